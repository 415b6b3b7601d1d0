-- orchestrator-kafka: every script of the Redis state store, in one script dispatched on ARGV[1].
--
-- Called as EVALSHA <sha> 0 <op> <prefix> <args...> (see script.py). One script (one SHA, one SCRIPT
-- LOAD) keeps the index bookkeeping in one place. Keys are built here instead of being passed as KEYS:
-- the client then sends one packed argument per batch, which is what keeps the client's CPU per
-- transition low (DESIGN section 7). The price is that the script targets a single Redis (or a
-- primary), not Redis Cluster.
--
-- This text runs after definitions generated from Python (script.py), so that the key layout and the
-- packed batch are defined once, there: K builds every key name (the layout: RedisKeys in keys.py),
-- H names a saga hash's fields (SagaField), W and T are the positions of a packed write's and timer's
-- fields, R the reply's status codes (packing.py). P is the key prefix.
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

-- Moves tx from the index set key_of(old) to key_of(new); old is false for a saga that did not exist.
local function move(key_of, tx, old, new)
  if old ~= new then
    if old then
      redis.call('SREM', key_of(old), tx)
    end
    redis.call('SADD', key_of(new), tx)
  end
end

-- Moves tx between the index sets; old_wf and old_st are false for a saga that did not exist.
local function reindex(tx, old_wf, old_st, wf, st)
  if not old_wf then
    redis.call('SADD', K.all_sagas, tx)
  end
  move(K.by_workflow, tx, old_wf, wf)
  move(K.by_state, tx, old_st, st)
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

if op == 'apply' then
  -- ARGV[3] = dedupe ttl (seconds); ARGV[4] = the packed batch: a JSON list with one row per write, by
  -- W (its timers' rows by T); ARGV[5] = the large values of every write (its ctx JSON, outbox entry
  -- and timer entries, in that order) back to back, cut out with string.sub.
  -- Reply, per write: {R.APPLIED, outbox_id (0: it added none)} or {R.DUPLICATE, outbox_id, entries...}
  -- or {R.CONFLICT} or {R.UNCHANGED}. An applied write's messages are the client's own: older entries
  -- still in the outbox are not its to publish (their writer or the recovery sweep publishes them).
  local ttl = ARGV[3]
  local writes = cjson.decode(ARGV[4])
  local data = ARGV[5]
  local sub = string.sub
  local pos = 1
  local out = {}
  -- A transaction that conflicted once conflicts for the rest of the batch: its later writes were
  -- computed on top of the one that failed.
  local conflicted = {}
  for i = 1, #writes do
    local w = writes[i]
    local eid, tx, nv = w[W.EVENT_ID], w[W.TX], w[W.NEW_VERSION]
    local ctx_len, outbox_len, timers = w[W.CONTEXT_LEN], w[W.OUTBOX_LEN], w[W.TIMERS]
    -- This write's values are data[at, pos - 1], whatever becomes of it.
    local at = pos
    pos = pos + ctx_len + outbox_len
    for j = 1, #timers do
      pos = pos + timers[j][T.ENTRY_LEN]
    end
    local base = K.saga(tx)
    local evkey = K.events(tx)
    -- Recording the event id first tells a duplicate in one command; the rarer outcomes that must not
    -- record it (conflict, unchanged) take it back.
    if redis.call('SADD', evkey, eid) == 0 then
      out[i] = with_outbox({R.DUPLICATE}, tx)
    else
      local cur = redis.call('HMGET', base, H.VERSION, H.WORKFLOW, H.STATE)
      local version = tonumber(cur[1]) or 0
      if conflicted[tx] or version ~= w[W.EXPECTED_VERSION] then
        conflicted[tx] = true
        redis.call('SREM', evkey, eid)
        out[i] = {R.CONFLICT}
      else
        cancel_timers(tx, w[W.CANCEL_TIMERS])
        if nv == 0 then
          redis.call('SREM', evkey, eid)
          out[i] = {R.UNCHANGED}
        else
          redis.call('EXPIRE', evkey, ttl)
          local wf, st = w[W.WORKFLOW], w[W.STATE]
          local next_at = at + ctx_len
          redis.call('HSET', base, H.VERSION, nv, H.CONTEXT, sub(data, at, next_at - 1), H.WORKFLOW, wf,
            H.STATE, st)
          reindex(tx, cur[2], cur[3], wf, st)
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
        end
      end
    end
  end
  return out

elseif op == 'load' then
  -- ARGV[3] = JSON list of tx ids. Reply: the ctx JSON of each, or nil.
  local ids = cjson.decode(ARGV[3])
  local out = {}
  for i = 1, #ids do
    out[i] = redis.call('HGET', K.saga(ids[i]), H.CONTEXT)
  end
  return out

elseif op == 'save' then
  -- ARGV[3..7] = tx, version, ctx JSON, workflow id, state.
  local tx = ARGV[3]
  local base = K.saga(tx)
  local cur = redis.call('HMGET', base, H.WORKFLOW, H.STATE)
  redis.call('HSET', base, H.VERSION, ARGV[4], H.CONTEXT, ARGV[5], H.WORKFLOW, ARGV[6], H.STATE, ARGV[7])
  reindex(tx, cur[1], cur[2], ARGV[6], ARGV[7])
  return 1

elseif op == 'delete' then
  -- ARGV[3] = tx. Reply: 1 if the saga existed. The processed event ids stay until they expire, so a
  -- late redelivery of an old event is still recognised as a duplicate.
  local tx = ARGV[3]
  local base = K.saga(tx)
  local tkey = K.saga_timers(tx)
  local cur = redis.call('HMGET', base, H.WORKFLOW, H.STATE)
  local existed = redis.call('EXISTS', base)
  local timer_ids = redis.call('SMEMBERS', tkey)
  if #timer_ids > 0 then
    chunked('ZREM', K.timers, timer_ids)
    chunked('HDEL', K.timer_entries, timer_ids)
  end
  redis.call('DEL', base, K.outbox(tx), tkey)
  redis.call('SREM', K.outboxes, tx)
  if existed == 1 then
    redis.call('SREM', K.all_sagas, tx)
    if cur[1] then
      redis.call('SREM', K.by_workflow(cur[1]), tx)
    end
    if cur[2] then
      redis.call('SREM', K.by_state(cur[2]), tx)
    end
  end
  return existed

elseif op == 'ack' then
  -- ARGV[3] = JSON list of [tx, outbox_id]: forget the entries with id <= outbox_id.
  local acks = cjson.decode(ARGV[3])
  for i = 1, #acks do
    local tx = acks[i][1]
    local key = K.outbox(tx)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', acks[i][2])
    if redis.call('EXISTS', key) == 0 then
      redis.call('SREM', K.outboxes, tx)
    end
  end
  return #acks

elseif op == 'pending' then
  -- ARGV[3] = limit. Reply: {tx, outbox_id, entries...} per saga with a non-empty outbox.
  -- SSCAN, not SMEMBERS: after an outage the set can be large and only `limit` are wanted.
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
  -- claims until then, and due again if its claimer dies) and returned. Reply: timer entries.
  local ids = redis.call('ZRANGEBYSCORE', K.timers, '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
  local out = {}
  for i = 1, #ids do
    local entry = redis.call('HGET', K.timer_entries, ids[i])
    if entry then
      redis.call('ZADD', K.timers, ARGV[5], ids[i])
      out[#out + 1] = entry
    else
      redis.call('ZREM', K.timers, ids[i])  -- no fields: nothing to fire
    end
  end
  return out
end

return redis.error_reply('orchestrator-kafka: unknown script operation ' .. tostring(op))
