"""The decisions of the pipeline as pure functions: no Redis, no IMAP, no HTTP.

The steps in :mod:`mailingest.application.pipeline` read the ledger (and Alloy), call one of
these, and write what it decided. Each is tested on its own without servers
(``tests/test_decisions.py``) and explored under every interleaving by the
simulation (``tests/sim``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from mailingest.core.errors import InDoubt, MailingestError
from mailingest.core.records import Document, DocumentRecord, MailRecord, Slot
from mailingest.core.retry import RetryPolicy
from mailingest.core.states import DECIDED, IN_FLIGHT, DocumentState, MailState


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


def adoption_candidates(
    listing: Sequence[Document],
    doc: DocumentRecord,
    *,
    note: str | None,
    agent_email: str | None,
    claimed: Collection[str],
) -> list[Document]:
    """The Alloy documents that may be ``doc``'s own, in the order to try them.

    A candidate has the document's name, extension and type, our note by our agent,
    and is claimed by no slot of ours. Uploaded ones come first (the caller adopts one
    only if its bytes are ours: Redis lost our record of an upload that went through),
    then descriptions without bytes, oldest first (a describe whose answer was lost).
    Time is not compared: Alloy's clock and ours may disagree, and a timestamp may be
    missing; the claim (one token, one slot) is what keeps two documents apart.
    """

    def ours(found: Document) -> bool:
        if (found.name, found.extension, found.type) != (doc.name, doc.extension, doc.type):
            return False
        if found.token in claimed:
            return False
        first = found.notes[0] if found.notes else {}
        if str(first.get("note") or "") != (note or ""):
            return False
        author = str(first.get("note_author_agent_email") or "")
        return not note or author.casefold() == (agent_email or "").casefold()

    matching = [found for found in listing if ours(found)]
    uploaded = [found for found in matching if found.uploaded]
    empty = sorted(
        (found for found in matching if not found.uploaded), key=lambda d: d.timestamp or 0
    )
    return uploaded + empty


def unsettled(mail_id: str, docs: Sequence[DocumentRecord], slots: Sequence[Slot]) -> list[Step]:
    """What must happen before a decided mail may leave the inbox: nothing of it may be
    left half-way at Alloy. A document with a token but no bytes gets its upload; one
    whose describe is in doubt is looked for (and adopted, or found absent). Documents
    never sent, uploaded, refused for good, or whose bytes this mail no longer has
    (``lost``) are settled. Empty: the mail may move."""
    steps: list[Step] = []
    for doc, slot in zip(docs, slots, strict=True):
        if slot.uploaded or slot.refused or doc.state == DocumentState.LOST:
            continue
        if slot.token:
            steps.append(Step("upload", mail_id, doc.index))
        elif slot.attempt:
            steps.append(Step("describe", mail_id, doc.index))
    return steps


@dataclass(frozen=True)
class Stale:
    """What the sweep does with a mail idle in a non-final state."""

    requeues: int  # the count to record (consecutive requeues without progress)
    fail: bool  # True: stop, it is a poison mail


@dataclass(frozen=True)
class Liveness:
    """Who may still move a mail on, read just before deciding about it.

    ``leased``: a step of it holds a lease now (a live worker runs it, or one that died
    less than a lease ago). ``queued_since``: when the oldest task still waiting in the
    broker was sent (ms), None when none waits; a task of this mail sent before that has
    left the queue (FIFO): it runs, ran, or was lost. Unknown is 0: anything may wait.
    ``lapsed``: a lease of it was taken and never given back, and is gone: the step
    that held it died (or hung) mid-way, so nothing is moving the mail."""

    leased: bool = False
    queued_since: int | None = 0
    lapsed: bool = False


def last_activity(record: MailRecord) -> int:
    """When the mail last moved, was retried or was queued again (ms)."""
    return max(record.updated_at, record.retry_at, record.requeued_at)


def stuck(record: MailRecord, now: int, *, policy: SweepPolicy, live: Liveness) -> bool:
    """In flight, no lease held, and idle for longer than any task of it can be waiting:
    what ``mailingest status`` lists as stalled, and what the sweep queues again.

    Idle for two leases while nothing queued before (or soon after) its last activity
    still waits in the broker: its task ran without moving it, or was lost with a
    killed worker or a crashed Redis. Idle for one lease when a lease of it lapsed (its
    step's holder died mid-way), whatever waits in the broker. Idle longer than ``stale_ms``
    in any case: the backstop when a deep queue hides whether its task is still there."""
    if record.state not in IN_FLIGHT or live.leased:
        return False
    last = last_activity(record)
    idle = now - last
    if live.lapsed and idle > policy.lease_ms:
        return True
    if idle > policy.stale_ms:
        return True
    # a task is sent just after the write that makes it: within a lease of it
    drained = live.queued_since is None or live.queued_since > last + policy.lease_ms
    return idle > 2 * policy.lease_ms and drained


def stale(record: MailRecord, now: int, *, policy: SweepPolicy, live: Liveness) -> Stale | None:
    """None unless the mail is :func:`stuck`; else queue it again, or fail it once it
    was queued again ``max_attempts`` times in a row without progress (progress since
    the last requeue starts the count afresh)."""
    if not stuck(record, now, policy=policy, live=live):
        return None
    progressed = record.updated_at > record.requeued_at
    count = 0 if progressed else record.requeues
    if count >= policy.max_attempts:
        return Stale(count, fail=True)
    return Stale(count + 1, fail=False)


@dataclass(frozen=True)
class Backlog:
    """An inbox's mails recorded but not decided yet, and the age of the oldest."""

    mails: int
    oldest_ms: int | None  # None: no mail in the backlog


def reply_stalled(record: MailRecord, now: int, policy: SweepPolicy) -> bool:
    """A filed mail whose reply is due and nothing has happened to it for two leases
    (nor is a retry planned): its step was lost, and is queued again. A step that runs
    meanwhile is harmless: the reply's record in the ledger lets one of them send it."""
    if not record.filed_to or now < record.retry_at:
        return False
    return now - max(record.updated_at, record.requeued_at) > 2 * policy.lease_ms


def backlog(records: Iterable[MailRecord], inbox: str, now: int) -> Backlog:
    """The backlog of ``inbox``: its mails in flight, aged from when they were recorded
    (the same for ``mailingest status`` and the metrics)."""
    ages = [now - r.created_at for r in records if r.ref.inbox == inbox and r.state in IN_FLIGHT]
    return Backlog(len(ages), max(ages, default=None))


# -- the poll -----------------------------------------------------------------------

FIRST_BATCH = 2  # mails in a poll's first FETCH: the workers start on them at once


def fetch_batches(
    uids: Sequence[int], sizes: Mapping[int, int], count: int, size: int
) -> Iterator[list[int]]:
    """Consecutive UIDs in batches of at most ``count`` mails and about ``size`` bytes,
    starting small and doubling: the first mails of a backlog reach the workers after
    one small FETCH, the rest in batches big enough to cost few round trips."""
    batch: list[int] = []
    total = 0
    limit = min(FIRST_BATCH, count)
    for uid in uids:
        if batch and (len(batch) >= limit or total + sizes.get(uid, 0) > size):
            yield batch
            batch, total = [], 0
            limit = min(2 * limit, count)
        batch.append(uid)
        total += sizes.get(uid, 0)
    if batch:
        yield batch


# -- the sweep ----------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPolicy:
    """The settings the sweep decides by, in milliseconds."""

    stale_ms: int  # MAILINGEST_STALE_AFTER: the backstop
    lease_ms: int  # MAILINGEST_LEASE
    max_attempts: int  # requeues in a row without progress before a mail is failed
    failed_retries: int  # MAILINGEST_FAILED_AUTO_RETRIES
    failed_retry_after_ms: int  # MAILINGEST_FAILED_RETRY_AFTER
    finish_grace_ms: int  # a decided mail's own finish may still be queued this long


class Sweep(StrEnum):
    LEAVE = "leave"  # nothing to do
    REQUEUE = "requeue"  # stuck: queue its ingest again (record ``requeues``)
    FAIL = "fail"  # queued again too often without progress: a poison mail
    RETRY_FAILED = "retry_failed"  # failed long enough ago: replay it (once more)
    FINISH = "finish"  # decided, still in the inbox: move it


@dataclass(frozen=True)
class SweepAction:
    action: Sweep
    requeues: int = 0  # REQUEUE / FAIL: the count to record
    reason: str = ""  # FAIL: why


def sweep(
    record: MailRecord, now: int, policy: SweepPolicy, live: Liveness | None = None
) -> SweepAction:
    """What the sweep does with one of its inbox's records."""
    if record.state in IN_FLIGHT:
        verdict = stale(record, now, policy=policy, live=live or Liveness())
        if verdict is None:
            return SweepAction(Sweep.LEAVE)
        if verdict.fail:
            reason = (
                f"stuck in {record.state}: queued again {verdict.requeues} times without progress"
            )
            return SweepAction(Sweep.FAIL, verdict.requeues, reason)
        return SweepAction(Sweep.REQUEUE, verdict.requeues)
    if record.state == MailState.FAILED:
        if (
            record.auto_replays < policy.failed_retries
            and now - record.updated_at > policy.failed_retry_after_ms
        ):
            return SweepAction(Sweep.RETRY_FAILED)
        return SweepAction(Sweep.LEAVE)
    if may_file(record) and record.updated_at <= now - policy.finish_grace_ms:
        # a move that failed (or whose task was lost) after the mail was decided; the
        # ones decided moments ago, whose finish is still queued, are left alone
        return SweepAction(Sweep.FINISH)
    return SweepAction(Sweep.LEAVE)


# -- the steps ----------------------------------------------------------------------


class Ingest(StrEnum):
    NOTHING = "nothing"  # no record, or replayed: nothing to parse
    PARSE = "parse"  # queued, or parsing (an earlier run died): parse it
    DOCUMENTS = "documents"  # planned already: go on with its documents
    FINISH = "finish"  # decided and not yet filed: move it


def ingest(record: MailRecord | None) -> Ingest:
    """What an ``ingest`` of this record does (it may run more than once)."""
    if record is None:
        return Ingest.NOTHING
    if record.state == MailState.DOCUMENTS_PENDING:
        return Ingest.DOCUMENTS
    if record.state in DECIDED:
        return Ingest.NOTHING if record.filed_to else Ingest.FINISH
    if record.state in (MailState.QUEUED, MailState.PARSING):
        return Ingest.PARSE
    return Ingest.NOTHING


def document_steps(mail_id: str, docs: Sequence[DocumentRecord]) -> list[Step]:
    """The step each document of a pending mail needs next: a planned one its describe,
    a described one its upload; uploaded (and lost) ones need none."""
    steps: list[Step] = []
    for doc in docs:
        if doc.state == DocumentState.PLANNED:
            steps.append(Step("describe", mail_id, doc.index))
        elif doc.state == DocumentState.DESCRIBED:
            steps.append(Step("upload", mail_id, doc.index))
    return steps


# at most this many steps run one after another in one task
CHAIN_LIMIT = 4


def chained(step: Step, following: Sequence[Step]) -> tuple[Step | None, list[Step]]:
    """Of the steps that follow ``step``, the one the same task runs next, and the rest
    to queue. A document's describe goes on with its own upload, and the step that
    decides a mail (its last upload, a refusal) goes on with its move: the next step of
    the same thing, on the same kind of worker, without a trip through the broker. The
    describes a parse plans are queued (in parallel, on the I/O workers)."""
    if step.task not in ("describe", "upload", "finish"):
        return None, list(following)
    for i, candidate in enumerate(following):
        same_document = (
            candidate.task == "upload"
            and step.task == "describe"
            and (candidate.mail_id, candidate.index) == (step.mail_id, step.index)
        )
        files_it = candidate.task == "finish" and candidate.mail_id == step.mail_id
        if same_document or files_it:
            return candidate, [*following[:i], *following[i + 1 :]]
    return None, list(following)


def may_file(record: MailRecord | None) -> bool:
    """A decided mail not yet filed: ``finish`` may move it (once it is settled)."""
    return record is not None and record.state in DECIDED and not record.filed_to


def destination(record: MailRecord, *, processed: str, quarantine: str) -> str:
    """Where ``finish`` files a decided mail: Processed when done, else Quarantine."""
    return processed if record.state == MailState.DONE else quarantine


def must_settle(record: MailRecord) -> bool:
    """A decided mail that is not done may have left documents half-way at Alloy: they
    are settled (:func:`unsettled`) before it moves."""
    return record.state != MailState.DONE and record.documents > 0


def with_note(reason: str, note: str) -> str:
    """A reason with one more note appended."""
    return (reason + "; " if reason else "") + note


# -- after an error -----------------------------------------------------------------


class After(StrEnum):
    RETRY = "retry"  # run the step again in ``delay`` seconds
    FAIL = "fail"  # retries exhausted: the mail is failed, with ``reason``
    QUARANTINE = "quarantine"  # a final error: the mail is quarantined, with ``reason``
    UNEXPECTED = "unexpected"  # a bug: quarantined, with ``reason``, and logged in full
    KEEP_DECIDED = "keep_decided"  # finish failed (``reason``): it stays decided; polls retry
    REPLY_FAILED = "reply_failed"  # the reply will not go (``reason``); the mail stays as is


@dataclass(frozen=True)
class AfterError:
    action: After
    delay: float = 0.0
    reason: str = ""


def after_error(
    step: Step, error: BaseException, tries: int, *, retryable: bool, policy: RetryPolicy
) -> AfterError:
    """Retry, give up (fail) or quarantine after ``step`` raised ``error``.

    ``tries`` counts the earlier tries; ``retryable`` says the error is transient (the
    caller knows which I/O errors are)."""
    if step.task == "reply":  # a reply never changes its mail's state
        if retryable and not policy.exhausted(tries):
            return AfterError(
                After.RETRY, delay=policy.delay(tries, getattr(error, "retry_after", None))
            )
        return AfterError(After.REPLY_FAILED, reason=give_up_reason(step, error))
    if retryable:
        if not policy.exhausted(tries):
            if isinstance(error, InDoubt) and error.retry_after is not None:
                delay = error.retry_after  # our own window: waiting less would not help
            else:
                delay = policy.delay(tries, getattr(error, "retry_after", None))
            return AfterError(After.RETRY, delay=delay)
        if step.task == "finish":
            return AfterError(After.KEEP_DECIDED, reason="moving it failed after retries")
        return AfterError(After.FAIL, reason=give_up_reason(step, error))
    if step.task == "finish":  # the mail is decided: a failed move is retried by later polls
        return AfterError(After.KEEP_DECIDED, reason="move failed")
    if isinstance(error, MailingestError):
        return AfterError(After.QUARANTINE, reason=str(error))
    return AfterError(
        After.UNEXPECTED, reason=f"internal error in {step.task}: {type(error).__name__}"
    )


def give_up_reason(step: Step, error: BaseException) -> str:
    """Why a mail failed once ``step`` ran out of tries (no text of an unknown error:
    it may quote a mail)."""
    text = str(error) if isinstance(error, MailingestError) else type(error).__name__
    reason = f"{step.task} gave up after retries: {text}"
    return reason if step.index is None else f"document {step.index}: {reason}"


def customer_of(
    sender: str,
    forwarded_senders: Sequence[str | None],
    forwarders: Collection[str],
    *,
    own_documents: bool = False,
) -> tuple[str | None, str]:
    """Whose entity a mail is filed on, and how that was decided ("" when simply its
    sender). A configured forwarder's (an agent's) mail is filed on the sender of the
    mail it forwards, when that is one customer and every document is theirs; else on
    none: (None, the reason). A forwarder's mail that forwards nothing is filed on the
    forwarder. (The forwarded mail's own From is not authenticated: the trust is in
    the agent, whose mail is.)"""
    if sender not in forwarders or not forwarded_senders:
        return sender, ""
    if any(s is None for s in forwarded_senders):
        return None, f"forwarded by {sender}: a forwarded mail has no single sender"
    if own_documents:
        return None, (
            f"forwarded by {sender}: documents of its own beside the forwarded mail; "
            "whose they are cannot be told"
        )
    originals = sorted({s for s in forwarded_senders if s})
    if len(originals) > 1:
        return None, (
            f"forwarded by {sender}: the forwarded mails have several senders "
            f"({', '.join(originals)}); one customer per mail"
        )
    return originals[0], f"forwarded by {sender}"
