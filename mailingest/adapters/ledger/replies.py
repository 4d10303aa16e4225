"""The replies to customers in the ledger: one record per mail (its message key and
sender, shared by every delivery and replay of it) and kind, the count per address and
kind that the rate limit reads, and the set of filed mails whose reply is still due.

A run that claims a record holds it by a token of its own: only that run moves it on
(``begin_sending``, ``settle_reply``), and another run takes a record over only from
the state and time it read (``take_over``), so a run that stalled past its time and
woke up again can never send what another run took."""

from __future__ import annotations

import secrets

from mailingest.adapters import keys
from mailingest.adapters.ledger.base import Store, decode
from mailingest.core.states import ReplyState

# how long a reply's record is kept: a replay or redelivery later than this may answer
# again (a mail is seldom replayed after months)
REPLY_TTL = 180 * 86400


def _pairs(fields: dict[str, object]) -> list[str]:
    return [str(x) for k, v in fields.items() for x in (k, "" if v is None else v)]


class ReplyRecords(Store):
    """The ledger's records of replies."""

    def claim_reply(self, key: str, kind: str, *, mail_id: str, message_id: str) -> tuple[str, str]:
        """Take the reply of ``kind`` to the mail ``key``: ("" or ``RETRY``, this run's
        token) when this run took it (``RETRY``: from a try that was not sent, counted
        already), else (the state another run left it in, "")."""
        token = secrets.token_hex(8)
        state = self._claim_reply(
            keys=[keys.reply(key, kind)],
            args=[
                mail_id,
                message_id,
                self.now(),
                REPLY_TTL,
                ReplyState.RETRY,
                ReplyState.CLAIMED,
                token,
            ],
        )
        taken = keys.as_text(state or b"")
        return (taken, token) if taken in ("", ReplyState.RETRY) else (taken, "")

    def reply_record(self, key: str, kind: str) -> dict[str, str]:
        return decode(self.redis.hgetall(keys.reply(key, kind)))

    def begin_sending(self, key: str, kind: str, token: str) -> bool:
        """The holder's claim becomes ``sending``: False when it is no longer its own."""
        return self._settle_reply(
            key, kind, token, ReplyState.CLAIMED, state=ReplyState.SENDING, at=self.now()
        )

    def settle_reply(self, key: str, kind: str, token: str, **fields: object) -> bool:
        """The holder records what became of it (``state`` and more)."""
        return self._settle_reply(key, kind, token, "", at=self.now(), **fields)

    def _settle_reply(
        self, key: str, kind: str, token: str, expected: str, **fields: object
    ) -> bool:
        return bool(
            self._settle_reply_script(
                keys=[keys.reply(key, kind)], args=[token, expected, *_pairs(fields)]
            )
        )

    def take_over(self, key: str, kind: str, *, read: dict[str, str], **fields: object) -> bool:
        """Another run moves on a record it found stale, if it is still as it ``read``
        it (its state and time)."""
        fields.setdefault("at", self.now())
        expected = [read.get("state", ""), read.get("at", "")]
        return bool(
            self._take_over_reply(keys=[keys.reply(key, kind)], args=[*expected, *_pairs(fields)])
        )

    def count_reply(self, kind: str, address: str, *, limit: int, window: int) -> bool:
        """One more reply of ``kind`` to ``address``, if fewer than ``limit`` went in
        the window: shared by every worker."""
        return bool(self._count_reply(keys=[keys.reply_rate(kind, address)], args=[limit, window]))

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
