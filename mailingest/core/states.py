"""The states of a mail and of a document, and the one table of legal moves between them.

This module is the only place that spells a state's name: the ledger's Lua scripts get
them as arguments, and every set of states (in flight, decided) is built here, so a new
state or a new move is one edit, checked by ``tests/test_states.py``. The diagram is in
``docs/states.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum


class MailState(StrEnum):
    """Where a mail is; a mail id lives in exactly one ``mailingest:state:<state>`` set."""

    QUEUED = "queued"  # fetched and staged; its ingest is queued
    PARSING = "parsing"  # being parsed, its sender resolved
    DOCUMENTS_PENDING = "documents_pending"  # documents planned, going to Alloy
    DONE = "done"  # every document confirmed by Alloy: filed to Processed
    QUARANTINED = "quarantined"  # cannot be handled (``reason``): filed to Quarantine
    FAILED = "failed"  # retries exhausted: stays in the inbox, retried later
    REPLAYED = "replayed"  # a filed quarantined or partly filed mail sent back (a new mail)
    IGNORED = "ignored"  # no rule of its inbox takes it (``reason``): left there untouched
    HANDLED = "handled"  # quarantined and filed, then dealt with by hand (the console)


class DocumentState(StrEnum):
    """Where one document of one mail is (what Alloy holds is in its slot)."""

    PLANNED = "planned"  # bytes staged, not described yet
    DESCRIBED = "described"  # has a ``document_token``, no bytes at Alloy yet
    UPLOADED = "uploaded"  # Alloy answered ``uploaded: true``
    LOST = "lost"  # a quarantined mail's document whose bytes are gone: nothing to send


class ReplyState(StrEnum):
    """Where the reply of one kind to one mail is (its record in the ledger, shared by
    every delivery and replay of the mail): see mailingest.application.replies."""

    CLAIMED = "claimed"  # a run took it and has not sent it yet
    RETRY = "retry"  # a try that was not sent gave it back: the next run takes it
    SENDING = "sending"  # the message is on its way: a run that dies leaves it unconfirmed
    SENT = "sent"  # the server answered 250
    UNCONFIRMED = "unconfirmed"  # may have gone, never confirmed: never sent again
    FAILED = "failed"  # will not go (a 5xx, retries exhausted)
    SUPPRESSED = "suppressed"  # not sent: the rate limit, a robot, a forged sender


MAIL_STATES: tuple[MailState, ...] = tuple(MailState)

# recorded, not decided yet: the backlog; the sweep queues them again when stuck
IN_FLIGHT: tuple[MailState, ...] = (
    MailState.QUEUED,
    MailState.PARSING,
    MailState.DOCUMENTS_PENDING,
)
# decided: the mail leaves the inbox (``finish``) to Processed or Quarantine
DECIDED: tuple[MailState, ...] = (MailState.DONE, MailState.QUARANTINED)
# what an operator must look at: the console's attention list
ATTENTION: tuple[MailState, ...] = (MailState.QUARANTINED, MailState.FAILED)
# a move here is counted once by the metrics (the ledger tells ``on_decided``)
COUNTED: tuple[MailState, ...] = (*DECIDED, MailState.FAILED, MailState.IGNORED)

# Which state may go to which. A move to the same state rewrites the record's fields
# (a retried ingest clears its reason; a failed mail gets a newer reason); a mail enters
# the ledger ``queued`` (Ledger.record_new), never through a transition.
TRANSITIONS: Mapping[MailState, frozenset[MailState]] = {
    # ignored straight away: too large to fetch, and no rule takes it by its header
    MailState.QUEUED: frozenset(
        {MailState.PARSING, MailState.QUARANTINED, MailState.FAILED, MailState.IGNORED}
    ),
    MailState.PARSING: frozenset(
        {
            MailState.PARSING,
            MailState.DOCUMENTS_PENDING,
            MailState.QUARANTINED,
            MailState.FAILED,
            MailState.IGNORED,
        }
    ),
    MailState.DOCUMENTS_PENDING: frozenset(
        {MailState.DONE, MailState.QUARANTINED, MailState.FAILED}
    ),
    # a mail filed with parts refused (on_refused_part = "skip"), sent back to the inbox
    MailState.DONE: frozenset({MailState.REPLAYED}),
    # not yet filed: run again in place (queued); filed: sent back to the inbox
    # (replayed); filed and dealt with by hand (handled)
    MailState.QUARANTINED: frozenset({MailState.QUEUED, MailState.REPLAYED, MailState.HANDLED}),
    # replayed (queued, or documents_pending when it has documents), quarantined by a
    # late refusal, or failed again with a newer reason
    MailState.FAILED: frozenset(
        {
            MailState.QUEUED,
            MailState.DOCUMENTS_PENDING,
            MailState.QUARANTINED,
            MailState.FAILED,
        }
    ),
    MailState.REPLAYED: frozenset(),
    # the rules changed since: run again in place (it never left the inbox)
    MailState.IGNORED: frozenset({MailState.QUEUED}),
    # an operator replays it after all: as a filed quarantined mail (a copy filed by a
    # rule's action is run again in place)
    MailState.HANDLED: frozenset({MailState.QUEUED, MailState.REPLAYED}),
}
INITIAL = MailState.QUEUED


class IllegalTransition(ValueError):
    """A move the table does not allow was asked for: a bug in the caller, never a race
    (a mail that moved on meanwhile is a refused compare-and-set, not this)."""

    def __init__(self, source: str, target: str) -> None:
        super().__init__(f"a mail may not go from {source} to {target}")
        self.source = source
        self.target = target


def allowed(source: str, target: str) -> bool:
    """True when the table lets a mail in ``source`` go to ``target``."""
    return source in MAIL_STATES and target in TRANSITIONS[MailState(source)]


def sources(target: str) -> tuple[MailState, ...]:
    """Every state from which a mail may go to ``target``, in table order."""
    return tuple(s for s in MAIL_STATES if allowed(s, target))


def check(target: str, froms: Iterable[str]) -> tuple[MailState, ...]:
    """The from-states of a transition to ``target``, checked against the table: all of
    :func:`sources` when ``froms`` is empty; else each must be allowed, or
    :class:`IllegalTransition` is raised."""
    if target not in MAIL_STATES:
        raise IllegalTransition("?", target)
    for source in froms:
        if not allowed(source, target):
            raise IllegalTransition(source, target)
    return tuple(MailState(s) for s in froms) or sources(target)
