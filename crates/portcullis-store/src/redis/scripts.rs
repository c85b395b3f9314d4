//! The Lua scripts that make the Redis backend's multi-step operations atomic.

/// Fixed-window counter. KEYS[1] = counter; ARGV = cost, limit, window_ms.
/// Returns {allowed (0/1), count, reset_after_ms}.
pub(super) const WINDOW_LUA: &str = r#"
local cost = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local raw = redis.call('GET', KEYS[1])
local current = 0
local ttl = window
if raw then
  current = tonumber(raw)
  if current == nil then
    return redis.error_reply('PORTCULLIS_CORRUPT window counter is not a number')
  end
  ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], window)
    ttl = window
  end
end
if current + cost > limit then
  return {0, current, ttl}
end
if raw then
  if cost > 0 then
    redis.call('INCRBY', KEYS[1], cost)
  end
elseif cost > 0 then
  redis.call('SET', KEYS[1], cost, 'PX', window)
end
return {1, current + cost, ttl}
"#;

/// Rate limit: the arithmetic of [`crate::ratelimit`] (keep the two in step), on the
/// server's clock. KEYS[1] = state hash {s, a, b}; ARGV = algorithm (0 sliding window,
/// 1 token bucket), limit, period_ms, burst, cost, idle_ms.
/// Returns {allowed (0/1), remaining, reset_after_ms, retry_after_ms}.
pub(super) const RATE_LUA: &str = r#"
local algo = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local p = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local idle = tonumber(ARGV[6])
local eps = 1e-9
local function ceil_ms(x)
  local v = math.ceil(x - 1e-6)
  if v < 0 then v = 0 end
  return v
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local raw = redis.call('HMGET', KEYS[1], 's', 'a', 'b')
local have = raw[1] ~= false
local s, a, b = 0, 0, 0
if have then
  s = tonumber(raw[1])
  a = tonumber(raw[2])
  b = tonumber(raw[3])
  if s == nil or a == nil or b == nil then
    return redis.error_reply('PORTCULLIS_CORRUPT rate-limit state')
  end
end
local allowed, remaining, reset, retry
if algo == 0 then
  local start = now - (now % p)
  local cur, prev = 0, 0
  if have and s == start then
    cur, prev = a, b
  elseif have and s + p == start then
    cur, prev = 0, a
  elseif have and s > start then
    start = s
    cur, prev = a, b
  end
  local elapsed = now - start
  if elapsed < 0 then elapsed = 0 end
  if elapsed > p then elapsed = p end
  local est = prev * ((p - elapsed) / p) + cur
  local to_end = p - elapsed
  if est + cost <= limit + eps then
    cur = cur + cost
    allowed = 1
    remaining = math.max(0, math.floor(limit - est - cost + eps))
    reset = to_end
    retry = 0
  else
    allowed = 0
    local room = limit - cost - cur
    if room >= 0 and prev > 0 then
      retry = math.max(1, ceil_ms(p * (1 - room / prev)) - elapsed)
    elseif cost > limit then
      retry = p
    else
      local at = 0
      if cur > 0 then at = ceil_ms(p * (1 - (limit - cost) / cur)) end
      retry = to_end + at
    end
    remaining = math.max(0, math.floor(limit - est + eps))
    reset = retry
  end
  s, a, b = start, cur, prev
else
  local cap = math.max(burst, 1)
  local per_ms = math.max(limit, 1) / p
  local tokens, last = cap, now
  if have then tokens, last = a, s end
  if now > last then
    tokens = math.min(cap, tokens + (now - last) * per_ms)
    last = now
  end
  if tokens + eps >= cost then
    allowed = 1
    retry = 0
    tokens = math.max(0, tokens - cost)
  else
    allowed = 0
    if cost > cap then
      retry = p
    else
      retry = math.max(1, ceil_ms((cost - tokens) / per_ms))
    end
  end
  remaining = math.floor(tokens + eps)
  reset = ceil_ms((cap - tokens) / per_ms)
  s, a, b = last, tokens, 0
end
if allowed == 1 or have then
  redis.call('HSET', KEYS[1], 's', string.format('%.17g', s), 'a', string.format('%.17g', a),
    'b', string.format('%.17g', b))
  redis.call('PEXPIRE', KEYS[1], idle)
end
return {allowed, remaining, reset, retry}
"#;

/// Compare-and-set. KEYS[1] = key; ARGV = expected, new[, ttl_ms].
/// Returns 1 if the value was `expected` and is now `new`, else 0.
pub(super) const CAS_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"#;

/// Compare-and-delete. KEYS[1] = key; ARGV = expected. Returns 1 if deleted, else 0.
pub(super) const CAD_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
return redis.call('DEL', KEYS[1])
"#;
