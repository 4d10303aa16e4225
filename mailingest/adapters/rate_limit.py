"""One request rate to Alloy for all workers on all hosts: a token bucket in Redis.

Every worker process takes a token before each Alloy request
(``MAILINGEST_ALLOY_RATE`` per second, bursts up to ``MAILINGEST_ALLOY_BURST``),
so adding workers never turns into a 429 storm. A request that would have to
wait longer than ``max_wait`` does not wait in the worker: the limiter says so
and the step is retried later (its task is not holding a worker meanwhile).

Tokens are reserved, not polled: a caller that must wait is told how long and
its token is already its own, so callers are served in arrival order. The
bucket uses Redis' clock, so workers on hosts with skewed clocks agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from mailingest.adapters import keys

# KEYS[1] bucket; ARGV: rate per s, burst, max wait ms, now ms ('' = Redis' clock)
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local wait = 0
if tokens < 1 then wait = math.ceil((1 - tokens) * 1000 / rate) end
if wait > max_wait then return -wait end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 60000)
return wait
"""


class RateLimited(Exception):
    """The wait for a token would be longer than allowed; try again after ``retry_after``."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limit: next slot in {retry_after:.1f}s")
        self.retry_after = retry_after


class RateLimiter:
    def __init__(
        self,
        client: redis.Redis,
        *,
        rate: float,
        burst: int,
        max_wait: float = 5.0,
        name: str = "alloy",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.max_wait = rate, burst, max_wait
        self.key = keys.rate_bucket(name)
        self._take = client.register_script(_TAKE)
        self._sleep = sleep

    def reserve(self, now_ms: int | None = None) -> float:
        """Take a token: seconds to wait before using it. Raises RateLimited when the
        wait would exceed ``max_wait`` (then no token is taken)."""
        waited = int(
            self._take(
                keys=[self.key],
                args=[
                    self.rate,
                    self.burst,
                    int(self.max_wait * 1000),
                    "" if now_ms is None else now_ms,
                ],
            )
        )
        if waited < 0:
            raise RateLimited(-waited / 1000)
        return waited / 1000

    def acquire(self) -> None:
        """Block until this process may send one request."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
