-- orchestrator-kafka: every script of the Redis state store, in one script dispatched on ARGV[1].
--
-- Called as EVALSHA <sha> 0 <op> <prefix> <args...>. One script (one SHA, one SCRIPT LOAD) keeps the
-- key layout and the index bookkeeping in one place. Keys are built here from the prefix and the
-- transaction ids instead of being passed as KEYS: the client then sends one packed argument per batch,
-- which is what keeps the client's CPU per transition low (DESIGN section 7). The price is that the
-- script targets a single Redis (or a primary), not Redis Cluster.
--
-- Key layout (P = prefix, tx = transaction id):
--   P:{tx}          hash  v (version), ctx (SagaContext JSON), wf (workflow id), state
--   P:{tx}:ev       set   processed event ids; expires dedupe_ttl after the saga's last applied event
--   P:{tx}:outbox   zset  score = outbox id (the version that wrote it), member = encoded messages
--   P:{tx}:timers   set   ids of the saga's live timers (so delete can find them)
--   P:outboxes      set   tx ids with a non-empty outbox
--   P:timers        zset  score = due time (epoch seconds), member = timer id
--   P:timer         hash  timer id -> encoded Timer
--   P:idx:all, P:idx:wf:<workflow id>, P:idx:state:<state>   sets of tx ids
--
-- A Redis script is atomic (no other command runs in between, and AOF/replicas get its effects as one
-- transaction), but a runtime error half way would keep the writes made before it. So every check that
-- could fail is made before the first write of each transition, and the client validates the batch
-- before sending it. (A Redis out of memory refuses a script's first write, never a later one, so it
-- cannot cut a batch in two.) No `#!lua` shebang: it would make the read operations fail when memory is
-- full and require Redis 7.

local op = ARGV[1]
local P = ARGV[2]

local K_ALL = P .. ':idx:all'
local K_OUTBOXES = P .. ':outboxes'
local K_TIMERS = P .. ':timers'
local K_TIMER = P .. ':timer'

local function base_key(tx)
  return P .. ':{' .. tx .. '}'
end

-- Variadic commands in chunks: unpack() of a huge table would overflow Lua's C stack.
local function chunked(cmd, key, items)
  local n = #items
  for i = 1, n, 1000 do
    redis.call(cmd, key, unpack(items, i, math.min(i + 999, n)))
  end
end

-- Moves tx between the index sets; old_wf and old_st are false for a saga that did not exist.
local function reindex(tx, old_wf, old_st, wf, st)
  if not old_wf then
    redis.call('SADD', K_ALL, tx)
  end
  if old_wf ~= wf then
    if old_wf then
      redis.call('SREM', P .. ':idx:wf:' .. old_wf, tx)
    end
    redis.call('SADD', P .. ':idx:wf:' .. wf, tx)
  end
  if old_st ~= st then
    if old_st then
      redis.call('SREM', P .. ':idx:state:' .. old_st, tx)
    end
    redis.call('SADD', P .. ':idx:state:' .. st, tx)
  end
end

-- Appends the saga's outbox to reply: reply[2] = the newest outbox id (0 when empty), then every
-- entry, oldest first.
local function with_outbox(reply, base)
  local entries = redis.call('ZRANGE', base .. ':outbox', 0, -1, 'WITHSCORES')
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

local function cancel_timers(base, ids)
  if #ids > 0 then
    chunked('ZREM', K_TIMERS, ids)
    chunked('HDEL', K_TIMER, ids)
    chunked('SREM', base .. ':timers', ids)
  end
end

