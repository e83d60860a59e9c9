--[[ session: admission to a session (or any named resource) shared by every replica.
A ticket is "<arrival, 14 digits>.<owner id>", so tickets sort in arrival order. Leases are
expiry times (ms, Redis clock) in sorted sets; an expired holder or waiter is pruned by the next
call, so a crashed process blocks nobody for longer than one lease TTL.
KEYS[1]  holders  ZSET  holder ticket -> lease expiry (ms)
KEYS[2]  queue    ZSET  unsequenced waiting ticket -> arrival number
KEYS[3]  seqq     ZSET  sequenced waiting ticket -> its sequence number
KEYS[4]  qexp     ZSET  every waiting ticket -> lease expiry (ms)
KEYS[5]  meta     HASH  ticket -> caller metadata (JSON)
KEYS[6]  state    HASH  arr (arrival counter), fence, next (next expected sequence number),
                        gap (ms when the wait for a missing number began), g:<ticket> (grant),
                        o:<owner> (the ticket last given to that owner id)
KEYS[7]  conv     HASH  the session's conversation (conversation.lua): read, never written here,
                        and returned with an admission, so a turn starts without a round trip
                        of its own to load it
ARGV[1]  op: "acquire" or "release"
ARGV[2]  ticket ("" for a new caller)
ARGV[3]  owner id, for a new ticket
ARGV[4]  mode: "throw" or "queue"
ARGV[5]  most holders at once           ARGV[6]  most waiters at once
ARGV[7]  lease TTL (ms)                 ARGV[8]  metadata of a new ticket (JSON)
ARGV[9]  sequence number, or ""         ARGV[10] gap timeout (ms)
ARGV[11] first sequence number, or ""   ARGV[12] channel
ARGV[13] publish command                ARGV[14] idle TTL of the session's keys (ms)
A grant is "fence|skip_from|skip_to|late": the session fence given to the holder, the range of
sequence numbers skipped to admit it (-1|-1 when none), and 1 when its number was already passed.
Every admission publishes "G<ticket>|<grant>" on the channel.
An acquire that would give its owner a new ticket while the ticket last given to that owner still
holds or waits answers for that ticket instead: a repeated acquire (a retried command whose first
copy also ran) makes no second ticket.
Returns
  acquire: {'H', ticket, grant, conv}           the caller holds the session; conv is HGETALL
                                                of KEYS[7] (flat field/value list) read after the
                                                admission
           {'Q', ticket, position, depth, wake}  queued; re-ask within `wake` ms at the latest
           {'B', holders, depth, retry_ms}      mode "throw" and the session is taken
           {'O', holders, depth}                the queue is full
  release: {'X', removed}                       1 when the ticket held or waited, else 0
]]
local holders, queue, seqq, qexp, meta, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local op, ticket = ARGV[1], ARGV[2]
local max, max_queue, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local gap_timeout, first = tonumber(ARGV[10]), tonumber(ARGV[11])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local wake = ttl

local function forget(tk)
  redis.call('HDEL', meta, tk)
  redis.call('HDEL', state, 'g:' .. tk)
  local owner_field = 'o:' .. string.sub(tk, 16)
  if redis.call('HGET', state, owner_field) == tk then
    redis.call('HDEL', state, owner_field)
  end
end

local function prune()
  for _, tk in ipairs(redis.call('ZRANGEBYSCORE', holders, '-inf', now)) do forget(tk) end
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  for _, tk in ipairs(redis.call('ZRANGEBYSCORE', qexp, '-inf', now)) do
    redis.call('ZREM', queue, tk)
    redis.call('ZREM', seqq, tk)
    forget(tk)
  end
  redis.call('ZREMRANGEBYSCORE', qexp, '-inf', now)
end

-- The next ticket to admit: the earliest arrival among the unsequenced head and the sequenced
-- head, where the sequenced head is admissible only when its number is due (or was passed), or
-- when the missing number before it has been waited for gap_timeout.
local function pick()
  local cand, seq, skip_from, skip_to, late = nil, nil, -1, -1, 0
  local head = redis.call('ZRANGE', seqq, 0, 0, 'WITHSCORES')
  if #head > 0 then
    local n = tonumber(head[2])
    local due = tonumber(redis.call('HGET', state, 'next')) or first or n
    if n <= due then
      cand, seq = head[1], n
      if n < due then late = 1 end
    else
      local gap = tonumber(redis.call('HGET', state, 'gap'))
      if not gap then
        gap = now
        redis.call('HSET', state, 'gap', now)
      end
      if now - gap >= gap_timeout then
        cand, seq, skip_from, skip_to = head[1], n, due, n - 1
      else
        wake = math.min(wake, gap + gap_timeout - now)
      end
    end
  end
  local plain = redis.call('ZRANGE', queue, 0, 0)
  if #plain > 0 and (cand == nil or plain[1] < cand) then
    return plain[1], nil, -1, -1, 0
  end
  return cand, seq, skip_from, skip_to, late
