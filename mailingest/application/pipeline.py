"""The steps of ingestion as plain functions: poll -> ingest -> describe -> upload -> finish.

Each step takes the :class:`~mailingest.application.services.Context` and the mail id (and a
document index), does its work, records it in the ledger and returns the
:class:`Step` s to run next. Who runs them is the caller's business: Celery
tasks (:mod:`mailingest.application.tasks`) queue them, ``mailingest poll-once``
(:mod:`mailingest.application.poll_once`) runs them in this process. Steps raise only
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
from datetime import UTC, datetime

import redis

from mailingest.adapters import keys
from mailingest.adapters import ledger as L
from mailingest.adapters.imap import Fetched, Mailbox, Moved
from mailingest.adapters.ledger import PlannedDocument
from mailingest.adapters.ledger.leases import NO_LEASES, step_lease_keys
from mailingest.adapters.senders import SenderResolver
from mailingest.application import logs, metrics
from mailingest.application import replies as reply_step
from mailingest.application.services import Context
from mailingest.config.settings import SEND_GUARD, InboxSettings, Settings
from mailingest.core import decisions, replies, reply_address, rules
from mailingest.core.decisions import (
    After,
    Ingest,
    Step,
    Sweep,
    SweepPolicy,
    adoption_candidates,
    destination,
    document_steps,
    may_file,
    must_settle,
    unsettled,
    with_note,
)
from mailingest.core.errors import (
    AlloyRejected,
    AlloyUnavailable,
    Busy,
    InDoubt,
    MailboxError,
    MailError,
    MailingestError,
    ReplyError,
    ResolverError,
)
from mailingest.core.mail import (
    MailParseError,
    ParsedMail,
    document_payload,
    message_key,
    parse_mail,
)
from mailingest.core.records import DocumentRecord, MailRecord, MailRef, Slot
from mailingest.core.screening import Screened, screen, size_refusal
from mailingest.core.states import IN_FLIGHT, DocumentState, MailState

log = logging.getLogger(__name__)

Emit = Callable[[list["Step"]], None]


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
    """Hold the lease on one step of one mail; yields False when another run holds it.

    The lease is renewed by this process's heartbeat while the step runs, and lapses
    ``MAILINGEST_LEASE`` seconds after a holder dies (kill -9, a lost host): the sweep
    then sees the mail is not being worked on and queues it again.
    """
    lease = ctx.leases.acquire(keys.step_lock(name))
    try:
        yield lease is not None
    finally:
        if lease is not None:
            with suppress(Exception):  # Redis away: the lease lapses by itself
                ctx.leases.release(lease)


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
    lease = ctx.leases.acquire(keys.poll_lock(inbox.name))
    if lease is None:
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
        with suppress(Exception):  # Redis away: the lease lapses by itself
            ctx.leases.release(lease)
    ctx.ledger.record_poll(inbox.name, found=found)
    log.info("polled inbox %s: %d new mail(s)", inbox.name, found)
    return PollResult(inbox.name, validity, found, tuple(collected), again=again)


def _fetch_new(ctx: Context, inbox: InboxSettings, out: Emit) -> tuple[int, int]:
    settings = ctx.settings
    deadline = time.monotonic() + settings.task_time_limit / 2
    found = 0
    with ctx.imap(inbox.name) as box:
        box.ensure_folders(inbox.processed_folder, inbox.quarantine_folder)
        # a SELECT every poll, never a kept selection: a new UIDVALIDITY of the inbox,
        # or the folder made anew, is found here
        validity = box.select(inbox.folder)
        watermark = ctx.ledger.watermark(inbox.name, inbox.folder, validity)
        # Back pressure: take new mail only while fewer than POLL_LIMIT of the inbox's
        # mails are in flight, oldest first. A backlog of 10,000 is staged in Redis a
        # slice at a time, not all at once; the rest waits in the mailbox, where it is safe.
        room = settings.poll_limit - ctx.ledger.in_flight(inbox.name)
        uids = _new_uids(ctx, inbox, box, validity, watermark)[: max(0, room)]
        sizes = box.sizes(uids)
        # a mail over the size limit is recorded and quarantined without fetching its body
        too_big = [u for u in uids if sizes.get(u, 0) > settings.limits.max_message_bytes]
        # with rules, one is decided by its header first: a mail no rule takes stays
        untaken = _untaken_by_header(inbox, box.headers(too_big)) if inbox.rules else {}
        for uid in too_big:
            ref = MailRef(inbox.name, inbox.folder, validity, uid)
            found += 1
            if not ctx.ledger.record_new(ref, b"", size=sizes[uid]):
                continue
            if uid in untaken:
                _ignore(ctx, ref.id, untaken[uid], allowed=MailState.QUEUED)
            else:
                out(quarantine(ctx, ref.id, size_refusal(sizes[uid], settings.limits)))
        refused = set(too_big)
        uids = [u for u in uids if u not in refused]
        for chunk in decisions.fetch_batches(
            uids, sizes, settings.fetch_batch, settings.fetch_bytes
        ):
            fetched = box.fetch(chunk)
            steps = []
            for mail in fetched:
                ref = MailRef(inbox.name, inbox.folder, validity, mail.uid)
                found += 1
                if ctx.ledger.record_new(
                    ref, mail.raw, size=mail.size, internaldate=mail.internaldate
                ):
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
                            MailState.FAILED,
                            allowed=(MailState.QUEUED,),
                            reason=f"the server returned no body for UID {uid} in 3 polls",
                        )
                    still_there.remove(uid)
            safe = chunk[-1] if not still_there else still_there[0] - 1
            ctx.ledger.advance_watermark(inbox.name, inbox.folder, validity, safe)
            if still_there or time.monotonic() > deadline:
                break
    return validity, found


def _new_uids(
    ctx: Context, inbox: InboxSettings, box: Mailbox, validity: int, watermark: int
) -> list[int]:
    """The UIDs above the watermark some rule of the inbox could take (all of them
    without rules: rules.search_criteria). When the rules' search finds none, the
    watermark passes every mail there was before it: what no rule takes is not searched
    again at every poll."""
    narrow = rules.search_criteria(inbox.rules, datetime.now(UTC))
    if narrow is None:
        return box.uids_after(watermark)
    everything = box.uids_after(watermark)  # first: a mail that comes later is not passed
    found = box.uids_after(watermark, narrow)
    if not found and everything:
        ctx.ledger.advance_watermark(inbox.name, inbox.folder, validity, everything[-1])
    return found


def sweep_policy(settings: Settings) -> SweepPolicy:
    return SweepPolicy(
        stale_ms=settings.stale_after * 1000,
        lease_ms=settings.lease * 1000,
        max_attempts=settings.max_attempts,
        failed_retries=settings.failed_auto_retries,
        failed_retry_after_ms=settings.failed_retry_after * 1000,
        finish_grace_ms=settings.finish_grace * 1000,
    )


def sweep(ctx: Context, inbox_name: str) -> list[Step]:
    """The sweep alone, between polls (beat runs it every lease when polls are rarer):
    under the poll's lease, so it never runs beside a poll (which sweeps at its end)."""
    inbox = ctx.settings.inbox(inbox_name)
    if ctx.ledger.now() - ctx.ledger.swept_at(inbox.name) < ctx.settings.lease * 500:
        return []  # swept less than half a lease ago (sweeps late in a deep queue bunch up)
    lease = ctx.leases.acquire(keys.poll_lock(inbox.name))
    if lease is None:
        return []  # a poll runs: it sweeps when it is done
    try:
        return _sweep(ctx, inbox)
    finally:
        with suppress(Exception):  # Redis away: the lease lapses by itself
            ctx.leases.release(lease)


