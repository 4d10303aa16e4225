"""The steps of ingestion as plain functions: poll -> ingest -> describe -> upload -> finish.

Each step takes the :class:`~mailingest.runtime.Context` and the mail id (and a
document index), does its work, records it in the ledger and returns the
:class:`Step` s to run next. Who runs them is the caller's business: Celery
tasks (:mod:`mailingest.tasks`) queue them, ``mailingest poll-once``
(:mod:`mailingest.runner`) runs them in this process. Steps raise only
*retryable* errors (:class:`AlloyUnavailable`, :class:`ResolverError`,
:class:`MailboxError`); anything final is recorded (quarantine) and returned
as the ``finish`` step.

Every step may run more than once (late acks, redelivery, replay): it reads
the ledger first and skips what is already done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import ledger as L
from .documents import describe_attachments
from .errors import AlloyRejected, MailError, MailingestError
from .ledger import MailRef, PlannedDocument
from .mail import parse_mail
from .runtime import Context
from .settings import InboxSettings

log = logging.getLogger(__name__)

POLL_LOCK_SECONDS = 600  # longer than a poll may take (its task time limit)
FINISH_GRACE_MS = 60_000  # a decided mail not moved after this long gets another finish


@dataclass(frozen=True)
class Step:
    """The next thing to do: one of ``ingest``, ``describe``, ``upload``, ``finish``."""

    task: str
    mail_id: str
    index: int | None = None

    @property
    def args(self) -> tuple[str] | tuple[str, int]:
        return (self.mail_id,) if self.index is None else (self.mail_id, self.index)


@dataclass(frozen=True)
class PollResult:
    inbox: str
    uidvalidity: int
    found: int
    steps: tuple[Step, ...]
    skipped: bool = False


# -- poll ----------------------------------------------------------------------


def poll(ctx: Context, inbox_name: str) -> PollResult:
    """Fetch mail above the watermark, stage and record each before queuing its ingest.

    Also re-queues ``finish`` for mails that were decided but not yet moved
    (a move that failed after the uploads succeeded is not an upload again).
    """
    inbox = ctx.settings.inbox(inbox_name)
    steps: list[Step] = []
    found = 0
    lock = ctx.ledger.poll_lock(inbox.name, timeout=POLL_LOCK_SECONDS)
    if not lock.acquire(blocking=False):
        log.info("inbox %s: another poll is running; skipped", inbox.name)
        return PollResult(inbox.name, 0, 0, (), skipped=True)
    try:
        validity, found, steps = _poll_locked(ctx, inbox)
    finally:
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - expired: the next poll may already hold it
            log.warning("inbox %s: poll lock expired before the poll ended", inbox.name)
    # a move that failed (or whose task was lost) after the mail was decided: try again,
    # leaving alone the ones decided moments ago whose finish_message is still queued
    steps += [Step("finish", m) for m in ctx.ledger.unfiled(inbox.name, idle_ms=FINISH_GRACE_MS)]
    log.info("polled inbox %s: %d new mail(s)", inbox.name, found)
    return PollResult(inbox.name, validity, found, tuple(steps))


def _poll_locked(ctx: Context, inbox: InboxSettings) -> tuple[int, int, list[Step]]:
    steps: list[Step] = []
    found = 0
    with ctx.mailbox(inbox.name) as box:
        box.ensure_folders(inbox.processed_folder, inbox.quarantine_folder)
        validity = box.select(inbox.folder)
        watermark = ctx.ledger.watermark(inbox.name, inbox.folder, validity)
        # bounded per poll: a huge backlog is taken a slice per tick, oldest first
        uids = box.uids_after(watermark)[: ctx.settings.poll_limit]
        batch = ctx.settings.fetch_batch
        for start in range(0, len(uids), batch):
            chunk = uids[start : start + batch]
            for fetched in box.fetch(chunk):
                ref = MailRef(inbox.name, inbox.folder, validity, fetched.uid)
                found += 1
                if ctx.ledger.record_new(ref, fetched.raw):
                    steps.append(Step("ingest", ref.id))
            ctx.ledger.advance_watermark(inbox.name, inbox.folder, validity, chunk[-1])
    return validity, found, steps


# -- ingest --------------------------------------------------------------------


def ingest(ctx: Context, mail_id: str) -> list[Step]:
    """Parse one staged mail, resolve its sender, plan its documents."""
    record = ctx.ledger.mail(mail_id)
    if record is None:
        log.warning("mail %s: not in the ledger; nothing to do", mail_id)
        return []
    if record.state == L.DOCUMENTS_PENDING:
        return _pending_steps(ctx, mail_id, record.documents)
    if record.state in L.DECIDED:
        return [] if record.filed_to else [Step("finish", mail_id)]
    if record.state not in (L.QUEUED, L.PARSING):
        return []
    raw = ctx.ledger.raw(mail_id)
    if raw is None:
        ctx.ledger.transition(
            mail_id, L.FAILED, reason="staged mail bytes expired before ingestion; replay it"
        )
        return []
    ctx.ledger.transition(mail_id, L.PARSING, allowed=(L.QUEUED, L.PARSING), reason="")

    try:
        mail = parse_mail(raw, inline_image_floor=ctx.settings.inline_image_floor)
        specs = describe_attachments(mail)
    except Exception as exc:  # noqa: BLE001 - a bad mail must never crash the worker
        log.warning("mail %s: cannot be parsed (%s)", mail_id, type(exc).__name__)
        return quarantine(
            ctx, mail_id, f"cannot parse the mail: {type(exc).__name__}: {str(exc)[:200]}"
        )

    ctx.ledger.update(
        mail_id,
        message_id=mail.message_id or "",
        sender=mail.sender or "",
        subject=(mail.subject or "")[:200],
        skipped=len(mail.skipped),
    )
    if not mail.sender:
        return quarantine(ctx, mail_id, "no sender address in From:")
    resolved = ctx.senders.resolve(mail.sender)  # ResolverError is retried by the caller
    if resolved is None:
        return quarantine(
            ctx, mail_id, f"unknown sender {mail.sender}: no entity in the sender directory"
        )
    entity, source = resolved
    if not specs:
        skipped = f" ({len(mail.skipped)} inline image(s) skipped)" if mail.skipped else ""
        ctx.ledger.update(mail_id, entity=entity)
        return quarantine(ctx, mail_id, f"no documents attached{skipped}")

    payloads = {att.index: att.payload for att in mail.attachments}
    planned = [
        PlannedDocument(
            index=i,
            name=spec.name,
            extension=spec.extension,
            type=spec.type,
            content_type=spec.content_type,
            payload=payloads[spec.index],
        )
        for i, spec in enumerate(specs)
    ]
    message_key = mail.message_id or f"uid:{mail_id}"
    ctx.ledger.plan_documents(mail_id, message_key, entity, planned)
    ctx.ledger.drop_raw(mail_id)
    log.info(
        "mail %s: sender resolved by %s; %d document(s), %d inline part(s) skipped",
        mail_id,
        source,
        len(planned),
        len(mail.skipped),
    )
    return _pending_steps(ctx, mail_id, len(planned))


def _pending_steps(ctx: Context, mail_id: str, count: int) -> list[Step]:
    steps: list[Step] = []
    docs = ctx.ledger.documents(mail_id, count)
    for doc in docs:
        if doc.state == L.PLANNED:
            steps.append(Step("describe", mail_id, doc.index))
        elif doc.state == L.DESCRIBED:
            steps.append(Step("upload", mail_id, doc.index))
    if not steps and len(docs) == count:
        steps += _complete(ctx, mail_id)
    return steps


# -- describe / upload ---------------------------------------------------------


def describe(ctx: Context, mail_id: str, index: int) -> list[Step]:
    """POST the document's description; record its ``document_token``."""
    record, doc = ctx.ledger.mail(mail_id), ctx.ledger.document(mail_id, index)
    if record is None or doc is None or record.state != L.DOCUMENTS_PENDING:
        return []
    if doc.state == L.UPLOADED:
        return _complete(ctx, mail_id)
    if doc.token:
        return [Step("upload", mail_id, index)]
    inbox = ctx.settings.inbox(record.ref.inbox)
    try:
        answer = ctx.alloy.describe(
            record.entity,
            name=doc.name,
            extension=doc.extension,
            type=doc.type,
            note=inbox.note,
            note_author_agent_email=inbox.agent_email,
        )
    except AlloyRejected as exc:
        return quarantine(
            ctx, mail_id, f"document {index} ({doc.name}.{doc.extension}): {exc.describe()}"
        )
    ctx.ledger.mark_described(mail_id, index, answer.token)
    log.info("mail %s: document %d described as %s", mail_id, index, answer.token)
    return [Step("upload", mail_id, index)]