end

local function grant(tk, seq, skip_from, skip_to, late)
  local fence = redis.call('HINCRBY', state, 'fence', 1)
  if seq then
    local due = tonumber(redis.call('HGET', state, 'next'))
    if not due or seq + 1 > due then redis.call('HSET', state, 'next', seq + 1) end
    redis.call('HDEL', state, 'gap')
  end
  local g = fence .. '|' .. skip_from .. '|' .. skip_to .. '|' .. late
  redis.call('HSET', state, 'g:' .. tk, g)
  redis.call(ARGV[13], ARGV[12], 'G' .. tk .. '|' .. g)
  return g
end

local function admit()
  while redis.call('ZCARD', holders) < max do
    local tk, seq, skip_from, skip_to, late = pick()
    if not tk then return end
    local expiry = redis.call('ZSCORE', qexp, tk)
    redis.call('ZREM', queue, tk)
    redis.call('ZREM', seqq, tk)
    redis.call('ZREM', qexp, tk)
    redis.call('ZADD', holders, expiry, tk)
    grant(tk, seq, skip_from, skip_to, late)
  end
end

local function touch()
  for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], ARGV[14]) end
end

local function new_ticket()
  local arrival = redis.call('HINCRBY', state, 'arr', 1)
  local tk = string.format('%014d', arrival) .. '.' .. ARGV[3]
  redis.call('HSET', meta, tk, ARGV[8])
  redis.call('HSET', state, 'o:' .. ARGV[3], tk)
  return tk, arrival
end

local function admitted(tk, g)
  return {'H', tk, g, redis.call('HGETALL', KEYS[7])}
end

local function earliest(key)
  local first_entry = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first_entry > 0 then wake = math.min(wake, tonumber(first_entry[2]) - now) end
end

if op == 'release' then
  local removed = redis.call('ZREM', holders, ticket) + redis.call('ZREM', qexp, ticket)
  redis.call('ZREM', queue, ticket)
  redis.call('ZREM', seqq, ticket)
  forget(ticket)
  prune()
  admit()
  touch()
  return {'X', removed}
end

prune()
if ticket == '' or not (redis.call('ZSCORE', holders, ticket) or redis.call('ZSCORE', qexp, ticket)) then
  local given = redis.call('HGET', state, 'o:' .. ARGV[3])
  if given and (redis.call('ZSCORE', holders, given) or redis.call('ZSCORE', qexp, given)) then
    ticket = given  -- this owner's ticket, given by a first copy of this same acquire
  end
end
if ticket ~= '' and redis.call('ZSCORE', holders, ticket) then
  return admitted(ticket, redis.call('HGET', state, 'g:' .. ticket) or '0|-1|-1|0')
end
if ticket == '' or not redis.call('ZSCORE', qexp, ticket) then
  -- a new caller, or a waiter whose entry expired (it joins again, at the tail)
  local depth = redis.call('ZCARD', qexp)
  if ARGV[4] == 'throw' then
    local held = redis.call('ZCARD', holders)
    if held < max and depth == 0 then
      ticket = new_ticket()
      redis.call('ZADD', holders, now + ttl, ticket)
      local g = grant(ticket, nil, -1, -1, 0)
      touch()
      return admitted(ticket, g)
    end
    earliest(holders)
    return {'B', held, depth, math.max(wake, 1)}
  end
  if depth >= max_queue then
    return {'O', redis.call('ZCARD', holders), depth}
  end
  local arrival
  ticket, arrival = new_ticket()
  redis.call('ZADD', qexp, now + ttl, ticket)
  if ARGV[9] ~= '' then
    redis.call('ZADD', seqq, tonumber(ARGV[9]), ticket)
  else
    redis.call('ZADD', queue, arrival, ticket)
  end
  touch()
else
  redis.call('ZADD', qexp, 'XX', now + ttl, ticket)
end
admit()
if redis.call('ZSCORE', holders, ticket) then
  return admitted(ticket, redis.call('HGET', state, 'g:' .. ticket))
end
earliest(holders)
earliest(qexp)
local rank = redis.call('ZRANK', queue, ticket) or redis.call('ZRANK', seqq, ticket) or 0
return {'Q', ticket, rank + 1, redis.call('ZCARD', qexp), math.max(wake, 1)}
