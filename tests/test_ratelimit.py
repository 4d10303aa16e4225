"""The shared Alloy rate limit: a token bucket in a real Redis, tested with explicit
clock values so the figures are exact, and from several threads at once; what it counts
for `mailingest status`; the pause every worker keeps after a 429."""

from __future__ import annotations

import threading

import pytest
import redis

from mailingest.adapters.rate_limit import (
    PAUSE_WITHOUT_RETRY_AFTER,
    AlloyPause,
    Pace,
    Paused,
    RateLimited,
    RateLimiter,
    read_pace,
)

pytestmark = pytest.mark.servers


def test_burst_then_one_token_per_interval(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, rate=10, burst=5, max_wait=100)
    waits = [limiter.reserve(now_ms=0) for _ in range(8)]
    assert waits == [0, 0, 0, 0, 0, 0.1, 0.2, 0.3]  # 5 at once, then one per 100 ms
    assert limiter.reserve(now_ms=1000) == pytest.approx(0.0)  # refilled meanwhile
    assert limiter.reserve(now_ms=10_000) == 0  # never more than the burst saved up
    assert [limiter.reserve(now_ms=10_000) for _ in range(5)] == [0, 0, 0, 0, 0.1]


def test_a_long_wait_is_refused_not_waited_out(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, rate=2, burst=1, max_wait=1)
    assert limiter.reserve(now_ms=0) == 0
    assert limiter.reserve(now_ms=0) == 0.5
    assert limiter.reserve(now_ms=0) == 1.0
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(now_ms=0)
    assert refused.value.retry_after == 1.5
    assert limiter.reserve(now_ms=2000) == 0.0  # the refusal took no token


def test_workers_share_one_bucket(redis_url: str) -> None:
    """Four clients (as four worker processes would) reserve at the same instant: the
    bucket serves them one after the other, exactly, whoever asks."""
    results: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        client = redis.Redis.from_url(redis_url)
        limiter = RateLimiter(client, rate=20, burst=4, max_wait=100)
        for _ in range(10):
            wait = limiter.reserve(now_ms=5_000)
            with lock:
                results.append(wait)
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [0.0] * 4 + [n / 20 for n in range(1, 37)]


# -- what the limiter did in the last minute (status) ----------------------------------


def test_the_bucket_counts_what_it_delayed_in_the_same_call(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, rate=10, burst=5, max_wait=0.25)
    start = 1_750_000_000_000
    waits = [limiter.reserve(now_ms=start) for _ in range(7)]
    assert waits == [0, 0, 0, 0, 0, 0.1, 0.2]
    with pytest.raises(RateLimited):
        limiter.reserve(now_ms=start)  # 0.3 s away: over max_wait, put off
    pace = read_pace(redis_client, rate=10, burst=5, now_ms=start)
    assert (pace.requests, pace.delayed, pace.waited_ms, pace.deferred) == (7, 2, 300, 1)
    assert pace.answered_429 == 0 and pace.pause_ms == 0
    assert pace.tokens == pytest.approx(-2) and pace.bucket_empty
    assert pace.waiting == 2  # the two delayed hold tokens not yet due
    assert pace.sets_the_pace
    # 59 s later the same second is still in the window; the bucket refilled meanwhile
    later = read_pace(redis_client, rate=10, burst=5, now_ms=start + 59_999)
    assert (later.requests, later.delayed, later.deferred) == (7, 2, 1)
    assert later.tokens == 5 and not later.bucket_empty and later.waiting == 0
    # a minute later it is out of the window
    gone = read_pace(redis_client, rate=10, burst=5, now_ms=start + 60_000)
    assert (gone.requests, gone.delayed, gone.waited_ms, gone.deferred) == (0, 0, 0, 0)
    assert not gone.sets_the_pace


def test_a_second_slot_is_emptied_before_it_is_used_again(redis_client: redis.Redis) -> None:
    """The counters are a ring of 60 one-second slots: the slot of second 60 is the slot
    of second 0, and must not add a minute-old count to the new one."""
    limiter = RateLimiter(redis_client, rate=1, burst=1, max_wait=100)
    start = 1_750_000_000_000
    assert [limiter.reserve(now_ms=start) for _ in range(3)] == [0, 1, 2]
    assert limiter.reserve(now_ms=start + 60_000) == 0  # refilled: in the same slot again
    pace = read_pace(redis_client, rate=1, burst=1, now_ms=start + 60_000)
    assert (pace.requests, pace.delayed, pace.waited_ms) == (1, 0, 0)
    assert pace.bucket_empty and pace.waiting == 0  # a burst of 1: empty after each
    assert not pace.sets_the_pace


