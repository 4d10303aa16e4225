"""Simulated threads that run one at a time and hand control back at checkpoints.

Each running task is an :class:`Actor`, run by a real thread (a :class:`Carrier`, reused
from task to task) only while the scheduler (the main thread) waits for it. Hooks call
:func:`checkpoint` before and after every external operation. There the actor asks the
scheduler's ``decide`` (it may: only one thread ever runs) whether to go on, to die
(:class:`Crash`, raised right there, as kill -9 would stop it) or to hand control back
to the scheduler, which then picks what runs next. A crashing actor performs no further
external operation: every later checkpoint raises again, so ``finally`` blocks cannot
release locks or log out.
"""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable
from typing import Any

GO, CRASH, YIELD = "go", "crash", "yield"


class Crash(BaseException):
    """Kills a simulated thread where it stands (no ``except Exception`` catches it)."""


_local = threading.local()


def current() -> Actor | None:
    """The actor running in this thread (None in the scheduler's own thread)."""
    return getattr(_local, "actor", None)


def checkpoint(label: str) -> None:
    """A point where the schedule may switch threads or kill this one (no-op outside
    an actor)."""
    actor = getattr(_local, "actor", None)
    if actor is not None:
        actor.checkpoint(label)


class _Baton:
    """A binary semaphore on a raw lock (a third of a ``threading.Semaphore``'s cost)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def give(self) -> None:
        self._lock.release()

    def take(self) -> None:
        self._lock.acquire()


class Carrier:
    """A reusable thread that runs one actor at a time."""

    def __init__(self, pool: list[Carrier]) -> None:
        self.pool = pool
        self.actor: Actor | None = None
        self.wake = _Baton()
        self.thread = threading.Thread(target=self._loop, name="sim-carrier", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.wake.take()
            actor = self.actor
            if actor is None:
                return
            actor._run()


_pool: list[Carrier] = []


def _carrier() -> Carrier:
    return _pool.pop() if _pool else Carrier(_pool)


class Actor:
    """One task running in a carrier thread; ``resume`` runs it to its next yield."""

    def __init__(
        self,
        name: str,
        fn: Callable[[], Any],
        owner: Any = None,
        decide: Callable[[Actor], str] | None = None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.owner = owner  # the scheduler's worker record
        self.decide = decide  # asked at each checkpoint: GO, CRASH or YIELD
        self.label = "start"  # where it stands
        self.crashing = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.crashed_at: str | None = None
        self.checkpoints = 0
        self.pending_errors: list[BaseException] = []  # raised at its next Redis command
        self._command = GO
        self._go = _Baton()
        self._back = _Baton()
        self._carrier: Carrier | None = None

    # -- the scheduler's side ------------------------------------------------------
    def resume(self, command: str = GO) -> None:
        """Run until it yields or ends (``crash``: die at the checkpoint it stands at)."""
        assert not self.done, self.name
        self._command = command
        if self._carrier is None:
            self._carrier = _carrier()
            self._carrier.actor = self
            self._carrier.wake.give()
        else:
            self._go.give()
        self._back.take()
        if self.done and self._carrier is not None:
            self._carrier.actor = None
            _pool.append(self._carrier)
            self._carrier = None

    # -- the actor's side ----------------------------------------------------------
    def checkpoint(self, label: str) -> None:
        if self.crashing:
            raise Crash(label)
        self.label = label
        self.checkpoints += 1
        verdict = self.decide(self) if self.decide is not None else YIELD
        if verdict == GO:
            return
        if verdict != CRASH:
            self._back.give()
            self._go.take()
            verdict = self._command
        if verdict == CRASH:
            self.crashing = True
            raise Crash(label)

    def _run(self) -> None:
        _local.actor = self
        try:
            if self._command == CRASH:
                self.crashing = True
                raise Crash("start")
            self.result = self.fn()
        except Crash:
            self.crashing = True
            self.crashed_at = self.label
        except BaseException as exc:  # noqa: BLE001 - reported to the scheduler
            self.error = exc
        finally:
            self.done = True
            _local.actor = None
            self._back.give()
