"""The cluster's state transitions, as Lua scripts that Redis runs atomically.

Every rule that spans nodes is checked and applied inside one script, so no node ever
checks in one round trip and acts in another: an id's owner, the per-user cap, the
fencing epoch, the queue bounds, and each expiry step. Time is Redis's own (TIME), so
nodes' clocks never disagree about a deadline.

Keys (all under `eb:`; one Redis database is one cluster):
- `eb:ep:{id}`  hash, one endpoint: u user, o org, k keepAliveSeconds, r reminder (0/1),
  g origin (rest/mqtt), v version, s state, l last keepalive (Redis time), n node holding
  its MQTT connection ("" if none), lk that connection's keep-alive ("" if none), cs
  connected since (Unix time, "" if none), t its transport ("" if none), e fencing epoch,
  p persistent session (0/1), sb subscriptions (JSON topic -> QoS), qb bytes queued.
- `eb:q:{id}`   stream of queued QoS 1 events (field p), oldest first.
- `eb:u:{org}\\0{user}`, `eb:o:{org}`, `eb:all`: sets of ids, for targeting and listing.
- `eb:due`      sorted set, id -> when its next expiry step is due (SICK, then gone).
- `eb:n:{node}` set of ids whose connection a node holds; `eb:nodes` node -> heartbeat.
- `eb:blk:{id}` a logout block, with its TTL; `eb:idem:{scope}\\0{key}` an idempotency key.
- `eb:swept`, `eb:hold`: when the last sweep ran, and until when sweeps hold after a gap.
- `eb:epoch`    the cluster's epoch: a Redis that comes back empty has none, and the
  first heartbeat after that sets a new one, which tells every node to re-register.
Channel `eb:node:{node}` carries messages to one node (see cluster.node).

Fenced scripts take the node and the epoch the node got from its CONNECT, and do
nothing ("stale") unless the endpoint is still held by that node under that epoch.
"""

from __future__ import annotations

