local fp = ARGV[4]
local seen = remembered(KEYS[2], fp)
if seen then return seen end
local limit = tonumber(ARGV[3])
local n = redis.call('SCARD', KEYS[1])
local holds = ARGV[2] ~= '' and redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1
local ans
if ARGV[1] == 'a' then
  if holds then ans = '1 ' .. n .. ' 1'
  elseif limit >= 0 and n >= limit then ans = '0 ' .. n .. ' 1'
  else redis.call('SADD', KEYS[1], ARGV[2]); ans = '1 ' .. (n + 1) .. ' 0' end
elseif ARGV[1] == 'r' then
  if holds then redis.call('SREM', KEYS[1], ARGV[2]); ans = '1 ' .. (n - 1) .. ' 0'
  else ans = '1 ' .. n .. ' 1' end
else
  local ok = holds or limit < 0 or n < limit
  ans = (ok and '1' or '0') .. ' ' .. n .. ' 1'
end
-- Only an admitted step is remembered: a denial changed nothing.
if fp ~= '' and ARGV[1] ~= 'k' and string.sub(ans, 1, 1) == '1' then
  redis.call('SET', KEYS[2], fp .. ' ' .. ans, 'PX', ARGV[5])
end
return {'ok', ans}
