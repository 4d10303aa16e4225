"""The ledger: what happened to every mail and every document, kept in Redis.

A mail id lives in exactly one ``mailingest:state:<state>`` set; the states, and which
may go to which, are :mod:`mailingest.core.states` (diagram: ``docs/states.md``).

Every transition is a compare-and-set in one Lua script, checked against the table
before it is sent (:class:`~mailingest.core.states.IllegalTransition`), so a step that
runs twice (late acks, a redelivered task) finds the mail already moved on and does
nothing. The scripts get every state name as an argument: none is spelled here. Mail
and document bytes are staged here under a TTL and passed between tasks by key; they
never travel through the broker.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.lock

from mailingest.adapters import keys
from mailingest.adapters.encryption import Plain, Sealer
from mailingest.core import states
from mailingest.core.records import DocumentRecord, MailRecord, MailRef, Slot
from mailingest.core.states import (
    COUNTED,
    DECIDED,
    IN_FLIGHT,
    MAIL_STATES,
    DocumentState,
    MailState,
)

# the old names, kept for the many callers (and tests) that use ``L.QUEUED`` and kin
QUEUED = MailState.QUEUED
PARSING = MailState.PARSING
DOCUMENTS_PENDING = MailState.DOCUMENTS_PENDING
DONE = MailState.DONE
QUARANTINED = MailState.QUARANTINED
FAILED = MailState.FAILED
REPLAYED = MailState.REPLAYED
PLANNED = DocumentState.PLANNED
DESCRIBED = DocumentState.DESCRIBED
UPLOADED = DocumentState.UPLOADED
LOST = DocumentState.LOST

# KEYS[1] mail hash, KEYS[2] the unfiled set; ARGV[1] new state, ARGV[2] state-set prefix,
# ARGV[3] mail id, ARGV[4] '1' when the new state is decided (a decided mail not yet filed
# joins the unfiled set), ARGV[5] number of allowed from-states, then those states, then
# field/value pairs. Returns the record as written (HGETALL), or 0 when it did not move.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
local n = tonumber(ARGV[5])
local allowed = false
for i = 1, n do
  if ARGV[5 + i] == current then allowed = true end
end
if not allowed then return 0 end
local i = 6 + n
while i <= #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
local filed = redis.call('HGET', KEYS[1], 'filed_to')
if ARGV[4] == '1' and not (filed and filed ~= '') then
  redis.call('SADD', KEYS[2], ARGV[3])
else
  redis.call('SREM', KEYS[2], ARGV[3])
end
if current ~= ARGV[1] then
  redis.call('SREM', ARGV[2] .. current, ARGV[3])
  redis.call('SADD', ARGV[2] .. ARGV[1], ARGV[3])
end
return redis.call('HGETALL', KEYS[1])
"""


# KEYS: mail hash, raw key, queued set; ARGV: raw, ttl, size, now, mail id, internaldate,
# the initial state
_RECORD = """
if redis.call('HEXISTS', KEYS[1], 'state') == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'state', ARGV[7], 'size', ARGV[3],
           'created_at', ARGV[4], 'updated_at', ARGV[4], 'internaldate', ARGV[6])
redis.call('SADD', KEYS[3], ARGV[5])
return 1
"""

# KEYS: slot hash, token claim, doubt zset; ARGV: token, the attempt this token answers
# ('' for an adopted one), slot fingerprint. The slot's first token wins, and a token
# belongs to one slot only: '' when another slot already claimed it. The attempt the token
# answers is settled; an attempt still in doubt while another document was adopted stays
# in doubt (others with the same name wait for it: it may still become a document).
_CLAIM = """
local current = redis.call('HGET', KEYS[1], 'token')
if current and current ~= '' then return current end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= KEYS[1] then return '' end
redis.call('SET', KEYS[2], KEYS[1])
redis.call('HSET', KEYS[1], 'token', ARGV[1])
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'attempt') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'attempt', '', 'attempt_at', '')
  redis.call('ZREM', KEYS[3], ARGV[3])
end
return ARGV[1]
"""

# KEYS: slot hash, mail hash, doubt zset; ARGV: the attempt the caller saw ('' for none),
# now, window ms, new id, slot fingerprint, the documents_pending state. {'decided', _}
# the mail is no longer documents_pending (quarantined, failed: no new POST for it, or
# `finish` could move it before seeing this attempt).
# {'token', _} the slot has a document already; {'changed', _} another run moved it on
# since the caller looked; {'wait', ms} the attempt in doubt may still be committed by
# Alloy for ms more; {'go', 0} the new attempt is recorded: POST.
_BEGIN = """
if redis.call('HGET', KEYS[2], 'state') ~= ARGV[6] then return {'decided', 0} end
local token = redis.call('HGET', KEYS[1], 'token')
if token and token ~= '' then return {'token', 0} end
local current = redis.call('HGET', KEYS[1], 'attempt') or ''
if current ~= ARGV[1] then return {'changed', 0} end
local now = tonumber(ARGV[2])
if current ~= '' then
  local left = tonumber(redis.call('HGET', KEYS[1], 'attempt_at') or '0') + tonumber(ARGV[3]) - now
  if left > 0 then return {'wait', left} end
end
redis.call('HSET', KEYS[1], 'attempt', ARGV[4], 'attempt_at', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
return {'go', 0}
"""