# Shared by every script. ARGV[1] and ARGV[2] are always the expiry grace ratio and minimum.
PRELUDE = r"""
local P = 'eb:'
local GRACE_RATIO = tonumber(ARGV[1])
local MIN_GRACE = tonumber(ARGV[2])
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function ekey(id) return P .. 'ep:' .. id end
local function period(k, lk)
  k = tonumber(k)
  if lk == false or lk == nil or lk == '' then return k end
  lk = tonumber(lk)
  if lk == 0 then return nil end
  if lk > k then return lk end
  return k
end
local function schedule(id)
  local f = redis.call('HMGET', ekey(id), 'k', 'lk', 'l', 's')
  if f[1] == false then redis.call('ZREM', P .. 'due', id) return end
  local per = period(f[1], f[2])
  if per == nil then redis.call('ZREM', P .. 'due', id) return end
  local deadline = tonumber(f[3]) + per
  if f[4] == 'SICK' then
    deadline = deadline + math.max(MIN_GRACE, per * GRACE_RATIO)
  end
  redis.call('ZADD', P .. 'due', deadline, id)
end
local function record(id) return redis.call('HGETALL', ekey(id)) end
local function ukey(org, user) return P .. 'u:' .. org .. '\0' .. user end
-- Drop an endpoint, its queue and its indexes; tell the node that holds it to close it.
local function drop(id, reason)
  local f = redis.call('HMGET', ekey(id), 'u', 'o', 'n', 'e')
  local before = record(id)
  local queued = redis.call('XLEN', P .. 'q:' .. id)
  redis.call('DEL', ekey(id), P .. 'q:' .. id)
  redis.call('SREM', ukey(f[2], f[1]), id)
  redis.call('SREM', P .. 'o:' .. f[2], id)
  redis.call('SREM', P .. 'all', id)
  redis.call('ZREM', P .. 'due', id)
  if f[3] ~= '' then
    redis.call('SREM', P .. 'n:' .. f[3], id)
    redis.call('PUBLISH', P .. 'node:' .. f[3], 'close ' .. id .. ' ' .. f[4] .. ' ' .. reason)
  end
  return before, queued
end
-- The caller's view of an endpoint: nil if visible, else the error to answer.
local function refused(f_user, f_org, user, org, service)
  if f_user == false then return 'notfound' end
  if service == '1' then return nil end
  if f_org ~= org then return 'notfound' end
  if f_user ~= user then return 'forbidden' end
  return nil
end
local function make(id, user, org, k, r, origin, t)
  redis.call('HSET', ekey(id), 'u', user, 'o', org, 'k', k, 'r', r, 'g', origin, 'v', 0,
    's', 'HEALTHY', 'l', t, 'n', '', 'lk', '', 'cs', '', 'e', 0, 'p', 0, 'sb', '{}', 'qb', 0)
  redis.call('SADD', ukey(org, user), id)
  redis.call('SADD', P .. 'o:' .. org, id)
  redis.call('SADD', P .. 'all', id)
end
-- Back to HEALTHY on a sign of life; returns the state it left, or false.
local function revive(id, t)
  local key = ekey(id)
  redis.call('HSET', key, 'l', t)
  local state = redis.call('HGET', key, 's')
  if state ~= 'HEALTHY' then
    redis.call('HSET', key, 's', 'HEALTHY')
    redis.call('HINCRBY', key, 'v', 1)
    return state
  end
  return false
end
-- A connection `node` held is gone with the node (or never was): the endpoint is held by no one.
-- A keep-alive-0 connection's last sign of life is `seen`. Returns the record, or nil if another
-- node holds it now.
local function release(id, node, seen)
  local key = ekey(id)
  local f = redis.call('HMGET', key, 'n', 'lk', 'p', 'l')
  redis.call('SREM', P .. 'n:' .. node, id)
  if f[1] ~= node then return nil end
  if f[2] == '0' and seen > tonumber(f[4]) then redis.call('HSET', key, 'l', seen) end
  redis.call('HSET', key, 'n', '', 'lk', '', 'cs', '', 't', '')
  if f[3] ~= '1' then redis.call('HSET', key, 'sb', '{}') end
  schedule(id)
  return record(id)
end
local function fenced(id, node, epoch)
  local f = redis.call('HMGET', ekey(id), 'n', 'e')
  return f[1] == node and f[2] == epoch
end
"""

# REST register: ARGV id, user, org, keepAliveSeconds, reminder (0/1), max endpoints per user.
REGISTER = PRELUDE + r"""
local id, user, org, k, r, cap = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local t = now()
local key = ekey(id)
if redis.call('EXISTS', key) == 0 then
  local count = redis.call('SCARD', ukey(org, user))
  if count >= cap then return {'full', tostring(count)} end
  make(id, user, org, k, r, 'rest', t)
  redis.call('DEL', P .. 'blk:' .. id)
  schedule(id)
  return {'created', false, record(id)}
end
local f = redis.call('HMGET', key, 'u', 'o', 'k', 'r', 'g', 'n')
if f[1] ~= user or f[2] ~= org then return {'conflict'} end
local changed = f[3] ~= k or f[4] ~= r or f[5] ~= 'rest'
redis.call('HSET', key, 'k', k, 'r', r, 'g', 'rest')
redis.call('HINCRBY', key, 'v', 1)
local left = revive(id, t)
schedule(id)
if f[6] ~= '' then redis.call('PUBLISH', P .. 'node:' .. f[6], 'refresh ' .. id) end
return {changed and 'updated' or 'same', left, record(id)}
"""

# REST keepalive: ARGV id, user, org, service (0/1), lease fraction of the period.
# Writes only when the state changes or the stored keepalive is older than the lease
# fraction of the period; otherwise it answers "deferred" with Redis's time and the stored
# keepalive, and the node writes it later (cluster.node.Leases), before it can matter.
KEEPALIVE = PRELUDE + r"""
local id, user, org, service, fraction = ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local key = ekey(id)
local f = redis.call('HMGET', key, 'u', 'o', 's', 'l', 'k', 'lk')
local no = refused(f[1], f[2], user, org, service)
if no then return {no} end
local t = now()
if f[3] ~= 'HEALTHY' then
  local left = revive(id, t)
  schedule(id)
  return {'revived', left, record(id)}
end
local per = period(f[5], f[6])
if per == nil then return {'written'} end  -- a keep-alive-0 connection holds it: no deadline to move
if t - tonumber(f[4]) >= per * fraction then
  redis.call('HSET', key, 'l', t)
  schedule(id)
  return {'written'}
end
return {'deferred', tostring(t), f[4], tostring(per)}
"""

