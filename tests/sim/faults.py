"""What may go wrong in one schedule: a small set of faults drawn from its seed.

A :class:`FaultPlan` says which kinds of fault this schedule may inject and how often; the
scheduler consults it at each decision. Most schedules draw one to three kinds, so each
fault is explored both alone and in company.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .world import VARIANTS

# network faults at an Alloy request (see hooks.SimTransport)
NETWORK = ("lost", "late", "refuse", "e503", "e429", "e500", "e500_applied", "connect")
# harness events fired at a moment the scheduler picks
EVENTS = ("uidvalidity", "expire_staging", "rollback", "extra_poll")
KINDS = (
    "crash",
    "freeze",
    "duplicate_task",
    "drop_task",
    "duplicate_mail",
    "skew",
    *NETWORK,
    *EVENTS,
)


@dataclass
class FaultPlan:
    kinds: frozenset[str]
    variant: str = "full"
    workers: int = 2
    skews_ms: list[int] = field(default_factory=list)
    p_continue: float = 0.7  # keep running the thread that just yielded
    crash_at: frozenset[int] = frozenset()  # checkpoints (counted over the schedule)
    freeze_at: frozenset[int] = frozenset()
    p_network: float = 0.0  # per Alloy request, for the kinds drawn
    p_task: float = 0.0  # per queued task: duplicate / drop
    budget: int = 3  # network and task faults injected at most

    def has(self, kind: str) -> bool:
        return kind in self.kinds

    @property
    def network(self) -> list[str]:
        return [k for k in NETWORK if k in self.kinds]

    @property
    def events(self) -> list[str]:
        return [k for k in EVENTS if k in self.kinds]

    def describe(self) -> str:
        kinds = ",".join(sorted(self.kinds)) or "none"
        return f"server={self.variant} workers={self.workers} faults={kinds}"


# how likely each kind is to be drawn: the ones that break things most, most often
WEIGHTS = {
    "crash": 6,
    "freeze": 4,
    "duplicate_task": 3,
    "drop_task": 3,
    "duplicate_mail": 4,
    "skew": 1,
    "lost": 4,
    "late": 4,
    "refuse": 3,
    "e503": 1,
    "e429": 1,
    "e500": 1,
    "e500_applied": 2,
    "connect": 1,
    "uidvalidity": 3,
    "expire_staging": 2,
    "rollback": 2,
    "extra_poll": 2,
}
CHECKPOINTS = 450  # about how many checkpoints a schedule passes in its fault phase


def _points(rng: random.Random, wanted: bool) -> frozenset[int]:
    if not wanted:
        return frozenset()
    return frozenset(rng.sample(range(1, CHECKPOINTS), k=rng.choice((1, 1, 2, 3))))


def draw(rng: random.Random) -> FaultPlan:
    count = rng.choice((0, 1, 1, 2, 2, 2, 3, 3, 4))
    names = sorted(WEIGHTS)
    chosen: set[str] = set()
    while len(chosen) < count:
        chosen.add(rng.choices(names, weights=[WEIGHTS[n] for n in names])[0])
    kinds = frozenset(chosen)
    variant = rng.choices(VARIANTS, weights=(6, 3, 2))[0]
    workers = rng.choice((2, 3))
    skews = [
        rng.choice((-1, 1)) * rng.randint(1, 600_000) if "skew" in kinds else 0
        for _ in range(workers)
    ]
    return FaultPlan(
        kinds=kinds,
        variant=variant,
        workers=workers,
        skews_ms=skews,
        p_continue=rng.choice((0.3, 0.6, 0.85)),
        crash_at=_points(rng, "crash" in kinds),
        freeze_at=_points(rng, "freeze" in kinds),
        p_network=rng.choice((0.15, 0.3, 0.6)),
        p_task=rng.choice((0.1, 0.25)),
        budget=rng.choice((1, 2, 3, 5)),
    )
