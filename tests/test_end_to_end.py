"""End to end through real Celery worker and beat processes, on Redis, IMAP and the sandbox."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mailingest import ledger as L
from mailingest.embedded import CeleryProcess, ImapServer
from mailingest.ledger import Ledger
from mailingest.runtime import connect_redis
from mailingest.samples import bulk_scenario, demo_scenario
from mailingest.sandbox import SandboxServer

from .helpers import deliver, folder_counts, outcome_problems, seen_flags, write_senders

pytestmark = pytest.mark.servers


def wait_decided(ledger: Ledger, count: int, timeout: float = 120) -> list[L.MailRecord]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = ledger.mails(L.MAIL_STATES)
        if sum(1 for r in records if r.state in L.DECIDED and r.filed_to) >= count:
            return records
        time.sleep(0.2)
    raise AssertionError(f"not decided in {timeout}s: {ledger.counts()}")


def test_worker_and_beat_ingest_every_document(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    senders_file: Path,
    tmp_path: Path,
) -> None:
    scenario = bulk_scenario(24, seed=21)
    demo = demo_scenario(seed=22)
    scenario.senders.update(demo.senders)
    scenario.mails += demo.mails
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | env
    worker = CeleryProcess("worker", child_env, tmp_path / "worker.log", ["--concurrency", "2"])
    beat = CeleryProcess("beat", child_env, tmp_path / "beat.log")
    with worker, beat:
        ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
        records = wait_decided(ledger, len(scenario.mails))
        stats_after = sandbox.state.stats()
        polled = ledger.poll_status("default")["at"]
        deadline = time.monotonic() + 30
        while ledger.poll_status("default")["at"] == polled and time.monotonic() < deadline:
            time.sleep(0.2)
        second = ledger.poll_status("default")
        assert second["at"] != polled and second["found"] == "0" and not second["error"]
        assert sandbox.state.stats()["requests_total"] == stats_after["requests_total"]
        assert ledger.counts()[L.DONE] == len(scenario.mails) - 2
    assert outcome_problems(env, scenario) == []
    quarantined = [r for r in records if r.state == L.QUARANTINED]
    assert sorted(r.sender for r in quarantined) == [
        "mallory@unknown.example",
        "stranger@elsewhere.example",
    ]
    assert all(r.reason.startswith("unknown sender") for r in quarantined)
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 0,
        "Processed": len(scenario.mails) - 2,
        "Quarantine": 2,
    }
    assert not any(seen_flags(imap, "Processed"))
    documents = len(scenario.expected_documents)
    assert stats_after["uploaded"] == stats_after["documents"] == documents
    log_text = (tmp_path / "worker.log").read_text()
    assert "mailingest.upload_document" in log_text
    for secret in ("MAILINGEST_IMAP_PASSWORD", "MAILINGEST_ALLOY_TOKEN", "MAILINGEST_ALLOY_SECRET"):
        assert env[secret] not in log_text, secret