# Lease renewal of keepalives a node saw but did not write yet: ARGV node, the cluster epoch
# the node knows, then triples (id, Redis time of the keepalive, epoch or "" for a REST
# keepalive, which is not fenced). Returns {stale ids, revived triples (id, state left,
# record)...}, or {"epoch"} if Redis's cluster epoch is not the node's: Redis came back
# empty, and what the node holds must be registered again (HEARTBEAT tells it), not dropped.
RENEW = PRELUDE + r"""
local node = ARGV[3]
if redis.call('GET', P .. 'epoch') ~= ARGV[4] then return {'epoch'} end
local stale, revived = {}, {}
for i = 5, #ARGV, 3 do
  local id, at, epoch = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local f = redis.call('HMGET', ekey(id), 'l', 's', 'n', 'e')
  if f[1] == false or (epoch ~= '' and (f[3] ~= node or f[4] ~= epoch)) then
    if epoch ~= '' then stale[#stale + 1] = id end
  else
    if at > tonumber(f[1]) then redis.call('HSET', ekey(id), 'l', at) end
    if epoch ~= '' and f[2] ~= 'HEALTHY' then
      local left = revive(id, math.max(at, tonumber(f[1])))
      revived[#revived + 1] = {id, left, record(id)}
    end
    schedule(id)
  end
end
return {stale, revived}
"""

# REST unregister: ARGV id, user, org, service (0/1), block seconds (0: no block).
UNREGISTER = PRELUDE + r"""
local id, user, org, service, block = ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local f = redis.call('HMGET', ekey(id), 'u', 'o')
local no = refused(f[1], f[2], user, org, service)
if no then return {no} end
local before, queued = drop(id, 'unregistered')
if block > 0 then redis.call('SET', P .. 'blk:' .. id, '1', 'PX', math.floor(block * 1000)) end
return {'removed', before, queued}
"""

# GET: ARGV id, user, org, service. Returns {status, now, record}.
VIEW = PRELUDE + r"""
local id, user, org, service = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local f = redis.call('HMGET', ekey(id), 'u', 'o')
local no = refused(f[1], f[2], user, org, service)
if no then return {no} end
return {'ok', tostring(now()), record(id)}
"""

# List: ARGV org ("" for any), user ("" for any). Returns {now, {id, record}...}.
LIST = PRELUDE + r"""
local org, user = ARGV[3], ARGV[4]
local ids
if org ~= '' and user ~= '' then ids = redis.call('SMEMBERS', ukey(org, user))
elseif org ~= '' then ids = redis.call('SMEMBERS', P .. 'o:' .. org)
else ids = redis.call('SMEMBERS', P .. 'all') end
local out = {tostring(now())}
for _, id in ipairs(ids) do
  local rec = record(id)
  if #rec > 0 then
    local f = redis.call('HMGET', ekey(id), 'u')
    if user == '' or f[1] == user then out[#out + 1] = {id, rec} end
  end
end
return out
"""

