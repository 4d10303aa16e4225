"""Mail and document records, and the slots that say what Alloy holds for a document.

Every transition is a compare-and-set in one Lua script, checked against the table of
:mod:`mailingest.core.states` before it is sent, so a step that runs twice finds the
mail already moved on and does nothing."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.lock

from mailingest.adapters import keys
from mailingest.adapters.ledger.base import ATTEMPT, HISTORY_KEPT, Store, actor, decode
from mailingest.core import states
from mailingest.core.reasons import reason_kind
from mailingest.core.records import DocumentRecord, MailRecord, MailRef, Slot
from mailingest.core.states import (
    COUNTED,
    DECIDED,
    IN_FLIGHT,
    MAIL_STATES,
    DocumentState,
    MailState,
)


@dataclass(frozen=True)
class Attempt:
    """What :meth:`Ledger.begin_attempt` decided: ``go`` (POST, as ``attempt_id``),
    ``token`` (the slot has its document), ``changed`` (look again), ``wait`` (an
    attempt in doubt may still be committed for ``wait_ms``), ``decided`` (the mail
    was quarantined or failed meanwhile: no POST)."""

    verdict: str
    attempt_id: str
    wait_ms: int
    at: int = 0


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


def doubt_key(entity: str, doc: DocumentRecord) -> str:
    """Where the describes of documents of ``doc``'s name, extension and type for this
    entity that may still become Alloy documents are kept (see Ledger.others_in_doubt)."""
    return keys.doubt(entity, doc.name, doc.extension, doc.type)


class MailRecords(Store):
    """The ledger's records of mails, documents and slots."""

    def record_new(
        self, ref: MailRef, raw: bytes, *, size: int = 0, internaldate: str = ""
    ) -> bool:
        """Stage a newly fetched mail and record it ``queued``, atomically, before
        anything is queued. Returns False when it was already recorded (nothing changes)."""
        recorded = bool(
            self._record(
                keys=[
                    keys.mail(ref.id),
                    keys.raw(ref.id),
                    keys.state(states.INITIAL),
                    keys.history(ref.id),
                ],
                args=[
                    self.sealer.seal(raw),
                    self.staging_ttl,
                    size or len(raw),
                    self.now(),
                    ref.id,
                    internaldate,
                    states.INITIAL,
                    keys.INDEX,
                    actor(),
                    HISTORY_KEPT,
                ],
            )
        )
        if recorded and self.on_recorded is not None:
            self.on_recorded(ref)
        return recorded

    def step_lock(self, name: str, *, timeout: float) -> redis.lock.Lock:
        """Single flight of one step of one mail (``ingest:<id>``, ``describe:<id>:<n>``)."""
        lock: redis.lock.Lock = self.redis.lock(keys.step_lock(name), timeout=timeout)
        return lock

    def mail(self, mail_id: str) -> MailRecord | None:
        h = self.redis.hgetall(keys.mail(mail_id))
        return MailRecord.from_hash(mail_id, decode(h)) if h else None

    def in_flight(self, inbox: str) -> int:
        """How many of the inbox's mails are recorded but not decided yet (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for state in IN_FLIGHT:
            pipe.smembers(keys.state(state))
        mine = (inbox + "/").encode()
        return sum(1 for members in pipe.execute() for m in members if m.startswith(mine))

    def records(self, mail_ids: Sequence[str]) -> list[MailRecord]:
        """The records of these mails that exist, read in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for mail_id in mail_ids:
            pipe.hgetall(keys.mail(mail_id))
        return [
            MailRecord.from_hash(mail_id, decode(h))
            for mail_id, h in zip(mail_ids, pipe.execute(), strict=True)
            if h
        ]

    def transition(
        self, mail_id: str, to: str, *, allowed: Sequence[str] = (), **fields: object
    ) -> MailRecord | None:
        """Move a mail to ``to`` if its state is one of ``allowed`` (every state the table
        lets go to ``to`` if empty); return the record as written, or None when the mail
        was in another state (or has no record). Asking for a move the table does not
        allow raises :class:`~mailingest.core.states.IllegalTransition`."""
        froms = states.check(to, allowed)
        fields.setdefault("updated_at", self.now())
        if "reason" in fields:  # its kind indexes the mail for the console's filters
            fields["kind"] = reason_kind(str(fields["reason"])) if fields["reason"] else ""
        decided = "1" if to in DECIDED else "0"
        attempt = ATTEMPT.get()
        argv: list[Any] = [
            to,
            keys.state(""),
            mail_id,
            decided,
            keys.INDEX,
            actor(),
            attempt or "",
            HISTORY_KEPT,
            len(froms),
            *froms,
            keys.FIND,
        ]
        for name, value in fields.items():
            argv += [name, "" if value is None else str(value)]
        written = self._transition(
            keys=[keys.mail(mail_id), keys.UNFILED, keys.history(mail_id)], args=argv
        )
        if not written:
            return None
        flat = [keys.as_text(v) for v in written]
        record = MailRecord.from_hash(mail_id, dict(zip(flat[::2], flat[1::2], strict=True)))
        if to in COUNTED and self.on_decided is not None:
            self.on_decided(mail_id, to, str(fields.get("reason") or ""))
        return record

    def add_reason(self, mail_id: str, reason: str) -> None:
        """Append to the reason of a mail already decided (one more refused document)."""
        self._add_reason(keys=[keys.mail(mail_id)], args=[reason])

    def requeued(self, mail_id: str, count: int) -> None:
        """The sweep queued the mail again (not progress: ``updated_at`` stays)."""
        self._set(mail_id, {"requeued_at": self.now(), "requeues": count})

    def update(self, mail_id: str, **fields: object) -> None:
        fields.setdefault("updated_at", self.now())
        self._set(mail_id, fields)

    def _set(self, mail_id: str, fields: dict[str, object]) -> bool:
        """Set fields of an existing record only: a step that outlived its mail's record
        (Redis lost it) must not leave a hash without a state, which would hide the
        mail from the next poll for good."""
        argv: list[Any] = [keys.FIND, mail_id]
        for name, value in fields.items():
            argv += [name, "" if value is None else str(value)]
        return bool(self._update(keys=[keys.mail(mail_id)], args=argv))

    def filed(self, mail_id: str, folder: str, **fields: object) -> None:
        """The decided mail left the inbox (``folder`` is where it went, ``-`` if it could not)."""
        self._set(mail_id, {"filed_to": folder, "updated_at": self.now(), **fields})
        self.redis.srem(keys.UNFILED, mail_id)

    def partly_filed(self, mail_id: str, *, keep: int = 200) -> None:
        """Remember a mail planned with parts refused (the newest ``keep`` of them)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.PARTLY_FILED, {mail_id: self.now()})
        pipe.zremrangebyrank(keys.PARTLY_FILED, 0, -keep - 1)
        pipe.execute()

    def recent_partly_filed(self, limit: int = 20) -> list[MailRecord]:
        """The newest mails planned with parts refused, newest first."""
        ids = [keys.as_text(m) for m in self.redis.zrevrange(keys.PARTLY_FILED, 0, limit - 1)]
        by_id = {r.id: r for r in self.records(ids)}
        return [by_id[mail_id] for mail_id in ids if mail_id in by_id]

    def unfiled(self, inbox: str) -> list[MailRecord]:
        """The records of ``inbox``'s decided mails still waiting to be moved (the sweep
        decides which are due: decisions.sweep)."""
        ids = sorted(keys.as_text(m) for m in self.redis.smembers(keys.UNFILED))
        return self.records([mail_id for mail_id in ids if mail_id.startswith(inbox + "/")])

    def plan_documents(
        self,
        mail_id: str,
        message_key: str,
        entity: str,
        documents: Sequence[PlannedDocument],
        *,
        entity_source: str = "",
    ) -> bool:
        """Stage each document's bytes, record it and point it at its slot (the one Alloy
        document every copy of it shares), then move the mail ``parsing`` ->
        ``documents_pending``; returns False if it was not parsing.

        The slots hold what Alloy has; the mail's document records are its plan, made
        afresh each time it is planned (a replay, a run after a crash): a document the
        slot already has uploaded counts as uploaded at once."""
        fps = [fingerprint(message_key, doc) for doc in documents]
        slots = self.slots(entity, fps)
        pipe = self.redis.pipeline(transaction=True)
        # fenced: a run frozen past its lease must not rewrite the plan (and the done
        # set, and the staged bytes) of a mail another run planned and moved on since
        pipe.watch(keys.mail(mail_id))  # type: ignore[no-untyped-call]
        state, count = pipe.hmget(keys.mail(mail_id), ["state", "documents"])
        if keys.as_text(state or b"") != MailState.PARSING:
            pipe.reset()
            return False
        old = int(count or 0)
        pipe.multi()
        pipe.delete(keys.done(mail_id), *(keys.document(mail_id, i) for i in range(old)))
        for doc, fp, slot in zip(documents, fps, slots, strict=True):
            sha = hashlib.sha256(doc.payload).hexdigest()
            state = (
                DocumentState.UPLOADED
                if slot.uploaded
                else DocumentState.DESCRIBED
                if slot.token
                else DocumentState.PLANNED
            )
            pipe.hset(
                keys.document(mail_id, doc.index),
                mapping={
                    "state": state,
                    "token": slot.token,
                    "name": doc.name,
                    "extension": doc.extension,
                    "type": doc.type,
                    "content_type": doc.content_type,
                    "size": len(doc.payload),
                    "sha256": sha,
                    "fingerprint": fp,
                },
            )
            if slot.token:
                pipe.sadd(keys.find("token", slot.token), mail_id)
            if state == DocumentState.UPLOADED:
                pipe.sadd(keys.done(mail_id), doc.index)
            else:
                pipe.set(
                    keys.blob(mail_id, doc.index),
                    self.sealer.seal(doc.payload),
                    ex=self.staging_ttl,
                )
        try:
            pipe.execute()
        except redis.WatchError:
            return False  # the mail changed meanwhile: whoever changed it goes on
        moved = self.transition(
            mail_id,
            MailState.DOCUMENTS_PENDING,
            allowed=(MailState.PARSING,),
            entity=entity,
            entity_source=entity_source,
            documents=len(documents),
        )
        return moved is not None

    def slot(self, entity: str, fp: str) -> Slot:
        return Slot.from_hash(entity, fp, decode(self.redis.hgetall(keys.slot(entity, fp))))

    def slots(self, entity: str, fps: Sequence[str]) -> list[Slot]:
        pipe = self.redis.pipeline(transaction=False)
        for fp in fps:
            pipe.hgetall(keys.slot(entity, fp))
        return [
            Slot.from_hash(entity, fp, decode(h)) for fp, h in zip(fps, pipe.execute(), strict=True)
        ]

    def begin_attempt(self, slot: Slot, mail_id: str, doubt: str, *, window_ms: int) -> Attempt:
        """Fence a POST: go ahead only if the mail is still ``documents_pending``, the
        slot is as ``slot`` saw it (no token, the same attempt in doubt, or none) and the
        attempt in doubt, if any, is past its window (Alloy can no longer commit it).
        Recorded before the POST, at ``Attempt.at`` on the ledger's clock."""
        attempt_id = uuid.uuid4().hex[:16]
        now = self.now()
        verdict, value = self._begin(
            keys=[keys.slot(slot.entity, slot.fingerprint), keys.mail(mail_id), doubt],
            args=[
                slot.attempt,
                now,
                window_ms,
                attempt_id,
                slot.fingerprint,
                MailState.DOCUMENTS_PENDING,
            ],
        )
        go = keys.as_text(verdict) == "go"
        return Attempt(keys.as_text(verdict), attempt_id if go else "", int(value), now)

    def attempt_failed(self, slot: Slot, doubt: str, attempt_id: str) -> None:
        """The POST of ``attempt_id`` is known not to have been applied (refused, rate
        limited, never connected): it is no longer in doubt."""
        self._clear_attempt(
            keys=[keys.slot(slot.entity, slot.fingerprint), doubt],
            args=[attempt_id, slot.fingerprint],
        )

    def others_in_doubt(self, doubt: str, slot: Slot, *, window_ms: int) -> int:
        """Milliseconds until no *other* slot's describe of a document with this name,
        extension and type can still become an Alloy document (0: none can). Until then
        an unclaimed description of that name may be theirs, and a new one of ours could
        leave theirs without a slot."""
        now = self.now()
        self.redis.zremrangebyscore(doubt, "-inf", now - window_ms)
        entries: Any = self.redis.zrange(doubt, 0, -1, withscores=True)
        begun = [
            int(score) for member, score in entries if keys.as_text(member) != slot.fingerprint
        ]
        return max((at + window_ms - now for at in begun), default=0)

    def claim(self, slot: Slot, token: str, doubt: str, *, answers: str = "") -> str:
        """Record ``token`` as the slot's Alloy document unless the slot has one; return
        the slot's token, or "" when ``token`` already belongs to another slot.
        ``answers``: the attempt whose POST answered with this token (it is settled)."""
        return keys.as_text(
            self._claim(
                keys=[
                    keys.slot(slot.entity, slot.fingerprint),
                    keys.token_claim(token),
                    doubt,
                ],
                args=[token, answers, slot.fingerprint],
            )
        )

    def claimed(self, tokens: Sequence[str]) -> set[str]:
        """Which of these Alloy tokens a slot of ours has claimed (one round trip)."""
        if not tokens:
            return set()
        owners = self.redis.mget([keys.token_claim(token) for token in tokens])
        return {token for token, owner in zip(tokens, owners, strict=True) if owner}

    def slot_uploaded(self, slot: Slot) -> None:
        self.redis.hset(keys.slot(slot.entity, slot.fingerprint), mapping={"uploaded": 1})

    def slot_refused(self, slot: Slot, reason: str) -> None:
        """Alloy refused the bytes for good: the description stays (Alloy has no delete)."""
        self.redis.hset(keys.slot(slot.entity, slot.fingerprint), mapping={"refused": reason})

    def forget_refusals(self, entity: str, fps: Sequence[str]) -> None:
        for fp in fps:
            self.redis.hdel(keys.slot(entity, fp), "refused")

    def document(self, mail_id: str, index: int) -> DocumentRecord | None:
        h = self.redis.hgetall(keys.document(mail_id, index))
        return DocumentRecord.from_hash(mail_id, index, decode(h)) if h else None

    def documents(self, mail_id: str, count: int) -> list[DocumentRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for index in range(count):
            pipe.hgetall(keys.document(mail_id, index))
        return [
            DocumentRecord.from_hash(mail_id, i, decode(h))
            for i, h in enumerate(pipe.execute())
            if h
        ]

    def mark_described(self, mail_id: str, index: int, token: str) -> None:
        """The document's slot has a token (mirrored on the document, for status); a
        document already uploaded stays so (a late run must not set it back)."""
        self._mirror(
            keys=[keys.document(mail_id, index), keys.find("token", token)],
            args=[DocumentState.DESCRIBED, token, DocumentState.UPLOADED, mail_id],
        )
        self.update(mail_id)

    def mark_uploaded(self, mail_id: str, index: int, token: str) -> int:
        """Alloy holds the document's bytes (``uploaded: true``); drop the staged bytes;
        return how many documents of the mail are confirmed so far."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            keys.document(mail_id, index), mapping={"state": DocumentState.UPLOADED, "token": token}
        )
        pipe.delete(keys.blob(mail_id, index))
        pipe.sadd(keys.find("token", token), mail_id)
        pipe.sadd(keys.done(mail_id), index)
        pipe.scard(keys.done(mail_id))
        confirmed = int(pipe.execute()[-1])
        self.update(mail_id)
        return confirmed

    def mark_lost(self, mail_id: str, index: int) -> None:
        """This mail has nothing left to send for the document (its bytes are gone). Only
        this mail's record says so: another copy that still has the bytes uploads them."""
        self.redis.hset(keys.document(mail_id, index), "state", DocumentState.LOST)

    def confirmed(self, mail_id: str) -> int:
        return int(self.redis.scard(keys.done(mail_id)))

    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for state in MAIL_STATES:
            pipe.scard(keys.state(state))
        return dict(zip(MAIL_STATES, (int(n) for n in pipe.execute()), strict=True))

    def mail_ids(self, state: str) -> list[str]:
        return sorted(keys.as_text(m) for m in self.redis.smembers(keys.state(state)))

    def mails(self, states: Iterable[str]) -> list[MailRecord]:
        ids = [mail_id for state in states for mail_id in self.mail_ids(state)]
        return sorted(self.records(ids), key=lambda r: r.created_at)
