"""Simulated time: one clock for the world, a skewed local clock per worker.

The ledger gets the shared clock (``clock=`` of ``build_context``: in production it is
Redis's clock, the same for every worker). Each worker's *local* clock (``time.time()``
and ``time.monotonic()`` inside the ``mailingest`` modules) is the shared one plus that
worker's skew, so code that compares local time with ledger time shows the skew. The
Alloy sandbox stamps documents with the shared clock.
"""

from __future__ import annotations

import sys
import time as _time
from collections.abc import Callable
from types import ModuleType
from typing import Any

EPOCH_MS = 1_750_000_000_000  # every schedule starts here: runs do not depend on the day

# modules that run servers or wait for them: they keep real time
_REAL_TIME_MODULES = {
    "mailingest_testbed.servers",
    "mailingest_testbed.alloy_sandbox",
    "mailingest_testbed.demo",
    "mailingest_testbed.oauth_sandbox",
    "mailingest.application.cli",
    "mailingest.application.watch",
    "mailingest.core.base64_bodies",
}


class SimClock:
    """Milliseconds of simulated time; only the scheduler moves it."""

    def __init__(self, start_ms: int = EPOCH_MS) -> None:
        self.now_ms = start_ms
        # the calling thread's skew (ms); set by the scheduler (a worker's offset)
        self.local_skew: Callable[[], int] = lambda: 0

    def __call__(self) -> int:
        return self.now_ms

    def reset(self, start_ms: int = EPOCH_MS) -> None:
        self.now_ms = start_ms

    def advance(self, ms: int) -> None:
        self.now_ms += max(0, ms)

    def local_ms(self) -> int:
        return self.now_ms + self.local_skew()


class TimeShim:
    """Stands in for the ``time`` module inside mailingest: simulated wall and monotonic
    time (with the worker's skew); everything else is the real module."""

    def __init__(self, clock: SimClock) -> None:
        self._clock = clock

    def time(self) -> float:
        return self._clock.local_ms() / 1000.0

    def time_ns(self) -> int:
        return self._clock.local_ms() * 1_000_000

    def monotonic(self) -> float:
        return self._clock.local_ms() / 1000.0

    def sleep(self, seconds: float) -> None:  # nothing in a step should sleep; if it does
        self._clock.advance(int(seconds * 1000))

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


class Installed:
    """The patches one :func:`install` made, undone by :meth:`undo`."""

    def __init__(self) -> None:
        self._undo: list[tuple[ModuleType, str, Any]] = []

    def patch(self, module: ModuleType, name: str, value: Any) -> None:
        self._undo.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def undo(self) -> None:
        for module, name, value in reversed(self._undo):
            setattr(module, name, value)
        self._undo.clear()


def install(clock: SimClock) -> Installed:
    """Point every loaded ``mailingest`` module's ``time`` at the shim and the sandbox's
    document timestamps at the shared clock."""
    import mailingest_testbed.alloy_sandbox.model as sandbox

    done = Installed()
    shim = TimeShim(clock)
    for name, module in list(sys.modules.items()):
        if not name.startswith("mailingest.") or name in _REAL_TIME_MODULES or module is None:
            continue
        if getattr(module, "time", None) is _time:
            done.patch(module, "time", shim)
    done.patch(sandbox, "now_ms", clock)
    _cache_tls_contexts(done)
    return done


class _CachedTLS:
    """``ssl`` for mailingest.adapters.imap with ``create_default_context`` cached: loading the
    system CAs costs ~40 ms per IMAP connection, and the simulation's are plain TCP."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real
        self._default: Any = None

    def create_default_context(self, *args: Any, **kw: Any) -> Any:
        if args or any(v is not None for v in kw.values()):
            return self._real.create_default_context(*args, **kw)
        if self._default is None:
            self._default = self._real.create_default_context()
        return self._default

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _cache_tls_contexts(done: Installed) -> None:
    import mailingest.adapters.imap as inbox

    if getattr(inbox, "ssl", None) is not None and not isinstance(inbox.ssl, _CachedTLS):
        done.patch(inbox, "ssl", _CachedTLS(inbox.ssl))
