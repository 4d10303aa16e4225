"""The whole cycle in one process (poll-once) against real Redis, IMAP and the sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import bulk_scenario, demo_scenario
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import ledger as L
from mailingest.application.pipeline import poll
from mailingest.application.poll_once import poll_once
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings

from .helpers import deliver, folder_counts, outcome_problems, seen_flags, write_senders

pytestmark = pytest.mark.servers


def test_poll_once_in_process(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = demo_scenario(seed=3)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    ctx = build_context(load_settings(env))
    try:
        summary = poll_once(ctx)
        assert summary.ok, summary
        assert (summary.found, summary.processed, summary.quarantined) == (6, 4, 2)
        assert summary.documents_uploaded == 5
        assert outcome_problems(env, scenario) == []
        assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
            "INBOX": 0,
            "Processed": 4,
            "Quarantine": 2,
        }
        assert not any(seen_flags(imap, "Processed")), "BODY.PEEK[] must not set \\Seen"
        # in delivery order (two mails recorded in one millisecond tie on created_at)
        forged, stranger = sorted(ctx.ledger.mails([L.QUARANTINED]), key=lambda r: r.ref.uid)
        assert forged.reason.startswith("sender not authenticated: dmarc=fail")
        assert stranger.reason.startswith("unknown sender mallory@unknown.example")
        assert stranger.filed_to == "Quarantine"
        # the bytes are gone from Redis once uploaded; nothing is staged any more
        assert not list(ctx.redis.scan_iter("mailingest:blob:*"))
        assert not list(ctx.redis.scan_iter("mailingest:raw:*"))

        requests_before = sandbox.state.stats()["requests_total"]
        again = poll(ctx, "default")
        assert (again.found, again.steps) == (0, ())
        assert sandbox.state.stats()["requests_total"] == requests_before
        assert len(sandbox.state.list(scenario.senders["alice.martin@example.com"])) == 3
    finally:
        ctx.close()


def test_poll_once_command_prints_json_summary(
    env: dict[str, str], imap: ImapServer, senders_file: Path
) -> None:
    scenario = bulk_scenario(6, seed=11)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    proc = subprocess.run(
        [sys.executable, "-m", "mailingest", "poll-once", "--json"],
        env={"PATH": "/usr/bin:/bin"} | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["found"], summary["processed"], summary["quarantined"]) == (7, 6, 1)
    assert summary["documents_uploaded"] == len(scenario.expected_documents) == 12
    assert outcome_problems(env, scenario) == []


def test_alloy_refusal_quarantines_with_what_alloy_said(
    env: dict[str, str], imap: ImapServer, senders_file: Path
) -> None:
    scenario = demo_scenario(seed=5)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw])
    env = env | {"MAILINGEST_AGENT_EMAIL": "not.an.agent@support.example"}
    ctx = build_context(load_settings(env))
    try:
        summary = poll_once(ctx)
        assert (summary.processed, summary.quarantined) == (0, 1)
        (record,) = ctx.ledger.mails([L.QUARANTINED])
        assert "Alloy describe answered 400/4002" in record.reason
        assert "error_token" in record.reason
        assert folder_counts(imap, "INBOX", "Quarantine") == {"INBOX": 0, "Quarantine": 1}
    finally:
        ctx.close()


@pytest.mark.slow
def test_outage_is_retried_then_succeeds(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = bulk_scenario(4, seed=2)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    sandbox.set_faults(
        error_500=0.3, rate_429=0.2, retry_after_fraction=0.5, retry_after_seconds=0.1, seed=4
    )
    ctx = build_context(load_settings(env | {"MAILINGEST_MAX_ATTEMPTS": "30"}))
    try:
        summary = poll_once(ctx)
        assert summary.ok and summary.processed == 4, summary
    finally:
        ctx.close()
    sandbox.set_faults(error_500=0.0, rate_429=0.0)
    assert outcome_problems(env, scenario) == []


def test_retries_exhausted_leave_the_mail_failed_in_the_inbox(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = bulk_scenario(1, seed=9)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw])
    sandbox.set_faults(error_500=1.0)
    ctx = build_context(load_settings(env | {"MAILINGEST_MAX_ATTEMPTS": "3"}))
    try:
        summary = poll_once(ctx)
        assert not summary.ok and summary.failed == 1
        (record,) = ctx.ledger.mails([L.FAILED])
        assert "gave up after retries" in record.reason and "500" in record.reason
        assert folder_counts(imap, "INBOX")["INBOX"] == 1  # never lost, never moved
        sandbox.set_faults(error_500=0.0)
        from mailingest.application.pipeline import replay
        from mailingest.application.poll_once import run_steps

        run_steps(ctx, replay(ctx, record.id))
        assert ctx.ledger.mail(record.id).state == L.DONE  # type: ignore[union-attr]
        assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 1}
    finally:
        ctx.close()


def test_a_backlog_waits_in_the_mailbox_not_in_redis(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """Back pressure: a poll takes new mail only while fewer than POLL_LIMIT are in flight."""
    from mailingest.application.poll_once import run_steps

    scenario = bulk_scenario(6, seed=12)  # six mails and the stranger
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    ctx = build_context(load_settings(env | {"MAILINGEST_POLL_LIMIT": "3"}))
    try:
        first = poll(ctx, "default")
        assert first.found == 3 and ctx.ledger.in_flight("default") == 3
        assert poll(ctx, "default").found == 0  # the window is full: nothing more staged
        assert len(list(ctx.redis.scan_iter("mailingest:raw:*"))) == 3
        run_steps(ctx, first.steps)  # the three are decided and moved
        assert ctx.ledger.in_flight("default") == 0
        second = poll(ctx, "default")
        assert second.found == 3
        run_steps(ctx, second.steps)
        third = poll(ctx, "default")
        assert third.found == 1
        run_steps(ctx, third.steps)
        assert outcome_problems(env, scenario) == []
        assert folder_counts(imap, "INBOX") == {"INBOX": 0}
    finally:
        ctx.close()


def test_a_describe_waits_its_turn_before_its_attempt_is_recorded(
    env: dict[str, str], imap: ImapServer, senders_file: Path
) -> None:
    """A describe must be sent within SEND_GUARD of recording its attempt (others count
    its window from that record). So its wait for a token, or out another worker's 429,
    comes before the record, and none after it."""
    scenario = bulk_scenario(1, seed=9)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw])
    documents = len(scenario.expected_documents)
    ctx = build_context(load_settings(env | {"MAILINGEST_ALLOY_RATE": "1000"}))
    events: list[str] = []
    wait_turn, begin_attempt = ctx.alloy.wait_turn, ctx.ledger.begin_attempt

    def waiting(operation: str) -> None:
        events.append(f"turn {operation}")
        wait_turn(operation)

    def recording(*args: object, **kw: object) -> object:
        events.append("attempt")
        return begin_attempt(*args, **kw)  # type: ignore[arg-type]

    ctx.alloy.wait_turn = waiting  # type: ignore[method-assign]
    ctx.ledger.begin_attempt = recording  # type: ignore[assignment,method-assign]
    try:
        assert poll_once(ctx).processed == 1
    finally:
        ctx.close()
    assert events.count("attempt") == documents
    for at in (i for i, e in enumerate(events) if e == "attempt"):
        assert events[at - 1] == "turn describe", events
        assert events[at + 1] != "turn describe", events  # the POST waits no more
    assert events.count("turn describe") == documents
