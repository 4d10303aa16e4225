"""Run as in production: two inboxes from one TOML file, a worker and beat, /metrics scraped.

Two IMAP servers (two support desks), one sender directory per desk that maps
the same addresses to different entities, a note and agent per desk. The worker
serves Prometheus metrics; after the run they must count exactly what happened.
"""

from __future__ import annotations

import base64
import contextlib
import email
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from celery import Celery
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import AGENT_EMAIL, AUTHSERV_ID, bulk_scenario
from mailingest_testbed.servers import (
    CeleryProcess,
    ImapServer,
    ServerNotAvailable,
    free_port,
    start_imap_server,
)
from prometheus_client.parser import text_string_to_metric_families

from mailingest.adapters.ledger import Ledger
from mailingest.application.metrics import METRICS
from mailingest.application.services import connect_redis
from mailingest.config.settings import DEFAULT_NOTE

from .conftest import ALLOY_SECRET, ALLOY_TOKEN, require_or_skip
from .helpers import deliver, folder_counts, outcome_problems, wait_decided, wait_until

pytestmark = pytest.mark.servers

US_AGENT = "us.desk@support.example"
US_NOTE = "Sent in by e-mail to the US desk"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@pytest.mark.slow
def test_two_inboxes_from_one_file_end_to_end_with_metrics(
    redis_url: str, imap: ImapServer, tmp_path: Path
) -> None:
    try:
        us_imap = start_imap_server(
            tmp_path / "imap-us",
            os.environ.get("MAILINGEST_TEST_IMAP", "auto"),
            user="us-desk",
            password="us-desk-password",
        )
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    sandbox = SandboxServer(
        token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL, US_AGENT]
    ).start()
    try:
        eu, us = bulk_scenario(7, seed=71), bulk_scenario(5, seed=72)
        # the same addresses, other customers: each desk has its own directory
        assert set(eu.senders) == set(us.senders) and eu.senders != us.senders
        (tmp_path / "eu.csv").write_text(eu.senders_csv(), encoding="utf-8")
        (tmp_path / "us.csv").write_text(us.senders_csv(), encoding="utf-8")
        (tmp_path / "us-password").write_text(us_imap.account.password + "\n")
        config = tmp_path / "mailingest.toml"
        config.write_text(
            f"""\
redis_url = "{redis_url}"
alloy_url = "{sandbox.url}"
alloy_token = "{ALLOY_TOKEN}"
alloy_secret = "{ALLOY_SECRET}"
alloy_rate = 200
trusted_authserv_id = "{AUTHSERV_ID}"
imap_security = "plain"
imap_host = "127.0.0.1"
agent_email = "{AGENT_EMAIL}"
poll_interval = 1
retry_base = 0.05
retry_cap = 0.5

[[inboxes]]
name = "eu"
imap_port = {imap.account.port}
imap_user = "{imap.account.user}"
imap_password = "{imap.account.password}"
senders_file = "eu.csv"

[[inboxes]]
name = "us"
imap_port = {us_imap.account.port}
imap_user = "{us_imap.account.user}"
imap_password_file = "us-password"
senders_file = "us.csv"
agent_email = "{US_AGENT}"
note = "{US_NOTE}"
processed_folder = "Filed"
""",
            encoding="utf-8",
        )
        metrics_port = free_port()
        env = {
            "MAILINGEST_CONFIG": str(config),
            "MAILINGEST_METRICS_PORT": str(metrics_port),
            "MAILINGEST_LOG_FORMAT": "json",
        }
        deliver(imap, [m.raw for m in eu.mails])
        deliver(us_imap, [m.raw for m in us.mails])
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
        worker = CeleryProcess(
            "worker", child_env | env, tmp_path / "worker.log", ["--concurrency", "2"]
        )
        beat = CeleryProcess("beat", child_env | env, tmp_path / "beat.log")
        ledger = Ledger(connect_redis(redis_url))
        with worker, beat:
            wait_decided(ledger, len(eu.mails) + len(us.mails))
            samples = scrape(metrics_port)
            stats = sandbox.state.stats()

        url_env = {"MAILINGEST_REDIS_URL": redis_url, "MAILINGEST_ALLOY_URL": sandbox.url}
        assert outcome_problems(url_env, eu) == []
        assert outcome_problems(url_env, us, agent_email=US_AGENT, note_text=US_NOTE) == []
        assert DEFAULT_NOTE != US_NOTE
        assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
            "INBOX": 0,
            "Processed": len(eu.mails) - 1,
            "Quarantine": 1,  # the stranger
        }
        assert folder_counts(us_imap, "INBOX", "Filed", "Quarantine") == {
            "INBOX": 0,
            "Filed": len(us.mails) - 1,
            "Quarantine": 1,
        }

        # the metrics count exactly what happened, per inbox
        names = {name for name, _ in samples}
        for metric in METRICS:
            assert any(n.startswith(metric) for n in names), (metric, sorted(names))
        for name, scenario in (("eu", eu), ("us", us)):
            assert total(samples, "mailingest_mails_seen_total", inbox=name) == len(scenario.mails)
            assert total(samples, "mailingest_mails_processed_total", inbox=name) == (
                len(scenario.mails) - 1
            )
            assert (
                total(
                    samples,
                    "mailingest_mails_quarantined_total",
                    inbox=name,
                    reason="unknown_sender",
                )
                == 1
            )
            assert total(samples, "mailingest_mails_failed_total", inbox=name) == 0
            assert total(samples, "mailingest_imap_poll_seconds_count", inbox=name) >= 1
            assert total(samples, "mailingest_backlog_mails", inbox=name) == 0
            assert total(samples, "mailingest_oldest_unprocessed_seconds", inbox=name) == 0
        documents = eu.expected_documents + us.expected_documents
        assert total(samples, "mailingest_documents_described_total") == len(documents)
        assert total(samples, "mailingest_documents_uploaded_total") == len(documents)
        assert total(samples, "mailingest_upload_bytes_total") == sum(
            len(d.payload) for d in documents
        )
        assert stats["uploaded"] == len(documents)
        describe = "/entities/{entity}/documents"
        assert total(
            samples, "mailingest_alloy_responses_total", method="POST", endpoint=describe
        ) == len(documents)
        assert total(samples, "mailingest_alloy_request_seconds_count", method="PUT") == len(
            documents
        )
        # every request the sandbox saw was timed and counted, nothing more
        assert total(samples, "mailingest_alloy_responses_total") == stats["requests_total"]

        # JSON logs: each upload can be traced to its mail and document, across processes
        records = [
            json.loads(line)
            for line in (tmp_path / "worker.log").read_text().splitlines()
            if line.startswith("{")
        ]
        uploads = [r for r in records if " uploaded (" in r["message"]]
        assert len(uploads) == len(documents)
        message_ids = {
            email.message_from_bytes(m.raw)["Message-ID"].strip("<>") for m in eu.mails + us.mails
        }
        for record in uploads:
            assert (
                record["logger"] == "mailingest.application.pipeline" and record["level"] == "INFO"
            )
            # a describe goes on with its upload in the same task (decisions.chained)
            assert record["task_name"] in (
                "mailingest.describe_document",
                "mailingest.upload_document",
            )
            assert record["task_id"]
            assert record["mail_id"].startswith(record["inbox"] + "/INBOX/")
            assert record["mail_id"].endswith(f"/{record['uid']}")
            assert record["message_id"] in message_ids
            assert record["document_token"] in record["message"]
            assert isinstance(record["document"], int)
        assert {r["inbox"] for r in uploads} == {"eu", "us"}
        text = (tmp_path / "worker.log").read_text()
        for secret in (ALLOY_SECRET, imap.account.password, us_imap.account.password):
            assert secret not in text
    finally:
        sandbox.stop()
        us_imap.stop()


