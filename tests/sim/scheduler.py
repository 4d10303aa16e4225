"""The scheduler: which task runs, where it stops, what fails, and when time passes.

It plays the part of Celery (a multiset of queued tasks, late acks: a task may be
delivered twice or lost, a retried task comes back after its countdown), of the worker
processes (2-3, one task each at a time; kill -9, SIGSTOP), of beat (a poll every poll
interval) and of the network (faults at each Alloy request). Every choice comes from one
seeded RNG, and every choice that matters is appended to :attr:`Scheduler.trace`.

Only one simulated thread runs at a time; the scheduler resumes it and waits until it
reaches its next checkpoint (:mod:`.threads`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from . import threads
from .clock import SimClock
from .faults import FaultPlan
from .hooks import HeldRequest
from .threads import CRASH, GO, YIELD, Actor

FAULT_HORIZON_MS = 180_000  # faults are injected in the first 3 simulated minutes
MAX_QUIESCE_ROUNDS = 400
VISIBILITY_TIMEOUT_MS = 3_600_000
EVERYSEC_MS = 1_000  # what a Redis crash with appendfsync everysec may lose


@dataclass
class Job:
    """A queued task: a poll of an inbox, or a pipeline step (``target``)."""

    kind: str
    target: Any
    tries: int = 0
    due: int = 0
    seq: int = 0
    sent: int = -1  # when it was queued (the header mailingest stamps on publish)


@dataclass
class Outcome:
    """What a task body returns: the steps to queue, or a retry after ``retry_in`` s."""

    steps: list[Any] = field(default_factory=list)
    retry_in: float | None = None
    again: bool = False
    emitted: int = 0
    note: str = ""
    ran: bool = True  # a poll: it ran (not skipped for another poll holding the lock)


@dataclass
class Worker:
    slot: int
    ctx: Any
    skew_ms: int = 0
    actor: Actor | None = None
    job: Job | None = None
    frozen_until: int | None = None
    generation: int = 0

    @property
    def busy(self) -> bool:
        return self.actor is not None


Body = Callable[[Any, Job, Callable[[list[Any]], None]], Outcome]


@dataclass
class Lock:
    token: bytes
    holder: Actor | None
    deadline: int


class Scheduler:
    """One schedule. ``body(ctx, job, emit)`` runs a task in a simulated thread;
    ``new_context(worker)`` replaces a killed worker's process; ``events`` are harness
    faults (name -> action returning a detail for the trace)."""

    def __init__(
        self,
        *,
        seed: int,
        plan: FaultPlan,
        clock: SimClock,
        raw: redis.Redis,
        contexts: list[Any],
        body: Body,
        new_context: Callable[[Worker], Any],
        inbox: str = "default",
        poll_interval_ms: int = 60_000,
        settle_ms: int = 3_700_000,
        commit_window_ms: int = 90_000,
        deliver: Callable[[HeldRequest], None] | None = None,
        events: dict[str, Callable[[], str]] | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(f"{seed}:schedule")
        self.plan = plan
        self.clock = clock
        self.raw = raw
        self.body = body
        self.new_context = new_context
        self.inbox = inbox
        self.poll_interval_ms = poll_interval_ms
        self.settle_ms = settle_ms
        self.commit_window_ms = commit_window_ms
        self.deliver_held = deliver
        self.events = dict(events or {})
        self.workers = [
            Worker(i, ctx, plan.skews_ms[i] if i < len(plan.skews_ms) else 0)
            for i, ctx in enumerate(contexts)
        ]
        self.queue: list[Job] = []
        self.held: list[HeldRequest] = []
        self.locks: dict[bytes, Lock] = {}
        self.snapshots: list[tuple[int, list[tuple[bytes, int, bytes]]]] = []
        self.trace: list[str] = []
        self.notes: list[str] = []
        self.current: Worker | None = None
        self.budget = plan.budget
        self.healed = False
        self.start_ms = clock.now_ms
        self.next_beat = clock.now_ms + poll_interval_ms
        self.enqueued = 0
        self.checkpoints = 0
        self.polls_run = 0  # polls that took the inbox's lock and ran
        self._seq = 0
        self._names: dict[str, str] = {}
        clock.local_skew = self._local_skew

    # -- naming (traces name mails by first appearance, never by UID) ---------------------
    def name(self, mail_id: str) -> str:
        if mail_id not in self._names:
            self._names[mail_id] = f"#{len(self._names) + 1}"
        return self._names[mail_id]

    def label(self, job: Job) -> str:
        if job.kind == "poll":
            return "poll"
        step = job.target
        index = "" if getattr(step, "index", None) is None else f":{step.index}"
        tries = f" try{job.tries}" if job.tries else ""
        return f"{job.kind} {self.name(step.mail_id)}{index}{tries}"

    def log(self, entry: str) -> None:
        self.trace.append(entry)

    @property
    def digest(self) -> str:
        return hashlib.sha1("\n".join(self.trace).encode()).hexdigest()

    # -- the hooks' questions (hooks.Observer) ------------------------------------------
    def _local_skew(self) -> int:
        actor = threads.current()
        worker = actor.owner if actor is not None else None
        return worker.skew_ms if isinstance(worker, Worker) else 0

    def on_lock(self, key: bytes, token: bytes, ttl_ms: int) -> None:
        self.locks[key] = Lock(token, threads.current(), self.clock.now_ms + ttl_ms)

    def network_fault(self, operation: str) -> str:
        kinds = self.plan.network
        if self.healed or not kinds or self.budget <= 0:
            return "none"
        if operation in ("list", "download"):
            kinds = [k for k in kinds if k not in ("refuse", "e500_applied")]
        if not kinds or self.rng.random() >= self.plan.p_network:
            return "none"
        kind = self.rng.choice(kinds)
        self.budget -= 1
        self.log(f"net {kind} {operation}")
        return kind

    def hold(self, held: HeldRequest) -> None:
        held.deadline_ms = self.clock.now_ms + self.commit_window_ms
        self.held.append(held)

    # -- queue ----------------------------------------------------------------------------
    def enqueue(self, job: Job, *, faults: bool = True) -> None:
        self._seq += 1
        job.seq = self._seq
        if job.sent < 0:
            job.sent = self.clock.now_ms
        self.enqueued += 1
        if faults and not self.healed and self.budget > 0 and job.kind != "poll":
            if self.plan.has("drop_task") and self.rng.random() < self.plan.p_task:
                self.budget -= 1
                self.log(f"drop {self.label(job)}")
                return
            if self.plan.has("duplicate_task") and self.rng.random() < self.plan.p_task:
                self.budget -= 1
                self.log(f"duplicate {self.label(job)}")
                twin = Job(job.kind, job.target, job.tries, job.due)
                self._seq += 1
                twin.seq = self._seq
                self.queue.append(twin)
        self.queue.append(job)

    def queue_since(self) -> int | None:
        """When the oldest task waiting for a worker was sent (the broker queue's tail);
        tasks due later are a worker's countdowns, not in the queue."""
        now = self.clock.now_ms
        return min((j.sent for j in self.queue if j.due <= now), default=None)

    def emit(self, steps: list[Any]) -> None:
        for step in steps:
            self.enqueue(Job(step.task, step, due=self.clock.now_ms))

    def poll(self) -> None:
        self.enqueue(Job("poll", self.inbox, due=self.clock.now_ms))

    # -- time -------------------------------------------------------------------------
    def advance_to(self, t: int) -> None:
        """Let time pass: held requests commit by their deadline, locks expire, frozen
        workers wake, beat polls."""
        for held in sorted(self.held, key=lambda h: h.deadline_ms):
            if held.deadline_ms <= t:
                self.clock.now_ms = max(self.clock.now_ms, held.deadline_ms)
                self._deliver(held, "deadline")
        if t > self.clock.now_ms:
            self.log(f"advance {(t - self.clock.now_ms) // 1000}s")
            self.clock.now_ms = t
        self._expire_locks()
        for worker in self.workers:
            if worker.frozen_until is not None and worker.frozen_until <= self.clock.now_ms:
                worker.frozen_until = None
                self.log(f"thaw w{worker.slot}")
        if not self.healed and self.clock.now_ms >= self.next_beat:
            self.next_beat = self.clock.now_ms + self.poll_interval_ms
            self.poll()

    def _expire_locks(self) -> None:
        now = self.clock.now_ms
        for key, lock in list(self.locks.items()):
            if lock.deadline > now:
                continue
            holder = lock.holder
            if holder is not None and not holder.done:
                worker = holder.owner
                if isinstance(worker, Worker) and worker.frozen_until is None:
                    continue  # a running thread keeps its lock (its process would renew)
            del self.locks[key]
            if self.raw.get(key) == lock.token:
                self.raw.delete(key)

    def _next_time(self) -> int | None:
        now = self.clock.now_ms  # a job due already waits for a worker, not for time
        times = [j.due for j in self.queue if j.due > now]
        times += [w.frozen_until for w in self.workers if w.frozen_until is not None]
        times += [h.deadline_ms for h in self.held]
        return min(times) if times else None

    # -- running ------------------------------------------------------------------------
    def _runnable(self, worker: Worker) -> bool:
        return worker.actor is not None and worker.frozen_until is None

    def _start(self, job: Job, worker: Worker) -> None:
        self.queue.remove(job)
        if self.plan.has("rollback") and not self.healed:
            self._snapshot()
        self.log(f"start w{worker.slot} {self.label(job)}")
        ctx = worker.ctx
        worker.job = job
        worker.actor = Actor(
            self.label(job),
            lambda: self.body(ctx, job, self.emit),
            owner=worker,
            decide=self._decide,
        )
        self._resume(worker)

    def _fault(self, worker: Worker, actor: Actor) -> str:
        """At the n-th checkpoint of the schedule: kill the thread there, freeze its
        process there (as the plan says), or neither."""
        self.checkpoints += 1
        if self.healed or self.clock.now_ms >= self._horizon:
            return GO
        if self.checkpoints in self.plan.crash_at:
            self.log(f"crash w{worker.slot} at {actor.label}")
            return CRASH
        if self.checkpoints in self.plan.freeze_at:
            pause = self.rng.choice((5_000, 60_000, 400_000, 900_000))
            worker.frozen_until = self.clock.now_ms + pause
            self.log(f"freeze w{worker.slot} at {actor.label} {pause // 1000}s")
            self.current = None
            return YIELD
        return GO

    def _decide(self, actor: Actor) -> str:
        """Asked by the running thread at each checkpoint (only one thread runs, so it
        may draw from the RNG itself): go on (no hand-off), die, or yield."""
        verdict = self._fault(actor.owner, actor)
        if verdict != GO:
            return verdict
        if self.rng.random() < self.plan.p_continue:
            self.clock.now_ms += 1
            return GO
        return YIELD

    def _resume(self, worker: Worker) -> None:
        actor = worker.actor
        assert actor is not None
        if worker is not self.current:
            self.log(f"run w{worker.slot} {actor.name} at {actor.label}")
        self.current = worker
        self.clock.now_ms += 1
        actor.resume(GO)
        if actor.done:
            self._finished(worker)

    def _finished(self, worker: Worker) -> None:
        actor, job = worker.actor, worker.job
        assert actor is not None and job is not None
        worker.actor = worker.job = None
        self.current = None
        if actor.crashed_at is not None:
            worker.generation += 1
            worker.ctx = self.new_context(worker)
            fate = self.rng.random()
            if fate < 0.6:
                self.log(f"redeliver {self.label(job)}")
                self.enqueue(Job(job.kind, job.target, job.tries, self.clock.now_ms))
            elif fate < 0.8:
                self.log(f"redeliver-late {self.label(job)}")
                self.enqueue(
                    Job(job.kind, job.target, job.tries, self.clock.now_ms + VISIBILITY_TIMEOUT_MS)
                )
            else:
                self.log(f"lost {self.label(job)}")
            return
        if actor.error is not None:
            # Celery logs the failure and acks the message: the task is gone
            self.notes.append(
                f"{self.label(job)} raised {type(actor.error).__name__}: {actor.error}"
            )
            self.log(f"failed {self.label(job)} {type(actor.error).__name__}")
            return
        outcome: Outcome = actor.result
        if job.kind == "poll" and outcome.ran:
            self.polls_run += 1
        if outcome.note:
            self.log(f"{self.label(job)}: {outcome.note}")
        if outcome.retry_in is not None:
            due = self.clock.now_ms + int(outcome.retry_in * 1000)
            self.log(f"retry {self.label(job)} in {outcome.retry_in:.0f}s")
            self.enqueue(Job(job.kind, job.target, job.tries + 1, due))
        for step in outcome.steps:
            self.enqueue(Job(step.task, step, due=self.clock.now_ms))
        if outcome.again:
            self.poll()

    def _deliver(self, held: HeldRequest, why: str) -> None:
        self.held.remove(held)
        self.log(f"commit {held.operation} ({why})")
        if self.deliver_held is not None:
            self.deliver_held(held)

    # -- harness faults -------------------------------------------------------------------
    def _snapshot(self) -> None:
        keys = self.raw.keys("*")
        pipe = self.raw.pipeline(transaction=False)
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        values = pipe.execute()
        snap = [(k, values[2 * i + 1], values[2 * i]) for i, k in enumerate(keys)]
        self.snapshots = ([*self.snapshots, (self.clock.now_ms, snap)])[-4:]

    def rollback(self) -> str:
        """Redis restarts from an older state (a host crash with appendfsync everysec):
        the writes since a task start at most a second ago are gone, and every open
        connection drops."""
        recent = [s for s in self.snapshots if self.clock.now_ms - s[0] <= EVERYSEC_MS]
        if not recent:
            return "nothing written in the last second"
        back = self.rng.randrange(len(recent))
        snap = recent[-1 - back][1]
        pipe = self.raw.pipeline(transaction=True)
        pipe.flushdb()
        for key, ttl, value in snap:
            if value is not None:
                pipe.restore(key, max(0, ttl), value, replace=True)
        pipe.execute()
        # locks came back with the old state: they expire by their own TTL, in sim time
        for key, ttl, value in snap:
            if key.startswith(b"mailingest:lock:") and value is not None:
                token = self.raw.get(key)
                if token is not None:
                    self.locks[key] = Lock(token, None, self.clock.now_ms + max(0, ttl))
        for worker in self.workers:
            if worker.actor is not None:
                worker.actor.pending_errors.append(
                    redis.ConnectionError("simulated: Redis restarted")
                )
        return f"{back + 1} task(s) back"

    @property
    def _horizon(self) -> int:
        return self.start_ms + FAULT_HORIZON_MS

    # -- the loop -------------------------------------------------------------------------
    def _options(self) -> list[tuple[float, str, Any]]:
        now = self.clock.now_ms
        options: list[tuple[float, str, Any]] = []
        for worker in self.workers:  # the one that just yielded competes as well
            if self._runnable(worker):
                options.append((1.0, "run", worker))
        if any(not w.busy for w in self.workers):
            options += [(1.0, "start", job) for job in self.queue if job.due <= now]
        if not self.healed and now < self._horizon:
            options += [(0.3, "commit", held) for held in self.held]
            options += [(0.1, "event", name) for name in sorted(self.events)]
            options.append((0.03, "tick", None))
        return options

    def step(self) -> bool:
        """One decision; False when nothing can happen now (time must pass)."""
        options = self._options()
        if not options:
            return False
        weights = [w for w, _, _ in options]
        _, kind, arg = self.rng.choices(options, weights=weights)[0]
        if kind == "run":
            self._resume(arg)
        elif kind == "start":
            idle = [w for w in self.workers if not w.busy]
            self._start(arg, self.rng.choice(idle))
        elif kind == "commit":
            self._deliver(arg, "late")
        elif kind == "event":
            action = self.events.pop(arg)
            self.log(f"event {arg}: {action()}")
        elif kind == "tick":
            self.advance_to(self.clock.now_ms + self.rng.choice((1_000, 30_000, 120_000)))
        return True

    def drain(self) -> None:
        """Decide until nothing can happen without time passing."""
        while self.step():
            pass

    def run_faults(self) -> None:
        """The fault phase: the first mail arrives, beat polls, faults are injected,
        until the work in reach of the fault horizon is done."""
        self.poll()
        while True:
            self.drain()
            t = self._next_time()
            if t is None or t > self._horizon:
                break
            self.advance_to(t)
        for name in sorted(self.events):  # harness events not yet fired
            if name.startswith("mail"):
                self.log(f"event {name}: {self.events.pop(name)()}")
        self.events.clear()

    def quiesce(self) -> bool:
        """Heal everything, let every window pass, and run until nothing is pending and
        two polls in a row find nothing to do. False if it does not settle."""
        self.healed = True
        self.log("heal")
        for held in list(self.held):
            self._deliver(held, "heal")
        quiet = 0
        for _ in range(MAX_QUIESCE_ROUNDS):
            self.drain()
            t = self._next_time()
            if t is not None:
                self.advance_to(t)
                continue
            if any(w.busy for w in self.workers):
                continue
            self.advance_to(self.clock.now_ms + self.settle_ms)
            before, polled = self.enqueued, self.polls_run
            self.poll()
            self.drain()
            ran = self.polls_run > polled  # a poll skipped (lock held) checked nothing
            quiet = quiet + 1 if ran and self.enqueued == before + 1 and not self.queue else 0
            if quiet >= 2:
                return True
        return False

    def close(self) -> None:
        """Stop whatever still runs (a schedule that did not settle): crash it."""
        for worker in self.workers:
            while worker.actor is not None:
                worker.frozen_until = None
                actor = worker.actor
                actor.resume("crash")
                if actor.done:
                    worker.actor = worker.job = None
                    worker.generation += 1
                    worker.ctx = self.new_context(worker)
