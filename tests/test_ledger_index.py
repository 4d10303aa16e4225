"""The console's reads on a real Redis: the index pages the mails of a state (per inbox,
per reason kind, by age) newest first, each mail's history names every move, the audit
log keeps what operators did, and reindex builds the index for records made before it."""

from __future__ import annotations

import pytest
import redis

from mailingest.adapters import keys
from mailingest.adapters.ledger import Ledger, MailRef
from mailingest.adapters.ledger.base import ACTOR, ATTEMPT
from mailingest.core.states import MailState

pytestmark = pytest.mark.servers


def _ledger(client: redis.Redis, start: int = 1_000_000) -> tuple[Ledger, list[int]]:
    clock = [start]

    def now() -> int:
        clock[0] += 1000
        return clock[0]

    client.flushdb()
    return Ledger(client, clock=now), clock


def _quarantine(ledger: Ledger, ref: MailRef, reason: str) -> None:
    assert ledger.record_new(ref, b"raw")
    assert ledger.transition(ref.id, MailState.PARSING)
    assert ledger.transition(ref.id, MailState.QUARANTINED, reason=reason, sender="a@b.example")


def test_pages_are_newest_first_and_filter_by_inbox_kind_and_age(
    redis_client: redis.Redis,
) -> None:
    ledger, _ = _ledger(redis_client)
    reasons = ["unknown sender a@b.example", "no documents attached", "unknown sender c@d"]
    made = []
    for uid in range(1, 31):
        ref = MailRef("eu" if uid % 2 else "us", "INBOX", 7, uid)
        _quarantine(ledger, ref, reasons[uid % 3])
        made.append(ref.id)
    failed = MailRef("eu", "INBOX", 7, 99)
    assert ledger.record_new(failed, b"raw")
    assert ledger.transition(failed.id, MailState.FAILED, reason="Alloy unavailable: 503")

    everything = ledger.page(["quarantined", "failed"], inboxes=["eu", "us"], limit=100)
    assert everything.total == 31
    assert everything.records[0].id == failed.id  # newest first
    assert [r.id for r in everything.records][1:] == made[::-1]

    first = ledger.page(["quarantined"], inboxes=["eu"], limit=5)
    second = ledger.page(["quarantined"], inboxes=["eu"], offset=5, limit=5)
    eu = [m for m in made if m.startswith("eu/")][::-1]
    assert [r.id for r in first.records] == eu[:5] and first.total == 15
    assert [r.id for r in second.records] == eu[5:10]

    unknown = ledger.page(["quarantined"], inboxes=["eu", "us"], kinds=["unknown_sender"])
    assert unknown.total == 20
    assert all(r.reason.startswith("unknown sender") for r in unknown.records)
    assert {r.kind for r in unknown.records} == {"unknown_sender"}

    # recorded at or after the 25th mail's time: the last six of them
    cutoff = ledger.mail(made[24])
    assert cutoff is not None
    recent = ledger.page(["quarantined"], inboxes=["eu", "us"], since_ms=cutoff.created_at)
    assert [r.id for r in recent.records] == made[24:][::-1]
    # nothing temporary left behind by the merged pages
    assert not list(redis_client.scan_iter(match=keys.NS + ":console:page:*"))


def test_a_replayed_mail_leaves_the_quarantine_index(redis_client: redis.Redis) -> None:
    ledger, _ = _ledger(redis_client)
    ref = MailRef("eu", "INBOX", 7, 1)
    _quarantine(ledger, ref, "unknown sender a@b.example")
    assert ledger.page(["quarantined"], inboxes=["eu"], kinds=["unknown_sender"]).total == 1
    assert ledger.transition(ref.id, MailState.QUEUED, reason="", filed_to="")
    assert ledger.page(["quarantined"], inboxes=["eu"]).total == 0
    assert ledger.page(["quarantined"], inboxes=["eu"], kinds=["unknown_sender"]).total == 0
    assert [r.id for r in ledger.page(["queued"], inboxes=["eu"]).records] == [ref.id]
    assert ledger.indexed_counts(["eu"])["eu"]["queued"] == 1


def test_history_names_every_move_with_who_and_attempt(redis_client: redis.Redis) -> None:
    ledger, _ = _ledger(redis_client)
    ref = MailRef("eu", "INBOX", 7, 1)
    assert ledger.record_new(ref, b"raw")
    token = ATTEMPT.set(3)
    who = ACTOR.set("worker-a:42")
    try:
        assert ledger.transition(ref.id, MailState.PARSING)
        assert ledger.transition(ref.id, MailState.QUARANTINED, reason="unknown sender x@y")
    finally:
        ATTEMPT.reset(token)
        ACTOR.reset(who)
    moves = ledger.history(ref.id)
    assert [(m.source, m.to) for m in moves] == [
        ("", "queued"),
        ("queued", "parsing"),
        ("parsing", "quarantined"),
    ]
    assert moves[2].by == "worker-a:42" and moves[2].attempt == 3
    assert moves[2].reason == "unknown sender x@y"
    assert moves[0].attempt == 0 and moves[0].by  # this process, by default
    assert moves[0].at < moves[1].at < moves[2].at