def upload(ctx: Context, mail_id: str, index: int) -> list[Step]:
    """PUT the staged bytes; once Alloy answers ``uploaded: true`` the document is done."""
    record, doc = ctx.ledger.mail(mail_id), ctx.ledger.document(mail_id, index)
    if record is None or doc is None or record.state != L.DOCUMENTS_PENDING:
        return []
    if doc.state == L.UPLOADED:
        return _complete(ctx, mail_id)
    if not doc.token:
        return [Step("describe", mail_id, index)]
    data = ctx.ledger.blob(mail_id, index)
    if data is None:
        ctx.ledger.transition(
            mail_id,
            L.FAILED,
            allowed=(L.DOCUMENTS_PENDING,),
            reason=f"document {index}: staged bytes expired before upload; replay the mail",
        )
        return []
    try:
        answer = ctx.alloy.upload(record.entity, doc.token, data)
    except AlloyRejected as exc:
        if exc.status == 409:  # Alloy already has the bytes: an earlier try got through
            return _uploaded(ctx, mail_id, index, record.entity, doc.token)
        return quarantine(
            ctx, mail_id, f"document {index} ({doc.name}.{doc.extension}): {exc.describe()}"
        )
    if not answer.uploaded:
        return quarantine(
            ctx, mail_id, f"document {index}: Alloy answered the upload with uploaded=false"
        )
    log.info("mail %s: document %d uploaded (%s, %d bytes)", mail_id, index, doc.token, len(data))
    return _uploaded(ctx, mail_id, index, record.entity, doc.token)


