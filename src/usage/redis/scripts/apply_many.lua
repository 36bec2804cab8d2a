local fresh = redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
local out = {}
for i = 2, #KEYS do
  local j = (i - 2) * 3 + 2
  local u = tonumber(ARGV[j])
  if fresh and u > 0 then
    local t = redis.call('HINCRBY', KEYS[i], 'used', u)
    out[#out + 1] = t
    if t == u then
      -- A new window key: its end and expiry, once.
      redis.call('HSET', KEYS[i], 'window_end', ARGV[j + 1])
      redis.call('PEXPIREAT', KEYS[i], ARGV[j + 2])
    end
  else
    out[#out + 1] = tonumber(redis.call('HGET', KEYS[i], 'used') or '0')
  end
end
return out
