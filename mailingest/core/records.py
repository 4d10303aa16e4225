"""The records decisions are made on: the ledger's mail, document and slot records and
Alloy's document object, as plain data (no Redis, no HTTP).

They live in core so that :mod:`mailingest.core.decisions` can decide on them without
importing an adapter; :mod:`mailingest.adapters.ledger` and
:mod:`mailingest.adapters.alloy` read and write them, and re-export them under their
old names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from mailingest.core.errors import AlloyRejected


@dataclass(frozen=True)
class MailRef:
    """Where a mail lives: (inbox, folder, UIDVALIDITY, UID)."""

    inbox: str
    folder: str
    uidvalidity: int
    uid: int

    @property
    def id(self) -> str:
        return f"{self.inbox}/{quote(self.folder, safe='')}/{self.uidvalidity}/{self.uid}"

    @classmethod
    def parse(cls, mail_id: str) -> MailRef:
        inbox, folder, validity, uid = mail_id.split("/")
        return cls(inbox, unquote(folder), int(validity), int(uid))


@dataclass(frozen=True)
class MailRecord:
    ref: MailRef
    state: str
    size: int
    message_id: str
    sender: str
    entity: str
    subject: str
    reason: str
    documents: int
    skipped: int
    filed_to: str
    created_at: int
    updated_at: int
    retry_at: int
    auto_replays: int
    requeued_at: int
    requeues: int
    internaldate: str  # the server's arrival time, as it gave it: identifies our copy
    copied_uid: str  # "<uidvalidity>:<uid>" of our COPY in the destination (no MOVE)
    moving_to: str  # the folder a MOVE/COPY was sent to, recorded before it
    # parts screening refused while the mail's other documents were filed (one reason
    # each, "; "-joined; on_refused_part = "skip")
    refused_parts: str = ""
    # how the entity was found: the resolver's source ("directory", "crm", ...), and
    # "forwarded by <agent>" when it is the forwarded mail's own sender's
    entity_source: str = ""
    # what the inbox's rules decided (mailingest.core.rules): the rules applied, ", "
    # joined, the actions after filing, "," joined, and the note and agent the
    # documents are described with ("" for each: the inbox's own)
    rules: str = ""
    actions: str = ""
    note: str = ""
    agent_email: str = ""
    # for its reply (mailingest.core.replies): the key every delivery of it shares, why
    # it must not be answered ("" when it may be), its References, and what became of
    # its reply ("received: sent to ...")
    message_key: str = ""
    reply_block: str = ""
    references: str = ""
    reply: str = ""
    # the reason's kind (mailingest.core.reasons), set with the reason: the console's filter
    kind: str = ""
    # what the mail carried, as screening saw it (Screened.parts: JSON, no bytes)
    parts: str = ""

    @property
    def id(self) -> str:
        return self.ref.id

    @classmethod
    def from_hash(cls, mail_id: str, h: dict[str, str]) -> MailRecord:
        return cls(
            ref=MailRef.parse(mail_id),
            state=h.get("state", ""),
            size=int(h.get("size") or 0),
            message_id=h.get("message_id", ""),
            sender=h.get("sender", ""),
            entity=h.get("entity", ""),
            subject=h.get("subject", ""),
            reason=h.get("reason", ""),
            documents=int(h.get("documents") or 0),
            skipped=int(h.get("skipped") or 0),
            filed_to=h.get("filed_to", ""),
            created_at=int(h.get("created_at") or 0),
            updated_at=int(h.get("updated_at") or 0),
            retry_at=int(h.get("retry_at") or 0),
            auto_replays=int(h.get("auto_replays") or 0),
            requeued_at=int(h.get("requeued_at") or 0),
            requeues=int(h.get("requeues") or 0),
            internaldate=h.get("internaldate", ""),
            copied_uid=h.get("copied_uid", ""),
            moving_to=h.get("moving_to", ""),
            refused_parts=h.get("refused_parts", ""),
            entity_source=h.get("entity_source", ""),
            rules=h.get("rules", ""),
            actions=h.get("actions", ""),
            note=h.get("note", ""),
            agent_email=h.get("agent_email", ""),
            message_key=h.get("message_key", ""),
            reply_block=h.get("reply_block", ""),
            references=h.get("references", ""),
            reply=h.get("reply", ""),
            kind=h.get("kind", ""),
            parts=h.get("parts", ""),
        )


@dataclass(frozen=True)
class DocumentRecord:
    """One document of one mail; what Alloy holds for it is in its :class:`Slot`."""

    mail_id: str
    index: int
    state: str
    name: str
    extension: str
    type: str
    content_type: str
    size: int
    sha256: str
    token: str
    fingerprint: str

    @classmethod
    def from_hash(cls, mail_id: str, index: int, h: dict[str, str]) -> DocumentRecord:
        return cls(
            mail_id=mail_id,
            index=index,
            state=h.get("state", ""),
            name=h.get("name", ""),
            extension=h.get("extension", ""),
            type=h.get("type", ""),
            content_type=h.get("content_type", ""),
            size=int(h.get("size") or 0),
            sha256=h.get("sha256", ""),
            token=h.get("token", ""),
            fingerprint=h.get("fingerprint", ""),
        )


@dataclass(frozen=True)
class Slot:
    """The one Alloy document for a document, shared by every copy of its mail (delivered
    twice, a new UIDVALIDITY epoch, a replay): keyed by entity and fingerprint.

    ``attempt`` is the POST whose outcome is in doubt (sent, no answer recorded), begun
    at ``attempt_at``; ``token`` the Alloy document, ``uploaded`` once Alloy holds the
    bytes, ``refused`` when Alloy refused them for good."""

    entity: str
    fingerprint: str
    token: str
    attempt: str
    attempt_at: int
    uploaded: bool
    refused: str

    @classmethod
    def from_hash(cls, entity: str, fp: str, h: dict[str, str]) -> Slot:
        return cls(
            entity=entity,
            fingerprint=fp,
            token=h.get("token", ""),
            attempt=h.get("attempt", ""),
            attempt_at=int(h.get("attempt_at") or 0),
            uploaded=h.get("uploaded") == "1",
            refused=h.get("refused", ""),
        )


@dataclass(frozen=True)
class Document:
    """Alloy's document object, as far as ingestion needs it."""

    token: str
    name: str
    extension: str
    type: str
    uploaded: bool
    timestamp: int | None
    notes: tuple[dict[str, Any], ...]

    @classmethod
    def from_json(cls, body: Any) -> Document:
        if not isinstance(body, dict) or not isinstance(body.get("document_token"), str):
            raise AlloyRejected("answer is not a document object", operation="parse")
        return cls(
            token=body["document_token"],
            name=str(body.get("name", "")),
            extension=str(body.get("extension", "")),
            type=str(body.get("type", "")),
            uploaded=bool(body.get("uploaded")),
            timestamp=_epoch_ms(body.get("timestamp")),
            notes=tuple(n for n in body.get("notes") or () if isinstance(n, dict)),
        )


def _epoch_ms(value: Any) -> int | None:
    """Alloy's timestamps are milliseconds since the epoch; one given in seconds (below
    10^11, i.e. before 1973 in ms) is scaled, and anything else is "unknown" (None).
    Nothing in ingestion depends on them: adoption goes by claims, not by time."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value * 1000) if value < 10**11 else int(value)
