"""One fix to kombu's Redis transport, without which a busy worker exits when Redis restarts.

When a worker loses its broker connection, Celery (5.7) first lets kombu collect the
connection, which detaches the transport from it (``transport.client = None``), then
closes it. Closing the channel hands the unacknowledged messages back to Redis (the
running tasks', with late acks), and that needs the broker's address, which the channel
reads from ``transport.client``: ``AttributeError: 'NoneType' object has no attribute
'hostname'``, which is no connection error, so the worker stops ("Unrecoverable error")
instead of reconnecting. The same happens when a task that ran through the outage is
acknowledged afterwards on its old channel. Only a worker with a message in hand meets it,
so an idle one survives a restart and a busy one (the usual case under load) does not.

:func:`install` wraps ``Channel._connparams``: a channel remembers the broker's address
while its transport has it, and uses it after the transport was detached. The
unacknowledged messages are then handed back if Redis answers (as kombu means to) or stay
in its unacked hash if it does not (given back after the visibility timeout, as after any
lost worker), and a late acknowledgement reaches Redis. ``tests/test_outages.py`` (a worker
with a step in flight when Redis is killed) fails without it.
"""

from __future__ import annotations

from functools import wraps
from typing import Any

MARK = "_mailingest_keeps_the_address"


def install() -> None:
    """Wrap kombu's ``redis.Channel._connparams`` (once; idempotent)."""
    from kombu.transport import redis as kombu_redis

    channel: Any = kombu_redis.Channel  # _connparams is not in kombu's type stubs
    original = getattr(channel, "_connparams", None)
    if original is None or getattr(original, MARK, False):
        return  # a kombu without it (the test of a busy worker through a restart tells)

    @wraps(original)
    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport.client is not None:
            self._mailingest_broker = transport.client  # the kombu Connection: the address
            return original(self, asynchronous)
        remembered = getattr(self, "_mailingest_broker", None)
        if remembered is None:
            return original(self, asynchronous)
        transport.client = remembered  # for this call only: the transport stays detached
        try:
            return original(self, asynchronous)
        finally:
            transport.client = None

    setattr(_connparams, MARK, True)
    channel._connparams = _connparams
