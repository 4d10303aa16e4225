"""The ledger's Lua scripts: each compare-and-set runs as one atomic step in Redis.

None spells a state: every state name comes in as an argument, from
:mod:`mailingest.core.states`. Above each script: its KEYS, its ARGV and its answer.
"""

# KEYS[1] mail hash, KEYS[2] the unfiled set; ARGV[1] new state, ARGV[2] state-set prefix,
# ARGV[3] mail id, ARGV[4] '1' when the new state is decided (a decided mail not yet filed
# joins the unfiled set), ARGV[5] number of allowed from-states, then those states, then
# field/value pairs. Returns the record as written (HGETALL), or 0 when it did not move.
TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
local n = tonumber(ARGV[5])
local allowed = false
for i = 1, n do
  if ARGV[5 + i] == current then allowed = true end
end
if not allowed then return 0 end
local i = 6 + n
while i <= #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
local filed = redis.call('HGET', KEYS[1], 'filed_to')
if ARGV[4] == '1' and not (filed and filed ~= '') then
  redis.call('SADD', KEYS[2], ARGV[3])
else
  redis.call('SREM', KEYS[2], ARGV[3])
end
if current ~= ARGV[1] then
  redis.call('SREM', ARGV[2] .. current, ARGV[3])
  redis.call('SADD', ARGV[2] .. ARGV[1], ARGV[3])
end
return redis.call('HGETALL', KEYS[1])
"""


# KEYS: mail hash, raw key, queued set; ARGV: raw, ttl, size, now, mail id, internaldate,
# the initial state
RECORD = """
if redis.call('HEXISTS', KEYS[1], 'state') == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'state', ARGV[7], 'size', ARGV[3],
           'created_at', ARGV[4], 'updated_at', ARGV[4], 'internaldate', ARGV[6])
redis.call('SADD', KEYS[3], ARGV[5])
return 1
"""

# KEYS: slot hash, token claim, doubt zset; ARGV: token, the attempt this token answers
# ('' for an adopted one), slot fingerprint. The slot's first token wins, and a token
# belongs to one slot only: '' when another slot already claimed it. The attempt the token
# answers is settled; an attempt still in doubt while another document was adopted stays
# in doubt (others with the same name wait for it: it may still become a document).
CLAIM = """
local current = redis.call('HGET', KEYS[1], 'token')
if current and current ~= '' then return current end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= KEYS[1] then return '' end
redis.call('SET', KEYS[2], KEYS[1])
redis.call('HSET', KEYS[1], 'token', ARGV[1])
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'attempt') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'attempt', '', 'attempt_at', '')
  redis.call('ZREM', KEYS[3], ARGV[3])
end
return ARGV[1]
"""

# KEYS: slot hash, mail hash, doubt zset; ARGV: the attempt the caller saw ('' for none),
# now, window ms, new id, slot fingerprint, the documents_pending state. {'decided', _}
# the mail is no longer documents_pending (quarantined, failed: no new POST for it, or
# `finish` could move it before seeing this attempt).
# {'token', _} the slot has a document already; {'changed', _} another run moved it on
# since the caller looked; {'wait', ms} the attempt in doubt may still be committed by
# Alloy for ms more; {'go', 0} the new attempt is recorded: POST.
BEGIN = """
if redis.call('HGET', KEYS[2], 'state') ~= ARGV[6] then return {'decided', 0} end
local token = redis.call('HGET', KEYS[1], 'token')
if token and token ~= '' then return {'token', 0} end
local current = redis.call('HGET', KEYS[1], 'attempt') or ''
if current ~= ARGV[1] then return {'changed', 0} end
local now = tonumber(ARGV[2])
if current ~= '' then
  local left = tonumber(redis.call('HGET', KEYS[1], 'attempt_at') or '0') + tonumber(ARGV[3]) - now
  if left > 0 then return {'wait', left} end
end
redis.call('HSET', KEYS[1], 'attempt', ARGV[4], 'attempt_at', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
return {'go', 0}
"""

# KEYS: mail hash; ARGV: field/value pairs. Only a record that exists (has a state).
UPDATE = """
if redis.call('HEXISTS', KEYS[1], 'state') == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: document hash; ARGV: state, token, the uploaded state. An uploaded document stays
# uploaded.
MIRROR = """
if redis.call('HGET', KEYS[1], 'state') == ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'token', ARGV[2])
return 1
"""

# KEYS: mail hash; ARGV: reason. Appended once (a retried step does not repeat it).
ADD_REASON = """
local current = redis.call('HGET', KEYS[1], 'reason') or ''
if string.find(current, ARGV[1], 1, true) then return 0 end
if current == '' then redis.call('HSET', KEYS[1], 'reason', ARGV[1])
else redis.call('HSET', KEYS[1], 'reason', current .. '; ' .. ARGV[1]) end
return 1
"""

# KEYS: slot hash, doubt zset; ARGV: attempt id, slot fingerprint. Only that attempt is
# cleared (a later one stays).
CLEAR_ATTEMPT = """
if redis.call('HGET', KEYS[1], 'attempt') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'attempt', '', 'attempt_at', '')
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 1
"""

# take the record if nobody has, or a try that was not sent gave it back (RETRY):
# ARGV = mail id, Message-ID, now, ttl, RETRY, CLAIMED, token -> "" or RETRY when
# taken, else its state
CLAIM_REPLY = """
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= ARGV[5] then return state end
redis.call('HSET', KEYS[1], 'state', ARGV[6], 'mail', ARGV[1], 'message_id', ARGV[2],
           'at', ARGV[3], 'token', ARGV[7])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return state or ''
"""

# the holder moves its claim on: ARGV = token, expected state (or ""), then field/value
# pairs -> 1, or 0 when the record is not (or no longer) its own in that state
SETTLE_REPLY = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'state') ~= ARGV[2] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# another run takes the record over from the state and time it read: ARGV = state, at,
# then field/value pairs -> 1, or 0 when it changed meanwhile
TAKE_OVER_REPLY = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'at') ~= ARGV[2] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# one more reply to an address, if the window's count allows: ARGV = limit, window (s)
COUNT_REPLY = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2])) end
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"""