# MQTT CONNECT: ARGV id, user, org, MQTT keep-alive, node, persistent (0/1),
# default keep-alive for keep-alive 0, max keepAliveSeconds, max endpoints per user,
# transport (tcp, tls, websocket).
# Takes the endpoint over from any other node (whose connection is told to close) and
# moves the fencing epoch on. Returns {status, created, previous node, state left,
# session present, record}.
CONNECT = PRELUDE + r"""
local id, user, org, mka, node, persistent = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]
local default_ka, max_ka, cap, transport = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12]
if redis.call('EXISTS', P .. 'blk:' .. id) == 1 then return {'blocked'} end
local k = mka
if k == 0 then k = default_ka end
if k > max_ka then k = max_ka end
local t = now()
local key = ekey(id)
local created = false
local left = false
if redis.call('EXISTS', key) == 0 then
  local count = redis.call('SCARD', ukey(org, user))
  if count >= cap then return {'full', tostring(count)} end
  make(id, user, org, k, 0, 'mqtt', t)
  created = true
else
  local f = redis.call('HMGET', key, 'u', 'o', 'g', 'k')
  if f[1] ~= user or f[2] ~= org then return {'conflict'} end
  if f[3] == 'mqtt' and tonumber(f[4]) ~= k then
    redis.call('HSET', key, 'k', k)
    redis.call('HINCRBY', key, 'v', 1)
  end
  left = revive(id, t)
end
local g = redis.call('HMGET', key, 'n', 'p', 'sb')
local previous = g[1]
local epoch = redis.call('HINCRBY', key, 'e', 1)
local present = persistent == '1' and g[2] == '1' and g[3] ~= '{}'
if not present then redis.call('HSET', key, 'sb', '{}') end
redis.call('HSET', key, 'n', node, 'lk', mka, 'cs', t, 'p', persistent, 't', transport)
redis.call('SADD', P .. 'n:' .. node, id)
if previous ~= '' and previous ~= node then
  redis.call('SREM', P .. 'n:' .. previous, id)
  redis.call('PUBLISH', P .. 'node:' .. previous, 'close ' .. id .. ' ' .. (epoch - 1) .. ' taken over')
end
schedule(id)
return {'ok', created, previous, left, present, record(id)}
"""

# The connection ended: ARGV id, node, epoch, clean (0/1: a clean DISCONNECT, which
# unregisters an endpoint MQTT made), the Redis time of its last keepalive (the node may not
# have written it yet). Returns {"stale"}, {"removed", record, queued} or {"detached"}.
DETACH = PRELUDE + r"""
local id, node, epoch, clean, last = ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
if not fenced(id, node, epoch) then return {'stale'} end
local key = ekey(id)
local f = redis.call('HMGET', key, 'g', 'lk', 'p', 'l')
redis.call('SREM', P .. 'n:' .. node, id)
if clean == '1' and f[1] == 'mqtt' then
  redis.call('HSET', key, 'n', '')
  local before, queued = drop(id, 'disconnected')
  return {'removed', before, queued}
end
if f[2] == '0' then redis.call('HSET', key, 'l', now())
elseif last > tonumber(f[4]) then redis.call('HSET', key, 'l', last) end
redis.call('HSET', key, 'n', '', 'lk', '', 'cs', '', 't', '')
if f[3] ~= '1' then redis.call('HSET', key, 'sb', '{}') end
schedule(id)
return {'detached'}
"""

# Subscriptions of a held endpoint changed: ARGV id, node, epoch, JSON topic -> QoS.
SUBSCRIPTIONS = PRELUDE + r"""
local id, node, epoch, sb = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if not fenced(id, node, epoch) then return 'stale' end
redis.call('HSET', ekey(id), 'sb', sb)
return 'ok'
"""

# Events done with (every PUBLISH of them acknowledged): ARGV id, node, epoch, stream ids.
ACKNOWLEDGE = PRELUDE + r"""
local id, node, epoch = ARGV[3], ARGV[4], ARGV[5]
if not fenced(id, node, epoch) then return 'stale' end
local q = P .. 'q:' .. id
local freed = 0
for i = 6, #ARGV do
  local entry = redis.call('XRANGE', q, ARGV[i], ARGV[i])
  if #entry > 0 then
    freed = freed + #entry[1][2][2]
    redis.call('XDEL', q, ARGV[i])
  end
end
if freed > 0 then redis.call('HINCRBY', ekey(id), 'qb', -freed) end
return 'ok'
"""

