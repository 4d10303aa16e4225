"""One clock for every worker of the ledger: Redis's."""

from __future__ import annotations

import time

import redis


def now_ms() -> int:
    return int(time.time() * 1000)


class RedisClock:
    """Milliseconds on Redis's clock: one clock for every worker of the ledger.

    Workers on different hosts disagree about the time; comparing one worker's
    timestamp with another's (is this mail stale? is this attempt past its
    window?) would inherit their skew. The offset to Redis's ``TIME`` is measured
    on first use and again every ``resync`` seconds (one round trip), so reading
    the clock costs nothing."""

    def __init__(self, client: redis.Redis, *, resync: float = 300.0) -> None:
        self.client = client
        self.resync = resync
        self._offset_ms: int | None = None
        self._synced_at = 0.0

    def __call__(self) -> int:
        local = time.time()
        if self._offset_ms is None or time.monotonic() - self._synced_at > self.resync:
            try:
                seconds, micros = self.client.time()
                self._offset_ms = int(seconds * 1000 + micros // 1000) - int(
                    (local + time.time()) * 500
                )
                self._synced_at = time.monotonic()
            except redis.RedisError:
                if self._offset_ms is None:
                    return int(local * 1000)  # Redis down: the ledger call will fail anyway
        return int(local * 1000) + self._offset_ms
