"""What the console reads: the index of mails by state, inbox and reason kind, each
mail's history of moves, and the operators' audit log.

The index is kept by the transition scripts (:mod:`.scripts`), so a page of 50 mails
out of 50,000 is one ``ZREVRANGEBYSCORE ... LIMIT`` and one pipeline of 50 hashes,
whatever the ledger's size. :meth:`Index.reindex` builds it for records written before
it existed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import redis
import redis.lock

from mailingest.adapters import keys
from mailingest.adapters.ledger.base import decode
from mailingest.adapters.ledger.records import MailRecords
from mailingest.core.reasons import reason_kind
from mailingest.core.records import MailRecord
from mailingest.core.states import MAIL_STATES

AUDIT_KEPT = 100  # entries kept per mail
FIND_READ = 2000  # records a search reads at most
INDEX_VERSION = "1"  # what Index.reindex builds: a ledger without it is indexed again
AUDIT_KEPT_ALL = 10_000  # entries kept in the log of every mail


@dataclass(frozen=True)
class Move:
    """One entry of a mail's history."""

    at: int  # ms, the ledger's clock
    source: str  # "" when the mail was recorded
    to: str
    by: str  # a worker (host:pid) or a console user (console:<name>)
    attempt: int  # 0: not known (a sweep, a replay, the poll)
    reason: str


@dataclass(frozen=True)
class AuditEntry:
    at: int
    who: str
    action: str
    mail_id: str
    outcome: str


@dataclass(frozen=True)
class Page:
    records: list[MailRecord]
    total: int  # how many mails the filter finds (all pages)
    offset: int


