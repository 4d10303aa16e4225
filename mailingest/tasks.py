"""Celery tasks: thin shells over :mod:`mailingest.pipeline`, named as ops see them in Flower.

    mailingest.poll_inbox(inbox)              -> ingest_message per new mail
    mailingest.ingest_message(mail_id)        -> describe_document per document
    mailingest.describe_document(mail_id, i)  -> upload_document
    mailingest.upload_document(mail_id, i)    -> finish_message once all are uploaded
    mailingest.finish_message(mail_id)        moves the mail to Processed or Quarantine

Arguments are an inbox name, a mail id (``inbox/folder/uidvalidity/uid``) and
a document index: nothing sensitive, readable in Flower. Bytes stay in Redis.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from . import pipeline
from .celery import app, settings
from .errors import MailingestError
from .pipeline import Step
from .runner import RETRYABLE
from .runtime import Context, build_context

log = logging.getLogger(__name__)
_context: Context | None = None


def context() -> Context:
    """This process's services, built on first use (after the worker forked)."""
    global _context
    if _context is None:
        _context = build_context(settings)
    return _context


@worker_process_init.connect
def _fresh_context(**_: Any) -> None:
    global _context
    _context = None  # never share sockets across a fork


@worker_process_shutdown.connect
def _close_context(**_: Any) -> None:
    if _context is not None:
        _context.close()


def _as_error(exc: BaseException) -> MailingestError:
    if isinstance(exc, MailingestError):
        return exc
    if isinstance(exc, SoftTimeLimitExceeded):
        return MailingestError("the task ran past its time limit")
    return MailingestError(type(exc).__name__)


def dispatch(steps: list[Step]) -> None:
    for step in steps:
        TASKS[step.task].apply_async(args=step.args)


def _run(task: Task, step: Step) -> None:
    ctx = context()
    try:
        steps = pipeline.run_step(ctx, step)
    except (*RETRYABLE, SoftTimeLimitExceeded) as exc:
        tries = task.request.retries
        if ctx.policy.exhausted(tries):
            steps = pipeline.give_up(ctx, step, _as_error(exc))
        else:
            delay = ctx.policy.delay(tries, getattr(exc, "retry_after", None))
            log.info("%s %s: %s; retry %d in %.1fs", step.task, step.mail_id, exc, tries + 1, delay)
            raise task.retry(countdown=delay, max_retries=ctx.policy.max_attempts) from None
    except MailingestError as exc:
        steps = pipeline.quarantine(ctx, step.mail_id, str(exc))
    except Exception as exc:  # a bug must not leave the mail in limbo: quarantine it, loudly
        log.exception("%s %s: unexpected error", step.task, step.mail_id)
        steps = pipeline.quarantine(
            ctx, step.mail_id, f"internal error in {step.task}: {type(exc).__name__}"
        )
    dispatch(steps)


@app.task(name="mailingest.poll_inbox", bind=True, max_retries=None)
def poll_inbox(self: Task, inbox: str) -> int:
    ctx = context()
    try:
        result = pipeline.poll(ctx, inbox)
    except RETRYABLE as exc:
        log.warning("poll of inbox %s failed: %s (next tick retries)", inbox, exc)
        return 0
    dispatch(list(result.steps))
    return result.found


@app.task(name="mailingest.ingest_message", bind=True)
def ingest_message(self: Task, mail_id: str) -> None:
    _run(self, Step("ingest", mail_id))


@app.task(name="mailingest.describe_document", bind=True)
def describe_document(self: Task, mail_id: str, index: int) -> None:
    _run(self, Step("describe", mail_id, index))


@app.task(name="mailingest.upload_document", bind=True)
def upload_document(self: Task, mail_id: str, index: int) -> None:
    _run(self, Step("upload", mail_id, index))


@app.task(name="mailingest.finish_message", bind=True)
def finish_message(self: Task, mail_id: str) -> None:
    _run(self, Step("finish", mail_id))


TASKS = {
    "ingest": ingest_message,
    "describe": describe_document,
    "upload": upload_document,
    "finish": finish_message,
}
