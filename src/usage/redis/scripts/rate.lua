local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local base = math.max(tat, now)
local ok = base + cost - now <= tau
if ok and ARGV[4] == '1' then
  local ttl = math.max(1, math.ceil((base + cost - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%d', base + cost), 'PX', ttl)
end
return {ok and 1 or 0, string.format('%d', tat)}
