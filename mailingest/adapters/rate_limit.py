"""Alloy's request rate, shared by all workers on all hosts through Redis.

Two mechanisms; :class:`~mailingest.adapters.alloy.AlloyClient` asks both before each
request (the pause first, so a paused worker takes no token).

**The pause after a 429** (:class:`AlloyPause`, always on). Alloy publishes no rate
limit; it answers 429, sometimes with ``Retry-After``. The worker that gets one
writes "pause until" (Redis' clock) to one key, and every worker holds its requests
until then, instead of each finding the limit with a 429 of its own. Reading the key
costs one GET per process at most every :data:`PAUSE_REFRESH` seconds, and only
while it sends requests: not a round trip per request. So a worker learns of
another's 429 within that interval; of its own at once.

**The token bucket** (:class:`RateLimiter`, when ``MAILINGEST_ALLOY_RATE`` is set):
every request takes a token (``MAILINGEST_ALLOY_RATE`` per second, bursts up to
``MAILINGEST_ALLOY_BURST``), so the fleet together never exceeds a rate a team knows
from its Alloy contract. Tokens are reserved, not polled: a caller that must wait is
told how long and its token is already its own, so callers are served in arrival
order. The bucket uses Redis' clock, so workers on hosts with skewed clocks agree.

Neither waits long inside a worker: a hold longer than ``max_wait`` raises
:class:`Deferred` (the step is retried after it; its task does not hold a worker
meanwhile).

**What they did in the last minute** (:func:`read_pace`, for ``mailingest status``):
the same script call that takes a token counts, per second of Redis' clock, the
requests, those delayed, the milliseconds they wait and those deferred; the 429s are
counted where the pause is written. No extra round trip.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from mailingest.adapters import keys

log = logging.getLogger(__name__)

# seconds between reads of the shared pause by one process (while it sends requests)
PAUSE_REFRESH = 0.5
# how long every worker holds its requests after a 429 without Retry-After
PAUSE_WITHOUT_RETRY_AFTER = 1.0
# the longest a request waits inside a worker (for a token or out a pause)
MAX_WAIT = 5.0
# the window of read_pace: the current second and the 59 before it
WINDOW_S = 60
_FIELDS = ("n", "d", "w", "r", "t")  # requests, delayed, ms waited, deferred, 429s

# count(stats, now ms, {field = by, ...}): a ring of WINDOW_S one-second slots in one
# hash; a slot found holding an older second is emptied first
_COUNT = """
local function count(stats, now, by)
  local sec = math.floor(now / 1000)
  local k = sec % 60
  if tonumber(redis.call('HGET', stats, 's' .. k)) ~= sec then
    redis.call('HSET', stats, 's' .. k, sec, 'n' .. k, 0, 'd' .. k, 0, 'w' .. k, 0,
               'r' .. k, 0, 't' .. k, 0)
  end
  for field, n in pairs(by) do
    if n ~= 0 then redis.call('HINCRBY', stats, field .. k, n) end
  end
  redis.call('PEXPIRE', stats, 120000)
end
"""

# KEYS[1] bucket, KEYS[2] stats; ARGV: rate per s, burst, max wait ms, now ms ('' = Redis' clock)
_TAKE = (
    _COUNT
    + """
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
if wait > max_wait then
  count(KEYS[2], now, {r = 1})
  return -wait
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 60000)
if wait > 0 then
  count(KEYS[2], now, {n = 1, d = 1, w = wait})
else
  count(KEYS[2], now, {n = 1})
end
return wait
"""
)

# KEYS[1] pause, KEYS[2] stats; ARGV: pause until (ms, shared clock), now (ms, same clock)
_PAUSE = (
    _COUNT
    + """
local ends = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local held = tonumber(redis.call('GET', KEYS[1])) or 0
if ends > held and ends > now then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ends - now + 60000)
  held = ends