def liveness(
    ctx: Context, records: list[MailRecord], now: int, policy: SweepPolicy
) -> dict[str, decisions.Liveness]:
    """What the sweep must know of the mails it may find stuck: those idle for a lease
    (a lease of the others cannot have lapsed yet), with their leases and the broker
    queue's age."""
    idle = [
        r
        for r in records
        if r.state in IN_FLIGHT
        and now - decisions.last_activity(r) > min(policy.lease_ms, policy.stale_ms)
    ]
    if not idle:
        return {}
    seen = ctx.leases.mail_leases([(r.id, r.documents) for r in idle])
    since = ctx.queue_since()
    return {r.id: seen.get(r.id, NO_LEASES).liveness(since) for r in idle}


def _sweep(ctx: Context, inbox: InboxSettings) -> list[Step]:
    """Read the inbox's records not yet filed, and do what decisions.sweep says with
    each: stalled mails again, failed ones retried, decided ones filed."""
    now = ctx.ledger.now()
    policy = sweep_policy(ctx.settings)
    mine = inbox.name + "/"
    steps: list[Step] = []
    for state in (*IN_FLIGHT, MailState.FAILED):
        ids = [mail_id for mail_id in ctx.ledger.mail_ids(state) if mail_id.startswith(mine)]
        records = ctx.ledger.records(ids)  # one round trip for all of them
        live = liveness(ctx, records, now, policy)
        if live:
            # read again after the leases: a step that wrote its progress and released
            # its lease between the two reads is seen with that progress
            fresh = {r.id: r for r in ctx.ledger.records(list(live))}
            records = [
                fresh[r.id] if r.id in live else r
                for r in records
                if r.id in fresh or r.id not in live
            ]
        for record in records:
            action = decisions.sweep(record, now, policy, live.get(record.id))
            steps += _swept(ctx, record, action)
    now = ctx.ledger.now()  # the sweep above took time: the grace counts from now
    for record in ctx.ledger.unfiled(inbox.name):
        steps += _swept(ctx, record, decisions.sweep(record, now, policy))
    # filed mails whose reply step was lost (its worker died, the broker lost it)
    due = ctx.ledger.records(ctx.ledger.replies_due(inbox.name))
    steps += [Step("reply", r.id) for r in due if decisions.reply_stalled(r, now, policy)]
    ctx.ledger.record_sweep(inbox.name)
    return steps


def _swept(ctx: Context, record: MailRecord, action: decisions.SweepAction) -> list[Step]:
    mail_id = record.id
    if action.action == Sweep.FAIL:
        # a poison mail (it kills or hangs whatever runs it): stop, and say so
        ctx.ledger.transition(
            mail_id, MailState.FAILED, allowed=(record.state,), reason=action.reason
        )
    elif action.action == Sweep.REQUEUE:
        log.warning(
            "mail %s: stalled in %s (no lease held, its task gone); queued again",
            mail_id,
            record.state,
        )
        # requeued_at, not updated_at: `mailingest status` still sees it as stuck
        ctx.ledger.requeued(mail_id, action.requeues)
        ctx.leases.forget(step_lease_keys(mail_id, record.documents))  # its lapsed leases
        return [Step("ingest", mail_id)]
    elif action.action == Sweep.RETRY_FAILED:
        log.warning("mail %s: failed %s ago; retried", mail_id, "long")
        ctx.ledger.update(mail_id, auto_replays=record.auto_replays + 1)
        return replay(ctx, mail_id)
    elif action.action == Sweep.FINISH:
        return [Step("finish", mail_id)]
    return []


# -- ingest --------------------------------------------------------------------


def ingest(ctx: Context, mail_id: str) -> list[Step]:
    """Parse one staged mail, resolve its sender, plan its documents."""
    record = ctx.ledger.mail(mail_id)
    action = decisions.ingest(record)
    if record is None:
        log.warning("mail %s: not in the ledger; nothing to do", mail_id)
        return []
    if action == Ingest.DOCUMENTS:
        return _pending_steps(ctx, mail_id, record.documents)
    if action == Ingest.FINISH:
        return [Step("finish", mail_id)]
    if action != Ingest.PARSE:
        return []
    with single_flight(ctx, Step("ingest", mail_id).lock_name) as mine:
        if not mine:
            return []  # another run parses this mail right now
        return _ingest_locked(ctx, record)


