--[[ conversation: write a session's conversation (a turn's commit, or a write outside any turn).
The conversation lives in one hash beside the session guard's keys (the same hash slot), so the
holder's fence is checked in the same script that writes.
KEYS[1]  conv     HASH  turn (commits so far), fence and by (the last committer's admission fence
                        and ticket), n (messages stored), bytes (size of the stored values), and
                        the items: s (session), a:<agent> (agent), m:<agent>:<id> (message),
                        x:<id> (multi-agent state), rec (the commit record of a conversation kept
                        in another store); every item is JSON
KEYS[2]  holders  ZSET  the session guard's holder tickets -> lease expiry (ms, Redis clock)
KEYS[3]  state    HASH  the session guard's state; g:<ticket> = "<fence>|..." (the grant)
ARGV[1]  ticket of the committing holder; "" writes without a turn (no fence, no turn count)
ARGV[2]  the holder's admission fence     ARGV[3]  the turn it loaded (the commits it saw)
ARGV[4]  idle TTL of the hash (ms)        ARGV[5]  most messages   ARGV[6]  most bytes
ARGV[7..] item field, value pairs to set (a message field adds a message or replaces one)
Returns
  {'OK', turn, lease_ms}  written; turn: commits now; lease_ms: the holder's lease left (-1 with
                          no ticket)
  {'LOST', 0}             the ticket no longer holds the session with that fence: nothing written
  {'TURN', turn}          another holder committed since this one loaded: nothing written
  {'FULL', n, bytes}      the writes would take the hash past a bound (n, bytes after them):
                          nothing written
A commit run twice (a retried command whose first copy ran) finds the turn already counted, by
the same ticket, and returns OK without writing again; a write without a turn sets the same
values again, which changes nothing.
]]
local conv, holders, state = KEYS[1], KEYS[2], KEYS[3]
local ticket, fence, loaded = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_n, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local lease = -1

if ticket ~= '' then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local turn = tonumber(redis.call('HGET', conv, 'turn') or '0')
  if turn == loaded + 1 and redis.call('HGET', conv, 'by') == ticket then
    return {'OK', turn, 0}
  end
  local expiry = tonumber(redis.call('ZSCORE', holders, ticket))
  local grant = redis.call('HGET', state, 'g:' .. ticket)
  if not expiry or expiry <= now or not grant or string.match(grant, '^(%d+)|') ~= fence then
    return {'LOST', 0}
  end
  if turn ~= loaded then
    return {'TURN', turn}
  end
  lease = expiry - now
end

local n = tonumber(redis.call('HGET', conv, 'n') or '0')
local size = tonumber(redis.call('HGET', conv, 'bytes') or '0')
for i = 7, #ARGV, 2 do
  local field, old = ARGV[i], redis.call('HSTRLEN', conv, ARGV[i])
  if string.sub(field, 1, 2) == 'm:' and redis.call('HEXISTS', conv, field) == 0 then
    n = n + 1
  end
  size = size + string.len(ARGV[i + 1]) - old
end
if n > max_n or size > max_bytes then
  return {'FULL', n, size}
end
for i = 7, #ARGV, 2 do
  redis.call('HSET', conv, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', conv, 'n', n, 'bytes', size)
local turn = tonumber(redis.call('HGET', conv, 'turn') or '0')
if ticket ~= '' then
  turn = redis.call('HINCRBY', conv, 'turn', 1)
  redis.call('HSET', conv, 'fence', fence, 'by', ticket)
end
redis.call('PEXPIRE', conv, ARGV[4])
return {'OK', turn, lease}
