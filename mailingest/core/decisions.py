"""The decisions of the pipeline as pure functions: no Redis, no IMAP, no HTTP.

The steps in :mod:`mailingest.application.pipeline` read the ledger (and Alloy), call one of
these, and write what it decided. Each is tested on its own without servers
(``tests/test_decisions.py``) and explored under every interleaving by the
simulation (``tests/sim``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from mailingest.adapters import ledger as L
from mailingest.adapters.alloy import Document


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
    doc: L.DocumentRecord,
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


def unsettled(
    mail_id: str, docs: Sequence[L.DocumentRecord], slots: Sequence[L.Slot]
) -> list[Step]:
    """What must happen before a decided mail may leave the inbox: nothing of it may be
    left half-way at Alloy. A document with a token but no bytes gets its upload; one
    whose describe is in doubt is looked for (and adopted, or found absent). Documents
    never sent, uploaded, refused for good, or whose bytes this mail no longer has
    (``lost``) are settled. Empty: the mail may move."""
    steps: list[Step] = []
    for doc, slot in zip(docs, slots, strict=True):
        if slot.uploaded or slot.refused or doc.state == L.LOST:
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


def stale(record: L.MailRecord, now: int, *, stale_ms: int, max_attempts: int) -> Stale | None:
    """None while the mail made progress within ``stale_ms``; else queue it again, or fail
    it once it was queued again ``max_attempts`` times in a row without progress
    (progress since the last requeue starts the count afresh)."""
    if now - max(record.updated_at, record.retry_at, record.requeued_at) <= stale_ms:
        return None
    progressed = record.updated_at > record.requeued_at
    count = 0 if progressed else record.requeues
    if count >= max_attempts:
        return Stale(count, fail=True)
    return Stale(count + 1, fail=False)