end
count(KEYS[2], now, {t = 1})
return held
"""
)


class Deferred(Exception):
    """The hold before a request would be longer than allowed: try again after
    ``retry_after`` (the request was not sent). ``cause``: ``rate_limit`` or ``pause``."""

    cause = "rate_limit"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Deferred):
    """The wait for a token would be longer than allowed (then no token is taken)."""

    cause = "rate_limit"

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limit: next slot in {retry_after:.1f}s", retry_after)


class Paused(Deferred):
    """Alloy answered a worker 429 and every worker holds its requests a while longer."""

    cause = "pause"

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            f"Alloy answered 429: every worker holds its requests {retry_after:.1f}s more",
            retry_after,
        )


class RateLimiter:
    def __init__(
        self,
        client: redis.Redis,
        *,
        rate: float,
        burst: int,
        max_wait: float = MAX_WAIT,
        name: str = "alloy",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.max_wait = rate, burst, max_wait
        self.key = keys.rate_bucket(name)
        self.stats_key = keys.rate_stats(name)
        self._take = client.register_script(_TAKE)
        self._sleep = sleep

    def reserve(self, now_ms: int | None = None) -> float:
        """Take a token: seconds to wait before using it. Raises RateLimited when the
        wait would exceed ``max_wait`` (then no token is taken)."""
        waited = int(
            self._take(
                keys=[self.key, self.stats_key],
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

    def acquire(self) -> float:
        """Block until this process may send one request; the seconds it waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait


class AlloyPause:
    """After a 429, every worker holds its Alloy requests until Alloy's ``Retry-After``
    (or :data:`PAUSE_WITHOUT_RETRY_AFTER` s) has passed.

    ``clock`` is milliseconds on the clock all workers share (the ledger's: Redis'), so
    a pause means the same moment to every host. ``max_pause`` caps what a 429 may ask
    (the retry cap: no step waits longer either).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        clock: Callable[[], int],
        max_pause: float = 300.0,
        max_wait: float = MAX_WAIT,
        refresh: float = PAUSE_REFRESH,
        name: str = "alloy",
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.max_pause, self.max_wait, self.refresh = max_pause, max_wait, refresh
        self.key = keys.rate_pause(name)
        self.stats_key = keys.rate_stats(name)
        self._pause = client.register_script(_PAUSE)
        self._sleep = sleep
        self._until_ms = 0  # the pause as this process last knew it (shared clock)
        self._next_read = float("-inf")  # time.monotonic() of the next read of the key

    def remaining(self) -> float:
        """Seconds every worker still holds its requests (0: none). Reads the shared key
        at most every ``refresh`` seconds; between reads, what this process knows."""
        now = time.monotonic()
        if now >= self._next_read:
            self._next_read = now + self.refresh
            try:
                value = self.client.get(self.key)
            except redis.RedisError as exc:  # advisory: Alloy's own 429 still stops us
                log.debug("cannot read the shared Alloy pause (%s)", type(exc).__name__)
            else:
                self._until_ms = max(self._until_ms, int(value or 0))
        return max(0, self._until_ms - self.clock()) / 1000

    def hold(self) -> float:
        """Wait out the pause if it is short; the seconds waited. Raises :class:`Paused`
        when it is longer than ``max_wait`` (nothing waited)."""
        left = self.remaining()
        if left <= 0:
            return 0.0
        if left > self.max_wait:
            raise Paused(left)
        if self._sleep is not None:
            self._sleep(left)
        else:
            time.sleep(left)  # looked up now: the simulation's clock replaces time
        return left

    def forget(self) -> None:
        """Drop what this process knows of the pause; the next call reads the key again
        (the simulation reuses a worker's services across schedules on an emptied Redis
        and a clock set back)."""
        self._until_ms = 0
        self._next_read = float("-inf")

    def begin(self, retry_after: float | None) -> None:
        """Alloy answered 429: every worker holds its requests for ``retry_after``
        seconds (capped at ``max_pause``), or a short while when Alloy did not say."""
        seconds = PAUSE_WITHOUT_RETRY_AFTER if retry_after is None else retry_after
        now = self.clock()
        until = now + int(min(seconds, self.max_pause) * 1000)
        self._until_ms = max(self._until_ms, until)
        try:
            held = int(self._pause(keys=[self.key, self.stats_key], args=[until, now]))
        except redis.RedisError as exc:
            log.warning("cannot share Alloy's 429 with the other workers (%s)", type(exc).__name__)
            return
        self._until_ms = max(self._until_ms, held)


@dataclass(frozen=True)
class Pace:
    """The last minute of Alloy requests as the shared limiter and pause counted them
    (every worker's): what ``mailingest status`` shows."""

    requests: int  # tokens taken (0 while the limiter is off)
    delayed: int  # of them, the requests that waited for their token
    waited_ms: int  # how long they waited, together
    deferred: int  # requests refused a token (the wait was over MAX_WAIT): retried later
    answered_429: int  # 429s Alloy answered to any worker
    tokens: float | None  # in the bucket now (negative: requests queued); None: no bucket
    pause_ms: int  # left of the pause every worker holds its requests for (0: none)

    @property
    def bucket_empty(self) -> bool:
        """The next request waits for its token."""
        return self.tokens is not None and self.tokens < 1

    @property
    def waiting(self) -> int:
        """Requests holding a token not yet due: waiting for it now."""
        return 0 if self.tokens is None or self.tokens >= 0 else math.ceil(-self.tokens)

    @property
    def sets_the_pace(self) -> bool:
        """The limiter, not the pipeline, decides how fast mail goes: a tenth of last
        minute's requests or more waited for a token (or were put off), or requests
        wait for one now."""
        asked = self.requests + self.deferred
        held = self.delayed + self.deferred
        return asked > 0 and (10 * held >= asked or self.waiting > 0)


def read_pace(
    client: redis.Redis,
    *,
    rate: float,
    burst: int,
    name: str = "alloy",
    now_ms: int | None = None,
) -> Pace:
    """What the limiter and the pause did in the last minute (one round trip)."""
    pipe = client.pipeline(transaction=False)
    ask_pace(pipe, name)
    return pace_of(pipe.execute(), rate=rate, burst=burst, now_ms=now_ms)


def ask_pace(pipe: Any, name: str = "alloy") -> None:
    """Queue on ``pipe`` the four reads :func:`pace_of` needs (in a pipeline of others)."""
    pipe.hgetall(keys.rate_stats(name))
    pipe.hmget(keys.rate_bucket(name), ["tokens", "at"])
    pipe.get(keys.rate_pause(name))
    pipe.time()


def pace_of(answers: Sequence[Any], *, rate: float, burst: int, now_ms: int | None = None) -> Pace:
    """The :class:`Pace` of the four answers :func:`ask_pace` queued."""
    stats, (tokens, at), pause, (seconds, micros) = answers
    now = now_ms if now_ms is not None else int(seconds) * 1000 + int(micros) // 1000
    fields = {keys.as_text(k): int(v) for k, v in stats.items()}
    second = now // 1000
    totals = dict.fromkeys(_FIELDS, 0)
    for slot in range(WINDOW_S):
        held = fields.get(f"s{slot}")
        if held is None or not second - WINDOW_S < held <= second:
            continue
        for field in _FIELDS:
            totals[field] += fields.get(f"{field}{slot}", 0)
    left: float | None = None
    if tokens is not None and rate > 0:
        since = max(0, now - int(float(at or now)))
        left = min(float(burst), float(tokens) + since * rate / 1000)
    return Pace(
        requests=totals["n"],
        delayed=totals["d"],
        waited_ms=totals["w"],
        deferred=totals["r"],
        answered_429=totals["t"],
        tokens=left,
        pause_ms=max(0, int(pause or 0) - now),
    )
