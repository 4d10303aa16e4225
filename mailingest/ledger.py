"""The ledger: what happened to every mail and every document, kept in Redis.

Mail states (a mail id lives in exactly one ``mailingest:state:<state>`` set)::

    queued ──> parsing ──> documents_pending ──> done ─────────> (moved to Processed)
       │          │               │
       │          └──────> quarantined <──┘  ───────────────────> (moved to Quarantine)
       └──────────────────────────┴────> failed   (retries exhausted; `mailingest replay`)

    quarantined ──(mailingest replay)──> replayed   (moved back to the inbox: a new mail)

Document states: ``planned`` -> ``described`` (has a ``document_token``) ->
``uploaded`` (Alloy answered ``uploaded: true``).

Every transition is a compare-and-set in one Lua script, so a step that runs
twice (late acks, a redelivered task) finds the mail already moved on and
does nothing. Mail and document bytes are staged here under a TTL and passed
between tasks by key; they never travel through the broker.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import redis
import redis.lock

from . import keys
from .sealing import Plain, Sealer

QUEUED = "queued"
PARSING = "parsing"
DOCUMENTS_PENDING = "documents_pending"
DONE = "done"
QUARANTINED = "quarantined"
FAILED = "failed"
REPLAYED = "replayed"
MAIL_STATES = (QUEUED, PARSING, DOCUMENTS_PENDING, DONE, QUARANTINED, FAILED, REPLAYED)
DECIDED = (DONE, QUARANTINED)

PLANNED = "planned"
DESCRIBED = "described"
UPLOADED = "uploaded"
DOCUMENT_STATES = (PLANNED, DESCRIBED, UPLOADED)

# KEYS[1] mail hash, KEYS[2] the unfiled set; ARGV[1] new state, ARGV[2] state-set prefix,
# ARGV[3] mail id, ARGV[4] number of allowed from-states, then those states, then
# field/value pairs. A decided mail not yet filed joins the unfiled set.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
local n = tonumber(ARGV[4])
local allowed = (n == 0)
for i = 1, n do
  if ARGV[4 + i] == current then allowed = true end
end
if not allowed then return 0 end
local i = 5 + n
while i <= #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
local filed = redis.call('HGET', KEYS[1], 'filed_to')
if (ARGV[1] == 'done' or ARGV[1] == 'quarantined') and not (filed and filed ~= '') then
  redis.call('SADD', KEYS[2], ARGV[3])
else
  redis.call('SREM', KEYS[2], ARGV[3])
end
if current ~= ARGV[1] then
  redis.call('SREM', ARGV[2] .. current, ARGV[3])
  redis.call('SADD', ARGV[2] .. ARGV[1], ARGV[3])
end
return 1
"""


# KEYS: mail hash, raw key, queued set; ARGV: raw, ttl, size, now, mail id
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'queued', 'size', ARGV[3],
           'created_at', ARGV[4], 'updated_at', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