def _ingest_locked(ctx: Context, record: MailRecord) -> list[Step]:
    mail_id = record.id
    raw = ctx.ledger.raw(mail_id) or _refetch(ctx, record)
    if raw is None:
        ctx.ledger.transition(
            mail_id,
            MailState.FAILED,
            allowed=(MailState.QUEUED, MailState.PARSING),
            reason=f"the mail is no longer in {record.ref.folder} (deleted or moved by hand?)",
        )
        return []
    parsing = ctx.ledger.transition(
        mail_id, MailState.PARSING, allowed=(MailState.QUEUED, MailState.PARSING), reason=""
    )
    if parsing is None:
        return []

    inbox = ctx.settings.inbox(record.ref.inbox)
    screened = screen_for(ctx.settings, inbox, raw)
    mail = screened.mail
    if mail is not None:
        logs.correlate(message_id=mail.message_id)
        screened, verdict = ruled(inbox, screened, *_times(record))
        note, agent = verdict.note(inbox.note), verdict.agent_email(inbox.agent_email)
        ctx.ledger.update(
            mail_id,
            message_id=mail.message_id or "",
            sender=mail.sender or "",
            subject=(mail.subject or "")[:200],
            skipped=len(mail.skipped),
            refused_parts="; ".join(screened.refused)[:2000],
            parts=screened.parts(),
            rules=verdict.names,
            actions=",".join(verdict.actions) if verdict.ruled else "",
            note=note if verdict.ruled else "",
            agent_email=(agent or "") if verdict.ruled else "",
            message_key=message_key(raw, mail.message_id),
            **_reply_facts(inbox, screened, raw),
        )
        if not verdict.taken:
            return _ignore(ctx, mail_id, verdict.why_not())
    elif inbox.rules:  # whether a rule would take it cannot be told: it stays
        return _ignore(ctx, mail_id, f"the rules cannot read it: {screened.refusal}")
    if screened.refusal is not None or mail is None:
        return quarantine(ctx, mail_id, screened.refusal or "cannot parse the mail")
    if not mail.sender:
        return quarantine(ctx, mail_id, "no single sender address in From:")
    found = entity_of(ctx.settings, inbox, ctx.senders(inbox.name), mail)
    if isinstance(found, str):
        return quarantine(ctx, mail_id, found)
    entity, entity_source = found
    planned = _planned(screened)
    # every copy of this mail (delivered twice, a new UIDVALIDITY, a replay) shares one
    # slot per document: the same Alloy document, described and uploaded once
    if ctx.ledger.plan_documents(
        mail_id, message_key(raw, mail.message_id), entity, planned, entity_source=entity_source
    ):
        for reason in screened.refused:  # counted once: by the run that planned it
            log.warning("mail %s: %s (its other documents are filed)", mail_id, reason)
            metrics.part_refused(mail_id, reason)
        if screened.refused:
            ctx.ledger.partly_filed(mail_id)
    log.info(
        "mail %s: entity found by %s; %d document(s); %s",
        mail_id,
        entity_source,
        len(planned),
        "; ".join(screened.notes) or "nothing skipped",
    )
    return _pending_steps(ctx, mail_id, len(planned))


def _times(record: MailRecord) -> tuple[datetime | None, datetime]:
    """When the mail arrived (the server's INTERNALDATE) and when it was fetched."""
    return _times_of(record.internaldate, record.created_at)


def _times_of(internaldate: str, fetched_ms: int) -> tuple[datetime | None, datetime]:
    arrived = None
    with suppress(ValueError):
        arrived = datetime.fromisoformat(internaldate).astimezone(UTC)
    fetched = datetime.fromtimestamp(fetched_ms / 1000, UTC) if fetched_ms else datetime.now(UTC)
    return arrived, fetched


def _reply_facts(inbox: InboxSettings, screened: Screened, raw: bytes) -> dict[str, str]:
    """What the mail's reply needs of its headers, which are gone once it is filed: why
    it must not be answered ("" when it may be), recorded whatever the settings now (a
    mail read while replies were off is not answered once they are on)."""
    if inbox.replies is None:
        return {"reply_block": "read while replies were off"}
    headers = replies.headers_of(raw)
    block = replies.suppressed(
        headers,
        authenticated=screened.authenticated is True,
        ours=replies.Ours(inbox.replies.from_address, inbox.replies.domain),
    )
    if block is None and headers.sender in inbox.forwarders:
        block = "forwarded by an agent (the customer did not write to us)"
    return {"reply_block": block or "", "references": replies.references(headers)[:2000]}


def _untaken_by_header(inbox: InboxSettings, heads: list[Fetched]) -> dict[int, str]:
    """Of mails too large to fetch, those no rule takes by their header (a body filter
    does not match a mail whose body is not read), with why; one whose header cannot be
    read is none of them (it is quarantined as too large)."""
    untaken = {}
    now = datetime.now(UTC)
    for head in heads:
        try:
            mail = parse_mail(head.raw.rstrip(b"\r\n") + b"\r\n\r\n")
        except MailParseError:
            continue
        arrived = _times_of(head.internaldate, 0)[0]
        verdict = rules.decide(inbox.rules, rules.facts_of(mail, arrived=arrived, fetched=now))
        if not verdict.taken:
            untaken[head.uid] = verdict.why_not() + "; too large to fetch, read by its header"
    return untaken


def _ignore(
    ctx: Context, mail_id: str, reason: str, *, allowed: MailState = MailState.PARSING
) -> list[Step]:
    """No rule of the inbox takes the mail: it stays where it is, as it is."""
    if ctx.ledger.transition(mail_id, MailState.IGNORED, allowed=(allowed,), reason=reason):
        log.info("mail %s left in the inbox: %s", mail_id, reason)
        ctx.ledger.drop_staged(mail_id, 0)
    return []


def ruled(
    inbox: InboxSettings, screened: Screened, arrived: datetime | None, fetched: datetime
) -> tuple[Screened, rules.Verdict]:
    """What the inbox's rules decide for a parsed mail, and its documents as they take
    them (filtered by filename, typed)."""
    if screened.mail is None:
        return screened, rules.NO_RULES
    facts = rules.facts_of(screened.mail, arrived=arrived, fetched=fetched)
    verdict = rules.decide(inbox.rules, facts)
    return rules.applied_to(screened, verdict), verdict


