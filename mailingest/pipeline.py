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

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import redis

from . import ledger as L
from . import logs, metrics
from .errors import (
    AlloyRejected,
    AlloyUnavailable,
    Busy,
    MailboxError,
    MailError,
    MailingestError,
    ResolverError,
)
from .ledger import MailRef, PlannedDocument
from .runtime import Context
from .screening import Screened, screen, size_refusal
from .settings import InboxSettings

log = logging.getLogger(__name__)

RECONCILE_SKEW_MS = 30_000  # clock skew allowed between us and Alloy when adopting a document

Emit = Callable[[list["Step"]], None]


@dataclass(frozen=True)
class Step:
    """The next thing to do: one of ``ingest``, ``describe``, ``upload``, ``finish``."""

    task: str
    mail_id: str
    index: int | None = None

    @property
    def args(self) -> tuple[str] | tuple[str, int]:
        return (self.mail_id,) if self.index is None else (self.mail_id, self.index)

    @property
    def lock_name(self) -> str:
        suffix = "" if self.index is None else f":{self.index}"
        return f"{self.task}:{self.mail_id}{suffix}"


@dataclass(frozen=True)
class PollResult:
    inbox: str
    uidvalidity: int
    found: int
    steps: tuple[Step, ...]
    skipped: bool = False
    again: bool = False  # a poll was asked for meanwhile: poll once more


@contextmanager
def single_flight(ctx: Context, name: str) -> Iterator[bool]:
    """Hold a lock for one step of one mail; yields False when another run holds it.

    The lock outlives the task's hard time limit, so a run killed mid-step
    (kill -9, lost worker) blocks its step until the lock expires; the sweep in
    :func:`poll` then queues the mail again.
    """
    lock = ctx.ledger.step_lock(name, timeout=ctx.settings.task_time_limit + 30)
    acquired = lock.acquire(blocking=False)
    try:
        yield acquired
    finally:
        if acquired:
            with suppress(Exception):  # expired meanwhile: nothing of ours to release
                lock.release()


# -- poll ----------------------------------------------------------------------


def poll(ctx: Context, inbox_name: str, emit: Emit | None = None) -> PollResult:
    """Fetch new mail (UIDs above the watermark), record each before queuing its ingest.

    ``emit`` receives the steps as soon as each batch is recorded (the Celery
    task queues them at once, so a poll that dies halfway loses nothing);
    without it they are returned. The poll also sweeps the ledger of this inbox:
    mails idle too long in a non-terminal state are queued again, decided mails
    not yet moved get another ``finish``, and failed mails are retried after
    ``FAILED_RETRY_AFTER`` (at most ``FAILED_AUTO_RETRIES`` times).
    """
    inbox = ctx.settings.inbox(inbox_name)
    collected: list[Step] = []

    def out(steps: list[Step]) -> None:
        if steps:
            (emit or collected.extend)(steps)

    hold = ctx.settings.task_time_limit + 30
    lock = ctx.ledger.poll_lock(inbox.name, timeout=hold)
    if not lock.acquire(blocking=False):
        # mail may have arrived after the running poll searched: it polls once more
        ctx.ledger.ask_repoll(inbox.name, ttl=hold)
        log.info("inbox %s: another poll is running; it will poll again", inbox.name)
        return PollResult(inbox.name, 0, 0, (), skipped=True)
    try:
        with metrics.poll_timer(inbox.name):
            ctx.ledger.take_repoll(inbox.name)  # this poll answers every request so far
            validity, found = _fetch_new(ctx, inbox, out)
            out(_sweep(ctx, inbox))
            again = ctx.ledger.take_repoll(inbox.name)
    except MailingestError as exc:
        ctx.ledger.record_poll(inbox.name, found=0, error=str(exc))
        raise
    finally:
        with suppress(Exception):  # expired: the next poll may already hold it
            lock.release()
    ctx.ledger.record_poll(inbox.name, found=found)
    log.info("polled inbox %s: %d new mail(s)", inbox.name, found)
    return PollResult(inbox.name, validity, found, tuple(collected), again=again)


