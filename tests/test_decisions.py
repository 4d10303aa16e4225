"""Every decision of the pipeline, table by table, without a server (core/decisions.py)."""

from __future__ import annotations

import pytest

from mailingest.core import decisions
from mailingest.core.decisions import (
    After,
    Backlog,
    Ingest,
    Liveness,
    Step,
    Sweep,
    SweepAction,
    SweepPolicy,
)
from mailingest.core.errors import AlloyRejected, AlloyUnavailable, InDoubt, MailError
from mailingest.core.records import Document, DocumentRecord, MailRecord, Slot
from mailingest.core.retry import RetryPolicy
from mailingest.core.states import DocumentState, MailState

NOW = 100_000_000
MIN = 60_000
MAIL = "eu/INBOX/7/42"


def record(state: str = MailState.QUEUED, mail_id: str = MAIL, **fields: object) -> MailRecord:
    return MailRecord.from_hash(mail_id, {"state": state} | {k: str(v) for k, v in fields.items()})


def doc(index: int = 0, state: str = DocumentState.PLANNED, **fields: object) -> DocumentRecord:
    h = {"state": state, "name": "passport", "extension": "pdf", "type": "passport"}
    return DocumentRecord.from_hash(MAIL, index, h | {k: str(v) for k, v in fields.items()})


def slot(**fields: object) -> Slot:
    return Slot.from_hash("P-x", "fp", {k: str(v) for k, v in fields.items()})


# -- stuck and stale -------------------------------------------------------------------

STALE_MS = 10 * MIN
LEASE_MS = 15_000
POLICY = SweepPolicy(
    stale_ms=STALE_MS,
    lease_ms=LEASE_MS,
    max_attempts=3,
    failed_retries=2,
    failed_retry_after_ms=60 * MIN,
    finish_grace_ms=MIN,
)
EMPTY = Liveness(leased=False, queued_since=None)  # no lease, nothing waits in the queue