def _uploaded(ctx: Context, mail_id: str, index: int, entity: str, token: str) -> list[Step]:
    confirmed = ctx.ledger.mark_uploaded(mail_id, index, entity, token)
    record = ctx.ledger.mail(mail_id)
    if record is not None and confirmed >= record.documents:
        return _complete(ctx, mail_id)
    return []


def _complete(ctx: Context, mail_id: str) -> list[Step]:
    record = ctx.ledger.mail(mail_id)
    if record is None:
        return []
    if ctx.ledger.confirmed(mail_id) < record.documents:
        return []
    ctx.ledger.transition(mail_id, L.DONE, allowed=(L.DOCUMENTS_PENDING,), reason="")
    record = ctx.ledger.mail(mail_id)
    if record is None or record.state != L.DONE or record.filed_to:
        return []
    return [Step("finish", mail_id)]


# -- decide and file ------------------------------------------------------------


def quarantine(ctx: Context, mail_id: str, reason: str) -> list[Step]:
    """Record why a mail cannot be handled; it will be moved to the quarantine folder."""
    moved = ctx.ledger.transition(
        mail_id,
        L.QUARANTINED,
        allowed=(L.QUEUED, L.PARSING, L.DOCUMENTS_PENDING, L.FAILED),
        reason=reason,
    )
    if moved:
        log.warning("mail %s quarantined: %s", mail_id, reason)
        record = ctx.ledger.mail(mail_id)
        if record is not None:
            ctx.ledger.drop_raw(mail_id)
            ctx.ledger.drop_blobs(mail_id, record.documents)
    return [Step("finish", mail_id)]


