"""Celery tasks: thin shells over :mod:`.pipeline`, named as ops see them in Flower.

    mailingest.poll_inbox(inbox)              -> ingest_message per new mail
    mailingest.sweep_inbox(inbox)             -> the step a stalled or decided mail needs
    mailingest.ingest_message(mail_id)        -> describe_document per document
    mailingest.describe_document(mail_id, i)  -> and in the same task its upload, and the
                                                 move once it was the mail's last document
    mailingest.upload_document(mail_id, i)    -> (an upload on its own: a retry, a replay)
    mailingest.finish_message(mail_id)        moves the mail to Processed or Quarantine

A step chains to the next step of the same document or mail (decisions.chained)
instead of queuing it: fewer trips through the broker, the same steps.
Arguments are an inbox name, a mail id (``inbox/folder/uidvalidity/uid``) and
a document index: nothing sensitive, readable in Flower. Bytes stay in Redis.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from mailingest.adapters.ledger.base import ACTOR, ATTEMPT
from mailingest.application import pipeline
from mailingest.application.celery_app import app, settings
from mailingest.application.services import Context, build_context
from mailingest.core.decisions import CHAIN_LIMIT, Step, chained
from mailingest.core.errors import MailFailed, MailingestError
from mailingest.core.reasons import reason_kind
from mailingest.core.states import MailState

log = logging.getLogger(__name__)
_context: Context | None = None


_building = threading.Lock()


def context() -> Context:
    """This process's services, built on first use (after the worker forked); shared by
    the threads of a thread-pool worker (its clients are thread-safe, and each IMAP use
    takes its own connection). Its Redis commands wait out an outage of about a minute
    (a step caught by it then finishes)."""
    global _context
    with _building:
        if _context is None:
            _context = build_context(settings, ride_out=True)
        return _context


@worker_process_init.connect
def _fresh_context(**_: Any) -> None:
    global _context
    _context = None  # never share sockets across a fork


@worker_process_shutdown.connect
def _close_context(**_: Any) -> None:
    if _context is not None:
        _context.close()


def dispatch(steps: list[Step]) -> None:
    for step in steps:
        TASKS[step.task].apply_async(args=tuple(step.args))


@contextmanager
def _named(task: Task[Any, Any], attempt: int = 0) -> Iterator[None]:
    """The worker and the try a task's moves of mails are recorded with (ledger.base),
    reset when it ends: the next task of this process or thread starts without them."""
    tried = ATTEMPT.set(attempt)
    actor = ACTOR.set(f"{task.request.hostname or ''}:{os.getpid()}".lstrip(":"))
    try:
        yield
    finally:
        ATTEMPT.reset(tried)
        ACTOR.reset(actor)


def _run(task: Task[Any, Any], step: Step) -> str:
    """Run ``step``, then the steps it chains to (decisions.chained) in this task; queue
    the rest. A chained step that fails is recovered as itself: queued again with its
    backoff, while this task, whose own step is done, ends.

    What the task returns (Flower's "result") says where a mail it filed went and why;
    a step that ran out of tries makes it end FAILURE with the reason, once the ledger
    recorded it (raised last: nothing retries it)."""
    ctx = context()
    with _named(task, task.request.retries + 1):
        return _run_steps(task, ctx, step)


def _run_steps(task: Task[Any, Any], ctx: Context, step: Step) -> str:
    failed = ""
    try:
        steps = pipeline.run_step(ctx, step)
    except Exception as exc:  # noqa: BLE001 - every failure has a recorded outcome
        recovery = _recover(ctx, step, exc, task.request.retries)
        if recovery.retry_in is not None:
            raise task.retry(
                countdown=recovery.retry_in, max_retries=ctx.policy.max_attempts
            ) from None
        steps, failed = recovery.steps, recovery.failed
    for _ in range(CHAIN_LIMIT):
        following, steps = chained(step, steps)
        dispatch(steps)
        steps = []
        if following is None:
            break
        step = following
        ATTEMPT.set(1)  # a chained step's first try
        try:
            steps = pipeline.run_step(ctx, step)
        except Exception as exc:  # noqa: BLE001 - every failure has a recorded outcome
            recovery = _recover(ctx, step, exc, 0)
            if recovery.retry_in is not None:
                TASKS[step.task].apply_async(args=step.args, countdown=recovery.retry_in)
                break
            steps, failed = recovery.steps, recovery.failed or failed
    dispatch(steps)
    if failed:
        raise MailFailed(f"mail {step.mail_id}: {failed}")
    return _outcome(ctx, step)


def _outcome(ctx: Context, step: Step) -> str:
    """Where the mail went, when the task's last step filed it: ``quarantined:
    unknown_sender -> Quarantine``, ``done -> Processed``; "" otherwise."""
    if step.task != "finish":
        return ""
    record = ctx.ledger.mail(step.mail_id)
    if record is None or not record.filed_to:
        return ""
    why = f": {reason_kind(record.reason)}" if record.state == MailState.QUARANTINED else ""
    return f"{record.state}{why} -> {record.filed_to}"


def _recover(ctx: Context, step: Step, exc: Exception, tries: int) -> pipeline.Recovery:
    limit = isinstance(exc, SoftTimeLimitExceeded)
    error = MailingestError("the task ran past its time limit") if limit else exc
    return pipeline.recover(ctx, step, error, tries, retryable=limit)


# Polls and sweeps send no task events: beat sends one every few seconds, and in Flower
# they buried the mail tasks; their outcome is in `mailingest status` and the metrics.
@app.task(name="mailingest.poll_inbox", bind=True, send_events=False)
def poll_inbox(self: Task[Any, Any], inbox: str) -> int:
    """Poll the inbox. While its server is away every tick's poll fails; the log says so
    once, when the first fails, and once more when one succeeds again (the last poll's
    outcome is in the ledger, so this holds across all the workers)."""
    ctx = context()
    before = ctx.ledger.poll_status(inbox)
    failing = bool(before.get("error"))  # the last poll failed: this was logged then
    try:
        with _named(self):  # the mails it records name this worker in their history
            result = pipeline.poll(ctx, inbox, emit=dispatch)
    except pipeline.RETRYABLE as exc:
        log.log(
            logging.DEBUG if failing else logging.WARNING,
            "poll of inbox %s failed: %s (each tick tries again; logged once until a poll "
            "succeeds)",
            inbox,
            exc,
        )
        return 0
    if failing and not result.skipped:
        last_good = int(before.get("ok_at") or 0)
        since = f", {(ctx.ledger.now() - last_good) / 1000:.0f} s after the last good one"
        log.warning("inbox %s: a poll succeeded again%s", inbox, since if last_good else "")
    if result.again:
        poll_inbox.apply_async(args=(inbox,))
    return result.found


@app.task(name="mailingest.sweep_inbox", bind=True, send_events=False)
def sweep_inbox(self: Task[Any, Any], inbox: str) -> int:
    """Between polls (beat sends it every MAILINGEST_LEASE seconds when polls are
    rarer): queue stalled mails again, retry failed ones, file decided ones."""
    ctx = context()
    try:
        with _named(self):
            steps = pipeline.sweep(ctx, inbox)
    except pipeline.RETRYABLE as exc:
        log.warning("sweep of inbox %s failed: %s (the next one tries again)", inbox, exc)
        return 0
    dispatch(steps)
    return len(steps)


@app.task(name="mailingest.ingest_message", bind=True)
def ingest_message(self: Task[Any, Any], mail_id: str) -> str:
    return _run(self, Step("ingest", mail_id))


@app.task(name="mailingest.describe_document", bind=True)
def describe_document(self: Task[Any, Any], mail_id: str, index: int) -> str:
    return _run(self, Step("describe", mail_id, index))


@app.task(name="mailingest.upload_document", bind=True)
def upload_document(self: Task[Any, Any], mail_id: str, index: int) -> str:
    return _run(self, Step("upload", mail_id, index))


@app.task(name="mailingest.finish_message", bind=True)
def finish_message(self: Task[Any, Any], mail_id: str) -> str:
    return _run(self, Step("finish", mail_id))


@app.task(name="mailingest.reply_to_sender", bind=True)
def reply_to_sender(self: Task[Any, Any], mail_id: str) -> str:
    return _run(self, Step("reply", mail_id))


TASKS = {
    "ingest": ingest_message,
    "describe": describe_document,
    "upload": upload_document,
    "finish": finish_message,
    "reply": reply_to_sender,
}