class Index(MailRecords):
    """The console's reads (over the records), and the audit log it writes."""

    def page(
        self,
        states: Sequence[str],
        *,
        inboxes: Sequence[str] | None = None,
        kinds: Sequence[str] = (),
        since_ms: int = 0,
        offset: int = 0,
        limit: int = 50,
    ) -> Page:
        """The mails in ``states`` of ``inboxes`` (None: of every inbox) with a reason of
        one of ``kinds`` (if given), recorded at or after ``since_ms``, newest first. One
        sorted set answers directly; several are merged into a short-lived key first
        (a union: its cost grows with the mails in them)."""
        if inboxes is None and not kinds:
            sources = [keys.index(state) for state in states]
        else:
            if inboxes is None:
                raise ValueError("a filter by reason kind names its inboxes")
            sources = [
                keys.index(state, inbox, kind)
                for state in states
                for inbox in inboxes
                for kind in (kinds or [""])
            ]
        low = since_ms if since_ms > 0 else "-inf"
        pipe = self.redis.pipeline(transaction=False)
        if len(sources) == 1:  # one sorted set: its page, in O(log N + limit)
            pipe.zcount(sources[0], low, "+inf")
            pipe.zrevrangebyscore(sources[0], "+inf", low, start=offset, num=limit)
            total, ids = pipe.execute()
            mail_ids = [keys.as_text(m) for m in ids]
        else:
            # several (disjoint: a mail is in one state, one inbox, one kind): the first
            # offset + limit of each, merged here as Redis orders one set (by score, then
            # member, both descending); Redis is never held by a union of them
            for key in sources:
                pipe.zcount(key, low, "+inf")
            counts = [int(n) for n in pipe.execute()]
            total = sum(counts)
            mail_ids = []
            if offset < total:  # a page past the end reads nothing
                pipe = self.redis.pipeline(transaction=False)
                for key, count in zip(sources, counts, strict=True):
                    pipe.zrevrangebyscore(
                        key, "+inf", low, start=0, num=min(offset + limit, count), withscores=True
                    )
                merged = sorted(
                    ((score, keys.as_text(m)) for found in pipe.execute() for m, score in found),
                    reverse=True,
                )
                mail_ids = [m for _, m in merged[offset : offset + limit]]
        by_id = {r.id: r for r in self.records(mail_ids)}
        return Page([by_id[m] for m in mail_ids if m in by_id], int(total), offset)

    def indexed_counts(self, inboxes: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per inbox, how many of its mails are in each state (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for inbox in inboxes:
            for state in MAIL_STATES:
                pipe.zcard(keys.index(state, inbox))
        counts = iter(pipe.execute())
        return {inbox: {state: int(next(counts)) for state in MAIL_STATES} for inbox in inboxes}

    def find(self, value: str, *, limit: int = 200) -> list[MailRecord]:
        """The mails whose sender, Message-ID, entity or document token is ``value`` (any
        case), newest first (of the first 2,000 found): one round trip for the ids, one
        for their records. A record found by a field that no longer has that value is
        left out (its entry went when the field changed; this is the second check)."""
        wanted = keys.ascii_lower(value.strip())
        if not wanted:
            return []
        fields = ("sender", "message_id", "entity", "token")
        pipe = self.redis.pipeline(transaction=False)
        for field in fields:
            pipe.smembers(keys.find(field, wanted))
        found = [{keys.as_text(m) for m in ids} for ids in pipe.execute()]
        by_token = found[3]
        ids = sorted(set().union(*found))[:FIND_READ]
        records = [
            r
            for r in self.records(ids)
            if r.id in by_token
            or wanted in (keys.ascii_lower(v) for v in (r.sender, r.message_id, r.entity))
        ]
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)[:limit]

    def history(self, mail_id: str) -> list[Move]:
        """Every move of the mail kept (the latest 64), oldest first."""
        moves = []
        entries: Any = self.redis.xrange(keys.history(mail_id))
        for _, fields in entries:
            f = decode(fields)
            moves.append(
                Move(
                    at=int(f.get("at") or 0),
                    source=f.get("from", ""),
                    to=f.get("to", ""),
                    by=f.get("by", ""),
                    attempt=int(f.get("attempt") or 0),
                    reason=f.get("reason", ""),
                )
            )
        return moves

    def reindex(self, *, force: bool = False) -> int:
        """Build the index, the search keys and the reason kinds of every mail when the
        ledger was not indexed by this version (records written before the index
        existed: an upgrade), when a state's whole index is lost (a Redis restored from
        an old snapshot), or when ``force`` (``mailingest console --reindex``: keys of it
        deleted by hand); returns how many mails were indexed (0: none needed). Safe
        beside running workers: each mail is indexed as its hash says at that moment, in
        one script, and a move meanwhile indexes it itself."""
        pipe = self.redis.pipeline(transaction=True)  # one moment: no move between reads
        pipe.get(keys.INDEX_VERSION)
        for state in MAIL_STATES:
            pipe.scard(keys.state(state))
            pipe.zcard(keys.index(state))
        version, *found = pipe.execute()
        # a state's index emptied while its set is not (lost, restored from an old
        # snapshot); a few ids without a record never index, so counts need not agree
        lost = any(n and not z for n, z in zip(found[0::2], found[1::2], strict=True))
        if keys.as_text(version or b"") == INDEX_VERSION and not lost and not force:
            return 0
        lock = self.redis.lock(keys.NS + ":lock:reindex", timeout=900, blocking=False)
        if not lock.acquire():
            return 0  # another console is building it
        try:
            return self._rebuild()
        finally:
            with suppress(redis.exceptions.LockError):
                lock.release()

    def _rebuild(self) -> int:
        stale = list(self.redis.scan_iter(match=keys.INDEX + "*", count=1000))
        for start in range(0, len(stale), 500):
            self.redis.delete(*stale[start : start + 500])
        done = 0
        for state in MAIL_STATES:
            ids = [keys.as_text(m) for m in self.redis.smembers(keys.state(state))]
            for start in range(0, len(ids), 500):
                done += self._reindex_some(ids[start : start + 500])
        self.redis.set(keys.INDEX_VERSION, INDEX_VERSION)
        return done

    def _reindex_some(self, mail_ids: list[str]) -> int:
        records = self.records(mail_ids)
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            if record.reason and not record.kind:  # written before kinds were kept
                pipe.hsetnx(keys.mail(record.id), "kind", reason_kind(record.reason))
        pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            self._reindex(
                keys=[keys.mail(record.id)], args=[record.id, keys.INDEX, keys.FIND], client=pipe
            )
        done = sum(1 for answer in pipe.execute() if answer == 1)
        # the document tokens of mails planned before the search keys existed
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            for index in range(record.documents):
                pipe.hget(keys.document(record.id, index), "token")
        tokens = iter(pipe.execute())
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            for _ in range(record.documents):
                token = keys.as_text(next(tokens) or b"")
                if token:
                    pipe.sadd(keys.find("token", token), record.id)
        pipe.execute()
        return done

    def audit(self, mail_id: str, who: str, action: str, outcome: str) -> AuditEntry:
        """Record what an operator did to a mail (in its log and in the log of all)."""
        entry = AuditEntry(self.now(), who, action, mail_id, outcome)
        line = json.dumps(entry.__dict__, ensure_ascii=False)
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(keys.audit(mail_id), line)
        pipe.ltrim(keys.audit(mail_id), 0, AUDIT_KEPT - 1)
        pipe.lpush(keys.AUDIT, line)
        pipe.ltrim(keys.AUDIT, 0, AUDIT_KEPT_ALL - 1)
        pipe.execute()
        return entry

    def audit_log(self, mail_id: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest entries first: of one mail, or of every mail."""
        key = keys.audit(mail_id) if mail_id else keys.AUDIT
        return [_entry(line) for line in self.redis.lrange(key, 0, limit - 1)]


def _entry(line: Any) -> AuditEntry:
    data = json.loads(keys.as_text(line))
    return AuditEntry(**data)
