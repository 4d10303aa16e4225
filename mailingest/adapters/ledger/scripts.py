"""The ledger's Lua scripts: each compare-and-set runs as one atomic step in Redis.

None spells a state: every state name comes in as an argument, from
:mod:`mailingest.core.states`. Above each script: its KEYS, its ARGV and its answer.
"""

# The index the console pages through (Ledger.page): one sorted set per state, per state
# and inbox, and per state, inbox and reason kind, each scored by when the mail was
# recorded; kept here, in the same atomic step as the state sets. INDEX_MOVE takes the
# mail hash as KEYS[1], the id, the index prefix, the old state and kind ('' for none)
# and the new ones; it reads created_at from the hash.
INDEX_MOVE = """
local function index_move(key, id, prefix, old_state, old_kind, new_state, new_kind)
  local inbox = string.match(id, '^[^/]*')
  local at = tonumber(redis.call('HGET', key, 'created_at') or '0') or 0
  if old_state ~= '' then
    redis.call('ZREM', prefix .. old_state, id)
    redis.call('ZREM', prefix .. old_state .. ':' .. inbox, id)
    if old_kind ~= '' then
      redis.call('ZREM', prefix .. old_state .. ':' .. inbox .. ':' .. old_kind, id)
    end
  end
  redis.call('ZADD', prefix .. new_state, at, id)
  redis.call('ZADD', prefix .. new_state .. ':' .. inbox, at, id)
  if new_kind ~= '' then
    redis.call('ZADD', prefix .. new_state .. ':' .. inbox .. ':' .. new_kind, at, id)
  end
end
"""

# What the console's search finds a mail by: a set of mail ids per sender, Message-ID
# and entity (lower case), kept whenever one of those fields is written. find_add puts
# a mail in the set of one field's value; set_field sets one field of a mail hash and,
# for those three, moves the mail from the old value's set to the new one's (the find
# prefix and the mail id are arguments of both).
SET_FIELD = """
local FOUND_BY = {sender = true, message_id = true, entity = true}
local function find_add(prefix, id, name, value)
  if value ~= '' and #value <= 512 then
    redis.call('SADD', prefix .. name .. ':' .. string.lower(value), id)
  end
end
local function set_field(key, prefix, id, name, value)
  if FOUND_BY[name] then
    local old = redis.call('HGET', key, name) or ''
    if old ~= '' and old ~= value then
      redis.call('SREM', prefix .. name .. ':' .. string.lower(old), id)
    end
    find_add(prefix, id, name, value)
  end
  redis.call('HSET', key, name, value)
end
"""

# KEYS[1] mail hash, KEYS[2] the unfiled set, KEYS[3] the mail's history stream;
# ARGV[1] new state, ARGV[2] state-set prefix, ARGV[3] mail id, ARGV[4] '1' when the new
# state is decided (a decided mail not yet filed joins the unfiled set), ARGV[5] index
# prefix, ARGV[6] who moves it (a worker, a console user), ARGV[7] the attempt (''
# unknown), ARGV[8] the history's length kept, ARGV[9] number of allowed from-states,
# then those states, then the find prefix (SET_FIELD), then field/value pairs. Returns the
# record as written (HGETALL), or 0 when it did not move. Each move is one entry of the
# mail's history.
TRANSITION = (
    INDEX_MOVE
    + SET_FIELD
    + """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
local n = tonumber(ARGV[9])
local allowed = false
for i = 1, n do
  if ARGV[9 + i] == current then allowed = true end
end
if not allowed then return 0 end
local old_kind = redis.call('HGET', KEYS[1], 'kind') or ''
local find = ARGV[10 + n]
local i = 11 + n
while i <= #ARGV do
  set_field(KEYS[1], find, ARGV[3], ARGV[i], ARGV[i + 1])
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
local kind = redis.call('HGET', KEYS[1], 'kind') or ''
if current ~= ARGV[1] or kind ~= old_kind then
  index_move(KEYS[1], ARGV[3], ARGV[5], current, old_kind, ARGV[1], kind)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*',
           'from', current, 'to', ARGV[1],
           'at', redis.call('HGET', KEYS[1], 'updated_at') or '',
           'by', ARGV[6], 'attempt', ARGV[7],
           'reason', redis.call('HGET', KEYS[1], 'reason') or '')
return redis.call('HGETALL', KEYS[1])
"""
)


# KEYS: mail hash, raw key, queued set, history stream; ARGV: raw, ttl, size, now, mail
# id, internaldate, the initial state, index prefix, who recorded it, history length
RECORD = (
    INDEX_MOVE
    + """
if redis.call('HEXISTS', KEYS[1], 'state') == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'state', ARGV[7], 'size', ARGV[3],
           'created_at', ARGV[4], 'updated_at', ARGV[4], 'internaldate', ARGV[6])
redis.call('SADD', KEYS[3], ARGV[5])
index_move(KEYS[1], ARGV[5], ARGV[8], '', '', ARGV[7], '')
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', 'from', '', 'to', ARGV[7],
           'at', ARGV[4], 'by', ARGV[9], 'attempt', '', 'reason', '')
return 1
"""
)

# Puts one mail in the index and the find sets as its hash says (Ledger.reindex: records
# made before the index existed). KEYS[1] mail hash; ARGV: mail id, index prefix, find
# prefix.
REINDEX = (
    INDEX_MOVE
    + SET_FIELD
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
index_move(KEYS[1], ARGV[1], ARGV[2], '', '', state, redis.call('HGET', KEYS[1], 'kind') or '')
for name in pairs(FOUND_BY) do
  find_add(ARGV[3], ARGV[1], name, redis.call('HGET', KEYS[1], name) or '')
end
return 1
"""
)

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

# KEYS: mail hash; ARGV: the find prefix, the mail id, then field/value pairs. Only a
# record that exists (has a state).
UPDATE = (
    SET_FIELD
    + """
if redis.call('HEXISTS', KEYS[1], 'state') == 0 then return 0 end
local i = 3
while i <= #ARGV do
  set_field(KEYS[1], ARGV[1], ARGV[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
return 1
"""
)

# KEYS: document hash, the token's find set; ARGV: state, token, the uploaded state, the
# mail id. An uploaded document stays uploaded; the console finds the mail by the token.
MIRROR = """
redis.call('SADD', KEYS[2], ARGV[4])
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
