-- orchestrator-kafka: every script of the Redis state store, in one script dispatched on ARGV[1].
--
-- Called as EVALSHA <sha> 1 <a key of the partition> <op> <the partition's prefix> <args...> (see
-- script.py and store.py). One script (one SHA, one SCRIPT LOAD) keeps the index bookkeeping in one
-- place. Keys are built here instead of being passed as KEYS: the client then sends one packed argument
-- per batch, which is what keeps the client's CPU per transition low (DESIGN section 7). Every key a
-- call builds starts with the partition's prefix, hash tag included, so a call touches one Redis
-- Cluster slot, the one of the key it declares.
--
-- This text runs after definitions generated from Python (script.py), so that the key layout and the
-- packed batch are defined once, there: K builds every key name (the layout: RedisKeys in keys.py),
-- W and T are the positions of a packed write's and timer's fields, RF those of a saga's record (with
-- RECORD_FIELDS, SEP, EVENTS_KEPT and DIGEST_LEN), R the reply's status codes, FINAL the ended states,
-- each with its retention's position in {retention, failed retention} (packing.py). P is the key
-- prefix.
--
-- A Redis script is atomic (no other command runs in between, and AOF/replicas get its effects as one
-- transaction), but a runtime error half way would keep the writes made before it. So every check that
-- could fail is made before the first write of each transition, and the client validates the batch
-- before sending it. (A Redis out of memory refuses a script's first write, never a later one, so it
-- cannot cut a batch in two.) No `#!lua` shebang: it would make the read operations fail when memory is
-- full and require Redis 7.

local op = ARGV[1]

-- Variadic commands in chunks: unpack() of a huge table would overflow Lua's C stack.
local function chunked(cmd, key, items)
  local n = #items
  for i = 1, n, 1000 do
    redis.call(cmd, key, unpack(items, i, math.min(i + 999, n)))
  end
end

-- Moves tx to the index of (st, wf), scored by `score` (epoch ms), when the state or workflow changed:
-- old_wf and old_st are false for a saga that did not exist. An unchanged saga writes no index.
local function reindex(tx, old_wf, old_st, wf, st, score)
  if old_wf == wf and old_st == st then
    return
  end
  if old_wf and old_st then
    redis.call('ZREM', K.index(old_st, old_wf), tx)
  else
    redis.call('SADD', K.workflows, wf)
  end
  redis.call('ZADD', K.index(st, wf), score, tx)
end

-- The keys of tx beside its record that expire with it (the record expires by its own SET ... EX).
local function own_keys(tx)
  return {K.outbox(tx), K.saga_timers(tx)}
end

-- Gives tx's other keys the expiry `ttl` (seconds; '0' takes any expiry away).
local function expire_with_record(tx, ttl)
  for _, key in ipairs(own_keys(tx)) do
    if ttl == '0' then
      redis.call('PERSIST', key)
    else
      redis.call('EXPIRE', key, ttl)
    end
  end
end

-- A saga's record, a string: its fields by RF, each <length> SEP <bytes>, then the saga's JSON.
-- Parsed with string.find and string.sub, never cjson: the record is read on every transition.
local sub = string.sub
local function parse(rec)
  local f, pos = {}, 1
  for i = 1, RECORD_FIELDS do
    local colon = string.find(rec, SEP, pos, true)
    local len = tonumber(sub(rec, pos, colon - 1))
    f[i] = sub(rec, colon + 1, colon + len)
    pos = colon + len + 1
  end
  return f, pos
end

local function record(version, st, wf, events, ctx)
  local f = {}
  f[RF.VERSION], f[RF.STATE], f[RF.WORKFLOW], f[RF.EVENTS] = tostring(version), st, wf, events
  local parts = {}
  for i = 1, RECORD_FIELDS do
    parts[i] = #f[i] .. SEP .. f[i]
  end
  parts[RECORD_FIELDS + 1] = ctx
  return table.concat(parts)
end