def _batches(uids: list[int], sizes: dict[int, int], count: int, size: int) -> Iterator[list[int]]:
    """Consecutive UIDs, at most ``count`` mails and about ``size`` bytes per batch."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        if batch and (len(batch) >= count or total + sizes.get(uid, 0) > size):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += sizes.get(uid, 0)
    if batch:
        yield batch


def _fetch_new(ctx: Context, inbox: InboxSettings, out: Emit) -> tuple[int, int]:
    settings = ctx.settings
    deadline = time.monotonic() + settings.task_time_limit / 2
    found = 0
    with ctx.imap(inbox.name) as box:
        box.ensure_folders(inbox.processed_folder, inbox.quarantine_folder)
        validity = box.select(inbox.folder)
        watermark = ctx.ledger.watermark(inbox.name, inbox.folder, validity)
        # Back pressure: take new mail only while fewer than POLL_LIMIT of the inbox's
        # mails are in flight, oldest first. A backlog of 10,000 is staged in Redis a
        # slice at a time, not all at once; the rest waits in the mailbox, where it is safe.
        room = settings.poll_limit - ctx.ledger.in_flight(inbox.name)
        uids = box.uids_after(watermark)[: max(0, room)]
        sizes = box.sizes(uids)
        # a mail over the size limit is recorded and quarantined without fetching its body
        too_big = [u for u in uids if sizes.get(u, 0) > settings.limits.max_message_bytes]
        for uid in too_big:
            ref = MailRef(inbox.name, inbox.folder, validity, uid)
            found += 1
            if ctx.ledger.record_new(ref, b""):
                ctx.ledger.update(ref.id, size=sizes[uid])
                out(quarantine(ctx, ref.id, size_refusal(sizes[uid], settings.limits)))
        refused = set(too_big)
        uids = [u for u in uids if u not in refused]
        for chunk in _batches(uids, sizes, settings.fetch_batch, settings.fetch_bytes):
            fetched = box.fetch(chunk)
            steps = []
            for mail in fetched:
                ref = MailRef(inbox.name, inbox.folder, validity, mail.uid)
                found += 1
                if ctx.ledger.record_new(ref, mail.raw):
                    steps.append(Step("ingest", ref.id))
            out(steps)
            # the watermark passes a UID only once it is recorded or gone from the folder
            missing = sorted(set(chunk) - {m.uid for m in fetched})
            still_there = [uid for uid in missing if box.exists(uid)]
            for uid in list(still_there):
                # a mail the server lists but never delivers must not stall the inbox
                if ctx.ledger.unfetchable(inbox.name, validity, uid) >= 3:
                    ref = MailRef(inbox.name, inbox.folder, validity, uid)
                    if ctx.ledger.record_new(ref, b""):
                        ctx.ledger.transition(
                            ref.id,
                            L.FAILED,
                            allowed=(L.QUEUED,),
                            reason=f"the server returned no body for UID {uid} in 3 polls",
                        )
                    still_there.remove(uid)
            safe = chunk[-1] if not still_there else still_there[0] - 1
            ctx.ledger.advance_watermark(inbox.name, inbox.folder, validity, safe)
            if still_there or time.monotonic() > deadline:
                break
    return validity, found


def _sweep(ctx: Context, inbox: InboxSettings) -> list[Step]:
    now = L.now_ms()
    stale = ctx.settings.stale_after * 1000
    steps: list[Step] = []
    mine = inbox.name + "/"
    for state in (L.QUEUED, L.PARSING, L.DOCUMENTS_PENDING):
        ids = [mail_id for mail_id in ctx.ledger.mail_ids(state) if mail_id.startswith(mine)]
        for record in ctx.ledger.records(ids):  # one round trip for all of them
            mail_id = record.id
            if now - max(record.updated_at, record.retry_at, record.requeued_at) <= stale:
                continue
            if record.requeues >= ctx.settings.max_attempts:
                # a poison mail (it kills or hangs whatever runs it): stop, and say so
                ctx.ledger.transition(
                    mail_id,
                    L.FAILED,
                    allowed=(record.state,),
                    reason=f"stuck in {record.state}: queued again {record.requeues} times "
                    "without progress",
                )
                continue
            log.warning("mail %s: idle in %s; queued again", mail_id, record.state)
            # requeued_at, not updated_at: `mailingest status` still sees it as stuck
            ctx.ledger.requeued(mail_id, record.requeues + 1)
            steps.append(Step("ingest", mail_id))
    failed = [mail_id for mail_id in ctx.ledger.mail_ids(L.FAILED) if mail_id.startswith(mine)]
    for record in ctx.ledger.records(failed):
        mail_id = record.id
        if (
            record.auto_replays < ctx.settings.failed_auto_retries
            and now - record.updated_at > ctx.settings.failed_retry_after * 1000
        ):
            log.warning("mail %s: failed %s ago; retried", mail_id, "long")
            ctx.ledger.update(mail_id, auto_replays=record.auto_replays + 1)
            steps += replay(ctx, mail_id)
    # a move that failed (or whose task was lost) after the mail was decided: try again,
    # leaving alone the ones decided moments ago whose finish_message is still queued
    steps += [
        Step("finish", m)
        for m in ctx.ledger.unfiled(inbox.name, idle_ms=ctx.settings.finish_grace * 1000)
    ]
    return steps


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
    with single_flight(ctx, f"ingest:{mail_id}") as mine:
        if not mine:
            return []  # another run parses this mail right now
        return _ingest_locked(ctx, record)


def _ingest_locked(ctx: Context, record: L.MailRecord) -> list[Step]:
    mail_id = record.id
    raw = ctx.ledger.raw(mail_id) or _refetch(ctx, record)
    if raw is None:
        ctx.ledger.transition(
            mail_id,
            L.FAILED,
            allowed=(L.QUEUED, L.PARSING),
            reason=f"the mail is no longer in {record.ref.folder} (deleted or moved by hand?)",
        )
        return []
    if not ctx.ledger.transition(mail_id, L.PARSING, allowed=(L.QUEUED, L.PARSING), reason=""):
        return []

    screened = screen(raw, ctx.settings.limits, ctx.settings.inbox(record.ref.inbox).sender_auth)
    mail = screened.mail
    if mail is not None:
        logs.correlate(message_id=mail.message_id)
        ctx.ledger.update(
            mail_id,
            message_id=mail.message_id or "",
            sender=mail.sender or "",
            subject=(mail.subject or "")[:200],
            skipped=len(mail.skipped),
        )
    if screened.refusal is not None or mail is None:
        return quarantine(ctx, mail_id, screened.refusal or "cannot parse the mail")
    if not mail.sender:
        return quarantine(ctx, mail_id, "no single sender address in From:")
    # a ResolverError (directory or CRM down) is retried by the caller
    resolved = ctx.senders(record.ref.inbox).resolve(mail.sender)
    if resolved is None:
        return quarantine(
            ctx, mail_id, f"unknown sender {mail.sender}: no entity in the sender directory"
        )
    entity, source = resolved
    planned = _planned(screened)
    # the same mail (Message-ID, else its bytes) seen again is not uploaded again
    message_key = mail.message_id or "sha256:" + hashlib.sha256(raw).hexdigest()
    ctx.ledger.plan_documents(mail_id, message_key, entity, planned)
    log.info(
        "mail %s: sender resolved by %s; %d document(s); %s",
        mail_id,
        source,
        len(planned),
        "; ".join(screened.notes) or "nothing skipped",
    )
    return _pending_steps(ctx, mail_id, len(planned))


def _planned(screened: Screened) -> list[PlannedDocument]:
    return [
        PlannedDocument(
            index=i,
            name=doc.spec.name,
            extension=doc.spec.extension,
            type=doc.spec.type,
            content_type=doc.spec.content_type,
            payload=doc.payload,
        )
        for i, doc in enumerate(screened.documents)
    ]


def _refetch(ctx: Context, record: L.MailRecord) -> bytes | None:
    """The mail's bytes from the server, when the staged copy expired; None if it is gone."""
    with ctx.imap(record.ref.inbox) as box:
        if box.select(record.ref.folder) != record.ref.uidvalidity:
            return None
        fetched = box.fetch([record.ref.uid])
    if not fetched:
        return None
    ctx.ledger.restage(record.id, fetched[0].raw)
    log.info("mail %s: staged bytes expired; fetched again from the server", record.id)
    return fetched[0].raw


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
    """POST the document's description; record its ``document_token``.

    The attempt is recorded before the POST. If an earlier attempt may have
    reached Alloy without its token being recorded (a timeout, a killed
    worker), the entity's documents are listed first and the one that attempt
    created is adopted instead of describing the document a second time.
    """
    record, doc = ctx.ledger.mail(mail_id), ctx.ledger.document(mail_id, index)
    if record is None or doc is None or record.state != L.DOCUMENTS_PENDING:
        return []
    logs.correlate(message_id=record.message_id, document_token=doc.token)
    if doc.state == L.UPLOADED:
        return _complete(ctx, mail_id)
    if doc.token:
        return [Step("upload", mail_id, index)]
    adopted = _same_document_elsewhere(ctx, record, doc)
    if adopted is not None:
        return adopted
    with single_flight(ctx, f"describe:{mail_id}:{index}") as mine:
        if not mine:
            return []
        doc = ctx.ledger.document(mail_id, index)
        if doc is None or doc.token:
            return [Step("upload", mail_id, index)] if doc else []
        inbox = ctx.settings.inbox(record.ref.inbox)
        try:
            if doc.describe_started_at:
                for candidate in _reconcile(ctx, record, doc, inbox):
                    if ctx.ledger.mark_described(mail_id, index, candidate):
                        log.info("mail %s: document %d adopted as %s", mail_id, index, candidate)
                        return [Step("upload", mail_id, index)]
            ctx.ledger.describe_attempt(mail_id, index)
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
        metrics.document_described()
        token = ctx.ledger.mark_described(mail_id, index, answer.token)
        logs.correlate(document_token=token)
    log.info("mail %s: document %d described as %s", mail_id, index, token)
    return [Step("upload", mail_id, index)]