def screen_for(settings: Settings, inbox: InboxSettings, raw: bytes) -> Screened:
    """``screen`` with the limits and the inbox's own policies (sender authentication,
    refused parts, forwarded mail)."""
    return screen(
        raw,
        settings.limits,
        inbox.sender_auth,
        on_refused_part=inbox.on_refused_part,
        forwarded=inbox.forwarded,
    )


def entity_of(
    settings: Settings, inbox: InboxSettings, resolver: SenderResolver, mail: ParsedMail
) -> tuple[str, str] | str:
    """The entity a mail is filed on and how it was found, or why none (a reason to
    quarantine): a valid signed reply address names it; else the sender directory,
    asked for the sender (or, for a configured forwarder, the forwarded mail's own).
    A ResolverError (directory or CRM down) is retried by the caller."""
    key = settings.address_key_bytes
    ignored = ""
    if key is not None and inbox.reply_address:
        signed = reply_address.route(mail.recipients, inbox.reply_address, key)
        if signed.external_id is not None:
            return signed.external_id, "signed address"
        if signed.ignored:
            ignored = f"signed address ignored: {signed.ignored}"
            log.warning("mail from %s: %s", mail.sender, ignored)
    assert mail.sender is not None
    customer, via = decisions.customer_of(
        mail.sender, mail.forwarded_senders, inbox.forwarders, own_documents=mail.own_documents
    )
    if customer is None:
        return via
    resolved = resolver.resolve(customer)
    notes = "; ".join(n for n in (via, ignored) if n)
    if resolved is None:
        return f"unknown sender {customer}: no entity in the sender directory" + (
            f" ({notes})" if notes else ""
        )
    entity, source = resolved
    return entity, f"{source}, {notes}" if notes else source


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


def _refetch(ctx: Context, record: MailRecord) -> bytes | None:
    """The mail's bytes from the server, when the staged copy expired; None if it is gone."""
    with ctx.imap(record.ref.inbox) as box:
        where = box.select_mail(record.ref.folder, record.ref.uid, size=record.size)
        if where.uidvalidity != record.ref.uidvalidity or not where.present:
            return None
        fetched = box.fetch([record.ref.uid])
    if not fetched:
        return None
    ctx.ledger.restage(record.id, fetched[0].raw)
    log.info("mail %s: staged bytes expired; fetched again from the server", record.id)
    return fetched[0].raw


def _pending_steps(ctx: Context, mail_id: str, count: int) -> list[Step]:
    docs = ctx.ledger.documents(mail_id, count)
    steps = document_steps(mail_id, docs)
    if not steps and len(docs) == count:
        steps += _complete(ctx, mail_id)
    return steps


# -- describe / upload ---------------------------------------------------------

# a mail in these states may still act on its documents: pending ones go on; a
# quarantined one not yet moved settles what it left half-way (see decisions.unsettled)
_ACTING = (MailState.DOCUMENTS_PENDING, MailState.QUARANTINED)


def describe(ctx: Context, mail_id: str, index: int) -> list[Step]:
    """POST the document's description; record its ``document_token`` on its slot.

    Alloy has no idempotency key, so before any POST the entity's documents are
    listed and one that is already ours is adopted: a describe whose answer was lost,
    or an upload Redis forgot (a crash that cost the last writes). A POST is fenced
    by a compare-and-set on the slot (:meth:`Ledger.begin_attempt`), so two runs
    never both send one, and while an earlier POST may still be committed by Alloy
    none is sent. A quarantined mail only settles: it adopts, never POSTs.
    """
    record, doc = ctx.ledger.mail(mail_id), ctx.ledger.document(mail_id, index)
    if record is None or doc is None or record.state not in _ACTING or record.filed_to:
        return []
    logs.correlate(message_id=record.message_id, document_token=doc.token)
    slot = ctx.ledger.slot(record.entity, doc.fingerprint)
    if slot.uploaded:
        return _uploaded(ctx, record, doc, slot.token)
    if slot.token:
        return [Step("upload", mail_id, index)]
    with single_flight(ctx, Step("describe", mail_id, index).lock_name) as mine:
        if not mine:
            return []  # another run describes this document right now
        return _describe_locked(ctx, record, doc)


def _describe_locked(ctx: Context, record: MailRecord, doc: DocumentRecord) -> list[Step]:
    mail_id, index = record.id, doc.index
    slot = ctx.ledger.slot(record.entity, doc.fingerprint)  # as it is now, under the lock
    if slot.token:
        return [Step("upload", mail_id, index)]
    inbox = ctx.settings.inbox(record.ref.inbox)
    window = ctx.settings.in_doubt_ms
    doubt = L.doubt_key(record.entity, doc)
    adopted = _adopt(ctx, record, doc, slot, inbox=inbox, doubt=doubt)
    if adopted is not None:
        return adopted
    if record.state != MailState.DOCUMENTS_PENDING:  # settling a quarantined mail: never POST
        if slot.attempt:
            left = slot.attempt_at + window - ctx.ledger.now()
            if left > 0:
                raise InDoubt(_in_doubt(index, left), retry_after=left / 1000)
            ctx.ledger.attempt_failed(slot, doubt, slot.attempt)  # it never became one
        return [Step("finish", mail_id)]
    _wait_for_others(ctx, doubt, slot, index)
    # the wait for a token of the rate limit, or out another worker's 429, comes before
    # the attempt is recorded: the POST must go within SEND_GUARD of that record
    ctx.alloy.wait_turn("describe")
    attempt = ctx.ledger.begin_attempt(slot, mail_id, doubt, window_ms=window)
    if attempt.verdict == "token":
        return [Step("upload", mail_id, index)]
    if attempt.verdict == "decided":
        return []  # quarantined or failed meanwhile: whoever decided it settles it
    if attempt.verdict == "wait":
        raise InDoubt(_in_doubt(index, attempt.wait_ms), retry_after=attempt.wait_ms / 1000)
    if attempt.verdict != "go":
        raise Busy(f"document {index}: another run described it meanwhile; looking again")
    if ctx.ledger.now() - attempt.at > SEND_GUARD * 1000:
        # stalled (frozen, paused) since the attempt was recorded: others count its window
        # from the record, so it is not sent late; it was never sent, so it is not in doubt
        ctx.ledger.attempt_failed(slot, doubt, attempt.attempt_id)
        raise Busy(f"document {index}: stalled before sending its describe; trying again")
    note, agent = authorship(inbox, record)
    try:
        answer = ctx.alloy.describe(
            record.entity,
            name=doc.name,
            extension=doc.extension,
            type=doc.type,
            note=note,
            note_author_agent_email=agent,
            turn_taken=True,
        )
    except AlloyRejected as exc:
        ctx.ledger.attempt_failed(slot, doubt, attempt.attempt_id)
        return quarantine(
            ctx, mail_id, f"document {index} ({doc.name}.{doc.extension}): {exc.describe()}"
        )
    except AlloyUnavailable as exc:
        if not exc.applied:
            ctx.ledger.attempt_failed(slot, doubt, attempt.attempt_id)
        raise
    metrics.document_described()
    token = ctx.ledger.claim(slot, answer.token, doubt, answers=attempt.attempt_id)
    if not token:  # another slot adopted what this POST created: describe again
        ctx.ledger.attempt_failed(slot, doubt, attempt.attempt_id)
        raise Busy(f"document {index}: {answer.token} was adopted by another document")
    if token != answer.token:
        log.error(
            "mail %s: document %d: Alloy document %s was described by a run that outlived "
            "its lock; it stays at the entity without bytes",
            mail_id,
            index,
            answer.token,
        )
    ctx.ledger.mark_described(mail_id, index, token)
    logs.correlate(document_token=token)
    log.info("mail %s: document %d described as %s", mail_id, index, token)
    return [Step("upload", mail_id, index)]