@pytest.mark.parametrize(
    ("state", "fields", "live", "expected"),
    [
        # no lease, its task gone from the queue: stalled after two leases
        (MailState.QUEUED, {"updated_at": NOW - 31_000}, EMPTY, True),
        (MailState.PARSING, {"updated_at": NOW - 31_000}, EMPTY, True),
        (MailState.DOCUMENTS_PENDING, {"updated_at": NOW - 31_000}, EMPTY, True),
        (MailState.QUEUED, {"updated_at": NOW - 30_000}, EMPTY, False),  # exactly at it
        # a lease is held: a live worker runs a step of it, however long
        (MailState.DOCUMENTS_PENDING, {"updated_at": NOW - 11 * MIN}, Liveness(True, None), False),
        # tasks sent before (or within a lease after) its last activity still wait
        (MailState.QUEUED, {"updated_at": NOW - 5 * MIN}, Liveness(False, NOW - 6 * MIN), False),
        (MailState.QUEUED, {"updated_at": NOW - 60_000}, Liveness(False, NOW - 50_000), False),
        # ... but only up to the backstop
        (MailState.QUEUED, {"updated_at": NOW - 11 * MIN}, Liveness(False, NOW - 12 * MIN), True),
        # every task waiting was sent well after its last activity: its own is gone
        (MailState.QUEUED, {"updated_at": NOW - 60_000}, Liveness(False, NOW - 40_000), True),
        # a lease of it lapsed (its holder died mid-step): at once, whatever waits
        (
            MailState.DOCUMENTS_PENDING,
            {"updated_at": NOW - 16_000},
            Liveness(False, NOW - 6 * MIN, lapsed=True),
            True,
        ),
        # ... once idle for a lease (a lease given back late looks lapsed for a moment)
        (
            MailState.DOCUMENTS_PENDING,
            {"updated_at": NOW - 10_000},
            Liveness(False, NOW - 6 * MIN, lapsed=True),
            False,
        ),
        # ... unless another lease of it is held: a step is running
        (
            MailState.DOCUMENTS_PENDING,
            {"updated_at": NOW - 16_000},
            Liveness(True, NOW - 6 * MIN, lapsed=True),
            False,
        ),
        # the queue's age unknown (0): only the backstop
        (MailState.QUEUED, {"updated_at": NOW - 9 * MIN}, Liveness(False, 0), False),
        (MailState.QUEUED, {"updated_at": NOW - 11 * MIN}, Liveness(False, 0), True),
        # a planned retry, or a requeue, restarts the clock
        (MailState.QUEUED, {"updated_at": NOW - 11 * MIN, "retry_at": NOW - 10_000}, EMPTY, False),
        (MailState.QUEUED, {"updated_at": NOW - 11 * MIN, "retry_at": NOW + MIN}, EMPTY, False),
        (
            MailState.QUEUED,
            {"updated_at": NOW - 11 * MIN, "requeued_at": NOW - 10_000},
            EMPTY,
            False,
        ),
        (
            MailState.QUEUED,
            {"updated_at": NOW - 11 * MIN, "requeued_at": NOW - 31_000},
            EMPTY,
            True,
        ),
        (MailState.DONE, {"updated_at": 0}, EMPTY, False),
        (MailState.QUARANTINED, {"updated_at": 0}, EMPTY, False),
        (MailState.FAILED, {"updated_at": 0}, EMPTY, False),
        (MailState.REPLAYED, {"updated_at": 0}, EMPTY, False),
    ],
)
def test_stuck(state: str, fields: dict[str, int], live: Liveness, expected: bool) -> None:
    assert decisions.stuck(record(state, **fields), NOW, policy=POLICY, live=live) is expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"updated_at": NOW - 10_000}, None),
        ({"updated_at": NOW - MIN}, decisions.Stale(1, fail=False)),
        # requeued recently: wait for that run
        ({"updated_at": NOW - 30 * MIN, "requeued_at": NOW - 5_000, "requeues": 1}, None),
        # requeued a while ago, no progress since: count on
        (
            {"updated_at": NOW - 30 * MIN, "requeued_at": NOW - MIN, "requeues": 2},
            decisions.Stale(3, fail=False),
        ),
        # progress since the last requeue starts afresh
        (
            {"updated_at": NOW - MIN, "requeued_at": NOW - 2 * MIN, "requeues": 3},
            decisions.Stale(1, fail=False),
        ),
        # the budget used without progress: a poison mail
        (
            {"updated_at": NOW - 90 * MIN, "requeued_at": NOW - MIN, "requeues": 3},
            decisions.Stale(3, fail=True),
        ),
    ],
)
def test_stale(fields: dict[str, int], expected: decisions.Stale | None) -> None:
    verdict = decisions.stale(record(MailState.PARSING, **fields), NOW, policy=POLICY, live=EMPTY)
    assert verdict == expected


# -- backlog -------------------------------------------------------------------------


def test_backlog_counts_only_the_inboxs_mails_in_flight_and_ages_the_oldest() -> None:
    records = [
        record(MailState.QUEUED, "eu/INBOX/1/1", created_at=NOW - 90_000),
        record(MailState.DOCUMENTS_PENDING, "eu/INBOX/1/2", created_at=NOW - 5_000),
        record(MailState.DONE, "eu/INBOX/1/3", created_at=NOW - 900_000),
        record(MailState.FAILED, "eu/INBOX/1/4", created_at=NOW - 900_000),
        record(MailState.PARSING, "us/INBOX/1/1", created_at=NOW - 1_000),
    ]
    assert decisions.backlog(records, "eu", NOW) == Backlog(2, 90_000)
    assert decisions.backlog(records, "us", NOW) == Backlog(1, 1_000)
    assert decisions.backlog(records, "asia", NOW) == Backlog(0, None)


