"""The reply step: tell the customer what became of a filed mail, exactly once.

Queued by ``finish`` once a decided mail is filed (its filing never waits for its
reply). What the reply is comes from the mail's record: its outcome (done, with parts
refused or not; quarantined, and why) and what ingest noted of its headers (why it
must not be answered, if it must not: ``reply_block``).

Exactly once, for every delivery and replay of the mail: its reply of each kind has
one record in the ledger, keyed by the mail's message key. A run takes the record
(``claimed``) before it connects; a failure before the message itself was sent gives
it back (a later try, or the sweep, takes it again); the record says ``sending``
while the message is on its way and ``sent`` once the server answered 250. A worker
that dies while ``sending`` leaves the reply *unconfirmed*: it is never sent again
(at most once), and its Message-ID, derived from the mail and the kind, finds it in
the server's log. See docs/reliability.md, "Replies".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from mailingest.adapters import smtp
from mailingest.adapters.reply_templates import FiledDocument, templates
from mailingest.application import metrics
from mailingest.application.services import Context
from mailingest.core import replies
from mailingest.core.decisions import Step
from mailingest.core.errors import Busy, ReplyError
from mailingest.core.records import MailRecord
from mailingest.core.states import MailState
from mailingest.core.states import ReplyState as R

log = logging.getLogger(__name__)


def stale_ms(ctx: Context) -> int:
    """How long after a run took a reply it must have said more before another run
    takes it over: a ``claimed`` record is then taken again, a ``sending`` one is
    unconfirmed. A run that comes back later finds its claim gone and sends nothing
    (the ledger's records are held by a token: adapters/ledger/replies.py), so this
    decides how soon a dead run's reply moves on, never whether it goes twice."""
    return (ctx.settings.task_time_limit + 30) * 1000


@dataclass(frozen=True)
class Due:
    """The reply a filed mail is due, and the ledger record every copy of it shares."""

    kind: str
    key: str  # the mail (its message key) and its sender
    message_id: str


def due(ctx: Context, record: MailRecord) -> Due | str:
    """The reply the mail gets, or why none."""
    settings = ctx.settings.inbox(record.ref.inbox).replies
    if settings is None:
        return "replies are off"
    block = record.reply_block
    if not record.message_key:  # ingested before replies existed: its headers unread
        block = "its headers were not checked (read before replies existed)"
    chosen = replies.plan(
        state=record.state,
        reason=record.reason,
        refused=record.refused_parts,
        block=block,
        enabled=settings.kinds,
    )
    if chosen.kind is None:
        return chosen.why
    # the mail and its sender: two senders' mails that share a Message-ID are two
    key = f"{record.message_key or record.message_id or record.id}\0{record.sender}"
    return Due(chosen.kind, key, replies.reply_message_id(key, chosen.kind, settings.domain))


def reply(ctx: Context, mail_id: str) -> list[Step]:
    record = ctx.ledger.mail(mail_id)
    if record is None or not record.filed_to:
        return []
    inbox = ctx.settings.inbox(record.ref.inbox)
    settings = inbox.replies
    found = due(ctx, record)
    if isinstance(found, str):
        _settle(ctx, record, "none", f"not sent: {found}", counted=R.SUPPRESSED)
        return []
    assert settings is not None
    kind, key = found.kind, found.key
    taken, token = ctx.ledger.claim_reply(key, kind, mail_id=mail_id, message_id=found.message_id)
    if not token:
        return _taken_already(ctx, record, found, taken)
    if taken == "" and not ctx.ledger.count_reply(  # a retry was counted by its first try
        kind, record.sender, limit=settings.limit, window=settings.window
    ):
        why = f"not sent: {settings.limit} {kind} replies to this address in {settings.window} s"
        ctx.ledger.settle_reply(key, kind, token, state=R.SUPPRESSED, reason=why)
        _settle(ctx, record, kind, why, counted=R.SUPPRESSED)
        return []

    def before_data() -> None:
        if not ctx.ledger.begin_sending(key, kind, token):
            raise Busy(f"reply {kind}: taken over by another run before it went")

    try:
        answer = smtp.send(
            settings,
            _message(ctx, record, kind, found.message_id),
            to=record.sender,
            before_data=before_data,
            tokens=ctx.reply_tokens(inbox.name),
        )
    except ReplyError as exc:
        if exc.in_doubt:
            ctx.ledger.settle_reply(key, kind, token, state=R.UNCONFIRMED, reason=str(exc))
            what = f"unconfirmed: {exc} (Message-ID {found.message_id})"
            _settle(ctx, record, kind, what, counted=R.UNCONFIRMED)
            return []
        if exc.retryable:
            ctx.ledger.settle_reply(key, kind, token, state=R.RETRY)  # not sent: try later
            raise
        ctx.ledger.settle_reply(key, kind, token, state=R.FAILED, reason=str(exc))
        _settle(ctx, record, kind, f"failed: {exc}", counted=R.FAILED)
        return []
    except BaseException:  # not sent (anything before the message went): try later
        ctx.ledger.settle_reply(key, kind, token, state=R.RETRY)
        raise
    ctx.ledger.settle_reply(key, kind, token, state=R.SENT, answer=answer[:200])
    _settle(ctx, record, kind, f"sent to {record.sender} as <{found.message_id}>", R.SENT)
    return []


def _taken_already(ctx: Context, record: MailRecord, found: Due, state: str) -> list[Step]:
    """Another run, or another delivery of the same mail, holds this reply."""
    kind, key = found.kind, found.key
    held = ctx.ledger.reply_record(key, kind)
    age = ctx.ledger.now() - int(held.get("at") or 0)
    stale = stale_ms(ctx)
    if state == R.CLAIMED and age > stale:
        # its run died (or hangs) before it sent: given back, taken again by a retry
        ctx.ledger.take_over(key, kind, read=held, state=R.RETRY)
        raise Busy(f"reply {kind}: held by a run that died before it sent; taking it again")
    if state == R.SENDING and age > stale:
        why = "its sender died while it was on its way"
        ctx.ledger.take_over(key, kind, read=held, state=R.UNCONFIRMED, reason=why)
        state = R.UNCONFIRMED
    elif state in (R.CLAIMED, R.SENDING):
        raise Busy(f"reply {kind}: another run is sending it", retry_after=(stale - age) / 1000)
    if held.get("mail") == record.id:
        _settle(ctx, record, kind, state, counted=None)
    else:
        _settle(ctx, record, kind, f"not sent again: {state} for {held.get('mail')}", None)
    return []


def _settle(ctx: Context, record: MailRecord, kind: str, what: str, counted: str | None) -> None:
    """Record what became of the mail's reply; count it (None: counted by the run or
    the delivery that sent it)."""
    ctx.ledger.update(record.id, reply=f"{kind}: {what}"[:500])
    ctx.ledger.reply_settled(record.id)
    if counted is not None:
        why = replies.why_kind(what) if counted == R.SUPPRESSED else ""
        ctx.ledger.count_reply_outcome(kind, counted, why)
        metrics.reply_outcome(record.ref.inbox, kind, counted, why)
    log.info("mail %s: reply %s: %s", record.id, kind, what)


def give_up(ctx: Context, mail_id: str, reason: str) -> None:
    """Retries of a reply ran out. One another run holds (claimed, on its way) stays
    due: the sweep comes back to it once that run has said more or is stale. One this
    mail's own tries could not send is failed. One that went (a record lost after
    the send) is recorded sent. The mail itself stays as it is."""
    record = ctx.ledger.mail(mail_id)
    if record is None:
        return
    found = due(ctx, record)
    if isinstance(found, str):
        _settle(ctx, record, "none", f"not sent: {found}", counted=R.SUPPRESSED)
        return
    held = ctx.ledger.reply_record(found.key, found.kind)
    state = held.get("state", "")
    if state in (R.CLAIMED, R.SENDING):
        log.warning("mail %s: reply %s: %s; still due (%s)", mail_id, found.kind, reason, state)
        return
    if state in (R.SENT, R.UNCONFIRMED, R.FAILED, R.SUPPRESSED):
        _settle(ctx, record, found.kind, str(state), counted=None)
        return
    # given back by this mail's own tries (retry), or never taken: failed
    if not held or ctx.ledger.take_over(
        found.key, found.kind, read=held, state=R.FAILED, reason=reason
    ):
        _settle(ctx, record, found.kind, f"failed: {reason}", counted=R.FAILED)


def _message(ctx: Context, record: MailRecord, kind: str, message_id: str) -> EmailMessage:
    inbox = ctx.settings.inbox(record.ref.inbox)
    settings = inbox.replies
    assert settings is not None
    documents = (
        [
            FiledDocument(f"{d.name}.{d.extension}", d.type)
            for d in ctx.ledger.documents(record.id, record.documents)
        ]
        if record.state == MailState.DONE
        else []
    )
    refused_text = record.refused_parts if record.state == MailState.DONE else record.reason
    rendered = templates(settings.language, settings.templates).render(
        kind,
        subject=record.subject,
        sender=record.sender,
        team=settings.from_name,
        documents=documents,
        refused=replies.refused_parts(refused_text),
    )
    return replies.compose(
        to=record.sender,
        from_address=settings.from_address,
        from_name=settings.from_name,
        subject=record.subject,
        message_id=message_id,
        original=record.message_id,
        references=record.references,
        language=settings.language,
        text=rendered.text,
        html=rendered.html,
        date=formatdate(ctx.ledger.now() / 1000, localtime=False),
    )