def _in_doubt(index: int, left_ms: int) -> str:
    return (
        f"document {index}: a describe's answer was lost; Alloy may still commit it "
        f"for {left_ms / 1000:.0f} s, then it is looked for again"
    )


def _wait_for_others(ctx: Context, doubt: str, slot: Slot, index: int) -> None:
    """Raise InDoubt while another document of this name, extension and type for this
    entity has a describe that may still become an Alloy document: a description of that
    name adopted, or a new one made, before it settles could leave it without a slot."""
    left = ctx.ledger.others_in_doubt(doubt, slot, window_ms=ctx.settings.in_doubt_ms)
    if left > 0:
        raise InDoubt(
            f"document {index}: another document of its name may still be described "
            f"at Alloy for {left / 1000:.0f} s; looked for again then",
            retry_after=left / 1000,
        )


def authorship(inbox: InboxSettings, record: MailRecord) -> tuple[str, str | None]:
    """The note a mail's documents are described with and its author: what its inbox's
    rules assigned it (recorded when it was parsed), else the inbox's own."""
    return record.note or inbox.note, record.agent_email or inbox.agent_email


def _adopt(
    ctx: Context,
    record: MailRecord,
    doc: DocumentRecord,
    slot: Slot,
    *,
    inbox: InboxSettings,
    doubt: str,
) -> list[Step] | None:
    """Adopt the Alloy document that is already this document's, if there is one: one
    with exactly our bytes, else a description without bytes once no other document of
    its name is still being described (it may be theirs)."""
    listing = ctx.alloy.list(record.entity)
    claimed = ctx.ledger.claimed([found.token for found in listing])
    note, agent = authorship(inbox, record)
    for found in adoption_candidates(listing, doc, note=note, agent_email=agent, claimed=claimed):
        if found.uploaded:  # ours only if Alloy holds exactly our bytes
            held = ctx.alloy.download(record.entity, found.token)
            if hashlib.sha256(held).hexdigest() != doc.sha256:
                continue
        else:
            _wait_for_others(ctx, doubt, slot, doc.index)
        token = ctx.ledger.claim(slot, found.token, doubt)
        if not token:
            continue  # another slot took it meanwhile
        log.info("mail %s: document %d adopted as %s", record.id, doc.index, token)
        ctx.ledger.mark_described(record.id, doc.index, token)
        if token == found.token and found.uploaded:
            ctx.ledger.slot_uploaded(slot)
            return _uploaded(ctx, record, doc, token)
        return [Step("upload", record.id, doc.index)]
    return None


def upload(ctx: Context, mail_id: str, index: int) -> list[Step]:
    """PUT the planned bytes; once Alloy answers ``uploaded: true`` the document is done.

    The bytes are checked against the SHA-256 recorded at planning before every PUT.
    A document already described is uploaded even when its mail was quarantined or
    failed meanwhile (another document refused), so no description stays at Alloy
    without its bytes."""
    record, doc = ctx.ledger.mail(mail_id), ctx.ledger.document(mail_id, index)
    if record is None or doc is None or record.filed_to:
        return []
    if record.state not in (*_ACTING, MailState.FAILED):
        return []
    logs.correlate(message_id=record.message_id, document_token=doc.token)
    if doc.state == DocumentState.UPLOADED:
        return _complete(ctx, mail_id)
    slot = ctx.ledger.slot(record.entity, doc.fingerprint)
    if slot.uploaded:
        return _uploaded(ctx, record, doc, slot.token)
    if slot.refused:  # Alloy refused these bytes for good (for this copy or another)
        return quarantine(
            ctx, mail_id, f"document {index} ({doc.name}.{doc.extension}): {slot.refused}"
        )
    if not slot.token:
        return [Step("describe", mail_id, index)]
    with single_flight(ctx, Step("upload", mail_id, index).lock_name) as mine:
        if not mine:
            return []
        data = _planned_bytes(ctx, record, doc)
        if data is None:
            return []
        try:
            answer = ctx.alloy.upload(record.entity, slot.token, data)
        except AlloyRejected as exc:
            if exc.status == 409:  # Alloy has bytes for it already: an earlier try got through
                return _confirm_uploaded(ctx, record, doc, slot)
            ctx.ledger.slot_refused(slot, exc.describe())
            return quarantine(
                ctx, mail_id, f"document {index} ({doc.name}.{doc.extension}): {exc.describe()}"
            )
        if not answer.uploaded:
            raise AlloyUnavailable("answered the upload with uploaded=false", operation="upload")
        metrics.document_uploaded(len(data))
        ctx.ledger.slot_uploaded(slot)
        log.info(
            "mail %s: document %d uploaded (%s, %d bytes)", mail_id, index, slot.token, len(data)
        )
        return _uploaded(ctx, record, doc, slot.token)


