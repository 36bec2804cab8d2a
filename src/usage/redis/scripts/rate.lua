local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local base = math.max(tat, now)
if base - now > tau then
  -- Written under another grant: at most a full backlog of this one, stored so that
  -- the limiter refills from now by this grant's measure.
  base = now + tau
  if ARGV[4] == '1' then
    redis.call('SET', KEYS[1], string.format('%d', base), 'PX', math.max(1, math.ceil(tau / 1000)))
  end
end
local ok = base + cost - now <= tau
if ok and ARGV[4] == '1' then
  local ttl = math.max(1, math.ceil((base + cost - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%d', base + cost), 'PX', ttl)
end
return {ok and 1 or 0, string.format('%d', base)}