def test_the_audit_log_keeps_who_did_what(redis_client: redis.Redis) -> None:
    ledger, _ = _ledger(redis_client)
    ledger.audit("eu/INBOX/7/1", "alice", "replay", "moved back to INBOX")
    ledger.audit("eu/INBOX/7/2", "bob", "mark handled", "handled")
    mine = ledger.audit_log("eu/INBOX/7/1")
    assert [(e.who, e.action, e.outcome) for e in mine] == [
        ("alice", "replay", "moved back to INBOX")
    ]
    assert [e.who for e in ledger.audit_log()] == ["bob", "alice"]


def test_reindex_builds_the_index_of_older_records(redis_client: redis.Redis) -> None:
    ledger, _ = _ledger(redis_client)
    for uid in range(1, 6):
        _quarantine(ledger, MailRef("eu", "INBOX", 7, uid), "unknown sender a@b")
    assert ledger.reindex() == 5  # a ledger never indexed by this version: once
    assert ledger.reindex() == 0  # whole: nothing to do
    # as a ledger written before the index existed: no index, no version, no kinds, no
    # search keys
    for pattern in (keys.INDEX + "*", keys.FIND + "*", keys.INDEX_VERSION):
        for key in list(redis_client.scan_iter(match=pattern)):
            redis_client.delete(key)
    for uid in range(1, 6):
        redis_client.hdel(keys.mail(MailRef("eu", "INBOX", 7, uid).id), "kind")
    assert ledger.page(["quarantined"], inboxes=["eu"]).total == 0
    assert ledger.reindex() == 5
    page = ledger.page(["quarantined"], inboxes=["eu"], kinds=["unknown_sender"])
    assert page.total == 5
    assert [r.ref.uid for r in page.records] == [5, 4, 3, 2, 1]
    assert {r.kind for r in page.records} == {"unknown_sender"}
    assert len(ledger.find("a@b.example")) == 5
    # a part of the index lost (one inbox's sets): found by the counts, built again
    for key in list(redis_client.scan_iter(match=keys.index("quarantined", "eu") + "*")):
        redis_client.delete(key)
    redis_client.delete(keys.index("quarantined"))
    assert ledger.reindex() == 5
    assert ledger.page(["quarantined"], inboxes=["eu"], kinds=["unknown_sender"]).total == 5


def test_a_changed_field_is_no_longer_found_by_its_old_value(redis_client: redis.Redis) -> None:
    ledger, _ = _ledger(redis_client)
    ref = MailRef("eu", "INBOX", 7, 1)
    assert ledger.record_new(ref, b"raw")
    ledger.update(ref.id, entity="P-old00000000000000001", sender="a@b.example")
    ledger.update(ref.id, entity="P-new00000000000000001")
    assert ledger.find("P-old00000000000000001") == []
    assert [r.id for r in ledger.find("P-new00000000000000001")] == [ref.id]
    assert not redis_client.exists(keys.find("entity", "p-old00000000000000001"))


def test_a_merged_page_orders_as_one_set_would(redis_client: redis.Redis) -> None:
    """Several sorted sets merged in the ledger's process: newest first, ties broken as
    Redis breaks them, every page once, the total the sum."""
    ledger, clock = _ledger(redis_client)
    made = []
    for uid in range(1, 41):
        if uid % 5 == 0:
            clock[0] -= 1000  # the same time as the one before: a tie
        ref = MailRef(("eu", "us")[uid % 2], "INBOX", 7, uid)
        _quarantine(ledger, ref, ("unknown sender a@b", "no documents attached")[uid % 3 % 2])
        made.append(ref.id)
    seen = []
    for page_no in range(5):
        page = ledger.page(
            ["quarantined"],
            inboxes=["eu", "us"],
            kinds=["unknown_sender", "no_documents"],
            offset=page_no * 9,
            limit=9,
        )
        assert page.total == 40
        seen += [r.id for r in page.records]
    everything = redis_client.zrevrangebyscore(
        keys.index("quarantined"), "+inf", "-inf", withscores=True
    )
    assert seen == [keys.as_text(m) for m, _ in everything] and len(set(seen)) == 40


def test_find_by_sender_message_id_entity_and_document_token(redis_client: redis.Redis) -> None:
    ledger, _ = _ledger(redis_client)
    ref = MailRef("eu", "INBOX", 7, 1)
    assert ledger.record_new(ref, b"raw")
    ledger.update(ref.id, sender="Martin@Example.org", message_id="<Abc@mua.example>")
    assert ledger.transition(ref.id, MailState.PARSING)
    assert ledger.transition(
        ref.id, MailState.DOCUMENTS_PENDING, entity="P-x4vtIdFD20vv6jWshIYD", documents=1
    )
    ledger.mark_described(ref.id, 0, "D-fu1WeoS2ywAROk1srtP9")
    other = MailRef("eu", "INBOX", 7, 2)
    assert ledger.record_new(other, b"raw")
    ledger.update(other.id, sender="someone@else.example")
    for value in (
        "martin@example.org",
        "<abc@mua.example>",
        "p-x4vtidfd20vv6jwshiyd",
        "D-fu1WeoS2ywAROk1srtP9",
    ):
        assert [r.id for r in ledger.find(value)] == [ref.id], value
    assert ledger.find("nobody@example.org") == []
    assert ledger.find("  ") == []