def test_the_counters_add_up_across_seconds_and_workers(redis_url: str) -> None:
    start = 1_750_000_000_000
    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    limiters = [RateLimiter(c, rate=100, burst=100, max_wait=10) for c in clients]
    for second in range(5):  # 30 a second of 100 allowed: the limiter never binds
        for n in range(30):
            limiters[n % 2].reserve(now_ms=start + second * 1000 + n)
    pace = read_pace(clients[0], rate=100, burst=100, now_ms=start + 4_500)
    assert (pace.requests, pace.delayed, pace.deferred) == (150, 0, 0)
    assert not pace.sets_the_pace  # busy, but never held anyone
    for c in clients:
        c.close()


def test_the_verdict_sets_the_pace() -> None:
    def pace(requests: int, delayed: int, deferred: int = 0, tokens: float | None = 3) -> Pace:
        return Pace(requests, delayed, delayed * 100, deferred, 0, tokens, 0)

    assert not pace(0, 0).sets_the_pace  # idle
    assert not pace(100, 9).sets_the_pace  # a few at peaks
    assert pace(100, 10).sets_the_pace  # a tenth waited
    assert pace(50, 0, deferred=10).sets_the_pace  # put off for later counts as held
    assert pace(100, 0, tokens=-0.5).sets_the_pace  # a request waits for its token now
    assert not pace(100, 0, tokens=0.5).sets_the_pace  # empty, but nobody waits
    assert not pace(0, 0, tokens=-0.5).sets_the_pace  # nothing asked in the last minute
    assert not pace(100, 0, tokens=None).bucket_empty  # no bucket: the limiter is off


# -- the pause every worker keeps after a 429 ---------------------------------------------


class Clock:
    def __init__(self, ms: int = 1_750_000_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_a_429_pauses_every_worker_through_one_key(redis_url: str) -> None:
    clock = Clock()
    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    slept: list[float] = []
    got_it, other = (
        AlloyPause(c, clock=clock, refresh=0, max_pause=60, sleep=slept.append) for c in clients
    )
    assert other.remaining() == 0 and other.hold() == 0 and slept == []
    got_it.begin(2.5)  # Alloy's Retry-After
    assert got_it.remaining() == 2.5
    assert other.remaining() == 2.5  # the other worker reads it from Redis
    clock.ms += 1_000
    assert other.hold() == 1.5 and slept == [1.5]
    got_it.begin(0.5)  # a shorter Retry-After never shortens the pause
    assert other.remaining() == 1.5
    got_it.begin(3600)  # capped by max_pause
    assert other.remaining() == 60
    with pytest.raises(Paused) as too_long:  # longer than max_wait: not waited out here
        other.hold()
    assert too_long.value.retry_after == 60 and slept == [1.5]
    clock.ms += 60_000
    assert other.remaining() == 0
    got_it.begin(None)  # no Retry-After: a short pause all the same
    assert other.remaining() == PAUSE_WITHOUT_RETRY_AFTER
    pace = read_pace(clients[0], rate=0, burst=1, now_ms=clock.ms)
    assert pace.answered_429 == 1  # the three before are more than a minute old
    assert pace.pause_ms == PAUSE_WITHOUT_RETRY_AFTER * 1000
    assert pace.tokens is None and not pace.sets_the_pace
    for c in clients:
        c.close()


def test_the_pause_costs_no_round_trip_per_request(redis_client: redis.Redis) -> None:
    """Without a 429 a process reads the shared key at most once per refresh interval,
    however many requests it sends; after one, the worker that got it holds at once."""
    clock = Clock()
    pause = AlloyPause(redis_client, clock=clock, refresh=3600, sleep=lambda s: None)
    before = _calls(redis_client, "get")
    for _ in range(200):
        assert pause.hold() == 0
    assert _calls(redis_client, "get") - before == 1
    pause.begin(2)  # this process's own 429: known without reading the key again
    before = _calls(redis_client, "get")
    assert pause.hold() == 2
    assert _calls(redis_client, "get") == before


def _calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
