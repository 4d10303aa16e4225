"""The shared Alloy rate limit: a token bucket in a real Redis, tested with explicit
clock values so the figures are exact, and from several threads at once."""

from __future__ import annotations

import threading

import pytest
import redis

from mailingest.adapters.rate_limit import RateLimited, RateLimiter

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
