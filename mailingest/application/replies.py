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
from email.message import EmailMessage
from email.utils import formatdate

from mailingest.adapters import smtp
from mailingest.adapters.reply_templates import FiledDocument, Templates
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
    """How long after a run took a reply it must have said more: no step outlives the
    task time limit (Celery kills it), so a run silent for longer died. Its ``claimed``
    record is then taken again, its ``sending`` one is unconfirmed."""
    return (ctx.settings.task_time_limit + 30) * 1000


def reply(ctx: Context, mail_id: str) -> list[Step]:
    record = ctx.ledger.mail(mail_id)
    if record is None or not record.filed_to:
        return []
    inbox = ctx.settings.inbox(record.ref.inbox)
    settings = inbox.replies
    if settings is None:
        ctx.ledger.reply_settled(mail_id)
        return []
    chosen = replies.plan(
        state=record.state,
        reason=record.reason,
        refused=record.refused_parts,
        block=record.reply_block,
        enabled=settings.kinds,
    )
    if chosen.kind is None:
        _settle(ctx, record, "none", f"not sent: {chosen.why}", counted=R.SUPPRESSED)
        return []
    kind = chosen.kind
    key = record.message_key or record.message_id or mail_id
    message_id = replies.reply_message_id(key, kind, settings.domain)
    taken = ctx.ledger.claim_reply(key, kind, mail_id=mail_id, message_id=message_id)
    if taken not in ("", R.RETRY):
        return _taken_already(ctx, record, kind, key, taken)
    if taken == "" and not ctx.ledger.count_reply(  # a retry was counted by its first try
        kind, record.sender, limit=settings.limit, window=settings.window
    ):
        why = f"not sent: {settings.limit} {kind} replies to this address in {settings.window} s"
        ctx.ledger.set_reply(key, kind, state=R.SUPPRESSED, reason=why)
        _settle(ctx, record, kind, why, counted=R.SUPPRESSED)
        return []
    try:
        message = _message(ctx, record, kind, message_id)
    except Exception:
        ctx.ledger.set_reply(key, kind, state=R.RETRY)
        raise
    ctx.ledger.set_reply(key, kind, state=R.SENDING)
    try:
        answer = smtp.send(settings, message, to=record.sender, tokens=ctx.reply_tokens(inbox.name))
    except ReplyError as exc:
        if exc.in_doubt:
            ctx.ledger.set_reply(key, kind, state=R.UNCONFIRMED, reason=str(exc))
            _settle(
                ctx, record, kind, f"unconfirmed: {exc} (Message-ID {message_id})", R.UNCONFIRMED
            )
            return []
        if exc.retryable:
            ctx.ledger.set_reply(key, kind, state=R.RETRY)  # not sent: a later try takes it
            raise
        ctx.ledger.set_reply(key, kind, state=R.FAILED, reason=str(exc))
        _settle(ctx, record, kind, f"failed: {exc}", counted=R.FAILED)
        return []
    ctx.ledger.set_reply(key, kind, state=R.SENT, answer=answer[:200])
    _settle(ctx, record, kind, f"sent to {record.sender} as <{message_id}>", counted=R.SENT)
    return []


def _taken_already(ctx: Context, record: MailRecord, kind: str, key: str, state: str) -> list[Step]:
    """Another run, or another delivery of the same mail, took this reply."""
    held = ctx.ledger.reply_record(key, kind)
    age = ctx.ledger.now() - int(held.get("at") or 0)
    stale = stale_ms(ctx)
    if state == R.CLAIMED and age > stale:
        ctx.ledger.set_reply(key, kind, state=R.RETRY)  # its run died before it sent
        raise Busy(f"reply {kind}: taken by a run that died before it sent; taking it again")
    if state == R.SENDING and age > stale:
        ctx.ledger.set_reply(key, kind, state=R.UNCONFIRMED, reason="its sender died sending")
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
    """Retries of a reply ran out: it is recorded failed (its mail stays as it is; a
    replay of the mail may try it again)."""
    record = ctx.ledger.mail(mail_id)
    if record is None:
        return
    _settle(ctx, record, "reply", f"failed: {reason}", counted=R.FAILED)


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
    rendered = Templates(settings.language, settings.templates).render(
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