def give_up(ctx: Context, step: Step, error: BaseException) -> list[Step]:
    """Retries of ``step`` are exhausted: the mail is ``failed`` (it stays in the inbox).

    It waits there for `mailingest replay`."""
    text = str(error) if isinstance(error, MailingestError) else type(error).__name__
    reason = f"{step.task} gave up after retries: {text}"
    if step.index is not None:
        reason = f"document {step.index}: {reason}"
    if ctx.ledger.transition(
        step.mail_id, L.FAILED, allowed=(L.QUEUED, L.PARSING, L.DOCUMENTS_PENDING), reason=reason
    ):
        log.error("mail %s failed: %s", step.mail_id, reason)
    return []


def finish(ctx: Context, mail_id: str) -> list[Step]:
    """Move a decided mail out of the inbox: to Processed when done, else to Quarantine."""
    record = ctx.ledger.mail(mail_id)
    if record is None or record.state not in L.DECIDED or record.filed_to:
        return []
    inbox = ctx.settings.inbox(record.ref.inbox)
    destination = inbox.processed_folder if record.state == L.DONE else inbox.quarantine_folder
    with ctx.mailbox(inbox.name) as box:
        validity = box.select(record.ref.folder)
        if validity != record.ref.uidvalidity:
            ctx.ledger.filed(
                mail_id,
                "-",
                reason=(record.reason + "; " if record.reason else "")
                + f"not moved: UIDVALIDITY of {record.ref.folder} changed",
            )
            return []
        box.move(record.ref.uid, destination)
    ctx.ledger.filed(mail_id, destination)
    log.info("mail %s moved to %s", mail_id, destination)
    return []


def replay(ctx: Context, mail_id: str) -> list[Step]:
    """Send a failed or quarantined mail through again.

    A failed mail still sits in the inbox with its staged state: it is re-run
    from where it stopped. A quarantined mail was moved to the quarantine folder:
    it is moved back into the inbox, where the next poll picks it up as new
    mail; documents it already uploaded are recognised and not uploaded again.
    """
    record = ctx.ledger.mail(mail_id)
    if record is None:
        raise KeyError(mail_id)
    if record.state == L.FAILED:
        if record.documents:
            ctx.ledger.transition(mail_id, L.DOCUMENTS_PENDING, allowed=(L.FAILED,), reason="")
            return _pending_steps(ctx, mail_id, record.documents)
        ctx.ledger.transition(mail_id, L.QUEUED, allowed=(L.FAILED,), reason="")
        return [Step("ingest", mail_id)]
    if record.state == L.QUARANTINED:
        if not record.filed_to:  # not moved yet: still in the inbox, run it again in place
            ctx.ledger.transition(mail_id, L.QUEUED, allowed=(L.QUARANTINED,), reason="")
            return [Step("ingest", mail_id)] if ctx.ledger.raw(mail_id) else []
        if not record.message_id:
            raise MailError(
                f"mail {mail_id} has no Message-ID to find it by in {record.filed_to}; "
                "move it back to the inbox by hand"
            )
        inbox = ctx.settings.inbox(record.ref.inbox)
        with ctx.mailbox(inbox.name) as box:
            box.select(record.filed_to)
            uids = box.find_message_id(record.message_id)
            if not uids:
                raise MailError(f"mail {mail_id} is no longer in {record.filed_to}")
            for uid in uids:
                box.move(uid, record.ref.folder)
        ctx.ledger.transition(
            mail_id,
            L.REPLAYED,
            allowed=(L.QUARANTINED,),
            reason=f"sent back to {record.ref.folder} (was: {record.reason})",
        )
        log.info("mail %s moved back to %s for another run", mail_id, record.ref.folder)
    return []


STEPS = {"ingest": ingest, "describe": describe, "upload": upload, "finish": finish}


def run_step(ctx: Context, step: Step) -> list[Step]:
    fn = STEPS[step.task]
    if step.index is None:
        return fn(ctx, step.mail_id)  # type: ignore[operator]
    return fn(ctx, step.mail_id, step.index)  # type: ignore[operator]
