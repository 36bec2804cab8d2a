local fp = ARGV[5]
local seen = remembered(KEYS[4], fp)
if seen then return seen end
-- Only a settle that changed something is remembered (the reservation was open and
-- the commit fitted): a retry of any other is decided afresh.
local function finish(ans, remember)
  if fp ~= '' and remember then redis.call('SET', KEYS[4], fp .. ' ' .. ans, 'PX', ARGV[6]) end
  return {'ok', ans}
end
local h = redis.call('HGET', KEYS[3], ARGV[1])
local counter = redis.call('HGET', KEYS[1], 'counter')
if (not h) or counter ~= KEYS[2] then return finish('0 0 0 0 0 0', false) end
local a, e = string.match(h, '^(%d+) (%-?%d+)')
a = tonumber(a)
local now = tonumber(ARGV[4])
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit') or '-1')
local overage = redis.call('HGET', KEYS[1], 'overage') == '1'
if tonumber(e) <= now then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[1])
  redis.call('HINCRBY', KEYS[2], 'used', -a)
  return finish('0 0 0 0 0 0', false)
end
local actual = tonumber(ARGV[3])
local used
local committed, released, over = 0, 0, 0
if ARGV[2] == 'r' then
  used = redis.call('HINCRBY', KEYS[2], 'used', -a)
  released = a
elseif actual <= a then
  used = redis.call('HINCRBY', KEYS[2], 'used', actual - a)
  committed, released = actual, a - actual
else
  local cur = tonumber(redis.call('HGET', KEYS[2], 'used') or '0')
  local extra = actual - a
  if limit >= 0 and cur + extra > limit and not overage then
    return finish('1 0 0 0 1 ' .. cur, false)
  end
  used = redis.call('HINCRBY', KEYS[2], 'used', extra)
  committed = actual
  if limit >= 0 and used > limit then over = used - math.max(cur, limit) end
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1])
return finish('1 ' .. committed .. ' ' .. released .. ' ' .. over .. ' 0 ' .. used, true)