# sendEvent: ARGV org, user, endpoint id ("" for all the user's), QoS, payload, queue bounds
# (events, bytes), this node, idempotency key ("" for none), body digest, key TTL (ms).
# QoS 1 events go into each endpoint's stream; QoS 0 ones only to subscribed connections.
# Each other node that holds a target is told once. Returns {"ok", delivered, full ids,
# local targets as (id, stream id or "")...}, {"prior", "digest count"} or {"notfound"}.
SEND = PRELUDE + r"""
local org, user, eid, qos, payload = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local max_events, max_bytes, me = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]
local ikey, digest, ttl = ARGV[11], ARGV[12], ARGV[13]
if ikey ~= '' then
  local prior = redis.call('GET', ikey)
  if prior then return {'prior', prior} end
end
local ids
if eid ~= '' then
  local f = redis.call('HMGET', ekey(eid), 'u', 'o')
  if f[1] ~= user or f[2] ~= org then return {'notfound'} end
  ids = {eid}
else
  ids = redis.call('SMEMBERS', ukey(org, user))
end
local delivered, full, here, there = 0, {}, {}, {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', ekey(id), 'n', 'sb', 'qb')
  if f[1] ~= false then
    local sid = ''
    local took = false
    if qos == '1' then
      local q = P .. 'q:' .. id
      if redis.call('XLEN', q) >= max_events or tonumber(f[3]) + #payload > max_bytes then
        full[#full + 1] = id
      else
        sid = redis.call('XADD', q, '*', 'p', payload)
        redis.call('HINCRBY', ekey(id), 'qb', #payload)
        took = true
      end
    elseif f[1] ~= '' and f[2] ~= '{}' then
      took = true
    end
    if took then
      delivered = delivered + 1
      if f[1] == me then here[#here + 1] = {id, sid}
      elseif f[1] ~= '' then
        there[f[1]] = there[f[1]] or {}
        table.insert(there[f[1]], id)
      end
    end
  end
end
for node, targets in pairs(there) do
  if qos == '1' then
    redis.call('PUBLISH', P .. 'node:' .. node, 'wake ' .. table.concat(targets, ' '))
  else
    redis.call('PUBLISH', P .. 'node:' .. node, 'event ' .. table.concat(targets, ' ') .. '\n' .. payload)
  end
end
if ikey ~= '' and not (delivered == 0 and #full > 0) then
  redis.call('SET', ikey, digest .. ' ' .. delivered, 'PX', ttl)
end
return {'ok', delivered, full, here}
"""

# One node's heartbeat: ARGV node, an epoch to set if Redis has none (it came back empty).
# Returns {cluster epoch, whether the node was still listed (1/0), Redis time, nodes listed}.
HEARTBEAT = PRELUDE + r"""
local node, candidate = ARGV[3], ARGV[4]
local t = now()
local listed = redis.call('ZSCORE', P .. 'nodes', node)
redis.call('ZADD', P .. 'nodes', t, node)
local epoch = redis.call('GET', P .. 'epoch')
if not epoch then
  redis.call('SET', P .. 'epoch', candidate)
  epoch = candidate
end
return {epoch, listed and 1 or 0, tostring(t), redis.call('ZCARD', P .. 'nodes')}
"""