def _confirm_uploaded(
    ctx: Context, record: MailRecord, doc: DocumentRecord, slot: Slot
) -> list[Step]:
    """A PUT answered 409: count it only if Alloy holds exactly our bytes for the token."""
    held = ctx.alloy.download(record.entity, slot.token)
    if hashlib.sha256(held).hexdigest() != doc.sha256:
        reason = f"Alloy already holds other bytes for {slot.token}"
        ctx.ledger.slot_refused(slot, reason)
        return quarantine(
            ctx, record.id, f"document {doc.index} ({doc.name}.{doc.extension}): {reason}"
        )
    ctx.ledger.slot_uploaded(slot)
    return _uploaded(ctx, record, doc, slot.token)


def _planned_bytes(ctx: Context, record: MailRecord, doc: DocumentRecord) -> bytes | None:
    """The document's bytes, exactly as planned (by SHA-256): staged, else re-extracted
    from the mail (never screened again: settings may have changed). None when they
    cannot be had; the mail is then failed (or, if quarantined, the document ``lost``)."""
    data = ctx.ledger.blob(record.id, doc.index)
    if data is not None and hashlib.sha256(data).hexdigest() == doc.sha256:
        return data
    raw = ctx.ledger.raw(record.id) or _refetch(ctx, record)
    data = document_payload(raw, doc.sha256) if raw is not None else None
    if data is not None:
        ctx.ledger.restage_blob(record.id, doc.index, data)
        return data
    reason = f"document {doc.index}: its staged bytes expired and " + (
        f"the mail is no longer in {record.ref.folder}"
        if raw is None
        else "no part of the mail has the planned bytes any more"
    )
    if record.state == MailState.QUARANTINED:
        ctx.ledger.mark_lost(record.id, doc.index)  # nothing left to send: settle without it
        log.error("mail %s: %s", record.id, reason)
    elif ctx.ledger.transition(
        record.id,
        MailState.FAILED,
        allowed=(MailState.DOCUMENTS_PENDING, MailState.FAILED),
        reason=reason,
    ):
        log.error("mail %s failed: %s", record.id, reason)
    return None


def _uploaded(ctx: Context, record: MailRecord, doc: DocumentRecord, token: str) -> list[Step]:
    confirmed = ctx.ledger.mark_uploaded(record.id, doc.index, token)
    if record.state == MailState.QUARANTINED:
        return [Step("finish", record.id)]  # one less thing for the move to wait for
    if confirmed >= record.documents:
        return _complete(ctx, record.id)
    return []


def _complete(ctx: Context, mail_id: str) -> list[Step]:
    record = ctx.ledger.mail(mail_id)
    if record is None:
        return []
    if ctx.ledger.confirmed(mail_id) < record.documents:
        return []
    done = ctx.ledger.transition(
        mail_id, MailState.DONE, allowed=(MailState.DOCUMENTS_PENDING,), reason=""
    )
    if done is None:
        # moved on meanwhile: whoever moved it files it (done already: a finish is queued)
        record = ctx.ledger.mail(mail_id)
        if record is None or record.state != MailState.DONE or record.filed_to:
            return []
        return [Step("finish", mail_id)]
    return [] if done.filed_to else [Step("finish", mail_id)]


# -- decide and file ------------------------------------------------------------


def quarantine(ctx: Context, mail_id: str, reason: str) -> list[Step]:
    """Record why a mail cannot be handled; it will be moved to the quarantine folder."""
    record = ctx.ledger.transition(mail_id, MailState.QUARANTINED, reason=reason)
    moved = record is not None
    if moved:
        log.warning("mail %s quarantined: %s", mail_id, reason)
    else:
        record = ctx.ledger.mail(mail_id)  # not moved: as it is now
    if record is None or record.state != MailState.QUARANTINED:
        return []
    if not moved and reason not in record.reason:
        # quarantined already (another document): this refusal is part of the reason too
        ctx.ledger.add_reason(mail_id, reason)
        log.warning("mail %s quarantined, also: %s", mail_id, reason)
    return [] if record.filed_to else [Step("finish", mail_id)]


def give_up(ctx: Context, step: Step, error: BaseException) -> list[Step]:
    """Retries of ``step`` are exhausted: the mail is ``failed`` (it stays in the inbox).

    It is retried after ``FAILED_RETRY_AFTER`` and waits for `mailingest replay`."""
    if step.task == "finish":
        log.error("mail %s: moving it failed after retries: %s", step.mail_id, error)
        return []  # decided already; the next polls try the move again
    reason = decisions.give_up_reason(step, error)
    if ctx.ledger.transition(step.mail_id, MailState.FAILED, allowed=IN_FLIGHT, reason=reason):
        log.error("mail %s failed: %s", step.mail_id, reason)
    return []


