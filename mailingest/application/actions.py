"""What an operator does to mails, for the command line and the console alike: replay a
mail, map an unknown sender to an entity and replay that sender's mails, mark a
quarantined mail handled by hand, poll an inbox now.

Each takes ``run``, what to do with the steps a replay returns: the command line runs
them in its own process (poll_once.run_steps), the console hands them to the workers
(the broker). Each answers with an :class:`Outcome` per mail, and is safe to repeat: a
second replay of a mail finds it moved on and does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis

from mailingest.adapters.senders import RedisDirectory, check_entity, is_email, normalise_email
from mailingest.application import pipeline
from mailingest.application.services import Context
from mailingest.core.decisions import Step
from mailingest.core.errors import MailingestError
from mailingest.core.records import MailRecord
from mailingest.core.states import MailState

log = logging.getLogger(__name__)

Run = Callable[[list[Step]], None]
# the kinds of quarantine a sender's mapping puts right
UNKNOWN_SENDER = "unknown_sender"


@dataclass(frozen=True)
class Outcome:
    mail_id: str
    ok: bool
    text: str  # what became of it, for the operator ("queued again", "not in the ledger")


def replay(ctx: Context, mail_id: str, run: Run) -> Outcome:
    """Send one mail through again (pipeline.replay) and run or queue its next steps."""
    before = ctx.ledger.mail(mail_id)
    if before is not None and before.state == MailState.REPLAYED:
        return Outcome(mail_id, True, "replayed already: nothing to do")
    try:
        steps = pipeline.replay(ctx, mail_id)
    except KeyError:
        return Outcome(mail_id, False, "not in the ledger")
    except MailingestError as exc:
        return Outcome(mail_id, False, str(exc))
    if steps:
        run(steps)
    record = ctx.ledger.mail(mail_id)
    state = record.state if record else "?"
    if state == MailState.REPLAYED:
        return Outcome(mail_id, True, f"moved back to {record.ref.folder if record else '?'}")
    if steps:
        return Outcome(mail_id, True, f"{state}: sent through again")
    return Outcome(mail_id, True, f"{state}: nothing to do")


def sender_mails(ctx: Context, email: str) -> list[str]:
    """The mails of ``email`` set aside because their sender was unknown, newest first
    (found by the ledger's search keys: as many reads as the sender has mails)."""
    wanted = normalise_email(email)
    return [
        r.id
        for r in ctx.ledger.find(wanted, limit=1000)
        if normalise_email(r.sender) == wanted and not unmappable(r)
    ]


def unmappable(record: MailRecord) -> str:
    """Why this mail's sender cannot be mapped from it ("" when it can): only a mail set
    aside (quarantined, or handled since) because its sender was unknown."""
    if record.kind != UNKNOWN_SENDER or record.state not in pipeline.SET_ASIDE:
        return "only the sender of a mail quarantined as unknown can be mapped here"
    if not is_email(normalise_email(record.sender)):
        return "the mail has no sender address to map"
    return ""


def map_problem(record: MailRecord, entity: str) -> str:
    """Why the console may not map this mail's sender to ``entity`` ("" when it may):
    :func:`unmappable`, or an entity that is not well-formed."""
    problem = unmappable(record)
    if problem:
        return problem
    try:
        check_entity(entity)
    except ValueError as exc:
        return str(exc)
    return ""


def mapped_to(client: redis.Redis, email: str) -> str:
    """What the sender directory in Redis maps ``email`` to now ("" nothing)."""
    return RedisDirectory(client).resolve(normalise_email(email)) or ""


def map_sender_of(
    ctx: Context,
    mail_id: str,
    entity: str,
    run: Run,
    audited: Callable[[Outcome], Outcome] = lambda o: o,
) -> list[Outcome]:
    """The console's "map sender and replay": checked against the mail first
    (:func:`map_problem`); each outcome handed to ``audited`` as soon as it is known."""
    record = ctx.ledger.mail(mail_id)
    if record is None:
        return [audited(Outcome(mail_id, False, "not in the ledger"))]
    problem = map_problem(record, entity)
    if problem:
        return [audited(Outcome(mail_id, False, problem))]
    email, entity = normalise_email(record.sender), check_entity(entity)
    RedisDirectory(ctx.redis).add(email, entity)
    log.info("sender %s mapped to entity %s", email, entity)
    audited(Outcome("", True, f"{email} mapped to {entity}"))
    return [audited(replay(ctx, found, run)) for found in sender_mails(ctx, email)]


def map_sender(ctx: Context, email: str, entity: str, run: Run) -> list[Outcome]:
    """Add ``email`` -> ``entity`` to the sender directory in Redis, then replay every
    mail of that sender quarantined as unknown. ValueError: not an address or entity."""
    email = normalise_email(email)
    if not is_email(email):
        raise ValueError(f"not an e-mail address: {email!r}")
    entity = check_entity(entity)
    RedisDirectory(ctx.redis).add(email, entity)
    log.info("sender %s mapped to entity %s", email, entity)
    return [replay(ctx, mail_id, run) for mail_id in sender_mails(ctx, email)]


def mark_handled(ctx: Context, mail_id: str) -> Outcome:
    """A quarantined mail an operator dealt with by hand: it leaves the attention list
    and stays in the quarantine folder (replay still sends it through again)."""
    record = ctx.ledger.mail(mail_id)
    if record is None:
        return Outcome(mail_id, False, "not in the ledger")
    if record.state == MailState.HANDLED:
        return Outcome(mail_id, True, "handled already")
    if record.state != MailState.QUARANTINED:
        return Outcome(mail_id, False, f"it is {record.state}, not quarantined")
    if record.filed_to in ("", "-"):
        return Outcome(mail_id, False, "not moved to its folder yet; try again in a minute")
    moved = ctx.ledger.transition(mail_id, MailState.HANDLED, allowed=(MailState.QUARANTINED,))
    if moved is None:  # it moved on meanwhile (a replay, a second click)
        now = ctx.ledger.mail(mail_id)
        return Outcome(mail_id, now is not None and now.state == MailState.HANDLED, "changed")
    return Outcome(mail_id, True, f"handled; stays in {record.filed_to}")


def poll_now(ctx: Context, inbox: str) -> Outcome:
    """Ask the workers to poll ``inbox`` now (a task on the broker, as beat sends)."""
    ctx.settings.inbox(inbox)  # ConfigError for an unknown inbox
    ctx.services.broker.send_task("mailingest.poll_inbox", args=[inbox])
    return Outcome("", True, f"poll of inbox {inbox} queued")


def to_workers(ctx: Context) -> Run:
    """Queue each step as its Celery task (the console: the workers run them)."""

    def run(steps: list[Step]) -> None:
        for step in steps:
            ctx.services.broker.send_task(TASK_NAMES[step.task], args=list(step.args))

    return run


# a step's Celery task (mailingest.application.tasks.TASKS, by name: no worker imported)
TASK_NAMES = {
    "ingest": "mailingest.ingest_message",
    "describe": "mailingest.describe_document",
    "upload": "mailingest.upload_document",
    "finish": "mailingest.finish_message",
    "reply": "mailingest.reply_to_sender",
}
