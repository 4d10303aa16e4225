"""When to try a failed step again: exponential backoff with jitter, honouring Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass

from mailingest.config.table import default_float, default_int


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``max_attempts`` tries in all, each delay at most ``cap`` seconds.

    Without a server hint the n-th delay (n from 0) is drawn from
    ``[d/2, d]`` with ``d = min(cap, base * 2**n)`` ("equal jitter": spread
    out, never zero). A ``Retry-After`` from the server is honoured as given,
    up to ``cap``.
    """

    # the settings' defaults (MAILINGEST_MAX_ATTEMPTS, _RETRY_BASE, _RETRY_CAP)
    max_attempts: int = default_int("MAX_ATTEMPTS")
    base: float = default_float("RETRY_BASE")
    cap: float = default_float("RETRY_CAP")

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(self.cap, retry_after)
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 32)))
        return (rng or random).uniform(ceiling / 2, ceiling)

    def exhausted(self, attempt: int) -> bool:
        """True when ``attempt`` (0-based count of tries made so far) used the budget."""
        return attempt + 1 >= self.max_attempts

    def longest_wait(self) -> float:
        """Upper bound of the total time spent waiting between tries."""
        return float(sum(min(self.cap, self.base * 2**n) for n in range(self.max_attempts - 1)))