# KEYS: mail hash; ARGV: field/value pairs. Only a record that exists (has a state).
_UPDATE = """
if redis.call('HEXISTS', KEYS[1], 'state') == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: document hash; ARGV: state, token, the uploaded state. An uploaded document stays
# uploaded.
_MIRROR = """
if redis.call('HGET', KEYS[1], 'state') == ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'token', ARGV[2])
return 1
"""

# KEYS: mail hash; ARGV: reason. Appended once (a retried step does not repeat it).
_ADD_REASON = """
local current = redis.call('HGET', KEYS[1], 'reason') or ''
if string.find(current, ARGV[1], 1, true) then return 0 end
if current == '' then redis.call('HSET', KEYS[1], 'reason', ARGV[1])
else redis.call('HSET', KEYS[1], 'reason', current .. '; ' .. ARGV[1]) end
return 1
"""

# KEYS: slot hash, doubt zset; ARGV: attempt id, slot fingerprint. Only that attempt is
# cleared (a later one stays).
_CLEAR_ATTEMPT = """
if redis.call('HGET', KEYS[1], 'attempt') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'attempt', '', 'attempt_at', '')
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 1
"""


def now_ms() -> int:
    return int(time.time() * 1000)


class RedisClock:
    """Milliseconds on Redis's clock: one clock for every worker of the ledger.

    Workers on different hosts disagree about the time; comparing one worker's
    timestamp with another's (is this mail stale? is this attempt past its
    window?) would inherit their skew. The offset to Redis's ``TIME`` is measured
    on first use and again every ``resync`` seconds (one round trip), so reading
    the clock costs nothing."""

    def __init__(self, client: redis.Redis, *, resync: float = 300.0) -> None:
        self.client = client
        self.resync = resync
        self._offset_ms: int | None = None
        self._synced_at = 0.0

    def __call__(self) -> int:
        local = time.time()
        if self._offset_ms is None or time.monotonic() - self._synced_at > self.resync:
            try:
                seconds, micros = self.client.time()
                self._offset_ms = int(seconds * 1000 + micros // 1000) - int(
                    (local + time.time()) * 500
                )
                self._synced_at = time.monotonic()
            except redis.RedisError:
                if self._offset_ms is None:
                    return int(local * 1000)  # Redis down: the ledger call will fail anyway
        return int(local * 1000) + self._offset_ms


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
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.redis = client
        self.now = clock or RedisClock(client)  # ms; one clock for all workers
        self.staging_ttl = staging_ttl
        self.sealer = sealer or Plain()  # staged bytes encrypted at rest when a key is set
        # told once per mail recorded, and once per move to a final state (the metrics)
        self.on_recorded = on_recorded
        self.on_decided = on_decided
        self._transition = client.register_script(_TRANSITION)
        self._record = client.register_script(_RECORD)
        self._claim = client.register_script(_CLAIM)
        self._begin = client.register_script(_BEGIN)
        self._clear_attempt = client.register_script(_CLEAR_ATTEMPT)
        self._add_reason = client.register_script(_ADD_REASON)
        self._update = client.register_script(_UPDATE)
        self._mirror = client.register_script(_MIRROR)

    # -- polling -------------------------------------------------------------
    def poll_lock(self, inbox: str, *, timeout: float) -> redis.lock.Lock:
        """Single flight for one inbox's poll; expires by itself if its holder dies."""
        lock: redis.lock.Lock = self.redis.lock(keys.poll_lock(inbox), timeout=timeout)
        return lock

    def ask_repoll(self, inbox: str, *, ttl: float) -> None:
        """A poll was asked for while another ran: the running one polls once more."""
        self.redis.set(keys.repoll(inbox), 1, px=int(ttl * 1000))

    def take_repoll(self, inbox: str) -> bool:
        return bool(self.redis.delete(keys.repoll(inbox)))

    def watermark(self, inbox: str, folder: str, uidvalidity: int) -> int:
        value = self.redis.get(keys.watermark(inbox, folder, uidvalidity))
        return int(value) if value else 0

    def record_new(
        self, ref: MailRef, raw: bytes, *, size: int = 0, internaldate: str = ""
    ) -> bool:
        """Stage a newly fetched mail and record it ``queued``, atomically, before
        anything is queued. Returns False when it was already recorded (nothing changes)."""
        recorded = bool(
            self._record(
                keys=[keys.mail(ref.id), keys.raw(ref.id), keys.state(states.INITIAL)],
                args=[
                    self.sealer.seal(raw),
                    self.staging_ttl,
                    size or len(raw),
                    self.now(),
                    ref.id,
                    internaldate,
                    states.INITIAL,
                ],
            )
        )
        if recorded and self.on_recorded is not None:
            self.on_recorded(ref)
        return recorded

    def restage(self, mail_id: str, raw: bytes) -> None:
        self.redis.set(keys.raw(mail_id), self.sealer.seal(raw), ex=self.staging_ttl)

    def step_lock(self, name: str, *, timeout: float) -> redis.lock.Lock:
        """Single flight of one step of one mail (``ingest:<id>``, ``describe:<id>:<n>``)."""
        lock: redis.lock.Lock = self.redis.lock(keys.step_lock(name), timeout=timeout)
        return lock

    def record_poll(self, inbox: str, *, found: int, error: str = "") -> None:
        fields: dict[Any, Any] = {"at": self.now(), "found": found, "error": error}
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
            MailRecord.from_hash(mail_id, _decode(h))
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
        decided = "1" if to in DECIDED else "0"
        argv: list[Any] = [to, keys.state(""), mail_id, decided, len(froms), *froms]
        for name, value in fields.items():
            argv += [name, "" if value is None else str(value)]
        written = self._transition(keys=[keys.mail(mail_id), keys.UNFILED], args=argv)
        if not written:
            return None
        flat = [_text(v) for v in written]
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
        argv: list[Any] = []
        for name, value in fields.items():
            argv += [name, "" if value is None else str(value)]
        return bool(self._update(keys=[keys.mail(mail_id)], args=argv))

    def filed(self, mail_id: str, folder: str, **fields: object) -> None:
        """The decided mail left the inbox (``folder`` is where it went, ``-`` if it could not)."""
        self._set(mail_id, {"filed_to": folder, "updated_at": self.now(), **fields})
        self.redis.srem(keys.UNFILED, mail_id)

    def unfiled(self, inbox: str) -> list[MailRecord]:
        """The records of ``inbox``'s decided mails still waiting to be moved (the sweep
        decides which are due: decisions.sweep)."""
        ids = sorted(_text(m) for m in self.redis.smembers(keys.UNFILED))
        return self.records([mail_id for mail_id in ids if mail_id.startswith(inbox + "/")])

    # -- documents and their slots ----------------------------------------------
    def plan_documents(
        self, mail_id: str, message_key: str, entity: str, documents: Sequence[PlannedDocument]
    ) -> bool:
        """Stage each document's bytes, record it and point it at its slot (the one Alloy
        document every copy of it shares), then move the mail ``parsing`` ->
        ``documents_pending``; returns False if it was not parsing.

        The slots hold what Alloy has; the mail's document records are its plan, made
        afresh each time it is planned (a replay, a run after a crash): a document the
        slot already has uploaded counts as uploaded at once."""
        old = int(self.redis.hget(keys.mail(mail_id), "documents") or 0)
        fps = [fingerprint(message_key, doc) for doc in documents]
        slots = self.slots(entity, fps)
        pipe = self.redis.pipeline(transaction=True)
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
            if state == DocumentState.UPLOADED:
                pipe.sadd(keys.done(mail_id), doc.index)
            else:
                pipe.set(
                    keys.blob(mail_id, doc.index),
                    self.sealer.seal(doc.payload),
                    ex=self.staging_ttl,
                )
        pipe.execute()
        moved = self.transition(
            mail_id,
            MailState.DOCUMENTS_PENDING,
            allowed=(MailState.PARSING,),
            entity=entity,
            documents=len(documents),
        )
        return moved is not None

    def slot(self, entity: str, fp: str) -> Slot:
        return Slot.from_hash(entity, fp, _decode(self.redis.hgetall(keys.slot(entity, fp))))

    def slots(self, entity: str, fps: Sequence[str]) -> list[Slot]:
        pipe = self.redis.pipeline(transaction=False)
        for fp in fps:
            pipe.hgetall(keys.slot(entity, fp))
        return [
            Slot.from_hash(entity, fp, _decode(h))
            for fp, h in zip(fps, pipe.execute(), strict=True)
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
        go = _text(verdict) == "go"
        return Attempt(_text(verdict), attempt_id if go else "", int(value), now)

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
        begun = [int(score) for member, score in entries if _text(member) != slot.fingerprint]
        return max((at + window_ms - now for at in begun), default=0)

    def claim(self, slot: Slot, token: str, doubt: str, *, answers: str = "") -> str:
        """Record ``token`` as the slot's Alloy document unless the slot has one; return
        the slot's token, or "" when ``token`` already belongs to another slot.
        ``answers``: the attempt whose POST answered with this token (it is settled)."""
        return _text(
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

    def mark_described(self, mail_id: str, index: int, token: str) -> None:
        """The document's slot has a token (mirrored on the document, for status); a
        document already uploaded stays so (a late run must not set it back)."""
        self._mirror(
            keys=[keys.document(mail_id, index)],
            args=[DocumentState.DESCRIBED, token, DocumentState.UPLOADED],
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
