"""``mailingest poll-once``: one complete cycle in this process, no broker needed.

The same pipeline steps the Celery tasks run, executed from a local queue;
retryable failures wait their backoff (honouring Retry-After) in a heap of
timers, bounded by the same retry policy the workers use.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from mailingest.adapters import ledger as L
from mailingest.application import pipeline
from mailingest.application.services import Context
from mailingest.core.decisions import Step

log = logging.getLogger(__name__)


@dataclass
class MailSummary:
    mail_id: str
    state: str
    sender: str
    entity: str
    documents: int
    uploaded: int
    filed_to: str
    reason: str
    refused_parts: str  # parts refused while the others were filed ("; "-joined)


@dataclass
class Summary:
    found: int = 0
    processed: int = 0
    quarantined: int = 0
    failed: int = 0
    pending: int = 0
    documents_uploaded: int = 0
    mails: list[MailSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every mail found was processed or quarantined (and filed)."""
        return self.failed == 0 and self.pending == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def run_steps(
    ctx: Context,
    steps: Iterable[Step],
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run steps and the steps they return until none are left."""
    ready: deque[Step] = deque(steps)
    waiting: list[tuple[float, int, Step]] = []
    attempts: dict[Step, int] = {}
    order = itertools.count()
    while ready or waiting:
        if not ready:
            due, _, step = heapq.heappop(waiting)
            pause = due - clock()
            if pause > 0:
                sleep(pause)
            ready.append(step)
            continue
        step = ready.popleft()
        try:
            ready.extend(pipeline.run_step(ctx, step))
        except Exception as exc:  # noqa: BLE001 - every failure has a recorded outcome
            tries = attempts.get(step, 0)
            recovery = pipeline.recover(ctx, step, exc, tries)
            if recovery.retry_in is None:
                ready.extend(recovery.steps)
            else:
                attempts[step] = tries + 1
                heapq.heappush(waiting, (clock() + recovery.retry_in, next(order), step))


def poll_once(ctx: Context, inboxes: Iterable[str] | None = None, **kw: object) -> Summary:
    names = list(inboxes) if inboxes is not None else [i.name for i in ctx.settings.inboxes]
    summary = Summary()
    touched: dict[str, None] = {}
    for name in names:
        result = pipeline.poll(ctx, name)
        summary.found += result.found
        touched.update((s.mail_id, None) for s in result.steps)
        run_steps(ctx, result.steps, **kw)  # type: ignore[arg-type]
    for mail_id in touched:
        record = ctx.ledger.mail(mail_id)
        if record is None:
            continue
        uploaded = ctx.ledger.confirmed(mail_id)
        summary.documents_uploaded += uploaded if record.state == L.DONE else 0
        if record.state == L.DONE and record.filed_to:
            summary.processed += 1
        elif record.state == L.QUARANTINED and record.filed_to:
            summary.quarantined += 1
        elif record.state == L.FAILED:
            summary.failed += 1
        else:
            summary.pending += 1
        summary.mails.append(
            MailSummary(
                mail_id,
                record.state,
                record.sender,
                record.entity,
                record.documents,
                uploaded,
                record.filed_to,
                record.reason,
                record.refused_parts,
            )
        )
    return summary
