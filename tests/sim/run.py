"""One schedule from a seed: draw faults and mails, run the real steps, quiesce, check.

:class:`Simulation` binds the scheduler to the product: a task body is what
``mailingest.application.tasks`` does in a Celery worker (``pipeline.run_step``,
``pipeline.recover`` on an exception; ``pipeline.poll`` with ``emit`` for a poll).
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mailingest.adapters import ledger as L
from mailingest.core import retry

from . import checker, clock, faults, scenario
from .checker import Violation
from .faults import FaultPlan
from .hooks import HeldRequest, plain_transport
from .scheduler import Job, Outcome, Scheduler, Worker
from .world import Folders, World

# The one residual of a Redis rollback (docs/reliability.md, "Hazards"): a rollback that
# erases a describe attempt whose POST Alloy commits late, after the next listing, lets
# the document be described again. Only that combination is accepted, and only with
# these invariants; a rollback alone must cost nothing.
DOCUMENTED_UNDER_ROLLBACK = ("document exactly once", "no stray description")


def command(seed: int) -> str:
    return f".venv/bin/python -m tests.sim --seed {seed}"


@dataclass
class Result:
    seed: int
    plan: FaultPlan
    trace: list[str]
    digest: str
    violations: list[Violation]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def documented(self) -> bool:
        """Every violation is one the README accepts after a Redis rollback."""
        trace = " ".join(self.trace)
        return (
            bool(self.violations)
            and self.plan.has("rollback")
            and self.plan.has("late")
            and "event rollback" in trace
            and "net late" in trace
            and all(v.invariant in DOCUMENTED_UNDER_ROLLBACK for v in self.violations)
        )

    @property
    def failed(self) -> bool:
        return bool(self.violations) and not self.documented

    @property
    def harness_error(self) -> bool:
        return any(v.invariant == "harness" for v in self.violations)

    def summary(self, limit: int = 14) -> str:
        """The decisions that say what happened: faults, retries, events (not every
        switch)."""
        interesting = [
            t for t in self.trace if not t.startswith(("run ", "advance", "thaw", "start "))
        ]
        more = f"; ... {len(interesting) - limit} more" if len(interesting) > limit else ""
        return "; ".join(interesting[:limit]) + more

    def report(self) -> str:
        lines = [f"seed {self.seed}: {self.plan.describe()}"]
        for v in self.violations:
            lines.append(f"  VIOLATION {v}")
        if self.documented:
            lines.append("  (documented: a rollback erased an attempt Alloy committed late)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.trace:
            lines.append(f"  trace ({len(self.trace)} decisions): {self.summary()}")
        lines.append(f"  reproduce: {command(self.seed)}")
        return "\n".join(lines)


def body(ctx: Any, job: Job, emit: Callable[[list[Any]], None]) -> Outcome:
    """A Celery task's body, as mailingest.application.tasks runs it."""
    from mailingest.application import pipeline

    if job.kind == "poll":
        emitted: list[Any] = []

        def out(steps: list[Any]) -> None:
            emitted.extend(steps)
            emit(steps)

        try:
            result = pipeline.poll(ctx, job.target, emit=out)
        except pipeline.RETRYABLE as exc:
            return Outcome(note=f"poll failed: {type(exc).__name__}")
        return Outcome(
            again=result.again,
            emitted=len(emitted),
            ran=not result.skipped,
            note="skipped: another poll holds the lock" if result.skipped else "",
        )
    step = job.target
    try:
        steps = pipeline.run_step(ctx, step)
    except Exception as exc:  # noqa: BLE001 - as tasks._run: every failure is recovered
        recovery = pipeline.recover(ctx, step, exc, job.tries)
        if recovery.retry_in is not None:
            return Outcome(retry_in=recovery.retry_in, note=type(exc).__name__)
        return Outcome(steps=list(recovery.steps), note=type(exc).__name__)
    return Outcome(steps=list(steps))


