//! The Lua scripts that make each engine operation one atomic step in Redis (scripts run alone on
//! the server, so two nodes never interleave inside one). Every key a script touches belongs to
//! one address and carries its hash tag, so they run unchanged on Redis Cluster.
//!
//! Keys of address `A` (see [`super::Keys`]; `sb` is the default namespace):
//! - `sb:{A}:s`: the stream. Entry id `<sequence>-0`; fields `p` (payload), `t` (`sent_at`, µs
//!   since the Unix epoch, from Redis's own clock, never going backwards), `z` (bytes charged to
//!   retention), `c` (bytes appended to the address up to and including this message), then
//!   `h:<key>` / value per header.
//! - `sb:{A}:m`: hash: `seq` (last sequence), `bytes` (retained bytes), `cum` (bytes appended
//!   ever), `t` (last `sent_at`),
//!   `epoch` (set when the address is created; a new one after DeleteAddress tells other nodes'
//!   streams the address they followed was deleted).
//! - `sb:{A}:dh` / `sb:{A}:dz`: dedup ids: hash id → sequence, and sorted set id → expiry (ms).
//! - `sb:{A}:groups`: set of group names.
//! - `sb:{A}:g:<group>`: hash: `next` (next new sequence), `inc` (incarnation; a deleted and
//!   re-created group gets a new one), `desc` (its settings as CreateGroup's error shows them),
//!   `wait` (ack_wait, ms; 0: at most once), `maxdel`, `maxpend`, `dlq`.
//! - `sb:{A}:g:<group>:l`: leases, sorted set sequence → due time (ms, Redis clock);
//!   `:q` the same sequences scored by sequence (to find those retention took);
//!   `:n` hash sequence → deliveries so far; `:o` hash sequence → lease holder.

/// Appends messages: assigns consecutive sequences, skips duplicates, trims to retention.
///
/// KEYS: stream, meta, dedup hash, dedup zset. ARGV: retention messages, retention bytes, dedup
/// window (ms, 0 = off), message count, epoch for a new address; then per message: message id
/// (`""`: none), size, header field count (2 per header), payload, header fields.
/// Returns `[d, (index, sequence) * d, first, sent_at]`: the `d` duplicates (their 0-based index
/// in the batch and the sequence they matched), the sequence of the first message stored (the
/// others follow it in order; 0 if none was stored), and the messages' `sent_at` (µs; the node
/// that sent them puts them in its own feed with it, see `feed`). A compact answer: the node
/// parses a few integers per call, not two per message.
pub(super) const SEND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local m = redis.call('HMGET', KEYS[2], 'seq', 'cum', 't')
local seq = tonumber(m[1] or '0')
local cum = tonumber(m[2] or '0')
local last_t = tonumber(m[3] or '0')
if now < last_t then now = last_t end
redis.call('HSETNX', KEYS[2], 'epoch', ARGV[5])
local now_ms = math.floor(now / 1000)
-- Numbers handed to redis.call are formatted with %.17g per call; the fields are strings made
-- once (`t`) or with %d (`c`), which costs Redis ~0.75 µs less per message.
local now_s = string.format('%d', now)
local window = tonumber(ARGV[3])
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms, 'LIMIT', 0, 100)
if #old > 0 then
  redis.call('ZREM', KEYS[4], unpack(old))
  redis.call('HDEL', KEYS[3], unpack(old))