# -- the sweep -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "fields", "expected"),
    [
        (MailState.QUEUED, {"updated_at": NOW - MIN}, SweepAction(Sweep.LEAVE)),
        (MailState.PARSING, {"updated_at": NOW - 11 * MIN}, SweepAction(Sweep.REQUEUE, 1)),
        (
            MailState.DOCUMENTS_PENDING,
            {"updated_at": NOW - 90 * MIN, "requeued_at": NOW - 20 * MIN, "requeues": 3},
            SweepAction(
                Sweep.FAIL,
                3,
                "stuck in documents_pending: queued again 3 times without progress",
            ),
        ),
        (MailState.FAILED, {"updated_at": NOW - 61 * MIN}, SweepAction(Sweep.RETRY_FAILED)),
        (MailState.FAILED, {"updated_at": NOW - 59 * MIN}, SweepAction(Sweep.LEAVE)),
        (
            MailState.FAILED,
            {"updated_at": NOW - 61 * MIN, "auto_replays": 2},
            SweepAction(Sweep.LEAVE),
        ),
        (MailState.DONE, {"updated_at": NOW - 2 * MIN}, SweepAction(Sweep.FINISH)),
        (MailState.QUARANTINED, {"updated_at": NOW - MIN}, SweepAction(Sweep.FINISH)),
        # decided moments ago: its own finish is still queued
        (MailState.DONE, {"updated_at": NOW - MIN + 1}, SweepAction(Sweep.LEAVE)),
        (
            MailState.DONE,
            {"updated_at": NOW - 9 * MIN, "filed_to": "Processed"},
            SweepAction(Sweep.LEAVE),
        ),
        (MailState.REPLAYED, {"updated_at": 0}, SweepAction(Sweep.LEAVE)),
    ],
)
def test_sweep(state: str, fields: dict[str, object], expected: SweepAction) -> None:
    assert decisions.sweep(record(state, **fields), NOW, POLICY) == expected


# -- ingest, documents, filing --------------------------------------------------------


@pytest.mark.parametrize(
    ("rec", "expected"),
    [
        (None, Ingest.NOTHING),
        (record(MailState.QUEUED), Ingest.PARSE),
        (record(MailState.PARSING), Ingest.PARSE),
        (record(MailState.DOCUMENTS_PENDING), Ingest.DOCUMENTS),
        (record(MailState.DONE), Ingest.FINISH),
        (record(MailState.QUARANTINED), Ingest.FINISH),
        (record(MailState.DONE, filed_to="Processed"), Ingest.NOTHING),
        (record(MailState.FAILED), Ingest.NOTHING),
        (record(MailState.REPLAYED), Ingest.NOTHING),
    ],
)
def test_ingest(rec: MailRecord | None, expected: Ingest) -> None:
    assert decisions.ingest(rec) == expected


def test_document_steps() -> None:
    docs = [
        doc(0, DocumentState.PLANNED),
        doc(1, DocumentState.DESCRIBED),
        doc(2, DocumentState.UPLOADED),
        doc(3, DocumentState.LOST),
    ]
    assert decisions.document_steps(MAIL, docs) == [
        Step("describe", MAIL, 0),
        Step("upload", MAIL, 1),
    ]
    assert decisions.document_steps(MAIL, []) == []


@pytest.mark.parametrize(
    ("doc_state", "slot_fields", "expected"),
    [
        (DocumentState.PLANNED, {}, []),  # never sent
        (DocumentState.PLANNED, {"attempt": "a1"}, [Step("describe", MAIL, 0)]),  # in doubt
        (DocumentState.DESCRIBED, {"token": "D-1"}, [Step("upload", MAIL, 0)]),
        (DocumentState.UPLOADED, {"token": "D-1", "uploaded": 1}, []),
        (DocumentState.DESCRIBED, {"token": "D-1", "refused": "bad type"}, []),
        (DocumentState.LOST, {"token": "D-1"}, []),
    ],
)
def test_unsettled(doc_state: str, slot_fields: dict[str, object], expected: list[Step]) -> None:
    assert decisions.unsettled(MAIL, [doc(0, doc_state)], [slot(**slot_fields)]) == expected


@pytest.mark.parametrize(
    ("rec", "may_file", "must_settle", "target"),
    [
        (record(MailState.DONE, documents=2), True, False, "Processed"),
        (record(MailState.QUARANTINED, documents=2), True, True, "Quarantine"),
        (record(MailState.QUARANTINED, documents=0), True, False, "Quarantine"),
        (record(MailState.DONE, filed_to="Processed"), False, False, "Processed"),
        (record(MailState.QUARANTINED, filed_to="-"), False, False, "Quarantine"),
        (record(MailState.FAILED, documents=1), False, True, "Quarantine"),
        (record(MailState.DOCUMENTS_PENDING), False, False, "Quarantine"),
    ],
)
def test_filing(rec: MailRecord, may_file: bool, must_settle: bool, target: str) -> None:
    assert decisions.may_file(rec) is may_file
    assert decisions.must_settle(rec) is must_settle
    assert decisions.destination(rec, processed="Processed", quarantine="Quarantine") == target


def test_may_file_without_a_record() -> None:
    assert decisions.may_file(None) is False


