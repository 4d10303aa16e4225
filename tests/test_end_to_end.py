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
    wait_until,
    write_senders,
)

pytestmark = pytest.mark.servers


@pytest.mark.slow
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
        wait_until(lambda: ledger.poll_status("default")["at"] != polled, 30, "a second poll")
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
    assert "mailingest.describe_document" in log_text
    for secret in ("MAILINGEST_IMAP_PASSWORD", "MAILINGEST_ALLOY_TOKEN", "MAILINGEST_ALLOY_SECRET"):
        assert env[secret] not in log_text, secret


def described(ledger: Ledger, mail_id: str) -> bool:
    doc = ledger.document(mail_id, 0)
    return doc is not None and bool(doc.token)


@pytest.mark.slow
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
        sandbox.set_faults(latency_ms=5000)
        client = Celery(broker=env["MAILINGEST_REDIS_URL"])  # a bare client, as ops would
        client.send_task("mailingest.poll_inbox", args=["default"])
        client.close()
        mail_id = wait_until(
            lambda: next(iter(ledger.mail_ids(L.DOCUMENTS_PENDING)), ""), 30, "the mail recorded"
        )
        step = Step("ingest", mail_id)
        wait_until(lambda: described(ledger, step.mail_id), 30, "the describe")
        upload = f"mailingest:lock:step:upload:{step.mail_id}:0"
        wait_until(lambda: ledger.redis.exists(upload), 30, "the upload running on the worker")
        # the upload now waits on the slow sandbox (5 s): SIGTERM lands in the middle of it
        assert ledger.document(step.mail_id, 0).state == L.DESCRIBED  # type: ignore[union-attr]
        stopped = time.monotonic()
        worker.stop(timeout=30)  # SIGTERM to the main process, then wait
        waited = time.monotonic() - stopped
    assert waited > 1.0  # it did wait for the upload
    assert ledger.document(step.mail_id, 0).state == L.UPLOADED  # type: ignore[union-attr]
    assert sandbox.state.stats()["uploaded"] == 1


@pytest.mark.slow
def test_a_worker_killed_mid_upload_frees_its_mail_within_a_minute(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    senders_file: Path,
    tmp_path: Path,
) -> None:
    """kill -9 of a whole worker (main process and pool) while its upload waits on a slow
    Alloy: the task stays unacknowledged in Redis for the visibility timeout and the
    backstop (STALE_AFTER) is ten minutes, so only the lapsed lease can bring the mail
    back. It does, within a minute, through beat's sweep; the document is uploaded once."""
    scenario = bulk_scenario(1, seed=52)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw])
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | env
    child_env |= {
        "MAILINGEST_ALLOY_READ_TIMEOUT": "30",
        "MAILINGEST_LEASE": "3",
        "MAILINGEST_STALE_AFTER": "600",
        "MAILINGEST_VISIBILITY_TIMEOUT": "3600",
        "MAILINGEST_POLL_INTERVAL": "30",  # polls are rare: the sweep runs every lease
    }
    first = CeleryProcess("worker", child_env, tmp_path / "worker1.log", ["--concurrency", "1"])
    second = CeleryProcess("worker", child_env, tmp_path / "worker2.log", ["--concurrency", "1"])
    beat = CeleryProcess("beat", child_env, tmp_path / "beat.log")
    ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
    sandbox.set_faults(latency_ms=10_000)  # every request waits on Alloy
    with beat:
        first.start()
        try:
            mail_id = wait_until(
                lambda: next(iter(ledger.mail_ids(L.DOCUMENTS_PENDING)), ""), 60, "the mail"
            )
            upload = f"mailingest:lock:step:upload:{mail_id}:0"
            wait_until(lambda: ledger.redis.exists(upload), 90, "the upload's lease")
            time.sleep(4)  # longer than a lease: the heartbeat renews it
            assert ledger.redis.exists(upload), "a running step's lease lapsed"
        finally:
            first.kill()  # SIGKILL to the worker's process group
        killed = time.monotonic()
        sandbox.set_faults(latency_ms=0)
        with second:
            record = wait_until(
                lambda: (r := ledger.mail(mail_id)) and r.filed_to and r,
                120,
                "the mail filed after the kill",
            )
            recovered = time.monotonic() - killed
    print(f"filed {recovered:.1f} s after the kill (lease 3 s, sweep every 3 s)")
    assert record.state == L.DONE and record.filed_to == "Processed"
    assert recovered < 60, f"the mail moved again only {recovered:.0f} s after the kill"
    assert "stalled in documents_pending" in (tmp_path / "worker2.log").read_text()
    stats = sandbox.state.stats()
    assert stats["documents"] == stats["uploaded"] == len(scenario.expected_documents)


@pytest.mark.slow
def test_network_steps_run_on_a_thread_pool_worker_and_parsing_on_prefork(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    senders_file: Path,
    tmp_path: Path,
) -> None:
    """The deployment of docker-compose.yml: a prefork worker on queue "celery" (poll,
    ingest, sweep) and a thread-pool worker on "io" (describe, upload, move), with Alloy
    answering every request after 1 s. Each kind of task runs where it belongs and every
    document is at Alloy once."""
    scenario = bulk_scenario(6, seed=53)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | env
    cpu = CeleryProcess(
        "worker", child_env, tmp_path / "cpu.log", ["--concurrency", "1", "--queues", "celery"]
    )
    io = CeleryProcess(
        "worker",
        child_env,
        tmp_path / "io.log",
        ["--pool", "threads", "--concurrency", "8", "--queues", "io"],
    )
    beat = CeleryProcess("beat", child_env, tmp_path / "beat.log")
    sandbox.set_faults(latency_ms=1000)
    with cpu, io, beat:
        ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
        records = wait_decided(ledger, len(scenario.mails))
    assert L.DONE in {r.state for r in records}
    assert outcome_problems(env, scenario) == []  # each mail where the scenario expects it
    stats = sandbox.state.stats()
    assert stats["documents"] == stats["uploaded"] == len(scenario.expected_documents)
    cpu_log, io_log = (tmp_path / "cpu.log").read_text(), (tmp_path / "io.log").read_text()
    # describe tasks (which go on with their upload, and with the move of a mail's last
    # document) and any upload or move queued on its own run on the thread pool
    assert "mailingest.describe_document[" in io_log
    for task in ("describe_document", "upload_document", "finish_message"):
        assert f"mailingest.{task}[" not in cpu_log, task
    for line in ("document 0 uploaded (", "moved to Processed"):
        assert line in io_log and line not in cpu_log, line
    for task in ("poll_inbox", "ingest_message"):
        assert f"mailingest.{task}[" in cpu_log and f"mailingest.{task}[" not in io_log, task
