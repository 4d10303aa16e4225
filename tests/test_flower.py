"""Flower tells the truth (issue 15, part 0), read from a real Flower beside a real
worker and beat, with Redis behind a password: a mail that ran out of tries shows as a
FAILURE with its reason, a quarantined mail's move says so, polls do not bury the mail
tasks, no page shows the password, and nothing answers without the login."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import Faults, SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.samples import AGENT_EMAIL, bulk_scenario
from mailingest_testbed.servers import CeleryProcess, ImapServer, RedisServer, free_port

from .conftest import ALLOY_SECRET, ALLOY_TOKEN
from .helpers import deliver, wait_until

pytestmark = [pytest.mark.servers, pytest.mark.slow]

REDIS_PASSWORD = "flower-must-not-show-9Qx"
LOGIN = "ops:flower-login-7"


def test_flower_shows_failed_and_quarantined_mails_as_such_and_no_secret(
    imap: ImapServer, tmp_path: Path
) -> None:
    pytest.importorskip("flower")  # the [flower] extra, installed by ./dev and CI
    redis_server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD).start()
    # Alloy answers 500 to everything: the known customer's mail runs out of tries
    sandbox = SandboxServer(
        token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL], faults=Faults(error_500=1.0)
    ).start()
    scenario = bulk_scenario(1, seed=5)  # one customer's mail and the stranger's
    senders_file = tmp_path / "senders.csv"
    senders_file.write_text(scenario.senders_csv(), encoding="utf-8")
    deliver(imap, [m.raw for m in scenario.mails])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
    env |= local_environment(
        redis_server.url,
        imap.account,
        sandbox.url,
        senders_file,
        alloy_token=ALLOY_TOKEN,
        alloy_secret=ALLOY_SECRET,
        poll_interval="1",
        retry_base="0.05",
        retry_cap="0.2",
        max_attempts="2",
        failed_retry_after="3600",  # the failed mail stays failed for this test
        task_events="on",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Basic " + base64.b64encode(LOGIN.encode()).decode()}

    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=15) as answer:
                return answer.status, answer.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    worker = CeleryProcess("worker", env, tmp_path / "worker.log", ["--concurrency", "2"])
    beat = CeleryProcess("beat", env, tmp_path / "beat.log")
    flower = CeleryProcess(
        "flower",
        env | {"FLOWER_BASIC_AUTH": LOGIN},
        tmp_path / "flower.log",
        [f"--port={port}", "--address=127.0.0.1"],
    )
    try:
        with flower, worker, beat:

            def flower_up() -> bool:
                with contextlib.suppress(OSError):
                    return get("/healthcheck")[0] == 200
                return False

            wait_until(flower_up, 30, "Flower answering /healthcheck")

            def decided() -> dict[str, dict[str, object]]:
                status, body = get("/api/tasks", auth)
                tasks: dict[str, dict[str, object]] = json.loads(body) if status == 200 else {}
                states = {str(t.get("state")) for t in tasks.values()}
                quarantined = any("quarantined" in str(t.get("result")) for t in tasks.values())
                return tasks if "FAILURE" in states and quarantined else {}

            tasks = wait_until(decided, 90, "Flower showing a FAILURE and a quarantine")
            assert get("/api/tasks")[0] == 401  # nothing without the login
            assert get("/")[0] == 401
            _, workers = get("/api/workers?refresh=1", auth)
            worker_name = next(iter(json.loads(workers)), "")
            _, worker_page = get(f"/worker/{worker_name}", auth)
            pages = [workers, worker_page, get("/tasks", auth)[1], json.dumps(tasks)]
    finally:
        redis_server.stop()
        sandbox.stop()

    failures = [t for t in tasks.values() if t.get("state") == "FAILURE"]
    assert failures, tasks
    assert all("gave up after retries" in str(t.get("exception")) for t in failures), failures
    quarantine = [t for t in tasks.values() if "quarantined" in str(t.get("result"))]
    assert [str(t["result"]) for t in quarantine] == ["'quarantined: unknown_sender -> Quarantine'"]
    names = {str(t.get("name")) for t in tasks.values()}
    assert not names & {"mailingest.poll_inbox", "mailingest.sweep_inbox"}, names
    assert "redbeat_redis_url" in workers  # the configuration is shown ...
    for page in pages:
        assert REDIS_PASSWORD not in page  # ... without the password
        assert ALLOY_SECRET not in page and imap.account.password not in page
    assert "********" in workers
