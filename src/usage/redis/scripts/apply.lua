if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[4]) then
  local t = redis.call('HINCRBY', KEYS[1], 'used', ARGV[1])
  redis.call('HSET', KEYS[1], 'window_end', ARGV[2])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
  return t
end
return tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
