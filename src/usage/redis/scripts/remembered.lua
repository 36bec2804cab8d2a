local function remembered(key, fp)
  if fp == '' then return nil end
  local prev = redis.call('GET', key)
  if not prev then return nil end
  local pfp, ans = string.match(prev, '^(%S+) (.*)$')
  if pfp ~= fp then return {'reused', ''} end
  return {'replay', ans}
end
