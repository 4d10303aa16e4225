"""What the ledger's three parts share: the Redis client, the clock, the staging key."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import redis
import redis.lock

from mailingest.adapters import keys
from mailingest.adapters.encryption import Plain, Sealer
from mailingest.adapters.ledger import scripts
from mailingest.adapters.ledger.clock import RedisClock
from mailingest.core.records import MailRef

# who moves a mail and on which attempt, for its history: a worker's task sets the
# attempt, the console its user ("console:<name>"); by default the host and process
ACTOR: ContextVar[str] = ContextVar("mailingest_actor", default="")
ATTEMPT: ContextVar[int] = ContextVar("mailingest_attempt", default=0)
HISTORY_KEPT = 64  # moves kept per mail (a mail retried for days keeps its latest)


def actor() -> str:
    """Who is acting now: the console's user, or this host and process."""
    return ACTOR.get() or f"{socket.gethostname()}:{os.getpid()}"


def decode(h: Any) -> dict[str, str]:
    """A Redis hash as text."""
    return {keys.as_text(k): keys.as_text(v) for k, v in h.items()}


class Store:
    """The Redis client and what every part of the ledger reads through it."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        staging_ttl: int = 7 * 86400,
        sealer: Sealer | Plain | None = None,
        on_recorded: Callable[[MailRef], None] | None = None,
        on_decided: Callable[[str, str, str], None] | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.redis = client
        self.now = clock or RedisClock(client)  # ms; one clock for all workers
        self.staging_ttl = staging_ttl
        self.sealer = sealer or Plain()  # staged bytes encrypted at rest when a key is set
        # told once per mail recorded, and once per move to a final state (the metrics)
        self.on_recorded = on_recorded
        self.on_decided = on_decided
        self._transition = client.register_script(scripts.TRANSITION)
        self._record = client.register_script(scripts.RECORD)
        self._reindex = client.register_script(scripts.REINDEX)
        self._claim = client.register_script(scripts.CLAIM)
        self._begin = client.register_script(scripts.BEGIN)
        self._clear_attempt = client.register_script(scripts.CLEAR_ATTEMPT)
        self._add_reason = client.register_script(scripts.ADD_REASON)
        self._update = client.register_script(scripts.UPDATE)
        self._mirror = client.register_script(scripts.MIRROR)
        self._claim_reply = client.register_script(scripts.CLAIM_REPLY)
        self._settle_reply_script = client.register_script(scripts.SETTLE_REPLY)
        self._take_over_reply = client.register_script(scripts.TAKE_OVER_REPLY)
        self._count_reply = client.register_script(scripts.COUNT_REPLY)
