"""What each console page shows, read from the ledger as plain data (no HTTP here).

The live parts (the counts and the inbox table, refreshed every few seconds) are one
pipeline: one Redis round trip, whatever the ledger's size. A list page is the index
(:mod:`mailingest.adapters.ledger.index`) and one pipeline of its 50 records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode

from mailingest.adapters import keys
from mailingest.adapters.ledger import AuditEntry, DocumentRecord, Ledger, MailRecord, Move
from mailingest.adapters.rate_limit import Pace, ask_pace, pace_of
from mailingest.application import actions
from mailingest.config.settings import Settings
from mailingest.core.reasons import KINDS
from mailingest.core.states import ATTENTION, IN_FLIGHT, MAIL_STATES, MailState

PAGE_SIZE = 50
AGES: Mapping[str, int] = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": 0}
# which mails a list shows: those that need an operator, or one state of them
LISTS: Mapping[str, tuple[MailState, ...]] = {
    "attention": ATTENTION,
    **{str(state): (state,) for state in (*ATTENTION, MailState.HANDLED)},
}
IDLE_STALE_S = 15 * 60  # no word from `mailingest watch` for this long: it is not running


@dataclass(frozen=True)
class InboxView:
    name: str
    folder: str
    poll_every_s: float
    polled_at: int  # ms; 0: never
    ok_at: int
    found: int
    error: str
    backlog: int
    oldest_pending_ms: int | None  # when the oldest mail in flight was recorded
    idle: str  # what `mailingest watch` said last ("" never)
    idle_at: int
    counts: Mapping[str, int]


@dataclass(frozen=True)
class Overview:
    now: int  # ms, Redis's clock
    counts: Mapping[str, int]  # every inbox
    inboxes: list[InboxView]
    pace: Pace
    rate: float  # the configured Alloy rate (0: no limiter)

    @property
    def attention(self) -> int:
        return sum(self.counts.get(state, 0) for state in ATTENTION)

    @property
    def limiter_sets_the_pace(self) -> bool:
        return self.rate > 0 and self.pace.sets_the_pace


def overview(ledger: Ledger, settings: Settings) -> Overview:
    """The counts, each inbox's poll and backlog, and the rate limiter: one round trip."""
    names = [inbox.name for inbox in settings.inboxes]
    pipe = ledger.redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.poll_status(name))
        for state in MAIL_STATES:
            pipe.zcard(keys.index(state, name))
        for state in IN_FLIGHT:
            pipe.zrange(keys.index(state, name), 0, 0, withscores=True)
    ask_pace(pipe)
    answers = iter(pipe.execute())
    inboxes = []
    totals: dict[str, int] = {str(state): 0 for state in MAIL_STATES}
    for inbox in settings.inboxes:
        poll = {keys.as_text(k): keys.as_text(v) for k, v in next(answers).items()}
        counts: dict[str, int] = {str(state): int(next(answers)) for state in MAIL_STATES}
        firsts = [next(answers) for _ in IN_FLIGHT]
        oldest = min((int(score) for first in firsts for _, score in first), default=None)
        for name, n in counts.items():
            totals[name] += n
        inboxes.append(
            InboxView(
                name=inbox.name,
                folder=inbox.folder,
                poll_every_s=inbox.poll_interval,
                polled_at=int(poll.get("at") or 0),
                ok_at=int(poll.get("ok_at") or 0),
                found=int(poll.get("found") or 0),
                error=poll.get("error", ""),
                backlog=sum(counts[state] for state in IN_FLIGHT),
                oldest_pending_ms=oldest,
                idle=poll.get("idle", ""),
                idle_at=int(poll.get("idle_at") or 0),
                counts=counts,
            )
        )
    rest = list(answers)
    pace = pace_of(rest, rate=settings.alloy_rate, burst=settings.alloy_burst)
    seconds, micros = rest[-1]
    now = int(seconds) * 1000 + int(micros) // 1000
    return Overview(now, totals, inboxes, pace, settings.alloy_rate)


@dataclass(frozen=True)
class Filters:
    """A list page's filters, from its query string (anything unknown: the default)."""

    list: str = "attention"
    inbox: str = ""  # "": every inbox
    kind: str = ""  # "": every reason
    age: str = "all"
    page: int = 1

    def query(self, **changed: object) -> str:
        """The query string of these filters with ``changed`` applied (for links)."""
        values = {
            "list": self.list,
            "inbox": self.inbox,
            "kind": self.kind,
            "age": self.age,
            "page": self.page,
        } | changed
        return urlencode({k: v for k, v in values.items() if v not in ("", None)})