return 1
"""

# KEYS: document hash, token claim; ARGV: token, now. The document's first token wins, and
# a token belongs to one document only: '' when another document already claimed it.
_DESCRIBED = """
local current = redis.call('HGET', KEYS[1], 'token')
if current and current ~= '' then return current end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= KEYS[1] then return '' end
redis.call('SET', KEYS[2], KEYS[1])
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'state', 'described', 'described_at', ARGV[2])
return ARGV[1]
"""


def now_ms() -> int:
    return int(time.time() * 1000)


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
        )


@dataclass(frozen=True)
class DocumentRecord:
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
    describe_started_at: int
    describe_attempts: int

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
            describe_started_at=int(h.get("describe_started_at") or 0),
            describe_attempts=int(h.get("describe_attempts") or 0),
        )


@dataclass(frozen=True)
class PlannedDocument:
    """What ingestion hands the ledger for one document."""

    index: int
    name: str
    extension: str
    type: str
    content_type: str
    payload: bytes


def fingerprint(message_key: str, doc: PlannedDocument) -> str:
    """Same mail (Message-ID), same bytes, same name: the same Alloy document."""
    digest = hashlib.sha256()
    for part in (message_key, hashlib.sha256(doc.payload).hexdigest(), doc.name, doc.extension):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:40]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _decode(h: Any) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in h.items()}


class Ledger:
    def __init__(
        self,
        client: redis.Redis,
        *,
        staging_ttl: int = 7 * 86400,
        sealer: Sealer | Plain | None = None,
        on_recorded: Callable[[MailRef], None] | None = None,
        on_decided: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.redis = client
        self.staging_ttl = staging_ttl
        self.sealer = sealer or Plain()  # staged bytes encrypted at rest when a key is set
        # told once per mail recorded, and once per move to a final state (the metrics)
        self.on_recorded = on_recorded
        self.on_decided = on_decided
        self._transition = client.register_script(_TRANSITION)
        self._record = client.register_script(_RECORD)
        self._described = client.register_script(_DESCRIBED)

    # -- polling -------------------------------------------------------------
    def poll_lock(self, inbox: str, *, timeout: float) -> redis.lock.Lock:
        """Single flight for one inbox's poll; expires by itself if its holder dies."""
        return self.redis.lock(keys.poll_lock(inbox), timeout=timeout)

    def ask_repoll(self, inbox: str, *, ttl: float) -> None:
        """A poll was asked for while another ran: the running one polls once more."""
        self.redis.set(keys.repoll(inbox), 1, px=int(ttl * 1000))

    def take_repoll(self, inbox: str) -> bool:
        return bool(self.redis.delete(keys.repoll(inbox)))

    def watermark(self, inbox: str, folder: str, uidvalidity: int) -> int:
        value = self.redis.get(keys.watermark(inbox, folder, uidvalidity))
        return int(value) if value else 0

    def record_new(self, ref: MailRef, raw: bytes) -> bool:
        """Stage a newly fetched mail and record it ``queued``, atomically, before
        anything is queued. Returns False when it was already recorded (nothing changes)."""
        recorded = bool(
            self._record(
                keys=[keys.mail(ref.id), keys.raw(ref.id), keys.state(QUEUED)],
                args=[self.sealer.seal(raw), self.staging_ttl, len(raw), now_ms(), ref.id],
            )
        )
        if recorded and self.on_recorded is not None:
            self.on_recorded(ref)
        return recorded

    def restage(self, mail_id: str, raw: bytes) -> None:
        self.redis.set(keys.raw(mail_id), self.sealer.seal(raw), ex=self.staging_ttl)

    def step_lock(self, name: str, *, timeout: float) -> redis.lock.Lock:
        """Single flight of one step of one mail (``ingest:<id>``, ``describe:<id>:<n>``)."""
        return self.redis.lock(keys.step_lock(name), timeout=timeout)

    def record_poll(self, inbox: str, *, found: int, error: str = "") -> None:
        fields: dict[Any, Any] = {"at": now_ms(), "found": found, "error": error}
        if not error:
            fields["ok_at"] = fields["at"]
        self.redis.hset(keys.poll_status(inbox), mapping=fields)

    def poll_status(self, inbox: str) -> dict[str, str]:
        return _decode(self.redis.hgetall(keys.poll_status(inbox)))

    def advance_watermark(self, inbox: str, folder: str, uidvalidity: int, uid: int) -> None:
        key = keys.watermark(inbox, folder, uidvalidity)
        current = self.redis.get(key)
        if current is None or int(current) < uid:
            self.redis.set(key, uid)

    def raw(self, mail_id: str) -> bytes | None:
        value = self.redis.get(keys.raw(mail_id))
        return self.sealer.open(value) if isinstance(value, bytes) else None

    def drop_raw(self, mail_id: str) -> None:
        self.redis.delete(keys.raw(mail_id))

    # -- mail state ----------------------------------------------------------
    def mail(self, mail_id: str) -> MailRecord | None:
        h = self.redis.hgetall(keys.mail(mail_id))
        return MailRecord.from_hash(mail_id, _decode(h)) if h else None

    def in_flight(self, inbox: str) -> int:
        """How many of the inbox's mails are recorded but not decided yet (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for state in (QUEUED, PARSING, DOCUMENTS_PENDING):
            pipe.smembers(keys.state(state))
        mine = (inbox + "/").encode()
        return sum(1 for members in pipe.execute() for m in members if m.startswith(mine))

    def records(self, mail_ids: Sequence[str]) -> list[MailRecord]:
        """The records of these mails that exist, read in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for mail_id in mail_ids:
            pipe.hgetall(keys.mail(mail_id))
        return [
            MailRecord.from_hash(mail_id, _decode(h))
            for mail_id, h in zip(mail_ids, pipe.execute(), strict=True)
            if h
        ]

    def transition(
        self, mail_id: str, to: str, *, allowed: Sequence[str] = (), **fields: object
    ) -> bool:
        """Move a mail to ``to`` if its state is one of ``allowed`` (any if empty)."""
        assert to in MAIL_STATES, to
        fields.setdefault("updated_at", now_ms())
        argv: list[Any] = [to, keys.state(""), mail_id, len(allowed), *allowed]
        for name, value in fields.items():
            argv += [name, "" if value is None else str(value)]
        moved = bool(self._transition(keys=[keys.mail(mail_id), keys.UNFILED], args=argv))
        if moved and to in DECIDED + (FAILED,) and self.on_decided is not None:
            self.on_decided(mail_id, to, str(fields.get("reason") or ""))
        return moved

    def requeued(self, mail_id: str, count: int) -> None:
        """The sweep queued the mail again (not progress: ``updated_at`` stays)."""
        self.redis.hset(keys.mail(mail_id), mapping={"requeued_at": now_ms(), "requeues": count})

    def update(self, mail_id: str, **fields: object) -> None:
        fields.setdefault("updated_at", now_ms())
        self.redis.hset(
            keys.mail(mail_id), mapping={k: "" if v is None else str(v) for k, v in fields.items()}
        )

    def filed(self, mail_id: str, folder: str, **fields: object) -> None:
        """The decided mail left the inbox (``folder`` is where it went, ``-`` if it could not)."""
        mapping: dict[Any, Any] = {"filed_to": folder, "updated_at": now_ms()}
        mapping |= {k: str(v) for k, v in fields.items()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.mail(mail_id), mapping=mapping)
        pipe.srem(keys.UNFILED, mail_id)
        pipe.execute()

    def unfiled(self, inbox: str, *, idle_ms: int = 0) -> list[str]:
        """Decided mails of ``inbox`` still waiting to be moved, untouched for ``idle_ms``."""
        cutoff = now_ms() - idle_ms
        ids = sorted(_text(m) for m in self.redis.smembers(keys.UNFILED))
        mine = [mail_id for mail_id in ids if mail_id.startswith(inbox + "/")]
        return [r.id for r in self.records(mine) if r.updated_at <= cutoff and not r.filed_to]

    # -- documents -----------------------------------------------------------
    def plan_documents(
        self, mail_id: str, message_key: str, entity: str, documents: Sequence[PlannedDocument]
    ) -> bool:
        """Stage each document's bytes and record it ``planned`` (or ``uploaded`` when an
        earlier run of the same mail already uploaded it). Moves the mail
        ``parsing`` -> ``documents_pending``; returns False if it was not parsing."""
        for doc in documents:
            fp = fingerprint(message_key, doc)
            self.redis.set(
                keys.blob(mail_id, doc.index),
                self.sealer.seal(doc.payload),
                ex=self.staging_ttl,
                nx=True,
            )
            # a record from an earlier, interrupted run is kept: it may hold a token
            self.redis.hsetnx(keys.document(mail_id, doc.index), "state", PLANNED)
            self.redis.hset(
                keys.document(mail_id, doc.index),
                mapping={
                    "name": doc.name,
                    "extension": doc.extension,
                    "type": doc.type,
                    "content_type": doc.content_type,
                    "size": len(doc.payload),
                    "sha256": hashlib.sha256(doc.payload).hexdigest(),
                    "fingerprint": fp,
                },
            )
        # adopt what an earlier run of the same mail already uploaded
        for doc in documents:
            token = self.redis.get(keys.uploaded(entity, fingerprint(message_key, doc)))
            if token:
                self.mark_described(mail_id, doc.index, _text(token))
                self.mark_uploaded(mail_id, doc.index, entity, _text(token))
        return self.transition(
            mail_id,
            DOCUMENTS_PENDING,
            allowed=(PARSING,),
            entity=entity,
            documents=len(documents),
        )

    def fingerprint_owner(self, entity: str, fp: str, mail_id: str, index: int) -> tuple[str, int]:
        """The (mail id, index) that uploads this document; claimed for us if nobody has."""
        key = keys.fingerprint_owner(entity, fp)
        self.redis.set(key, f"{mail_id}|{index}", nx=True)
        owner = _text(self.redis.get(key) or f"{mail_id}|{index}")
        owner_mail, _, owner_index = owner.rpartition("|")
        return owner_mail, int(owner_index)

    def take_fingerprint(self, entity: str, fp: str, mail_id: str, index: int) -> None:
        self.redis.set(keys.fingerprint_owner(entity, fp), f"{mail_id}|{index}")

    def unfetchable(self, inbox: str, uidvalidity: int, uid: int) -> int:
        """Count one more poll that found ``uid`` but got no body for it."""
        key = keys.unfetchable(inbox, uidvalidity, uid)
        count = int(self.redis.incr(key))
        self.redis.expire(key, 7 * 86400)
        return count

    def document(self, mail_id: str, index: int) -> DocumentRecord | None:
        h = self.redis.hgetall(keys.document(mail_id, index))
        return DocumentRecord.from_hash(mail_id, index, _decode(h)) if h else None

    def documents(self, mail_id: str, count: int) -> list[DocumentRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for index in range(count):
            pipe.hgetall(keys.document(mail_id, index))
        return [
            DocumentRecord.from_hash(mail_id, i, _decode(h))
            for i, h in enumerate(pipe.execute())
            if h
        ]

    def restage_blob(self, mail_id: str, index: int, payload: bytes) -> None:
        self.redis.set(keys.blob(mail_id, index), self.sealer.seal(payload), ex=self.staging_ttl)

    def blob(self, mail_id: str, index: int) -> bytes | None:
        value = self.redis.get(keys.blob(mail_id, index))
        return self.sealer.open(value) if isinstance(value, bytes) else None

    def describe_attempt(self, mail_id: str, index: int) -> None:
        """Recorded before the POST: from now on a token may exist at Alloy that we never saw."""
        key = keys.document(mail_id, index)
        self.redis.hsetnx(key, "describe_started_at", now_ms())
        self.redis.hincrby(key, "describe_attempts", 1)
        self.update(mail_id)

    def mark_described(self, mail_id: str, index: int, token: str) -> str:
        """Record the document's token unless it has one; return the one kept, or "" when
        ``token`` already belongs to another document (then nothing is recorded)."""
        kept = self._described(
            keys=[keys.document(mail_id, index), keys.token_claim(token)], args=[token, now_ms()]
        )
        self.update(mail_id)
        return _text(kept)

    def token_claimed(self, token: str) -> bool:
        return bool(self.redis.exists(keys.token_claim(token)))

    def mark_uploaded(self, mail_id: str, index: int, entity: str, token: str) -> int:
        """Record Alloy's ``uploaded: true``; drop the staged bytes; return how many
        documents of the mail are confirmed so far."""
        doc = self.document(mail_id, index)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.document(mail_id, index), mapping={"state": UPLOADED, "token": token})
        if doc is not None and doc.fingerprint:
            pipe.set(keys.uploaded(entity, doc.fingerprint), token)
        pipe.delete(keys.blob(mail_id, index))
        pipe.sadd(keys.done(mail_id), index)
        pipe.hset(keys.mail(mail_id), "updated_at", now_ms())
        pipe.scard(keys.done(mail_id))
        return int(pipe.execute()[-1])

    def confirmed(self, mail_id: str) -> int:
        return int(self.redis.scard(keys.done(mail_id)))

    def drop_staged(self, mail_id: str, count: int) -> None:
        """Forget the mail's and its documents' bytes (once it left the inbox)."""
        self.redis.delete(keys.raw(mail_id), *(keys.blob(mail_id, i) for i in range(count)))

    # -- reporting -----------------------------------------------------------
    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for state in MAIL_STATES:
            pipe.scard(keys.state(state))
        return dict(zip(MAIL_STATES, (int(n) for n in pipe.execute()), strict=True))

    def mail_ids(self, state: str) -> list[str]:
        return sorted(_text(m) for m in self.redis.smembers(keys.state(state)))

    def mails(self, states: Iterable[str]) -> list[MailRecord]:
        ids = [mail_id for state in states for mail_id in self.mail_ids(state)]
        return sorted(self.records(ids), key=lambda r: r.created_at)