class Simulation:
    """Runs schedules on one :class:`World`."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.clock = clock.SimClock()
        world.clock = self.clock
        self._installed = clock.install(self.clock)
        # the product's retry jitter draws from a generator of its own, seeded per
        # schedule: the global one is also drawn by imaplib (each new connection's tag
        # prefix), and whether a worker connects afresh depends on earlier schedules
        self.jitter = random.Random()
        self._installed.patch(retry, "random", self.jitter)
        self._raw_http = plain_transport()
        self.timings: dict[str, float] = {}  # seconds spent per phase, over all runs
        logging.disable(logging.CRITICAL)  # the product logs every step: not here

    def close(self) -> None:
        self._installed.undo()
        self._raw_http.close()
        logging.disable(logging.NOTSET)

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - since
        return now

    def _deliver_held(self, held: HeldRequest) -> None:
        response = self._raw_http.handle_request(held.request())
        response.read()
        response.close()

    def run(self, seed: int, *, verbose: bool = False) -> Result:
        """One schedule; an error of the harness itself (not of the product) is reported
        as the ``harness`` invariant with its traceback, and the next schedule goes on."""
        try:
            return self._run(seed, verbose=verbose)
        except Exception as exc:  # noqa: BLE001
            self.world.relay.target = None
            plan = faults.draw(random.Random(f"{seed}:plan"))
            detail = "".join(traceback.format_exception(exc)[-6:])
            detail += self.world.log_tail(plan.variant)
            return Result(seed, plan, [], f"error:{seed}", [Violation("harness", detail)])

    def _run(self, seed: int, *, verbose: bool = False) -> Result:
        started = time.perf_counter()
        world = self.world
        plan = faults.draw(random.Random(f"{seed}:plan"))
        scen = scenario.draw(
            random.Random(f"{seed}:mails"), seed, duplicates=plan.has("duplicate_mail")
        )
        mark = self._phase("draw", started)
        world.reset(plan.variant)
        mark = self._phase("reset", mark)
        self.clock.reset()
        self.jitter.seed(seed)  # the product's retry jitter
        settings = world.servers[plan.variant].settings
        folders = Folders(world, plan.variant)
        placements: dict[tuple[int, int], str] = {}
        delivered: list[int] = []

        def deliver(i: int) -> str:
            d = scen.deliveries[i]
            placements[folders.append(d.raw)] = d.digest
            delivered.append(i)
            return f"{d.mail.key} {d.kind}"

        sched: Scheduler | None = None

        def deliver_during(i: int) -> str:
            """A mail arrives while the workers run; `mailingest watch` polls at once,
            or (half the time) it waits for beat."""
            assert sched is not None
            detail = deliver(i)
            if sched.rng.random() < 0.5:
                sched.poll()
                detail += ", watch polls"
            return detail

        events: dict[str, Callable[[], str]] = {}
        for i, d in enumerate(scen.deliveries):
            if d.during:
                events[f"mail{i}"] = lambda i=i: deliver_during(i)  # type: ignore[misc]
            else:
                deliver(i)

        contexts = [world.context(plan.variant, slot) for slot in range(plan.workers)]

        def new_context(worker: Worker) -> Any:
            return world.replace_context(plan.variant, worker.slot)

        sched = Scheduler(
            seed=seed,
            plan=plan,
            clock=self.clock,
            raw=world.raw,  # type: ignore[arg-type]
            contexts=contexts,
            body=body,
            new_context=new_context,
            poll_interval_ms=int(settings.inboxes[0].poll_interval * 1000),
            settle_ms=settle_ms(settings),
            commit_window_ms=commit_window_ms(settings),
            deliver=self._deliver_held,
            events=events,
        )

        def renumber() -> str:
            for digest, validity, uid in folders.renumber():
                placements[(validity, uid)] = digest
            return "new UIDVALIDITY"

        def expire_staging() -> str:
            keys = sorted(world.raw.keys("mailingest:raw:*") + world.raw.keys("mailingest:blob:*"))
            if not keys:
                return "nothing staged"
            gone = sched.rng.sample(keys, k=sched.rng.randint(1, len(keys)))
            world.raw.delete(*gone)
            return f"{len(gone)} staged key(s) expired"

        def extra_poll() -> str:
            sched.poll()
            return "poll-now"

        wanted = {
            "uidvalidity": renumber,
            "expire_staging": expire_staging,
            "rollback": sched.rollback,
            "extra_poll": extra_poll,
        }
        sched.events.update({k: v for k, v in wanted.items() if plan.has(k)})
        world.relay.target = sched
        settled = False
        mark = self._phase("setup", mark)
        try:
            sched.run_faults()
            mark = self._phase("faults", mark)
            settled = sched.quiesce()
            mark = self._phase("quiesce", mark)
        finally:
            sched.close()
            world.relay.target = None
        violations = checker.check(
            scenario=scen,
            delivered=delivered,
            placements=placements,
            sandbox=world.sandbox,  # type: ignore[arg-type]
            folders=folders,
            ledger=L.Ledger(world.raw, clock=self.clock),  # type: ignore[arg-type]
            raw=world.raw,  # type: ignore[arg-type]
        )
        mark = self._phase("check", mark)
        if not settled:
            pending = ", ".join(sched.label(j) for j in sched.queue[:5])
            violations.insert(0, Violation("settles", f"still pending: {pending or 'threads'}"))
        result = Result(
            seed,
            plan,
            sched.trace,
            sched.digest,
            violations,
            sched.notes,
            time.perf_counter() - started,
        )
        if verbose:
            print("\n".join(sched.trace))
        return result


def settle_ms(settings: Any) -> int:
    """Longer than every window the product waits out (locks, stale mail, the finish
    grace, failed-mail retries, a describe in doubt)."""
    windows = [
        settings.task_time_limit + 30,
        settings.stale_after,
        settings.finish_grace,
        settings.failed_retry_after,
        commit_window_ms(settings) / 1000 + 5,
    ]
    return int(max(windows) * 1000) + 1_000


def commit_window_ms(settings: Any) -> int:
    """Alloy commits a request whose answer was lost within read timeout + horizon."""
    horizon = getattr(settings, "alloy_commit_horizon", 60.0)
    return int((settings.alloy_read_timeout + horizon) * 1000)


__all__ = ["Result", "Simulation", "command"]
