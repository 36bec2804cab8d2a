local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local overage = ARGV[3] == '1'
local mode = ARGV[4]
local now = tonumber(ARGV[5])
local fp = ARGV[8]
local seen = remembered(KEYS[3], fp)
if seen then return seen end
local holds = redis.call('HGETALL', KEYS[2])
for i = 1, #holds, 2 do
  local a, e = string.match(holds[i + 1], '^(%d+) (%-?%d+)')
  if tonumber(e) <= now then
    redis.call('HINCRBY', KEYS[1], 'used', -tonumber(a))
    redis.call('HDEL', KEYS[2], holds[i])
  end
end
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
if mode == 'c' and not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[15]) then
  -- Already applied (this call timed out and its units were sent again).
  return {'ok', '1 ' .. used .. ' ' .. used}
end
local fits = limit < 0 or used + amount <= limit
local admitted = 0
local after = used
if mode == 'k' then
  if fits or overage then admitted = 1 end
elseif mode == 'c' then
  if fits or overage then
    after = redis.call('HINCRBY', KEYS[1], 'used', amount)
    admitted = 1
  end
elseif fits then
  after = redis.call('HINCRBY', KEYS[1], 'used', amount)
  admitted = 1
  redis.call('HSET', KEYS[2], ARGV[10], amount .. ' ' .. ARGV[11])
  redis.call('PEXPIREAT', KEYS[2], ARGV[7])
  redis.call('HSET', KEYS[4], 'counter', KEYS[1], 'holds', KEYS[2], 'customer', ARGV[12],
    'feature', ARGV[13], 'window_start', ARGV[14], 'window_end', ARGV[6],
    'limit', ARGV[2], 'overage', ARGV[3])
  redis.call('PEXPIREAT', KEYS[4], ARGV[7])
end
if mode ~= 'k' and admitted == 1 then
  redis.call('HSET', KEYS[1], 'window_end', ARGV[6])
  redis.call('PEXPIREAT', KEYS[1], ARGV[7])
end
local ans = admitted .. ' ' .. after .. ' ' .. used
-- Only an admitted step is remembered: a denial changed nothing, and its retry is
-- decided afresh.
if fp ~= '' and mode ~= 'k' and admitted == 1 then
  redis.call('SET', KEYS[3], fp .. ' ' .. ans, 'PX', ARGV[9])
end
return {'ok', ans}
