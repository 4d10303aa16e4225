"""The replies to customers in the ledger: one record per mail (its message key, shared
by every delivery and replay of it) and kind, the count per address and kind that the
rate limit reads, and the set of filed mails whose reply is still to be settled."""

from __future__ import annotations

from mailingest.adapters import keys
from mailingest.adapters.ledger.base import Store, decode
from mailingest.core.states import ReplyState

# how long a reply's record is kept: a replay or redelivery later than this may answer
# again (a mail is seldom replayed after months)
REPLY_TTL = 180 * 86400

# take the record if nobody has, or a try that was not sent gave it back (RETRY):
# ARGV = mail id, Message-ID, now, ttl, RETRY, CLAIMED -> "" or RETRY when taken, else
# its state
CLAIM_REPLY = """
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= ARGV[5] then return state end
redis.call('HSET', KEYS[1], 'state', ARGV[6], 'mail', ARGV[1], 'message_id', ARGV[2],
           'at', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return state or ''
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


class ReplyRecords(Store):
    """The ledger's records of replies."""

    def claim_reply(self, message_key: str, kind: str, *, mail_id: str, message_id: str) -> str:
        """Take the reply of ``kind`` to this mail: "" when this run took it first,
        ``RETRY`` when it took it from a try that was not sent (counted already), else the
        state another run left it in (``claimed``, ``sending``, ``sent``, ...)."""
        script = self.redis.register_script(CLAIM_REPLY)
        state = script(
            keys=[keys.reply(message_key, kind)],
            args=[mail_id, message_id, self.now(), REPLY_TTL, ReplyState.RETRY, ReplyState.CLAIMED],
        )
        return keys.as_text(state or b"")

    def reply_record(self, message_key: str, kind: str) -> dict[str, str]:
        return decode(self.redis.hgetall(keys.reply(message_key, kind)))

    def set_reply(self, message_key: str, kind: str, **fields: object) -> None:
        fields.setdefault("at", self.now())
        self.redis.hset(
            keys.reply(message_key, kind),
            mapping={k: "" if v is None else str(v) for k, v in fields.items()},
        )

    def count_reply(self, kind: str, address: str, *, limit: int, window: int) -> bool:
        """One more reply of ``kind`` to ``address``, if fewer than ``limit`` went in
        the window: shared by every worker."""
        script = self.redis.register_script(COUNT_REPLY)
        return bool(script(keys=[keys.reply_rate(kind, address)], args=[limit, window]))

    def count_reply_outcome(self, kind: str, outcome: str, why: str = "") -> None:
        """One more reply of ``kind`` that ended ``outcome`` (``why``: the kind of reason
        a suppressed one was not sent), for `mailingest status`."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(keys.REPLY_OUTCOMES, f"{kind}:{outcome}", 1)
        if why:
            pipe.hincrby(keys.REPLY_OUTCOMES, f"why:{why}", 1)
        pipe.execute()

    def reply_outcomes(self) -> dict[str, int]:
        return {k: int(v) for k, v in decode(self.redis.hgetall(keys.REPLY_OUTCOMES)).items()}

    def reply_due(self, mail_id: str) -> None:
        self.redis.sadd(keys.REPLIES_DUE, mail_id)

    def reply_settled(self, mail_id: str) -> None:
        self.redis.srem(keys.REPLIES_DUE, mail_id)

    def replies_due(self, inbox: str) -> list[str]:
        mine = inbox + "/"
        return sorted(
            m
            for m in (keys.as_text(v) for v in self.redis.smembers(keys.REPLIES_DUE))
            if m.startswith(mine)
        )
