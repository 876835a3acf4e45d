//! The Lua scripts that make checkpoint writes and lease changes atomic on the server.

/// Checks every checkpoint (ARGV: n, then partition, fence, position-hex, value per
/// checkpoint) against the hash KEYS[1] and the lease hash KEYS[2]; writes all of them or
/// none. Returns 0, or the 1-based index of the first refused checkpoint.
pub(super) const COMMIT: &str = r#"
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local field, fence, pos = ARGV[2 + i * 4], tonumber(ARGV[3 + i * 4]), ARGV[4 + i * 4]
  local lease = redis.call('HGET', KEYS[2], field)
  if lease then
    local epoch = tonumber(string.match(lease, '^(%d+)|'))
    if fence < epoch then return i + 1 end
  end
  local old = redis.call('HGET', KEYS[1], field)
  if old then
    local bar = string.find(old, '|', 1, true)
    local old_fence = tonumber(string.sub(old, 1, bar - 1))
    local old_pos = string.sub(old, bar + 1)
    if fence < old_fence then return i + 1 end
    if #pos < #old_pos or (#pos == #old_pos and pos < old_pos) then return i + 1 end
  end
end
for i = 0, n - 1 do
  redis.call('HSET', KEYS[1], ARGV[2 + i * 4], ARGV[5 + i * 4])
end
return 0
"#;

/// The server's clock in ms, in a script.
pub(super) const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Takes the lease KEYS[1][ARGV[1]] for owner ARGV[2], ttl ARGV[3] ms, stealing epoch
/// ARGV[4] (-1: no stealing). Returns the new epoch, or nil.
pub(super) const ACQUIRE: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
local epoch = 0
if old then
  local e, exp, fin, owner = string.match(old, '^(%d+)|(%d+)|(%d)|(.*)$')
  if fin == '1' then return false end
  if owner ~= '' and tonumber(exp) > now and tonumber(e) ~= tonumber(ARGV[4]) then
    return false
  end
  epoch = tonumber(e)
end
epoch = epoch + 1
redis.call('HSET', KEYS[1], ARGV[1],
  string.format('%d|%d|0|%s', epoch, now + tonumber(ARGV[3]), ARGV[2]))
return epoch
"#;

/// Changes the lease KEYS[1][ARGV[1]] if owner ARGV[2] holds it at epoch ARGV[3]: ARGV[4] is
/// `renew` (for ARGV[5] ms), `release` or `finish`. Returns 1, or nil if the lease was lost.
pub(super) const UPDATE: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return false end
local e, exp, fin, owner = string.match(old, '^(%d+)|(%d+)|(%d)|(.*)$')
if fin == '1' or owner ~= ARGV[2] or tonumber(e) ~= tonumber(ARGV[3]) then return false end
if ARGV[4] == 'renew' then
  redis.call('HSET', KEYS[1], ARGV[1],
    string.format('%s|%d|0|%s', e, now + tonumber(ARGV[5]), owner))
elseif ARGV[4] == 'release' then
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%s|%d|0|', e, now))
else
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%s|%d|1|', e, now))
end
return 1
"#;