@pytest.mark.parametrize(
    ("reason", "note", "expected"),
    [("", "moved by hand", "moved by hand"), ("unknown sender", "gone", "unknown sender; gone")],
)
def test_with_note(reason: str, note: str, expected: str) -> None:
    assert decisions.with_note(reason, note) == expected


# -- adoption ------------------------------------------------------------------------


def alloy(
    token: str, *, uploaded: bool = False, timestamp: int | None = 1, **kw: object
) -> Document:
    notes = kw.pop("notes", ({"note": "by mail", "note_author_agent_email": "a@x.example"},))
    fields = {"name": "passport", "extension": "pdf", "type": "passport"} | kw
    return Document(
        token=token,
        uploaded=uploaded,
        timestamp=timestamp,
        notes=notes,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("listing", "claimed", "expected"),
    [
        ([alloy("D-1")], set(), ["D-1"]),
        ([alloy("D-1")], {"D-1"}, []),  # another slot's
        ([alloy("D-1", name="bill")], set(), []),
        ([alloy("D-1", extension="png")], set(), []),
        ([alloy("D-1", type="utility")], set(), []),
        ([alloy("D-1", notes=({"note": "by hand"},))], set(), []),
        (
            [alloy("D-1", notes=({"note": "by mail", "note_author_agent_email": "b@x"},))],
            set(),
            [],
        ),
        # uploaded first, then descriptions oldest first (no timestamp counts as oldest)
        (
            [
                alloy("D-new", timestamp=30),
                alloy("D-up", uploaded=True),
                alloy("D-old", timestamp=10),
                alloy("D-none", timestamp=None),
            ],
            set(),
            ["D-up", "D-none", "D-old", "D-new"],
        ),
    ],
)
def test_adoption_candidates(
    listing: list[Document], claimed: set[str], expected: list[str]
) -> None:
    found = decisions.adoption_candidates(
        listing, doc(), note="by mail", agent_email="A@X.example", claimed=claimed
    )
    assert [d.token for d in found] == expected


# -- after an error ------------------------------------------------------------------

RETRY = RetryPolicy(max_attempts=3, base=2.0, cap=300.0)


@pytest.mark.parametrize(
    ("step", "error", "tries", "retryable", "action", "delay", "reason"),
    [
        # a server's Retry-After is honoured; our own in-doubt window too
        (
            Step("describe", MAIL, 0),
            AlloyUnavailable("busy", retry_after=7),
            0,
            True,
            After.RETRY,
            7,
            "",
        ),
        (
            Step("describe", MAIL, 0),
            InDoubt("wait", retry_after=42.5),
            1,
            True,
            After.RETRY,
            42.5,
            "",
        ),
        # retries exhausted
        (
            Step("upload", MAIL, 1),
            AlloyUnavailable("down", retry_after=1),
            2,
            True,
            After.FAIL,
            0,
            "document 1: upload gave up after retries: Alloy failed: down",
        ),
        (
            Step("ingest", MAIL),
            ConnectionError("secret text"),
            2,
            True,
            After.FAIL,
            0,
            "ingest gave up after retries: ConnectionError",
        ),
        (
            Step("finish", MAIL),
            AlloyUnavailable("x"),
            2,
            True,
            After.KEEP_DECIDED,
            0,
            "moving it failed after retries",
        ),
        # final errors
        (Step("finish", MAIL), MailError("gone"), 0, False, After.KEEP_DECIDED, 0, "move failed"),
        (
            Step("describe", MAIL, 0),
            AlloyRejected("bad type", status=400, operation="describe"),
            0,
            False,
            After.QUARANTINE,
            0,
            "Alloy describe answered 400: bad type",
        ),
        (
            Step("ingest", MAIL),
            KeyError("quoted mail text"),
            0,
            False,
            After.UNEXPECTED,
            0,
            "internal error in ingest: KeyError",
        ),
    ],
)
def test_after_error(
    step: Step,
    error: BaseException,
    tries: int,
    retryable: bool,
    action: After,
    delay: float,
    reason: str,
) -> None:
    after = decisions.after_error(step, error, tries, retryable=retryable, policy=RETRY)
    assert (after.action, after.delay, after.reason) == (action, delay, reason)


