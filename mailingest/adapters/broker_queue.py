"""How long the broker's queue is: when the oldest task still waiting in it was sent.

Every task mailingest sends carries its send time in a header (``celery_app`` stamps it
on publish). Celery's Redis transport keeps a queue as a list consumed from its tail,
so the tail is the oldest waiting task: one ``LINDEX`` per queue, whatever the queue's
length. The sweep compares it with a stalled-looking mail's last activity: a task of
that mail sent before the oldest waiting one has left the queue.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import redis

log = logging.getLogger(__name__)

SENT_HEADER = "mailingest_sent_ms"


class BrokerQueue:
    def __init__(self, client: redis.Redis | None, queues: Sequence[str]) -> None:
        self.client = client  # None: a broker that is not Redis
        self.queues = tuple(queues)

    def oldest_sent_ms(self) -> int | None:
        """The send time (ms) of the oldest task waiting, None when none waits, 0 when
        it cannot be told (not a Redis broker, a task without the header, an error):
        then anything may still be waiting."""
        if self.client is None:
            return 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                pipe.lindex(queue, -1)
            tails = pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not read the broker's queue: %s", type(exc).__name__)
            return 0
        sent: list[int] = []
        for tail in tails:
            if tail is None:
                continue
            try:
                sent.append(int(json.loads(tail)["headers"][SENT_HEADER]))
            except (ValueError, KeyError, TypeError):
                return 0  # sent by something else: its age is unknown
        return min(sent) if sent else None
