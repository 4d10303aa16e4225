"""End to end through real Celery worker and beat processes, on Redis, IMAP and the sandbox."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from celery import Celery
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import bulk_scenario, demo_scenario
from mailingest_testbed.servers import CeleryProcess, ImapServer

from mailingest.adapters import ledger as L
from mailingest.adapters.ledger import Ledger
from mailingest.application.pipeline import Step
from mailingest.application.services import connect_redis

from .helpers import (
    deliver,
    folder_counts,
    outcome_problems,
    seen_flags,
    wait_decided,
    write_senders,
)

pytestmark = pytest.mark.servers


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
        assert ledger.counts()[L.DONE] == len(scenario.mails) - 3
    assert outcome_problems(env, scenario) == []
    quarantined = sorted(
        (r.sender, r.reason.split(":")[0]) for r in records if r.state == L.QUARANTINED
    )
    assert quarantined == [
        ("alice.martin@example.com", "sender not authenticated"),  # the forged From:
        ("mallory@unknown.example", "unknown sender mallory@unknown.example"),
        ("stranger@elsewhere.example", "unknown sender stranger@elsewhere.example"),
    ]
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 0,
        "Processed": len(scenario.mails) - 3,
        "Quarantine": 3,
    }
    assert not any(seen_flags(imap, "Processed"))
    documents = len(scenario.expected_documents)
    assert stats_after["uploaded"] == stats_after["documents"] == documents
    log_text = (tmp_path / "worker.log").read_text()
    assert "mailingest.upload_document" in log_text
    for secret in ("MAILINGEST_IMAP_PASSWORD", "MAILINGEST_ALLOY_TOKEN", "MAILINGEST_ALLOY_SECRET"):
        assert env[secret] not in log_text, secret


def test_sigterm_lets_the_upload_in_flight_finish(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    senders_file: Path,
    tmp_path: Path,
) -> None:
    """Warm shutdown: SIGTERM (what `docker stop` sends) while Alloy takes its time
    with an upload; the worker finishes that upload and records it before it exits."""
    scenario = bulk_scenario(1, seed=51)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw])
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | env
    child_env["MAILINGEST_ALLOY_READ_TIMEOUT"] = "30"
    worker = CeleryProcess("worker", child_env, tmp_path / "worker.log", ["--concurrency", "1"])
    ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
    with worker:
        sandbox.set_faults(latency_ms=3000)
        client = Celery(broker=env["MAILINGEST_REDIS_URL"])  # a bare client, as ops would
        client.send_task("mailingest.poll_inbox", args=["default"])
        client.close()
        mail_id = ""
        deadline = time.monotonic() + 30
        while not mail_id and time.monotonic() < deadline:
            ids = ledger.mail_ids(L.DOCUMENTS_PENDING)
            mail_id = ids[0] if ids else ""
            time.sleep(0.05)
        step = Step("ingest", mail_id)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            doc = ledger.document(step.mail_id, 0)
            if doc is not None and doc.token:
                break
            time.sleep(0.05)
        assert doc is not None and doc.token, "the describe did not happen"
        time.sleep(1.0)  # the upload is now waiting on the slow sandbox
        assert ledger.document(step.mail_id, 0).state == L.DESCRIBED  # type: ignore[union-attr]
        stopped = time.monotonic()
        worker.stop(timeout=30)  # SIGTERM to the main process, then wait
        waited = time.monotonic() - stopped
    assert waited > 1.0  # it did wait for the upload
    assert ledger.document(step.mail_id, 0).state == L.UPLOADED  # type: ignore[union-attr]
    assert sandbox.state.stats()["uploaded"] == 1
