from __future__ import annotations

import random

from mailingest.core.retry import RetryPolicy


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=10, base=1.0, cap=30.0)
    rng = random.Random(1)
    for attempt in range(10):
        ceiling = min(30.0, 2.0**attempt)
        delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, not a constant


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    policy = RetryPolicy(base=1.0, cap=60.0)
    assert policy.delay(5, retry_after=3.0) == 3.0
    assert policy.delay(0, retry_after=0.0) == 0.0
    assert policy.delay(0, retry_after=3600.0) == 60.0


def test_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3, base=1.0, cap=10.0)
    assert [policy.exhausted(n) for n in range(4)] == [False, False, True, True]
    assert policy.longest_wait() == 1.0 + 2.0
