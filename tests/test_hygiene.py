"""No secret and no document byte where it does not belong.

An end-to-end run through a real worker and beat, with planted secrets (the IMAP
password, the Alloy token and secret) and planted document bytes and mail body text,
while every command sent to Redis (broker messages, task arguments, the ledger,
staged bytes) is captured with MONITOR. With MAILINGEST_STAGING_KEY set, the scan
of the Redis traffic, the Redis contents afterwards and the worker and beat logs
finds none of them.
"""

from __future__ import annotations

import base64
import os
import threading
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.samples import AGENT_EMAIL, authentication_results, pdf_bytes
from mailingest_testbed.servers import (
    CeleryProcess,
    RedisServer,
    ServerNotAvailable,
    start_imap_server,
)

from mailingest.adapters import ledger as L
from mailingest.adapters.ledger import Ledger

from .conftest import require_or_skip
from .helpers import deliver, wait_until

pytestmark = pytest.mark.servers

IMAP_PASSWORD = "planted-imap-password-7Q2"
ALLOY_TOKEN = "planted-alloy-token-K9"
ALLOY_SECRET = "planted-alloy-secret-M4"
STAGING_KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()
DOCUMENT_MARK = b"PLANTED-DOCUMENT-BYTES-5b1f"
BODY_MARK = "PLANTED-MAIL-BODY-9c3e"


class Monitor:
    """Every command Redis receives, as text, while it runs."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            for command in monitor.listen():
                self.lines.append(str(command.get("command", "")))
                if self.stop.is_set():
                    return


@pytest.mark.slow
def test_no_secret_or_document_bytes_in_redis_or_logs(tmp_path: Path) -> None:
    try:
        imap = start_imap_server(
            tmp_path / "imap",
            os.environ.get("MAILINGEST_TEST_IMAP", "auto"),
            password=IMAP_PASSWORD,
        )
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    redis_server = RedisServer(tmp_path / "redis").start()
    sandbox = SandboxServer(token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL]).start()
    monitor = Monitor(redis_server.url)
    monitor.thread.start()
    sender, entity = "erin@example.com", "P-erinErinErinErinErin"
    senders = tmp_path / "senders.csv"
    senders.write_text(f"email,entity_token\n{sender},{entity}\n", encoding="utf-8")
    document = pdf_bytes("planted", 4000)[:-6] + DOCUMENT_MARK + b"\n%%EOF"
    msg = EmailMessage()
    msg["Authentication-Results"] = authentication_results(sender)
    msg["From"], msg["Subject"], msg["Message-ID"] = sender, "licence", "<hygiene@x>"
    msg.set_content(f"Hello, here is my licence. {BODY_MARK}")
    msg.add_attachment(
        document, maintype="application", subtype="pdf", filename="driver_license.pdf"
    )
    account = imap.account
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
    env |= local_environment(
        redis_server.url,
        account,
        sandbox.url,
        senders,
        alloy_token=ALLOY_TOKEN,
        alloy_secret=ALLOY_SECRET,
        poll_interval="1",
        staging_key=STAGING_KEY,
        log_level="debug",
    )
    worker = CeleryProcess(
        "worker", env, tmp_path / "worker.log", ["--concurrency", "1", "--loglevel", "DEBUG"]
    )
    beat = CeleryProcess("beat", env, tmp_path / "beat.log")
    try:
        with worker, beat:
            deliver(imap, [msg.as_bytes()])
            ledger = Ledger(redis.Redis.from_url(redis_server.url))
            wait_until(lambda: any(r.filed_to for r in ledger.mails([L.DONE])), 60, "filed")
            assert [r.filed_to for r in ledger.mails([L.DONE])] == ["Processed"]
        monitor.stop.set()
        redis.Redis.from_url(redis_server.url).ping()  # wakes the monitor to see the stop
        monitor.thread.join(10)
        client = redis.Redis.from_url(redis_server.url)
        stored = [repr(client.dump(key)) for key in client.scan_iter("*")]
    finally:
        imap.stop()
        redis_server.stop()
        sandbox.stop()
    (doc,) = sandbox.state.list(entity)
    assert DOCUMENT_MARK in sandbox.state.download(entity, doc["document_token"])
    assert len(monitor.lines) > 100  # the capture saw the traffic
    assert any("mailingest.describe_document" in line for line in monitor.lines)
    logs = (tmp_path / "worker.log").read_text() + (tmp_path / "beat.log").read_text()
    planted = [
        IMAP_PASSWORD,
        ALLOY_TOKEN,
        ALLOY_SECRET,
        STAGING_KEY,
        BODY_MARK,
        DOCUMENT_MARK.decode(),
    ]
    for where, text in (
        ("redis traffic", "\n".join(monitor.lines)),
        ("redis contents", "\n".join(stored)),
        ("logs", logs),
    ):
        found = [p for p in planted if p in text]
        assert found == [], f"{found} in {where}"