-- RF.EVENTS holds the digests (DIGEST_LEN bytes each) of the saga's last EVENTS_KEPT applied events.
local function seen(events, digest)
  for j = 1, #events, DIGEST_LEN do
    if sub(events, j, j + DIGEST_LEN - 1) == digest then
      return true
    end
  end
  return false
end

local function remember(events, digest)
  events = events .. digest
  local keep = EVENTS_KEPT * DIGEST_LEN
  if #events > keep then
    events = sub(events, #events - keep + 1)
  end
  return events
end

-- The saga's retention in seconds for state st ('0' for none).
local function ttl_of(st, retention)
  local kind = FINAL[st]
  return kind and retention[kind] or '0'
end

-- Writes tx's record, with the expiry its state gives it (a plain SET takes any earlier one away).
local function put(tx, value, ttl)
  if ttl == '0' then
    redis.call('SET', K.saga(tx), value)
  else
    redis.call('SET', K.saga(tx), value, 'EX', ttl)
  end
end

-- Appends tx's outbox to reply: reply[2] = the newest outbox id (0 when empty), then every entry,
-- oldest first.
local function with_outbox(reply, tx)
  local entries = redis.call('ZRANGE', K.outbox(tx), 0, -1, 'WITHSCORES')
  local n = #entries
  if n == 0 then
    reply[2] = 0
    return reply
  end
  reply[2] = tonumber(entries[n])
  for i = 1, n, 2 do
    reply[#reply + 1] = entries[i]
  end
  return reply
end

local function cancel_timers(tx, ids)
  if #ids > 0 then
    chunked('ZREM', K.timers, ids)
    chunked('HDEL', K.timer_entries, ids)
    chunked('SREM', K.saga_timers(tx), ids)
  end
end

-- Forgets published outbox entries. `acks` holds, per acknowledgement, packed by ACK_FORMAT (Lua's
-- struct, read in C), an outbox id and a transaction id: its saga's entries with ids up to it go or, with
-- `only`, that entry alone (an older one may be another writer's, not published yet). Returns how many.
-- An acknowledgement `only` (the orchestrator's own, after every batch) leaves the saga in K.outboxes:
-- its next write would add it back, and the sweep ('pending') takes out a saga whose outbox is empty.
-- Checking for an empty outbox and taking the saga out here cost two commands per step: 3.4-3.9 us of
-- Redis's ~45 us per step in a replay of the hot path's calls, of which the sweep's taking out the
-- saga later costs back ~7 us once per saga (BENCHMARKS.md, 2026-12-06, night).
local function ack(acks, only)
  local pos, n, count = 1, #acks, 0
  while pos <= n do
    local id, tx
    id, tx, pos = struct.unpack(ACK_FORMAT, acks, pos)
    local key = K.outbox(tx)
    if only then
      redis.call('ZREMRANGEBYSCORE', key, id, id)
    else
      redis.call('ZREMRANGEBYSCORE', key, '-inf', id)
      if redis.call('EXISTS', key) == 0 then
        redis.call('SREM', K.outboxes, tx)
      end
    end
    count = count + 1
  end
  return count
end

if op == 'apply' then
  -- ARGV[3] = the packed batch: a JSON list with one row per write, by W (its timers' rows by T);
  -- ARGV[4] = the large values of every write (its ctx JSON, outbox entry and timer entries, in that
  -- order) back to back, cut out with string.sub; ARGV[5], ARGV[6] = the retention of an ended and of
  -- a failed saga (seconds; '0' keeps it); ARGV[7] = acknowledgements of this partition's published
  -- entries, each of its entry alone (see ack), applied first: they ride on the write that follows
  -- them instead of making a call (and an AOF fsync) of their own.
  -- Reply, per write: {R.APPLIED, outbox_id (0: it added none)} or {R.DUPLICATE, outbox_id, entries...}
  -- or {R.CONFLICT} or {R.UNCHANGED}. An applied write's messages are the client's own: older entries
  -- still in the outbox are not its to publish (their writer or the recovery sweep publishes them).
  if ARGV[7] then
    ack(ARGV[7], true)
  end
  local writes = cjson.decode(ARGV[3])
  local data = ARGV[4]
  local retention = {ARGV[5], ARGV[6]}
  local pos = 1
  local out = {}
  -- A transaction that conflicted once conflicts for the rest of the batch: its later writes were
  -- computed on top of the one that failed.
  local conflicted = {}
  for i = 1, #writes do
    local w = writes[i]
    local digest, tx, nv = w[W.EVENT_DIGEST], w[W.TX], w[W.NEW_VERSION]
    local ctx_len, outbox_len, timers = w[W.CONTEXT_LEN], w[W.OUTBOX_LEN], w[W.TIMERS]
    -- This write's values are data[at, pos - 1], whatever becomes of it.
    local at = pos
    pos = pos + ctx_len + outbox_len
    for j = 1, #timers do
      pos = pos + timers[j][T.ENTRY_LEN]
    end
    local rec = redis.call('GET', K.saga(tx))
    local f = rec and parse(rec)
    -- A duplicate: one of the saga's recent events, or an event of a deleted saga (its tombstone).
    -- Older events of a saga are the engine's to recognise, from the saga itself.
    local dup
    if f then
      dup = seen(f[RF.EVENTS], digest)
    else
      dup = redis.call('SISMEMBER', K.events(tx), digest) == 1
    end
    if dup then
      out[i] = with_outbox({R.DUPLICATE}, tx)
    else
      local version = f and tonumber(f[RF.VERSION]) or 0
      if conflicted[tx] or version ~= w[W.EXPECTED_VERSION] then
        conflicted[tx] = true
        out[i] = {R.CONFLICT}
      else
        cancel_timers(tx, w[W.CANCEL_TIMERS])
        if nv == 0 then
          out[i] = {R.UNCHANGED}
        else
          local wf, st = w[W.WORKFLOW], w[W.STATE]
          local next_at = at + ctx_len
          local ttl = ttl_of(st, retention)
          put(tx, record(nv, st, wf, remember(f and f[RF.EVENTS] or '', digest), sub(data, at, next_at - 1)), ttl)
          reindex(tx, f and f[RF.WORKFLOW], f and f[RF.STATE], wf, st, w[W.UPDATED_MS])
          at = next_at
          if #timers > 0 then
            local tkey = K.saga_timers(tx)
            local t_at = at + outbox_len
            for j = 1, #timers do
              local t = timers[j]
              local t_next = t_at + t[T.ENTRY_LEN]
              redis.call('ZADD', K.timers, t[T.DUE_AT], t[T.ID])
              redis.call('HSET', K.timer_entries, t[T.ID], sub(data, t_at, t_next - 1))
              redis.call('SADD', tkey, t[T.ID])
              t_at = t_next
            end
          end
          if outbox_len > 0 then
            redis.call('ZADD', K.outbox(tx), nv, sub(data, at, at + outbox_len - 1))
            redis.call('SADD', K.outboxes, tx)
            out[i] = {R.APPLIED, nv}
          else
            out[i] = {R.APPLIED, 0}
          end
          -- After the outbox and timers, so that keys made by this write expire with the record. Only
          -- an ended saga pays for it: the engine never moves one back, so a running saga's keys never
          -- had an expiry to take away.
          if ttl ~= '0' then
            expire_with_record(tx, ttl)
          end
        end
      end
    end
  end
  return out

elseif op == 'load' then
  -- ARGV[3..] = tx ids. Reply: the record of each, or nil.
  local out = {}
  for i = 3, #ARGV do
    out[i - 2] = redis.call('GET', K.saga(ARGV[i]))
  end
  return out

elseif op == 'save' then
  -- ARGV[3..8] = tx, version, ctx JSON, workflow id, state, updated_at (epoch ms); ARGV[9], ARGV[10]
  -- = the retentions, as for apply. A repair writes the index even when nothing indexed changed, so
  -- that it can also mend an index.
  -- The saga keeps the events it remembers.
  local tx = ARGV[3]
  local rec = redis.call('GET', K.saga(tx))
  local f = rec and parse(rec)
  local ttl = ttl_of(ARGV[7], {ARGV[9], ARGV[10]})
  put(tx, record(ARGV[4], ARGV[7], ARGV[6], f and f[RF.EVENTS] or '', ARGV[5]), ttl)
  if f then
    redis.call('ZREM', K.index(f[RF.STATE], f[RF.WORKFLOW]), tx)
  end
  reindex(tx, false, false, ARGV[6], ARGV[7], ARGV[8])
  expire_with_record(tx, ttl)
  return 1

elseif op == 'delete' then
  -- ARGV[3] = tx, ARGV[4] = how long (seconds) its events stay known. Reply: 1 if the saga existed. The
  -- digests of its recent events move to a tombstone that expires after ARGV[4], so a late redelivery
  -- of one is still recognised as a duplicate.
  local tx = ARGV[3]
  local base = K.saga(tx)
  local tkey = K.saga_timers(tx)
  local rec = redis.call('GET', base)
  local timer_ids = redis.call('SMEMBERS', tkey)
  if #timer_ids > 0 then
    chunked('ZREM', K.timers, timer_ids)
    chunked('HDEL', K.timer_entries, timer_ids)
  end
  redis.call('DEL', base, K.outbox(tx), tkey)
  redis.call('SREM', K.outboxes, tx)
  if not rec then
    return 0
  end
  local f = parse(rec)
  redis.call('ZREM', K.index(f[RF.STATE], f[RF.WORKFLOW]), tx)
  local events = f[RF.EVENTS]
  if #events > 0 then
    local evkey = K.events(tx)
    for j = 1, #events, DIGEST_LEN do
      redis.call('SADD', evkey, sub(events, j, j + DIGEST_LEN - 1))
    end
    redis.call('EXPIRE', evkey, ARGV[4])
  end
  return 1

elseif op == 'trim' then
  -- ARGV[3], ARGV[4] = the score (epoch ms) before which an ended, and a failed, saga's index entry
  -- goes ('' keeps them). Reply: how many entries went. Its keys expired by themselves (or are about
  -- to: Redis expires on the clock of the server, this on the orchestrator's).
  local before = {ARGV[3], ARGV[4]}
  local removed = 0
  local wfs = redis.call('SMEMBERS', K.workflows)
  for st, kind in pairs(FINAL) do
    if before[kind] ~= '' then
      for i = 1, #wfs do
        removed = removed + redis.call('ZREMRANGEBYSCORE', K.index(st, wfs[i]), '-inf', '(' .. before[kind])
      end
    end
  end
  return removed

elseif op == 'ids' or op == 'page' then
  -- Reads the indexes of ARGV[3] (a workflow id; '' any) in the states ARGV[4..] (after the page's
  -- arguments, for 'page'). 'ids' replies every member. For 'page', ARGV[4] = limit, ARGV[5], ARGV[6] =
  -- the position to start after (score, and a tx id, or '' for after every member of that score; ''
  -- and '' start at the first), ARGV[7] = the score to stop before ('' none), states from ARGV[8].
  -- Replies {more (1 if an index may hold more), tx, score, tx, score, ...}, up to limit per index,
  -- unsorted: the client merges them. Each index costs O(log(n)^2 + limit), not O(n).
  local wfs = ARGV[3] == '' and redis.call('SMEMBERS', K.workflows) or {ARGV[3]}
  local is_page = op == 'page'
  local first_state = is_page and 8 or 4
  local limit = tonumber(ARGV[4])
  local after_score, after_tx, before = ARGV[5], ARGV[6], ARGV[7]
  local out = {}
  if is_page then
    out[1] = 0  -- the `more` flag
  end
  -- a <= b, byte by byte: Lua's own string order follows the server's locale, a sorted set's does not.
  local function le(a, b)
    local n = math.min(#a, #b)
    for i = 1, n do
      local x, y = string.byte(a, i), string.byte(b, i)
      if x ~= y then
        return x < y
      end
    end
    return #a <= #b
  end
  -- The rank of the first member of key after the position (after_score, after_tx).
  local function start_rank(key)
    if after_score == '' then
      return 0
    end
    local lo = redis.call('ZCOUNT', key, '-inf', '(' .. after_score)
    local ties = redis.call('ZCOUNT', key, after_score, after_score)
    if after_tx == '' or ties == 0 then
      return lo + ties
    end
    -- Members of one score are in byte order of their ids: find the first after after_tx.
    local hi = lo + ties
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if le(redis.call('ZRANGE', key, mid, mid)[1], after_tx) then
        lo = mid + 1
      else
        hi = mid
      end
    end
    return lo
  end
  for s = first_state, #ARGV do
    for i = 1, #wfs do
      local key = K.index(ARGV[s], wfs[i])
      if not is_page then
        for _, tx in ipairs(redis.call('ZRANGE', key, 0, -1)) do
          out[#out + 1] = tx
        end
      else
        local from = start_rank(key)
        local got = redis.call('ZRANGE', key, from, from + limit - 1, 'WITHSCORES')
        local n = 0
        for j = 1, #got, 2 do
          if before ~= '' and tonumber(got[j + 1]) >= tonumber(before) then
            break
          end
          out[#out + 1] = got[j]
          out[#out + 1] = got[j + 1]
          n = n + 1
        end
        if n == limit then
          out[1] = 1
        end
      end
    end
  end
  return out

elseif op == 'ack' then
  -- ARGV[3] = acknowledgements (see ack); ARGV[4] = '1' to forget only each entry named. Reply: how many.
  return ack(ARGV[3], ARGV[4] == '1')

elseif op == 'pending' then
  -- ARGV[3] = limit. Reply: {tx, outbox_id, entries...} per saga with a non-empty outbox.
  -- SSCAN, not SMEMBERS: after an outage the set can be large and only `limit` are wanted. It also
  -- holds the sagas whose entries their writer acknowledged since the last sweep (see ack): taken out
  -- here.
  local limit = tonumber(ARGV[3])
  local out = {}
  local seen = {}
  local cursor = '0'
  repeat
    local page = redis.call('SSCAN', K.outboxes, cursor, 'COUNT', 200)
    cursor = page[1]
    local members = page[2]
    for i = 1, #members do
      if #out >= limit then
        break
      end
      local tx = members[i]
      if not seen[tx] then
        seen[tx] = true
        local reply = with_outbox({tx}, tx)
        if reply[2] == 0 then
          redis.call('SREM', K.outboxes, tx)  -- stale: its outbox is gone
        else
          out[#out + 1] = reply
        end
      end
    end
  until cursor == '0' or #out >= limit
  return out

elseif op == 'claim' then
  -- ARGV[3..5] = now, limit, lease end. Each due timer is pushed to the lease end (hidden from other
  -- claims until then, and due again if its claimer dies) and returned. Reply: the due time of the
  -- partition's earliest timer after the claim (nil for none), then the claimed timers' entries.
  local ids = redis.call('ZRANGEBYSCORE', K.timers, '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
  local out = {false}
  for i = 1, #ids do
    local entry = redis.call('HGET', K.timer_entries, ids[i])
    if entry then
      redis.call('ZADD', K.timers, ARGV[5], ids[i])
      out[#out + 1] = entry
    else
      redis.call('ZREM', K.timers, ids[i])  -- no fields: nothing to fire
    end
  end
  local first = redis.call('ZRANGE', K.timers, 0, 0, 'WITHSCORES')
  if first[2] then
    out[1] = first[2]
  end
  return out
end

return redis.error_reply('orchestrator-kafka: unknown script operation ' .. tostring(op))