# Expiry and node death, run by every node in turn; each step is atomic, so each
# transition happens once, on whichever node ran it. ARGV node TTL (s), at most this many
# endpoints per call. Returns a flat list of transitions:
# {"dropped", id, dead node, record} (a dead node's connection), {"sick", id, state left,
# record} or {"expired", id, record, queued}.
SWEEP = PRELUDE + r"""
local ttl, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = now()
local out = {}
-- After a gap with no sweep at all (Redis was frozen or down, or every node was), nobody could
-- write heartbeats or leases either: hold every step for a node TTL so they catch up, rather
-- than take every node for dead and every endpoint for silent.
local last = tonumber(redis.call('GET', P .. 'swept') or '0')
redis.call('SET', P .. 'swept', t)
if last > 0 and t - last > ttl / 2 then redis.call('SET', P .. 'hold', t + ttl) end
if t < tonumber(redis.call('GET', P .. 'hold') or '0') then return out end
local dead = redis.call('ZRANGEBYSCORE', P .. 'nodes', '-inf', t - ttl, 'WITHSCORES')
for i = 1, #dead, 2 do
  -- At most `limit` connections per dead node per call: the node stays listed (dead) until all
  -- are released, so one sweep of a node that held 100k connections does not block Redis.
  local node, seen = dead[i], tonumber(dead[i + 1])
  for _, id in ipairs(redis.call('SRANDMEMBER', P .. 'n:' .. node, limit)) do
    local released = release(id, node, seen)
    if released then out[#out + 1] = {'dropped', id, node, released} end
  end
  if redis.call('SCARD', P .. 'n:' .. node) == 0 then redis.call('ZREM', P .. 'nodes', node) end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', t, 'LIMIT', 0, limit)) do
  local f = redis.call('HMGET', ekey(id), 'k', 'lk', 'l', 's', 'n')
  local per = f[1] and period(f[1], f[2])
  if not per then
    redis.call('ZREM', P .. 'due', id)
  else
    local deadline = tonumber(f[3]) + per
    if t >= deadline + math.max(MIN_GRACE, per * GRACE_RATIO) then
      local before, queued = drop(id, 'expired')
      out[#out + 1] = {'expired', id, before, queued}
    elseif t >= deadline and f[4] ~= 'SICK' then
      redis.call('HSET', ekey(id), 's', 'SICK')
      redis.call('HINCRBY', ekey(id), 'v', 1)
      schedule(id)
      if f[5] ~= '' then redis.call('PUBLISH', P .. 'node:' .. f[5], 'sick ' .. id) end
      out[#out + 1] = {'sick', id, f[4], record(id)}
    else
      schedule(id)
    end
  end
end
return out
"""

# Redis came back empty: a node registers again the endpoints whose connections it holds,
# as UNKNOWN. ARGV node, then per endpoint 11 values: id, user, org, keepAliveSeconds,
# reminder, origin, version, MQTT keep-alive, persistent, epoch, subscriptions (JSON).
# Ids taken meanwhile are skipped.
REREGISTER = PRELUDE + r"""
local node = ARGV[3]
local t = now()
local done = {}
for i = 4, #ARGV, 11 do
  local id = ARGV[i]
  if redis.call('EXISTS', ekey(id)) == 0 then
    make(id, ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], t)
    redis.call('HSET', ekey(id), 's', 'UNKNOWN', 'v', ARGV[i + 6], 'n', node, 'lk', ARGV[i + 7],
      'cs', t, 'e', ARGV[i + 9], 'p', ARGV[i + 8], 'sb', ARGV[i + 10])
    redis.call('SADD', P .. 'n:' .. node, id)
    schedule(id)
    done[#done + 1] = {id, record(id)}
  end
end
return done
"""

# Connections a node is listed for in `eb:n:{node}` but does not hold: a CONNECT whose answer
# never reached it, or an earlier process under the same node id. ARGV node, then ids.
# Returns {id, record} for each released.
RELEASE = PRELUDE + r"""
local node = ARGV[3]
local t = now()
local out = {}
for i = 4, #ARGV do
  local released = release(ARGV[i], node, t)
  if released then out[#out + 1] = {ARGV[i], released} end
end
return out
"""

# An allowed client PUBLISH to an endpoint held by another node: ARGV org of the publisher, the
# target's id, its user as the topic names it ("" if the topic does not), the topic, the payload,
# this node. Tells the holding node; returns 1 if one was told, else 0.
RELAY = PRELUDE + r"""
local org, id, user, topic, payload, me = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local f = redis.call('HMGET', ekey(id), 'o', 'u', 'n')
if f[1] ~= org or (user ~= '' and f[2] ~= user) or f[3] == false or f[3] == '' or f[3] == me then return 0 end
redis.call('PUBLISH', P .. 'node:' .. f[3], 'topic ' .. id .. ' ' .. #topic .. '\n' .. topic .. payload)
return 1
"""