def _same_document_elsewhere(
    ctx: Context, record: L.MailRecord, doc: L.DocumentRecord
) -> list[Step] | None:
    """Another copy of this mail (delivered twice, a new UIDVALIDITY epoch) owns this very
    document: adopt its upload when done, wait while it is in flight, take over if it died.
    None: this copy owns it and goes on."""
    if not doc.fingerprint:
        return None
    owner_mail, owner_index = ctx.ledger.fingerprint_owner(
        record.entity, doc.fingerprint, record.id, doc.index
    )
    if (owner_mail, owner_index) == (record.id, doc.index):
        return None
    owner_doc = ctx.ledger.document(owner_mail, owner_index)
    owner = ctx.ledger.mail(owner_mail)
    if owner_doc is not None and owner_doc.state == L.UPLOADED:
        log.info(
            "mail %s: document %d is %s, uploaded by %s",
            record.id,
            doc.index,
            owner_doc.token,
            owner_mail,
        )
        return _uploaded(ctx, record.id, doc.index, record.entity, owner_doc.token)
    if owner is not None and owner.state in (L.QUEUED, L.PARSING, L.DOCUMENTS_PENDING):
        raise Busy(f"document {doc.index} is being uploaded by {owner_mail}; waiting for it")
    ctx.ledger.take_fingerprint(record.entity, doc.fingerprint, record.id, doc.index)
    return None