def test_after_error_backs_off_without_a_hint() -> None:
    for tries, ceiling in ((0, 2.0), (1, 4.0)):
        after = decisions.after_error(
            Step("ingest", MAIL), AlloyUnavailable("x"), tries, retryable=True, policy=RETRY
        )
        assert after.action == After.RETRY and ceiling / 2 <= after.delay <= ceiling


def test_step_lock_names() -> None:
    assert Step("ingest", MAIL).lock_name == f"ingest:{MAIL}"
    assert Step("upload", MAIL, 3).lock_name == f"upload:{MAIL}:3"
    assert Step("upload", MAIL, 3).args == (MAIL, 3)


# -- chaining -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "following", "runs", "queued"),
    [
        # a describe goes on with its own upload; another document's step is queued
        (
            Step("describe", MAIL, 0),
            [Step("describe", MAIL, 1), Step("upload", MAIL, 0)],
            Step("upload", MAIL, 0),
            [Step("describe", MAIL, 1)],
        ),
        # the last upload goes on with the move of its mail
        (Step("upload", MAIL, 1), [Step("finish", MAIL)], Step("finish", MAIL), []),
        # a refused describe quarantines: its move follows in the same task
        (Step("describe", MAIL, 0), [Step("finish", MAIL)], Step("finish", MAIL), []),
        # never another document's upload, never another mail
        (Step("describe", MAIL, 0), [Step("upload", MAIL, 1)], None, [Step("upload", MAIL, 1)]),
        (
            Step("upload", MAIL, 0),
            [Step("finish", "x/INBOX/1/2")],
            None,
            [Step("finish", "x/INBOX/1/2")],
        ),
        # a parse's describes are queued, for the I/O workers, in parallel
        (
            Step("ingest", MAIL),
            [Step("describe", MAIL, 0), Step("finish", MAIL)],
            None,
            [Step("describe", MAIL, 0), Step("finish", MAIL)],
        ),
        (Step("finish", MAIL), [], None, []),
    ],
)
def test_chained(step: Step, following: list[Step], runs: Step | None, queued: list[Step]) -> None:
    assert decisions.chained(step, following) == (runs, queued)


# -- fetch batches ----------------------------------------------------------------------


def test_fetch_batches_start_small_and_double_up_to_the_count() -> None:
    uids = list(range(1, 41))
    sizes = dict.fromkeys(uids, 1000)
    batches = list(decisions.fetch_batches(uids, sizes, 10, 10**9))
    assert [len(b) for b in batches] == [2, 4, 8, 10, 10, 6]
    assert [uid for b in batches for uid in b] == uids  # in order, each once


def test_fetch_batches_keep_to_the_byte_budget_and_never_leave_a_big_mail_out() -> None:
    sizes = {1: 10, 2: 10, 3: 10, 4: 50, 5: 60, 6: 10}
    batches = list(decisions.fetch_batches(list(sizes), sizes, 50, 55))
    assert batches == [[1, 2], [3], [4], [5], [6]]
    assert list(decisions.fetch_batches([], {}, 50, 55)) == []


@pytest.mark.parametrize(
    ("sender", "forwarded", "forwarders", "expected"),
    [
        ("dana@x.example", (), set(), ("dana@x.example", "")),
        # not a forwarder: its forwards are filed on it
        ("dana@x.example", ("olaf@y.example",), set(), ("dana@x.example", "")),
        # a forwarder: on the forwarded mail's sender
        (
            "agent@s.example",
            ("olaf@y.example",),
            {"agent@s.example"},
            ("olaf@y.example", "forwarded by agent@s.example"),
        ),
        # the same customer twice is one customer
        (
            "agent@s.example",
            ("olaf@y.example", "olaf@y.example"),
            {"agent@s.example"},
            ("olaf@y.example", "forwarded by agent@s.example"),
        ),
        # nothing forwarded: the agent's own mail
        ("agent@s.example", (), {"agent@s.example"}, ("agent@s.example", "")),
    ],
)
def test_customer_of(
    sender: str, forwarded: tuple[str, ...], forwarders: set[str], expected: tuple[str, str]
) -> None:
    assert decisions.customer_of(sender, forwarded, forwarders) == expected


def test_customer_of_several_forwarded_senders_is_none_with_the_reason() -> None:
    customer, reason = decisions.customer_of(
        "a@s.example", ("x@y.example", "z@y.example"), {"a@s.example"}
    )
    assert customer is None and "several senders (x@y.example, z@y.example)" in reason