def finish(ctx: Context, mail_id: str) -> list[Step]:
    """Move a decided mail out of the inbox: to Processed when done, else to Quarantine.

    Not before every document it left half-way at Alloy is settled (decisions.unsettled):
    until then it returns the steps that settle them. The mail is never removed from the
    inbox unless its own copy is in the destination: MOVE, or COPY (whose new UID is
    recorded) and then ``\\Deleted`` + ``UID EXPUNGE`` of that UID only.

    On a connection that has the inbox selected already, no SELECT: one ``UID FETCH`` of
    the mail's size vouches for the selection and finds the mail (Mailbox.select_mail),
    and the move's answer names its new UID (recorded). No search of the inbox, nothing
    whose cost grows with the mailbox. A mail not there, or a move that moved nothing
    of ours, takes the slow path: this very mail looked for in the destination."""
    record = ctx.ledger.mail(mail_id)
    if record is None or not may_file(record):
        return []
    if must_settle(record):
        docs = ctx.ledger.documents(mail_id, record.documents)
        slots = ctx.ledger.slots(record.entity, [doc.fingerprint for doc in docs])
        waiting = unsettled(mail_id, docs, slots) or _orphans(ctx, record, docs, slots)
        if waiting:
            return waiting
    inbox = ctx.settings.inbox(record.ref.inbox)
    target = destination(
        record, processed=inbox.processed_folder, quarantine=inbox.quarantine_folder
    )
    folder = record.ref.folder
    with single_flight(ctx, Step("finish", mail_id).lock_name) as mine:
        if not mine:
            return []
        with ctx.imap(inbox.name) as box:
            where = box.select_mail(folder, record.ref.uid, size=record.size)
            if where.uidvalidity != record.ref.uidvalidity:
                return _filed(
                    ctx,
                    inbox,
                    mail_id,
                    "-",
                    reason=with_note(record.reason, f"not moved: UIDVALIDITY of {folder} changed"),
                )
            moved = Moved(missed=True)
            if where.present:
                actions = rules.imap_actions(record.actions)
                if actions.flags or actions.keywords:
                    box.mark(record.ref.uid, actions.flags, actions.keywords)
                ctx.ledger.update(mail_id, moving_to=target)
                copied_uid = record.copied_uid if record.moving_to == target else ""
                if actions.copy:
                    moved = box.copy(record.ref.uid, target, copied_uid=copied_uid)
                    if moved.to:  # recorded at once: a run after a crash does not copy again
                        ctx.ledger.update(mail_id, copied_uid=moved.to)
                else:
                    moved = box.move(
                        record.ref.uid,
                        target,
                        copied_uid=copied_uid,
                        on_copied=lambda copied: ctx.ledger.update(mail_id, copied_uid=copied),
                    )
            if moved.missed:
                # moved by an earlier run that died before recording it, or by a person
                # (also between our look and the move): filed only if this very mail
                # (size, arrival time) is in the destination
                if box.find_copy(
                    target,
                    size=record.size,
                    internaldate=record.internaldate,
                    message_id=record.message_id,
                ):
                    steps = _filed(ctx, inbox, mail_id, target)
                else:
                    steps = _filed(
                        ctx,
                        inbox,
                        mail_id,
                        "-",
                        reason=with_note(
                            record.reason,
                            f"not moved: the mail left {folder} before (deleted or moved by hand?)",
                        ),
                    )
                ctx.ledger.drop_staged(mail_id, record.documents)
                return steps
        # the new UID as the answer named it: where the mail is, for a replay or a person
        steps = _filed(
            ctx, inbox, mail_id, target, **({"copied_uid": moved.to} if moved.to else {})
        )
        ctx.ledger.drop_staged(mail_id, record.documents)
    log.info("mail %s moved to %s", mail_id, target)
    return steps


def _filed(
    ctx: Context, inbox: InboxSettings, mail_id: str, folder: str, **fields: object
) -> list[Step]:
    """Record the decided mail filed; its reply, when the inbox sends replies, is due
    (noted first: a run that dies between the two leaves it due, not forgotten)."""
    if inbox.replies is not None:
        ctx.ledger.reply_due(mail_id)
    ctx.ledger.filed(mail_id, folder, **fields)
    return [Step("reply", mail_id)] if inbox.replies is not None else []


def _orphans(
    ctx: Context, record: MailRecord, docs: list[DocumentRecord], slots: list[Slot]
) -> list[Step]:
    """Documents this mail never sent as far as the ledger knows, for which Alloy holds a
    description without bytes that is ours and no slot's: a describe answered whose
    record a Redis crash lost (a rollback). Their describe adopts it and uploads the
    bytes before the mail moves, so no description is left without them."""
    never = [
        doc
        for doc, slot in zip(docs, slots, strict=True)
        if not (slot.token or slot.attempt or slot.uploaded or slot.refused)
        and doc.state != DocumentState.LOST
    ]
    if not never:
        return []
    inbox = ctx.settings.inbox(record.ref.inbox)
    listing = [found for found in ctx.alloy.list(record.entity) if not found.uploaded]
    claimed = ctx.ledger.claimed([found.token for found in listing])
    note, agent = authorship(inbox, record)
    return [
        Step("describe", record.id, doc.index)
        for doc in never
        if adoption_candidates(listing, doc, note=note, agent_email=agent, claimed=claimed)
    ]


# quarantined, and quarantined then dealt with by hand: a replay treats them alike
SET_ASIDE = (MailState.QUARANTINED, MailState.HANDLED)