def _reconcile(
    ctx: Context, record: L.MailRecord, doc: L.DocumentRecord, inbox: InboxSettings
) -> list[str]:
    """Tokens of documents an earlier describe of ``doc`` may have created, oldest first:
    same name, extension, type and note, not uploaded, created since the first attempt
    (less a small clock skew), not claimed by any document of ours."""
    since = doc.describe_started_at - RECONCILE_SKEW_MS
    return [
        found.token
        for found in sorted(ctx.alloy.list(record.entity), key=lambda d: d.timestamp or 0)
        if not found.uploaded
        and (found.name, found.extension, found.type) == (doc.name, doc.extension, doc.type)
        and (found.timestamp or 0) >= since
        and (found.notes[0].get("note", "") if found.notes else "") == (inbox.note or "")
        and not ctx.ledger.token_claimed(found.token)
    ]


def upload(ctx: Context, mail_id: str, index: int) -> list[Step]:
    """PUT the staged bytes; once Alloy answers ``uploaded: true`` the document is done."""
    record, doc = ctx.ledger.mail(mail_id), ctx.ledger.document(mail_id, index)
    if record is None or doc is None:
        return []
    logs.correlate(message_id=record.message_id, document_token=doc.token)
    if record.state != L.DOCUMENTS_PENDING:
        # the mail was quarantined or failed meanwhile (another document refused): a
        # document already described is still uploaded, so Alloy keeps no empty
        # description and a replay adopts it instead of describing it again
        if not (record.state in (L.QUARANTINED, L.FAILED) and doc.state == L.DESCRIBED):
            return []
    if doc.state == L.UPLOADED:
        return _complete(ctx, mail_id)
    if not doc.token:
        return [Step("describe", mail_id, index)]
    with single_flight(ctx, f"upload:{mail_id}:{index}") as mine:
        if not mine:
            return []
        data = ctx.ledger.blob(mail_id, index)
        if data is None:
            return _restage_documents(ctx, record, index)
        try:
            answer = ctx.alloy.upload(record.entity, doc.token, data)
        except AlloyRejected as exc:
            if exc.status == 409:  # Alloy has bytes for it already: an earlier try got through
                return _confirm_uploaded(ctx, record, doc, index)
            return quarantine(
                ctx, mail_id, f"document {index} ({doc.name}.{doc.extension}): {exc.describe()}"
            )
        if not answer.uploaded:
            raise AlloyUnavailable("answered the upload with uploaded=false", operation="upload")
        metrics.document_uploaded(len(data))
        log.info(
            "mail %s: document %d uploaded (%s, %d bytes)", mail_id, index, doc.token, len(data)
        )
        return _uploaded(ctx, mail_id, index, record.entity, doc.token)


