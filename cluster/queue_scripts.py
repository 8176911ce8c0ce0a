"""The work queue's Redis side: the Lua scripts that lease, finish, heartbeat, stage and prune entries.

Each runs atomically in Redis; cluster/queue.py (``WorkQueue``) registers them and says what each
guarantees (its module docstring). ``FINISH`` is the only way an item leaves the queue.
"""

from __future__ import annotations

from bark_serve.cluster.batch_types import LUA_PRELUDE

DEAD_LETTER_MAXLEN = 10_000  # the dead-letter stream is for operators, not a store: keep it bounded
_LEASE_PRELUDE = LUA_PRELUDE + f"local DEAD_MAXLEN = {DEAD_LETTER_MAXLEN}\n"

START = _LEASE_PRELUDE + """
local queue, group, dead, max_attempts = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local out = {}
for i = 8, #ARGV, 3 do
  local e, jid, iid = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local st = redis.call('HGET', jk(jid, 'state'), iid)
  if redis.call('EXISTS', jk(jid)) == 0 or not st or terminal(st) then
    ack(queue, group, e)
  elseif redis.call('HGET', jk(jid), 'status') == 'cancelled' then
    redis.call('HSET', jk(jid, 'state'), iid, 'cancelled')
    ack(queue, group, e)
  else
    local att = redis.call('HINCRBY', jk(jid, 'attempts'), iid, 1)
    if att > max_attempts then
      local reason = 'gave up after ' .. (att - 1) .. ' attempts: the worker was lost each time'
      fail_item(jid, iid, st, att - 1, reason, 'worker_lost')
      redis.call('XADD', dead, 'MAXLEN', '~', DEAD_MAXLEN, '*', 'job', jid, 'item', iid, 'reason', reason)
      ack(queue, group, e)
    else
      if st == 'queued' then
        redis.call('HINCRBY', jk(jid), 'queued', -1)
        redis.call('HINCRBY', jk(jid), 'running', 1)
        redis.call('HSET', jk(jid, 'state'), iid, 'running')
      end
      redis.call('HSETNX', jk(jid), 'started_at', NOW)
      out[#out + 1] = {e, att, redis.call('HGET', jk(jid, 'items'), iid), redis.call('HGET', jk(jid), 'owner') or ''}
    end
    touch(jid)
  end
end
return out
"""

# ARGV[4..]: queue group dead jid iid entry attempt mode max_attempts f1 f2 f3 [f4: result bytes, mode ok]
FINISH = _LEASE_PRELUDE + """
local queue, group, dead, jid, iid, e = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local attempt, mode, max_attempts = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])
local st = redis.call('HGET', jk(jid, 'state'), iid)
if redis.call('EXISTS', jk(jid)) == 0 or not st then ack(queue, group, e) return 'gone' end
if terminal(st) then ack(queue, group, e) return 'duplicate' end
if redis.call('HGET', jk(jid), 'status') == 'cancelled' then
  redis.call('HSET', jk(jid, 'state'), iid, 'cancelled')
  redis.call('HDEL', jk(jid, 'stage'), iid)
  ack(queue, group, e)
  touch(jid)
  return 'cancelled'
end
if mode == 'ok' then  -- the first result wins, whichever attempt produced it
  redis.call('HDEL', jk(jid, 'stage'), iid)
  redis.call('HINCRBY', jk(jid), st, -1)
  redis.call('HINCRBY', jk(jid), 'succeeded', 1)
  redis.call('HINCRBY', jk(jid), 'processed', 1)
  redis.call('HSET', jk(jid, 'state'), iid, 'succeeded')
  redis.call('XADD', jk(jid, 'results'), '*', 'id', iid, 'state', 'succeeded', 'attempts', attempt,
             'meta', ARGV[13], ARGV[14], ARGV[15])
  redis.call('HINCRBY', jk(jid), 'result_bytes', tonumber(ARGV[16]))  -- a tenant's quota counts them
  ack(queue, group, e)
  settle(jid)
  touch(jid)
  return 'ok'
end
if tonumber(redis.call('HGET', jk(jid, 'attempts'), iid)) ~= attempt then return 'stale' end
redis.call('HDEL', jk(jid, 'stage'), iid)  -- requeued or failed: in no stage now
if mode == 'release' or (mode == 'retry' and attempt < max_attempts) then
  if mode == 'release' then redis.call('HINCRBY', jk(jid, 'attempts'), iid, -1) end
  if st == 'running' then
    redis.call('HINCRBY', jk(jid), 'running', -1)
    redis.call('HINCRBY', jk(jid), 'queued', 1)
  end
  redis.call('HSET', jk(jid, 'state'), iid, 'queued')
  redis.call('XADD', queue, '*', 'job', jid, 'item', iid)
  ack(queue, group, e)
  touch(jid)
  if mode == 'release' then return 'released' end
  return 'retried'
end
redis.call('HINCRBY', jk(jid), 'processed', 1)
fail_item(jid, iid, st, attempt, ARGV[13], ARGV[14])
if ARGV[14] ~= 'invalid_item' then
  redis.call('XADD', dead, 'MAXLEN', '~', DEAD_MAXLEN, '*', 'job', jid, 'item', iid, 'reason', ARGV[13])
end
ack(queue, group, e)
touch(jid)
return 'failed'
"""

# ARGV[4..]: queue group consumer, then (entry, jid, iid) triples
HEARTBEAT = LUA_PRELUDE + """
local queue, group, consumer = ARGV[4], ARGV[5], ARGV[6]
local out = {}
for i = 7, #ARGV, 3 do
  local e, jid, iid = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local mine = redis.call('XPENDING', queue, group, e, e, 1, consumer)
  if #mine == 0 then
    out[#out + 1] = 'lost'
  elseif redis.call('EXISTS', jk(jid)) == 0 or redis.call('HGET', jk(jid), 'status') == 'cancelled' then
    local st = redis.call('HGET', jk(jid, 'state'), iid)
    if st and not terminal(st) then redis.call('HSET', jk(jid, 'state'), iid, 'cancelled') end
    redis.call('HDEL', jk(jid, 'stage'), iid)
    ack(queue, group, e)
    out[#out + 1] = 'cancelled'
  else
    redis.call('XCLAIM', queue, group, consumer, 0, e, 'JUSTID')
    out[#out + 1] = 'ok'
  end
end
return out
"""


# ARGV[4..]: jid iid attempt stage, then the stages the item has just passed. Progress only: it acts
# only for the attempt that holds the item, and the 'stage' hash is not part of the item's state.
STAGE = LUA_PRELUDE + """
local jid, iid, attempt, stage = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
if redis.call('HGET', jk(jid, 'state'), iid) ~= 'running'
   or tonumber(redis.call('HGET', jk(jid, 'attempts'), iid)) ~= attempt then return 0 end
if stage ~= '' then
  redis.call('HSET', jk(jid, 'stage'), iid, stage)
  redis.call('EXPIRE', jk(jid, 'stage'), TTL)
end
for i = 8, #ARGV do redis.call('HINCRBY', jk(jid), 'passed:' .. ARGV[i], 1) end
return 1
"""


# ARGV[4..]: queue group min_idle_ms. Consumers are per process, so dead ones pile up; drop idle, empty ones.
PRUNE = LUA_PRELUDE + """
local queue, group, min_idle = ARGV[4], ARGV[5], tonumber(ARGV[6])
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', queue, group)) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if tonumber(info['pending']) == 0 and tonumber(info['idle']) >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', queue, group, info['name'])
    removed = removed + 1
  end
end
return removed
"""