def replay(ctx: Context, mail_id: str) -> list[Step]:
    """Send a failed, quarantined (or handled), partly filed or ignored mail through again.

    A failed mail still sits in the inbox: it is re-run from where it stopped
    (documents already uploaded stay uploaded). A quarantined mail not yet moved
    is parsed again in place. One already in the quarantine folder, or a mail filed
    as processed with parts refused (the refusal fixed since: a limit raised, a type
    allowed), is moved back into the inbox, where the next poll picks it up as new
    mail; documents it already uploaded are recognised and not uploaded again. An
    ignored mail (its inbox's rules changed since) is parsed again in place.
    """
    record = ctx.ledger.mail(mail_id)
    if record is None:
        raise KeyError(mail_id)
    if record.state == MailState.DONE:
        if not record.refused_parts:
            raise MailError(f"mail {mail_id} is done: every document of it was filed")
        if not record.filed_to:
            raise MailError(f"mail {mail_id} is not moved to its folder yet; try again later")
    if record.state == MailState.FAILED:
        if record.documents:
            ctx.ledger.transition(
                mail_id, MailState.DOCUMENTS_PENDING, allowed=(MailState.FAILED,), reason=""
            )
            return _pending_steps(ctx, mail_id, record.documents)
        ctx.ledger.transition(mail_id, MailState.QUEUED, allowed=(MailState.FAILED,), reason="")
        return [Step("ingest", mail_id)]
    if record.state == MailState.IGNORED:  # the rules changed: still in the inbox
        ctx.ledger.transition(mail_id, MailState.QUEUED, allowed=(MailState.IGNORED,), reason="")
        return [Step("ingest", mail_id)]
    kept = record.filed_to and rules.imap_actions(record.actions).copy
    if kept and record.state == MailState.DONE:
        raise MailError(
            f"mail {mail_id} was filed by copy (a rule's action): the mail itself is still in "
            f"{record.ref.folder}, where a replay would file it twice; no replay of it"
        )
    if record.state in SET_ASIDE:
        # an operator replays a mail once the cause is fixed: uploads Alloy refused are
        # tried again (their descriptions are still there to take the bytes)
        docs = ctx.ledger.documents(mail_id, record.documents)
        ctx.ledger.forget_refusals(record.entity, [doc.fingerprint for doc in docs])
        if not record.filed_to or kept:  # still in the inbox: run it again in place
            # (a copy filed before is found by its recorded UID, not copied again)
            ctx.ledger.transition(
                mail_id, MailState.QUEUED, allowed=(record.state,), reason="", filed_to=""
            )
            return [Step("ingest", mail_id)]
    elif record.state != MailState.DONE:
        return []  # in flight, or replayed already: nothing to do
    if not (record.message_id or record.internaldate):
        raise MailError(
            f"mail {mail_id} has nothing to find it by in {record.filed_to}; "
            "move it back to the inbox by hand"
        )
    inbox = ctx.settings.inbox(record.ref.inbox)
    with ctx.imap(inbox.name) as box:
        # this very mail (size, arrival time, Message-ID), not every mail sharing its id
        uids = box.find_copy(
            record.filed_to,
            size=record.size,
            internaldate=record.internaldate,
            message_id=record.message_id,
        )
        if not uids:
            raise MailError(f"mail {mail_id} is no longer in {record.filed_to}")
        box.select(record.filed_to)
        if box.move(uids[0], record.ref.folder).missed:
            raise MailError(f"mail {mail_id} is no longer in {record.filed_to}")
    was = record.reason or f"filed, parts refused: {record.refused_parts}"
    ctx.ledger.transition(
        mail_id,
        MailState.REPLAYED,
        allowed=(*SET_ASIDE, MailState.DONE),
        reason=f"sent back to {record.ref.folder} (was: {was})",
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
    # the step ran out of tries and its mail (or its reply) is recorded failed, with this
    # reason: the task ends in Celery's FAILURE state with it (Flower shows it so)
    failed: str = ""


def recover(
    ctx: Context, step: Step, error: BaseException, tries: int, *, retryable: bool = False
) -> Recovery:
    """The one policy both runners (Celery tasks, poll-once) follow when a step fails.

    ``tries`` counts the earlier tries of this step; ``retryable`` marks errors
    the runner itself knows to be transient (a Celery soft time limit).
    """
    after = decisions.after_error(
        step,
        error,
        tries,
        retryable=retryable
        or isinstance(error, RETRYABLE)
        or (isinstance(error, ReplyError) and error.retryable),
        policy=ctx.policy,
    )
    if after.action == After.RETRY:
        ctx.ledger.update(step.mail_id, retry_at=ctx.ledger.now() + int(after.delay * 1000))
        log.info(
            "%s %s: %s; retry %d in %.1fs", step.task, step.mail_id, error, tries + 1, after.delay
        )
        return Recovery(after.delay, [])
    if after.action == After.FAIL:
        return Recovery(None, give_up(ctx, step, error), failed=after.reason)
    if after.action == After.KEEP_DECIDED:
        log.error("mail %s: %s: %s", step.mail_id, after.reason, error)
        return Recovery(None, [])
    if after.action == After.REPLY_FAILED:
        reply_step.give_up(ctx, step.mail_id, after.reason)
        return Recovery(None, [], failed=after.reason)
    if after.action == After.UNEXPECTED:
        log.error("%s %s: unexpected error", step.task, step.mail_id, exc_info=error)
    if step.index is None:
        return Recovery(None, quarantine(ctx, step.mail_id, after.reason))
    reason, settled = _give_up_document(ctx, step.mail_id, step.index, error, after.reason)
    steps = quarantine(ctx, step.mail_id, reason)
    # not settled: its finish would send the same step at once, which would fail the same
    # way, without end; the sweep files the mail after FINISH_GRACE and tries again then
    return Recovery(None, steps if settled else [])


def _give_up_document(
    ctx: Context, mail_id: str, index: int, error: BaseException, reason: str
) -> tuple[str, bool]:
    """A describe or upload failed for good: settle its document when that is safe, so
    that the move of its quarantined mail does not wait for it. Returns the reason,
    naming the document, and whether the document is settled.

    - A describe whose POST may have reached Alloy (an attempt in doubt) is not settled:
      a description may be there, and only a later look can find and upload it.
    - Alloy refused something about the described token (the PUT, or the download that
      checks Alloy's bytes after a 409): the slot is refused, for every copy, with
      Alloy's answer, as when it refuses the bytes themselves.
    - Anything else is this copy's own trouble (its staged bytes, a bug): the document
      is ``lost`` to this mail only; another copy may still upload it."""
    record, doc = ctx.ledger.mail(mail_id), ctx.ledger.document(mail_id, index)
    if record is None or doc is None:
        return reason, True
    named = f"document {index} ({doc.name}.{doc.extension}): {reason}"
    slot = ctx.ledger.slot(record.entity, doc.fingerprint)
    if slot.uploaded or slot.refused or doc.state == DocumentState.LOST:
        return named, True
    if slot.attempt and not slot.token:
        return named, False
    if slot.token and isinstance(error, AlloyRejected):
        ctx.ledger.slot_refused(slot, reason)
    else:
        ctx.ledger.mark_lost(mail_id, index)
    return named, True


STEPS = {
    "ingest": ingest,
    "describe": describe,
    "upload": upload,
    "finish": finish,
    "reply": reply_step.reply,
}


def run_step(ctx: Context, step: Step) -> list[Step]:
    fn = STEPS[step.task]
    ref = MailRef.parse(step.mail_id)
    with logs.correlated(inbox=ref.inbox, mail_id=step.mail_id, uid=ref.uid, document=step.index):
        if step.index is None:
            steps: list[Step] = fn(ctx, step.mail_id)  # type: ignore[operator]
        else:
            steps = fn(ctx, step.mail_id, step.index)  # type: ignore[operator]
        return steps