def _confirm_uploaded(
    ctx: Context, record: L.MailRecord, doc: L.DocumentRecord, index: int
) -> list[Step]:
    """A PUT answered 409: count it only if Alloy holds exactly our bytes for the token."""
    held = ctx.alloy.download(record.entity, doc.token)
    if hashlib.sha256(held).hexdigest() != doc.sha256:
        return quarantine(
            ctx,
            record.id,
            f"document {index} ({doc.name}.{doc.extension}): Alloy already holds other bytes "
            f"for {doc.token}",
        )
    return _uploaded(ctx, record.id, index, record.entity, doc.token)


def _restage_documents(ctx: Context, record: L.MailRecord, index: int) -> list[Step]:
    """The staged bytes of a document expired: stage them again from the mail on the server."""
    raw = ctx.ledger.raw(record.id) or _refetch(ctx, record)
    if raw is None:
        ctx.ledger.transition(
            record.id,
            L.FAILED,
            allowed=(L.DOCUMENTS_PENDING,),
            reason=f"document {index}: staged bytes expired and the mail is no longer "
            f"in {record.ref.folder}",
        )
        return []
    policy = ctx.settings.inbox(record.ref.inbox).sender_auth
    for doc in _planned(screen(raw, ctx.settings.limits, policy)):
        ctx.ledger.restage_blob(record.id, doc.index, doc.payload)
    return [Step("upload", record.id, index)]


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
    if record is None or record.state != L.QUARANTINED or record.filed_to:
        return []
    return [Step("finish", mail_id)]