end
local first = nil
local first_new = 0
local dups = {}
local i = 6
for k = 1, tonumber(ARGV[4]) do
  local id = ARGV[i]
  local size = ARGV[i + 1]
  local nf = tonumber(ARGV[i + 2])
  local dup = nil
  if id ~= '' and window > 0 then
    local prev = redis.call('HGET', KEYS[3], id)
    if prev then
      prev = tonumber(prev)
      if first == nil then
        local e = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
        if #e > 0 then first = tonumber(string.match(e[1][1], '^(%d+)')) else first = seq + 1 end
      end
      if prev >= first then dup = prev end
    end
  end
  if dup then
    dups[#dups + 1] = k - 1
    dups[#dups + 1] = dup
  else
    seq = seq + 1
    if first_new == 0 then first_new = seq end
    cum = cum + tonumber(size)
    if nf == 0 then
      redis.call('XADD', KEYS[1], string.format('%d-0', seq), 'p', ARGV[i + 3], 't', now_s, 'z', size, 'c', string.format('%d', cum))
    else
      local args = {'XADD', KEYS[1], string.format('%d-0', seq), 'p', ARGV[i + 3], 't', now_s, 'z', size, 'c', string.format('%d', cum)}
      for j = 1, nf do args[#args + 1] = ARGV[i + 3 + j] end
      redis.call(unpack(args))
    end
    if id ~= '' and window > 0 then
      redis.call('HSET', KEYS[3], id, seq)
      redis.call('ZADD', KEYS[4], now_ms + window, id)
    end
  end
  i = i + 4 + nf
end
-- Retention: every entry carries `c`, the bytes appended to the address up to and including
-- it, so the bytes retained from sequence s on are cum - (c(s) - z(s)): one entry read, not
-- one per evicted message. Sequences are dense, so the new first one is found directly (count)
-- or by binary search (bytes).
local function before(s)
  local e = redis.call('XRANGE', KEYS[1], string.format('%d-0', s), string.format('%d-0', s))
  local f = e[1][2]
  local c, z = 0, 0
  for q = 1, #f, 2 do
    if f[q] == 'c' then c = tonumber(f[q + 1]) elseif f[q] == 'z' then z = tonumber(f[q + 1]) end
  end
  return c - z
end
local len = redis.call('XLEN', KEYS[1])
local bytes = 0
if len > 0 then
  local oldest = seq - len + 1
  local from = oldest
  local maxn = tonumber(ARGV[1])
  local maxb = tonumber(ARGV[2])
  if len > maxn then from = seq - maxn + 1 end
  bytes = cum - before(from)
  if bytes > maxb then
    local lo, hi = from, seq
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cum - before(mid) <= maxb then hi = mid else lo = mid + 1 end
    end
    from = lo
    bytes = cum - before(from)
  end
  if from > oldest then redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-0', from)) end
end
redis.call('HSET', KEYS[2], 'seq', seq, 'bytes', bytes, 'cum', cum, 't', now)
local out = {#dups / 2}
for _, v in ipairs(dups) do out[#out + 1] = v end
out[#out + 1] = first_new
out[#out + 1] = now
return out
";

/// Shared by the scripts that place a reader: `position(kind, value, first, last)` returns the
/// first sequence at or after a start (`end`, `seq`, `time` in µs), or `nil` for a sequence past
/// `last + 1`. Sequences in the stream are dense, and `t` never decreases, so a time is found by
/// binary search.
const POSITION: &str = r"
local function seq_of(id) return tonumber(string.match(id, '^(%d+)')) end
local function first_seq(stream, last)
  local e = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #e > 0 then return seq_of(e[1][1]) end
  return last + 1
end
local function time_of(stream, s)
  local e = redis.call('XRANGE', stream, string.format('%d-0', s), string.format('%d-0', s))
  if #e == 0 then return nil end
  local f = e[1][2]
  for q = 1, #f, 2 do
    if f[q] == 't' then return tonumber(f[q + 1]) end
  end
  return 0
end
local function position(stream, kind, value, last)
  if kind == 'end' then return last + 1 end
  if kind == 'seq' then
    local n = tonumber(value)
    if n > last + 1 then return nil end
    return n
  end
  local want = tonumber(value)
  local lo = first_seq(stream, last)
  local hi = last + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local tm = time_of(stream, mid)
    if tm == nil or tm < want then lo = mid + 1 else hi = mid end
  end
  return lo
end
";

/// Where a fan-out reader starts. KEYS: stream, meta. ARGV: kind, value.
/// Returns `[next or -1 (past the end), last]`.
pub(super) fn start() -> String {
    format!(
        "{POSITION}
local last = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
local p = position(KEYS[1], ARGV[1], ARGV[2], last)
if p == nil then return {{-1, last}} end
return {{p, last}}
"
    )
}

/// Lua: `named_groups(set, prefix, max)`: how many named groups the groups set lists (the
/// default group `""` is not counted). When that reaches `max`, names whose hash has expired
/// (groups made by a read and unread for `--idle-group`) are dropped from the set first.
const NAMED_GROUPS: &str = r"
local function named_groups(set, prefix, max)
  local function count()
    return redis.call('SCARD', set) - redis.call('SISMEMBER', set, '')
  end
  local n = count()
  if n < max then return n end
  for _, g in ipairs(redis.call('SMEMBERS', set)) do
    if g ~= '' and redis.call('EXISTS', prefix .. g) == 0 then
      redis.call('SREM', set, g)
    end
  end
  return count()
end
";

/// CreateGroup. KEYS: stream, meta, group, groups set. ARGV: name, desc, wait (ms), maxdel,
/// maxpend, dlq, start kind, start value, incarnation, most named groups, prefix of group keys.
/// Returns `['created' | 'same', next]`, `['exists', desc]`, `['pastend', last]` or
/// `['toomany', max]`. A group a read made and CreateGroup names again is kept from then on
/// (no idle expiry).
pub(super) fn create_group() -> String {
    format!(
        "{POSITION}{NAMED_GROUPS}
local last = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
local ex = redis.call('HMGET', KEYS[3], 'desc', 'next')
if ex[1] then
  if ex[1] ~= ARGV[2] then return {{'exists', ex[1]}} end
  redis.call('PERSIST', KEYS[3])
  redis.call('HDEL', KEYS[3], 'auto')
  local first = first_seq(KEYS[1], last)
  local n = tonumber(ex[2])
  if n < first then n = first end
  return {{'same', n}}
end
if named_groups(KEYS[4], ARGV[11], tonumber(ARGV[10])) >= tonumber(ARGV[10]) then
  return {{'toomany', ARGV[10]}}
end
local p = position(KEYS[1], ARGV[7], ARGV[8], last)
if p == nil then return {{'pastend', last}} end
redis.call('HSET', KEYS[3], 'next', p, 'inc', ARGV[9], 'desc', ARGV[2], 'wait', ARGV[3],
  'maxdel', ARGV[4], 'maxpend', ARGV[5], 'dlq', ARGV[6])
redis.call('SADD', KEYS[4], ARGV[1])
local first = first_seq(KEYS[1], last)
if p < first then p = first end
return {{'created', p}}
"
    )
}

/// Takes messages for a group: due redeliveries first (dead-lettering those at
/// `max_deliveries`), then new ones up to `max_ack_pending`.
///
/// KEYS: stream, meta, group, leases, deliveries, holders, groups set, pending by sequence.
/// ARGV: name, max, holder,
/// expected incarnation (`""`: create the group at the end if missing), incarnation for a new
/// group, `1` if a new group starts at sequence 1 (the default group), desc for a new group,
/// byte budget of the batch, the address's length in bytes, most named groups, prefix of group
/// keys, idle expiry of a group made by a read (ms, 0: none). Messages go into the batch while
/// their encoded size (an upper bound: payload + address + headers' keys and values + 12 per
/// header + 64) fits the budget; a first message that does not fit is not taken and is named
/// in the reply instead.
/// A group made here (by a read) expires after the idle time without a take (each take
/// renews it); past the most named groups, making one is refused.
/// Returns `['deleted']`, `['toomany']` or `['ok', incarnation, dropped, next due in ms or -1, dlq, n, (seq,
/// attempt, fields) * n, d, (seq, deliveries, fields) * d, too large seq (0: none), its
/// bytes]`.
pub(super) fn take() -> String {
    format!("{NAMED_GROUPS}{TAKE}")
}

const TAKE: &str = r"
local g = KEYS[3]
local inc = redis.call('HGET', g, 'inc')
local last = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if not inc then
  if ARGV[4] ~= '' then return {'deleted'} end
  if ARGV[1] ~= '' and named_groups(KEYS[7], ARGV[11], tonumber(ARGV[10])) >= tonumber(ARGV[10]) then
    return {'toomany'}
  end
  local start = last + 1
  if ARGV[6] == '1' then start = 1 end
  inc = ARGV[5]
  redis.call('HSET', g, 'next', start, 'inc', inc, 'wait', 0, 'desc', ARGV[7])
  if ARGV[1] ~= '' then redis.call('HSET', g, 'auto', 1) end
  redis.call('SADD', KEYS[7], ARGV[1])
elseif ARGV[4] ~= '' and ARGV[4] ~= inc then
  return {'deleted'}
end
if ARGV[1] ~= '' and tonumber(ARGV[12]) > 0 and redis.call('HEXISTS', g, 'auto') == 1 then
  redis.call('PEXPIRE', g, ARGV[12])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cfg = redis.call('HMGET', g, 'wait', 'maxdel', 'maxpend', 'next', 'dlq')
local wait = tonumber(cfg[1] or '0')
local max = tonumber(ARGV[2])
local budget = tonumber(ARGV[8])
local alen = tonumber(ARGV[9])
local function cost(f)
  local c = alen + 64
  for i = 1, #f, 2 do
    local k = f[i]
    if k == 'p' then
      c = c + #f[i + 1]
    elseif string.sub(k, 1, 2) == 'h:' then
      c = c + #k - 2 + #f[i + 1] + 12
    end
  end
  return c
end
local msgs = {}
local dead = {}
local dropped = 0
local big_seq = 0
local big_bytes = 0
local full = false
if wait > 0 then
  -- Pending messages retention took are gone for good: reported now, not when they fall due.
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  local first = last + 1
  if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
  local gone = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', '(' .. first)
  for _, s in ipairs(gone) do
    redis.call('ZREM', KEYS[4], s)
    redis.call('ZREM', KEYS[8], s)
    redis.call('HDEL', KEYS[5], s)
    redis.call('HDEL', KEYS[6], s)
    dropped = dropped + 1
  end
  local maxdel = tonumber(cfg[2] or '0')
  local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, max)
  for _, s in ipairs(due) do
    local e = redis.call('XRANGE', KEYS[1], string.format('%d-0', s), string.format('%d-0', s))
    local att = tonumber(redis.call('HGET', KEYS[5], s) or '0')
    if #e == 0 then
      redis.call('ZREM', KEYS[4], s)
      redis.call('ZREM', KEYS[8], s)
      redis.call('HDEL', KEYS[5], s)
      redis.call('HDEL', KEYS[6], s)
      dropped = dropped + 1
    elseif maxdel > 0 and att >= maxdel then
      redis.call('ZADD', KEYS[4], now + wait, s)
      redis.call('HSET', KEYS[6], s, '!')
      redis.call('HINCRBY', g, 'deadlettered', 1)
      dead[#dead + 1] = s
      dead[#dead + 1] = att
      dead[#dead + 1] = e[1][2]
    elseif cost(e[1][2]) > budget then
      if #msgs == 0 then
        big_seq = s
        big_bytes = cost(e[1][2])
      end
      full = true
      break
    else
      budget = budget - cost(e[1][2])
      att = att + 1
      redis.call('HSET', KEYS[5], s, att)
      redis.call('ZADD', KEYS[4], now + wait, s)
      redis.call('HSET', KEYS[6], s, ARGV[3])
      redis.call('HINCRBY', g, 'redelivered', 1)
      msgs[#msgs + 1] = s
      msgs[#msgs + 1] = att
      msgs[#msgs + 1] = e[1][2]
    end
  end
end
local room = max - #msgs / 3
if full then room = 0 end
if wait > 0 then
  local left = tonumber(cfg[3] or '0') - redis.call('ZCARD', KEYS[4])
  if left < room then room = left end
end
local nxt = tonumber(cfg[4])
if room > 0 and nxt <= last then
  local es = redis.call('XRANGE', KEYS[1], string.format('%d-0', nxt), '+', 'COUNT', room)
  if #es == 0 then
    dropped = dropped + (last + 1 - nxt)
    nxt = last + 1
  else
    local f = tonumber(string.match(es[1][1], '^(%d+)'))
    if f > nxt then
      dropped = dropped + (f - nxt)
      nxt = f
    end
    for _, e in ipairs(es) do
      local s = string.match(e[1], '^(%d+)')
      local c = cost(e[2])
      if c > budget then
        if #msgs == 0 then
          big_seq = s
          big_bytes = c
        end
        break
      end
      budget = budget - c
      local att = 0
      if wait > 0 then
        att = 1
        redis.call('ZADD', KEYS[4], now + wait, s)
        redis.call('ZADD', KEYS[8], s, s)
        redis.call('HSET', KEYS[5], s, 1)
        redis.call('HSET', KEYS[6], s, ARGV[3])
      end
      msgs[#msgs + 1] = s
      msgs[#msgs + 1] = att
      msgs[#msgs + 1] = e[2]
      nxt = tonumber(s) + 1
    end
  end
  redis.call('HSET', g, 'next', nxt)
end
local due_in = -1
if wait > 0 then
  local d = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  if #d > 0 then
    due_in = tonumber(d[2]) - now
    if due_in < 0 then due_in = 0 end
  end
end
local r = {'ok', inc, dropped, due_in, cfg[5] or '', #msgs / 3}
for _, v in ipairs(msgs) do r[#r + 1] = v end
r[#r + 1] = #dead / 3
for _, v in ipairs(dead) do r[#r + 1] = v end
r[#r + 1] = big_seq
r[#r + 1] = big_bytes
return r
";

/// Ack, Nack (with a delay) or ExtendLease.
///
/// KEYS: stream, group, leases, deliveries, holders, pending by sequence. ARGV: op (`ack`,
/// `nack`, `extend`), delay
/// (ms), sequences... Returns `['nogroup']`, `['noack']` or `['ok', dlq, acked, n, not-pending * n, d,
/// (seq, deliveries, fields) * d]`.
pub(super) const SETTLE: &str = r"
local cfg = redis.call('HMGET', KEYS[2], 'inc', 'wait', 'maxdel', 'dlq')
if not cfg[1] then return {'nogroup'} end
local wait = tonumber(cfg[2] or '0')
if wait == 0 then return {'noack'} end
local maxdel = tonumber(cfg[3] or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first = nil
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
local notp = {}
local dead = {}
local acked = 0
for i = 3, #ARGV do
  local s = ARGV[i]
  local holder = redis.call('HGET', KEYS[5], s)
  if redis.call('ZSCORE', KEYS[3], s) and (first == nil or tonumber(s) < first) then
    -- Retention took it while it was pending: not pending any more.
    redis.call('ZREM', KEYS[3], s)
    redis.call('ZREM', KEYS[6], s)
    redis.call('HDEL', KEYS[4], s)
    redis.call('HDEL', KEYS[5], s)
    notp[#notp + 1] = s
  elseif not redis.call('ZSCORE', KEYS[3], s) or not holder or holder == '!' or holder == '-' then
    notp[#notp + 1] = s
  elseif op == 'ack' then
    acked = acked + 1
    redis.call('ZREM', KEYS[3], s)
    redis.call('ZREM', KEYS[6], s)
    redis.call('HDEL', KEYS[4], s)
    redis.call('HDEL', KEYS[5], s)
  elseif op == 'extend' then
    redis.call('ZADD', KEYS[3], now + wait, s)
  else
    local att = tonumber(redis.call('HGET', KEYS[4], s) or '0')
    local e = redis.call('XRANGE', KEYS[1], string.format('%d-0', s), string.format('%d-0', s))
    if #e == 0 then
      redis.call('ZREM', KEYS[3], s)
      redis.call('ZREM', KEYS[6], s)
      redis.call('HDEL', KEYS[4], s)
      redis.call('HDEL', KEYS[5], s)
    elseif maxdel > 0 and att >= maxdel then
      redis.call('ZADD', KEYS[3], now + wait, s)
      redis.call('HSET', KEYS[5], s, '!')
      redis.call('HINCRBY', KEYS[2], 'deadlettered', 1)
      dead[#dead + 1] = s
      dead[#dead + 1] = att
      dead[#dead + 1] = e[1][2]
    else
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), s)
      redis.call('HSET', KEYS[5], s, '-')
    end
  end
end
local r = {'ok', cfg[4] or '', acked, #notp}
for _, v in ipairs(notp) do r[#r + 1] = v end
r[#r + 1] = #dead / 3
for _, v in ipairs(dead) do r[#r + 1] = v end
return r
";

/// A dead letter is stored: forget its original. KEYS: group, leases, deliveries, holders,
/// pending by sequence.
/// ARGV: incarnation, sequences...
pub(super) const FINISH: &str = r"
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return 0 end
for i = 2, #ARGV do
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[5], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
return 1
";

/// A group stream ended: its leases fall due now. KEYS: group, leases, holders. ARGV:
/// incarnation, holder. Returns how many were released.
pub(super) const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HGETALL', KEYS[3])
local n = 0
for i = 1, #h, 2 do
  if h[i + 1] == ARGV[2] then
    redis.call('ZADD', KEYS[2], now, h[i])
    redis.call('HSET', KEYS[3], h[i], '-')
    n = n + 1
  end
end
return n
";

/// One address's figures. KEYS: stream, meta, groups set. ARGV: with groups (`1`/`0`), the
/// prefix of its group keys. Returns `[exists (0/1), retained, bytes, first, last, groups, (name, next, pending,
/// wait, maxdel, maxpend, dlq) * groups when asked]`.
pub(super) const INFO: &str = r"
local m = redis.call('HMGET', KEYS[2], 'seq', 'bytes')
if not m[1] then return {0} end
local last = tonumber(m[1])
local len = redis.call('XLEN', KEYS[1])
local first = 0
if len > 0 then
  local e = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  first = tonumber(string.match(e[1][1], '^(%d+)'))
end
local names = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  -- A group a read made that expired (--idle-group) is gone; the set forgets it lazily.
  if n == '' or redis.call('EXISTS', ARGV[2] .. n) == 1 then names[#names + 1] = n end
end
-- The default group exists from the address's creation, at sequence 1, even before its first
-- read.
local default = redis.call('SISMEMBER', KEYS[3], '') == 1
if not default then names[#names + 1] = '' end
local r = {1, len, tonumber(m[2] or '0'), first, last, #names}
if ARGV[1] == '1' then
  for _, n in ipairs(names) do
    local g = ARGV[2] .. n
    local c = redis.call('HMGET', g, 'next', 'wait', 'maxdel', 'maxpend', 'dlq', 'redelivered', 'deadlettered')
    if n == '' and not default then c[1] = 1 end
    r[#r + 1] = n
    r[#r + 1] = tonumber(c[1] or '0')
    r[#r + 1] = redis.call('ZCARD', g .. ':l')
    r[#r + 1] = tonumber(c[2] or '0')
    r[#r + 1] = tonumber(c[3] or '0')
    r[#r + 1] = tonumber(c[4] or '0')
    r[#r + 1] = c[5] or ''
    r[#r + 1] = tonumber(c[6] or '0')
    r[#r + 1] = tonumber(c[7] or '0')
  end
end
return r
";

/// DeleteGroup. KEYS: group, leases, deliveries, holders, groups set, pending by sequence.
/// ARGV: name. Returns 1 if
/// it existed.
pub(super) const DELETE_GROUP: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6])
redis.call('SREM', KEYS[5], ARGV[1])
return 1
";