def parse_filters(query: Mapping[str, str], inboxes: Sequence[str]) -> Filters:
    try:
        page = max(1, min(int(query.get("page", "1")), 100_000))
    except ValueError:
        page = 1
    return Filters(
        list=query.get("list", "") if query.get("list", "") in LISTS else "attention",
        inbox=query.get("inbox", "") if query.get("inbox", "") in inboxes else "",
        kind=query.get("kind", "") if query.get("kind", "") in KINDS else "",
        age=query.get("age", "") if query.get("age", "") in AGES else "all",
        page=page,
    )


@dataclass(frozen=True)
class Part:
    name: str
    type: str  # sniffed
    size: int
    outcome: str


@dataclass(frozen=True)
class Row:
    record: MailRecord
    parts: list[Part]


@dataclass(frozen=True)
class ListView:
    filters: Filters
    rows: list[Row]
    total: int
    pages: int
    kinds: Sequence[str] = field(default_factory=lambda: KINDS)


def mail_list(ledger: Ledger, settings: Settings, filters: Filters, now_ms: int) -> ListView:
    names: list[str] | None = [filters.inbox] if filters.inbox else None
    if names is None and filters.kind:  # the kinds are indexed per inbox
        names = [inbox.name for inbox in settings.inboxes]
    age = AGES[filters.age]
    page = ledger.page(
        LISTS[filters.list],
        inboxes=names,
        kinds=[filters.kind] if filters.kind else [],
        since_ms=now_ms - age * 1000 if age else 0,
        offset=(filters.page - 1) * PAGE_SIZE,
        limit=PAGE_SIZE,
    )
    rows = [Row(record, parts_of(record)) for record in page.records]
    pages = max(1, -(-page.total // PAGE_SIZE))
    return ListView(filters, rows, page.total, pages)


def parts_of(record: MailRecord) -> list[Part]:
    """What the mail carried, as screening recorded it (none for a mail never parsed)."""
    try:
        rows = json.loads(record.parts) if record.parts else []
    except ValueError:
        return []
    return [
        Part(
            str(row.get("name", "")),
            str(row.get("type", "")),
            int(row.get("size") or 0),
            str(row.get("outcome", "")),
        )
        for row in rows
        if isinstance(row, dict)
    ]


@dataclass(frozen=True)
class MailView:
    record: MailRecord
    history: list[Move]
    documents: list[DocumentRecord]
    parts: list[Part]
    audit: list[AuditEntry]
    sender_entity: str  # what the sender directory in Redis maps the sender to, if anything

    @property
    def may_replay(self) -> bool:
        return self.record.state in (
            MailState.QUARANTINED,
            MailState.FAILED,
            MailState.HANDLED,
            MailState.IGNORED,
        ) or (self.record.state == MailState.DONE and bool(self.record.refused_parts))

    @property
    def may_mark_handled(self) -> bool:
        return self.record.state == MailState.QUARANTINED and self.record.filed_to not in ("", "-")

    @property
    def may_map_sender(self) -> bool:
        return not actions.unmappable(self.record)


def mail_view(ledger: Ledger, mail_id: str) -> MailView | None:
    record = ledger.mail(mail_id)
    if record is None:
        return None
    mapped = actions.mapped_to(ledger.redis, record.sender) if record.sender else ""
    return MailView(
        record=record,
        history=ledger.history(mail_id),
        documents=ledger.documents(mail_id, record.documents),
        parts=parts_of(record),
        audit=ledger.audit_log(mail_id),
        sender_entity=mapped,
    )


def when(ms: int, now_ms: int | None = None) -> str:
    """``2026-12-04 23:25:28 UTC (5 min ago)``; ``-`` for 0."""
    if not ms:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))
    if now_ms is None:
        return stamp
    return f"{stamp} ({ago(now_ms - ms)})"


def ago(ms: int) -> str:
    seconds = max(0, ms // 1000)
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{seconds // 60} min ago"
    if seconds < 36 * 3600:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def idle_text(inbox: InboxView, now_ms: int) -> str:
    """What the inbox page says of IMAP IDLE."""
    if not inbox.idle:
        return "not watched (beat polls it)"
    if now_ms - inbox.idle_at > IDLE_STALE_S * 1000 and inbox.idle != "stopped":
        return f"no word from `mailingest watch` since {ago(now_ms - inbox.idle_at)}"
    return f"{inbox.idle} ({ago(now_ms - inbox.idle_at)})"