if op == 'apply' then
  -- ARGV[3] = dedupe ttl (seconds);
  -- ARGV[4] = JSON list of writes, each
  --   [event_id, tx, expected_version, new_version (0: no saga), ctx_len, workflow_id, state,
  --    outbox_entry_len (0: none), [[timer_id, due_at, timer_entry_len], ...], [cancel_timer_id, ...]];
  -- ARGV[5] = every write's ctx JSON, outbox entry and timer entries, in that order, back to back.
  -- The large values travel raw in ARGV[5] and are cut out with string.sub: decoding them as escaped
  -- JSON strings cost cjson as much time as all of a transition's Redis commands together.
  -- Reply, per write: {1 applied, outbox_id (0: it added none)} or {2 duplicate, outbox_id, entries...}
  -- or {3 conflict} or {4 unchanged}. An applied write's messages are the client's own: older entries
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
    local eid, tx, expected, nv = w[1], w[2], w[3], w[4]
    local timers = w[9]
    -- This write's values are data[at, pos - 1], whatever becomes of it.
    local at = pos
    pos = pos + w[5] + w[8]
    for j = 1, #timers do
      pos = pos + timers[j][3]
    end
    local base = base_key(tx)
    local evkey = base .. ':ev'
    -- Recording the event id first tells a duplicate in one command; the rarer outcomes that must not
    -- record it (conflict, unchanged) take it back.
    if redis.call('SADD', evkey, eid) == 0 then
      out[i] = with_outbox({2}, base)
    else
      local cur = redis.call('HMGET', base, 'v', 'wf', 'state')
      local version = tonumber(cur[1]) or 0
      if conflicted[tx] or version ~= expected then
        conflicted[tx] = true
        redis.call('SREM', evkey, eid)
        out[i] = {3}
      else
        cancel_timers(base, w[10])
        if nv == 0 then
          redis.call('SREM', evkey, eid)
          out[i] = {4}
        else
          redis.call('EXPIRE', evkey, ttl)
          local wf, st = w[6], w[7]
          local next_at = at + w[5]
          redis.call('HSET', base, 'v', nv, 'ctx', sub(data, at, next_at - 1), 'wf', wf, 'state', st)
          reindex(tx, cur[2], cur[3], wf, st)
          at = next_at
          if #timers > 0 then
            local tkey = base .. ':timers'
            local t_at = at + w[8]
            for j = 1, #timers do
              local t = timers[j]
              local t_next = t_at + t[3]
              redis.call('ZADD', K_TIMERS, t[2], t[1])
              redis.call('HSET', K_TIMER, t[1], sub(data, t_at, t_next - 1))
              redis.call('SADD', tkey, t[1])
              t_at = t_next
            end
          end
          if w[8] > 0 then
            redis.call('ZADD', base .. ':outbox', nv, sub(data, at, at + w[8] - 1))
            redis.call('SADD', K_OUTBOXES, tx)
            out[i] = {1, nv}
          else
            out[i] = {1, 0}
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
    out[i] = redis.call('HGET', base_key(ids[i]), 'ctx')
  end
  return out

elseif op == 'save' then
  -- ARGV[3..7] = tx, version, ctx JSON, workflow id, state.
  local tx = ARGV[3]
  local base = base_key(tx)
  local cur = redis.call('HMGET', base, 'wf', 'state')
  redis.call('HSET', base, 'v', ARGV[4], 'ctx', ARGV[5], 'wf', ARGV[6], 'state', ARGV[7])
  reindex(tx, cur[1], cur[2], ARGV[6], ARGV[7])
  return 1

elseif op == 'delete' then
  -- ARGV[3] = tx. Reply: 1 if the saga existed. The processed event ids stay until they expire, so a
  -- late redelivery of an old event is still recognised as a duplicate.
  local tx = ARGV[3]
  local base = base_key(tx)
  local cur = redis.call('HMGET', base, 'wf', 'state')
  local existed = redis.call('EXISTS', base)
  local timer_ids = redis.call('SMEMBERS', base .. ':timers')
  if #timer_ids > 0 then
    chunked('ZREM', K_TIMERS, timer_ids)
    chunked('HDEL', K_TIMER, timer_ids)
  end
  redis.call('DEL', base, base .. ':outbox', base .. ':timers')
  redis.call('SREM', K_OUTBOXES, tx)
  if existed == 1 then
    redis.call('SREM', K_ALL, tx)
    if cur[1] then
      redis.call('SREM', P .. ':idx:wf:' .. cur[1], tx)
    end
    if cur[2] then
      redis.call('SREM', P .. ':idx:state:' .. cur[2], tx)
    end
  end
  return existed

elseif op == 'ack' then
  -- ARGV[3] = JSON list of [tx, outbox_id]: forget the entries with id <= outbox_id.
  local acks = cjson.decode(ARGV[3])
  for i = 1, #acks do
    local tx = acks[i][1]
    local key = base_key(tx) .. ':outbox'
    redis.call('ZREMRANGEBYSCORE', key, '-inf', acks[i][2])
    if redis.call('EXISTS', key) == 0 then
      redis.call('SREM', K_OUTBOXES, tx)
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
    local page = redis.call('SSCAN', K_OUTBOXES, cursor, 'COUNT', 200)
    cursor = page[1]
    local members = page[2]
    for i = 1, #members do
      if #out >= limit then
        break
      end
      local tx = members[i]
      if not seen[tx] then
        seen[tx] = true
        local reply = with_outbox({tx}, base_key(tx))
        if reply[2] == 0 then
          redis.call('SREM', K_OUTBOXES, tx)  -- stale: its outbox is gone
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
  local ids = redis.call('ZRANGEBYSCORE', K_TIMERS, '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
  local out = {}
  for i = 1, #ids do
    local entry = redis.call('HGET', K_TIMER, ids[i])
    if entry then
      redis.call('ZADD', K_TIMERS, ARGV[5], ids[i])
      out[#out + 1] = entry
    else
      redis.call('ZREM', K_TIMERS, ids[i])  -- no fields: nothing to fire
    end
  end
  return out
end

return redis.error_reply('orchestrator-kafka: unknown script operation ' .. tostring(op))