@pytest.mark.slow
def test_flower_shows_every_task_with_readable_harmless_arguments_and_serves_metrics(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    senders_file: Path,
    tmp_path: Path,
) -> None:
    pytest.importorskip("flower")  # the [flower] extra, installed by ./dev
    scenario = bulk_scenario(2, seed=81)
    senders_file.write_text(scenario.senders_csv(), encoding="utf-8")
    deliver(imap, [m.raw for m in scenario.mails])
    port = free_port()
    auth = "ops:flower-pass-9"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | env
    child_env["MAILINGEST_TASK_EVENTS"] = "on"  # where Flower runs (off, it shows nothing)
    worker = CeleryProcess("worker", child_env, tmp_path / "worker.log", ["--concurrency", "2"])
    flower = CeleryProcess(
        "flower",
        child_env | {"FLOWER_BASIC_AUTH": auth},
        tmp_path / "flower.log",
        [f"--port={port}", "--address=127.0.0.1"],
    )
    base = f"http://127.0.0.1:{port}"
    header = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}

    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    with flower, worker:

        def flower_up() -> bool:
            with contextlib.suppress(OSError):
                return get("/healthcheck")[0] == 200
            return False

        wait_until(flower_up, 30, "Flower answering /healthcheck")
        client = Celery(broker=env["MAILINGEST_REDIS_URL"])
        client.send_task("mailingest.poll_inbox", args=["default"])
        client.close()
        expected = {  # polls send no task events (tests/test_flower.py)
            "mailingest.ingest_message": 3,  # two known senders and the stranger
            # each describe goes on with its upload and, for a mail's last document,
            # the move (decisions.chained); the stranger's quarantine is moved on its own
            "mailingest.describe_document": len(scenario.expected_documents),
            "mailingest.finish_message": 1,
        }

        def all_seen() -> dict[str, dict[str, object]]:
            status, body = get("/api/tasks", header)
            tasks = json.loads(body) if status == 200 else {}
            names = [str(t["name"]) for t in tasks.values() if t.get("state") == "SUCCESS"]
            return tasks if all(names.count(n) >= c for n, c in expected.items()) else {}

        tasks = wait_until(all_seen, 60, f"Flower showing {expected}")
        assert get("/api/tasks")[0] == 401  # basic auth is required
        metrics_status, metrics_body = get("/metrics", header)
    mail_id = r"'default/INBOX/\d+/\d+'"
    readable = re.compile(rf"^[([]('default'|{mail_id}),?( \d+)?[)\]]$")
    for task in tasks.values():
        assert readable.match(str(task["args"])), task["args"]
        assert task["kwargs"] in ("{}", {}), task["kwargs"]
    assert metrics_status == 200
    assert b'flower_events_total{task="mailingest.describe_document"' in metrics_body