def give_up(ctx: Context, step: Step, error: BaseException) -> list[Step]:
    """Retries of ``step`` are exhausted: the mail is ``failed`` (it stays in the inbox).

    It is retried after ``FAILED_RETRY_AFTER`` and waits for `mailingest replay`."""
    if step.task == "finish":
        log.error("mail %s: moving it failed after retries: %s", step.mail_id, error)
        return []  # decided already; the next polls try the move again
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
    with single_flight(ctx, f"finish:{mail_id}") as mine:
        if not mine:
            return []
        with ctx.imap(inbox.name) as box:
            validity = box.select(record.ref.folder)
            if validity != record.ref.uidvalidity:
                ctx.ledger.filed(
                    mail_id,
                    "-",
                    reason=(record.reason + "; " if record.reason else "")
                    + f"not moved: UIDVALIDITY of {record.ref.folder} changed",
                )
                return []
            if not box.exists(record.ref.uid):
                # moved by an earlier run that died before recording it, or by a person
                if record.message_id and box.holds(destination, record.message_id):
                    ctx.ledger.filed(mail_id, destination)
                else:
                    ctx.ledger.filed(
                        mail_id,
                        "-",
                        reason=(record.reason + "; " if record.reason else "")
                        + f"not moved: the mail left {record.ref.folder} before "
                        "(deleted or moved by hand?)",
                    )
                ctx.ledger.drop_staged(mail_id, record.documents)
                return []
            box.move(record.ref.uid, destination, message_id=record.message_id or None)
        ctx.ledger.filed(mail_id, destination)
        ctx.ledger.drop_staged(mail_id, record.documents)
    log.info("mail %s moved to %s", mail_id, destination)
    return []


def replay(ctx: Context, mail_id: str) -> list[Step]:
    """Send a failed or quarantined mail through again.

    A failed mail still sits in the inbox: it is re-run from where it stopped
    (documents already uploaded stay uploaded). A quarantined mail not yet moved
    is parsed again in place. One already in the quarantine folder is moved
    back into the inbox, where the next poll picks it up as new mail; documents
    it already uploaded are recognised and not uploaded again.
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
            return [Step("ingest", mail_id)]
        if not record.message_id:
            raise MailError(
                f"mail {mail_id} has no Message-ID to find it by in {record.filed_to}; "
                "move it back to the inbox by hand"
            )
        inbox = ctx.settings.inbox(record.ref.inbox)
        with ctx.imap(inbox.name) as box:
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


# errors worth another try later; anything else final quarantines the mail
RETRYABLE: tuple[type[BaseException], ...] = (
    AlloyUnavailable,
    Busy,
    ResolverError,
    MailboxError,
    redis.ConnectionError,
    redis.TimeoutError,
)


@dataclass(frozen=True)
class Recovery:
    """What a runner does after ``step`` raised: wait ``retry_in`` seconds and run it
    again, or (``retry_in`` None) run ``steps`` instead."""

    retry_in: float | None
    steps: list[Step]


def recover(
    ctx: Context, step: Step, error: BaseException, tries: int, *, retryable: bool = False
) -> Recovery:
    """The one policy both runners (Celery tasks, poll-once) follow when a step fails.

    ``tries`` counts the earlier tries of this step; ``retryable`` marks errors
    the runner itself knows to be transient (a Celery soft time limit).
    """
    if retryable or isinstance(error, RETRYABLE):
        if not ctx.policy.exhausted(tries):
            delay = ctx.policy.delay(tries, getattr(error, "retry_after", None))
            ctx.ledger.update(step.mail_id, retry_at=L.now_ms() + int(delay * 1000))
            log.info(
                "%s %s: %s; retry %d in %.1fs", step.task, step.mail_id, error, tries + 1, delay
            )
            return Recovery(delay, [])
        return Recovery(None, give_up(ctx, step, error))
    if step.task == "finish":  # the mail is decided: a failed move is retried by later polls
        log.error("mail %s: move failed: %s", step.mail_id, error)
        return Recovery(None, [])
    if isinstance(error, MailingestError):
        return Recovery(None, quarantine(ctx, step.mail_id, str(error)))
    log.error("%s %s: unexpected error", step.task, step.mail_id, exc_info=error)
    return Recovery(
        None,
        quarantine(ctx, step.mail_id, f"internal error in {step.task}: {type(error).__name__}"),
    )


STEPS = {"ingest": ingest, "describe": describe, "upload": upload, "finish": finish}


def run_step(ctx: Context, step: Step) -> list[Step]:
    fn = STEPS[step.task]
    ref = MailRef.parse(step.mail_id)
    with logs.correlated(inbox=ref.inbox, mail_id=step.mail_id, uid=ref.uid, document=step.index):
        if step.index is None:
            return fn(ctx, step.mail_id)  # type: ignore[operator]
        return fn(ctx, step.mail_id, step.index)  # type: ignore[operator]
