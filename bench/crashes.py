"""The recovery phase's crashes: kill -9 of a worker mid-step, then its restart, and how
long each mail it held sat still.

A ``Crashes`` runs in a thread beside ``Bench.run_mailingest``'s wait. For each planned
kill, ``spacing_s`` after the one before and once the last restart is done, it waits
until the chosen worker (the prefork ``worker`` or the thread-pool ``io-worker``) holds
a lease on at least one mail, snapshots every mail it holds, sends SIGKILL to its
process group (``CeleryProcess.kill``) and starts it again at once, as the compose
file's restart policy does. A mail "moves again" at the first sample in
which its state, its last activity or one of its documents' states differs from the
snapshot; the time from the kill to then is that mail's recovery time. Mails that were
only reserved by the killed worker (prefetched, no lease yet) are not counted: their
tasks come back the same way, but no lease says whose they were.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from mailingest.adapters import ledger as L
from mailingest.adapters.ledger.leases import Leases
from mailingest.core import decisions
from mailingest.core.states import IN_FLIGHT

from .stack import Mailingest, children

SAMPLE_S = 0.25
GIVE_UP_S = 300.0  # a mail still at rest this long after the kill is reported as such


@dataclass
class Kill:
    role: str  # "worker" (prefork: poll, parse) or "io-worker" (threads: describe, upload)
    at: float = 0.0  # seconds after the first poll
    held: int = 0  # mails the killed worker held a lease on
    recovered_s: list[float] = field(default_factory=list)
    never: int = 0  # still at rest after GIVE_UP_S
    skipped: bool = False  # the worker held no lease within max_wait_s (its work was done)
    restart_s: float = 0.0  # kill -> the restarted worker ready


def _look(ledger: L.Ledger, mail_id: str) -> tuple[Any, ...] | None:
    record = ledger.mail(mail_id)
    if record is None:
        return None
    docs = ledger.documents(mail_id, record.documents) if record.documents else []
    return (
        record.state,
        decisions.last_activity(record),
        record.filed_to,
        tuple(doc.state for doc in docs),
    )


class Crashes:
    """Kill each role of ``plan`` in turn (see the module's docstring)."""

    def __init__(
        self, plan: list[str], *, lease_ms: int, spacing_s: float = 5.0, max_wait_s: float = 30.0
    ) -> None:
        self.kills = [Kill(role) for role in plan]
        self.lease_ms = lease_ms
        self.spacing_s = spacing_s
        self.max_wait_s = max_wait_s
        self.errors: list[str] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, procs: Mailingest, client: redis.Redis, started: float) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(procs, client, started), name="crashes", daemon=True
        )
        self._thread.start()

    def join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(GIVE_UP_S + 60)

    def _pids(self, procs: Mailingest, role: str) -> set[int]:
        proc = procs.io_worker if role == "io-worker" else procs.worker
        main = proc.pid if proc is not None else None
        return {main, *children(main)} if main else set()

    def _held(self, ledger: L.Ledger, leases: Leases, pids: set[int]) -> list[str]:
        pending = ledger.mails(IN_FLIGHT)
        holders = leases.mail_holders([(r.id, r.documents) for r in pending])
        return [mail_id for mail_id, who in holders.items() if int(who.rsplit(":", 1)[-1]) in pids]

    def _run(self, procs: Mailingest, client: redis.Redis, started: float) -> None:
        try:
            ledger = L.Ledger(client)
            leases = Leases(client, lease_ms=self.lease_ms, heartbeat=False)
            # mail id -> (its kill, what it looked like then, when)
            waiting: dict[str, tuple[Kill, Any, float]] = {}
            restarts: list[threading.Thread] = []
            for kill in self.kills:
                proc = procs.io_worker if kill.role == "io-worker" else procs.worker
                assert proc is not None, kill.role
                self._sample(ledger, waiting, until=time.monotonic() + self.spacing_s)
                while any(restart.is_alive() for restart in restarts):
                    self._sample(ledger, waiting, until=time.monotonic() + 0.1)
                deadline = time.monotonic() + self.max_wait_s
                held: list[str] = []
                while not held and time.monotonic() < deadline and not self._stop.is_set():
                    held = self._held(ledger, leases, self._pids(procs, kill.role))
                    if not held:
                        self._sample(ledger, waiting, until=time.monotonic() + 0.05)
                if not held:
                    kill.skipped = True  # the run ended, or this worker's part of it did
                    continue
                before = {mail_id: _look(ledger, mail_id) for mail_id in held}
                proc.kill()  # SIGKILL to the process group
                killed = time.monotonic()
                kill.at = time.time() - started
                kill.held = len(held)
                for mail_id, seen in before.items():
                    waiting.setdefault(mail_id, (kill, seen, killed))
                restart = threading.Thread(target=self._restart, args=(proc, kill, killed))
                restart.start()  # the supervisor's restart, while the samples run
                restarts.append(restart)
            self._sample(ledger, waiting, until=time.monotonic() + GIVE_UP_S, drain=True)
            for kill, _, _ in waiting.values():
                kill.never += 1
            for restart in restarts:
                restart.join()
        # reported with the run, which then counts as invalid
        except (redis.RedisError, RuntimeError, OSError, AssertionError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _sample(
        self,
        ledger: L.Ledger,
        waiting: dict[str, tuple[Kill, Any, float]],
        *,
        until: float,
        drain: bool = False,
    ) -> None:
        """Until ``until`` (``drain``: or until no mail waits): each waiting mail that
        moved since its kill leaves ``waiting`` with its time."""
        while True:
            for mail_id, (kill, seen, killed) in list(waiting.items()):
                if _look(ledger, mail_id) != seen:
                    kill.recovered_s.append(round(time.monotonic() - killed, 2))
                    del waiting[mail_id]
            if time.monotonic() >= until or (drain and not waiting):
                return
            time.sleep(SAMPLE_S)

    def _restart(self, proc: Any, kill: Kill, killed: float) -> None:
        try:
            proc.start()
            kill.restart_s = time.monotonic() - killed
        except (RuntimeError, OSError) as exc:
            self.errors.append(f"restart of {kill.role}: {type(exc).__name__}: {exc}")

    def summary(self) -> dict[str, Any]:
        times = sorted(t for kill in self.kills for t in kill.recovered_s)
        return {
            "kills": [kill.__dict__ for kill in self.kills],
            "held": sum(kill.held for kill in self.kills),
            "recovered_s": times,
            "never": sum(kill.never for kill in self.kills),
            "errors": self.errors,
        }
