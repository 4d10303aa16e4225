"""IMAP IDLE (`mailingest watch`) against a real Dovecot: new mail, a kick, a silent drop.

The watcher's notify records when it was called; the tests deliver mail or
break the connection and wait for the notification. No test asserts a speed
(the benchmark measures latency); each waits with a generous deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import bulk_scenario
from mailingest_testbed.servers import CeleryProcess, ImapServer

from mailingest.adapters import ledger as L
from mailingest.adapters.imap import Mailbox
from mailingest.adapters.ledger import Ledger
from mailingest.application import pipeline
from mailingest.application.services import build_context, connect_redis
from mailingest.application.watch import InboxWatcher, _new_mail, _said_bye
from mailingest.config.settings import InboxSettings, load_settings

from .conftest import require_or_skip
from .helpers import (
    deliver,
    dovecot_without,
    inbox_settings,
    outcome_problems,
    wait_decided,
    wait_until,
)
from .proxy import Proxy

pytestmark = pytest.mark.servers


class Recorder:
    """The watcher's notify: counts calls, wakes waiters."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.changed = threading.Condition()

    def __call__(self, inbox: str) -> None:
        with self.changed:
            self.calls.append(inbox)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.calls) >= count, timeout):
                raise AssertionError(f"{len(self.calls)} notification(s), expected {count}")


def watch(
    inbox: InboxSettings,
    recorder: Recorder,
    *,
    renew: float = 60.0,
    timeout: float = 5.0,
    mailbox: type[Mailbox] = Mailbox,
):
    stop = threading.Event()
    watcher = InboxWatcher(
        inbox, lambda: mailbox(inbox, timeout=timeout), recorder, stop, renew=renew
    )
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    return watcher, stop, thread


def message(n: int) -> bytes:
    return f"From: a@example.com\r\nSubject: {n}\r\nMessage-ID: <{n}@t>\r\n\r\nhello\r\n".encode()


@pytest.mark.slow  # seconds: left out of ./dev test --quick
def test_new_mail_is_noticed_while_idling(imap: ImapServer) -> None:
    recorder = Recorder()
    watcher, stop, thread = watch(inbox_settings(imap.account), recorder)
    try:
        recorder.wait_for(1)  # the catch-up notification after connecting
        assert watcher.idle_supported and watcher.sessions == 1
        for n in range(2, 5):
            deliver(imap, [message(n)])
            recorder.wait_for(n)  # one per delivery: the server said EXISTS
        assert watcher.sessions == 1  # no reconnection was needed for any of it
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()  # stop is seen within about a second


@pytest.mark.slow
def test_a_kicked_session_reconnects_and_catches_up(imap: ImapServer) -> None:
    if imap.kind != "dovecot":
        require_or_skip("doveadm kick needs Dovecot")
    recorder = Recorder()
    watcher, stop, thread = watch(inbox_settings(imap.account), recorder)
    try:
        recorder.wait_for(1)
        wait_until(lambda: watcher.idling)
        imap.kick()  # type: ignore[attr-defined] # BYE, then the server closes
        wait_until(lambda: watcher.sessions == 2)
        recorder.wait_for(2)  # the catch-up poll after reconnecting
        deliver(imap, [message(1)])
        recorder.wait_for(3)
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before DONE", "before NOOP", "before IDLE"])
def test_mail_that_comes_between_two_idles_is_noticed(imap: ImapServer, when: str) -> None:
    """A mail delivered while IDLE is renewed. The server tells of it in the answer to
    DONE or to NOOP, or in the packet that says ``+ idling``, not in an IDLE response,
    and the IDLE after has nothing new to say. Each is read (they were once dropped or
    left unread, and such a mail waited for the next renewal or for beat)."""
    recorder = Recorder()
    delivered = threading.Event()
    watcher: InboxWatcher

    class Renewing(Mailbox):
        """The real mailbox; a mail arrives at one point of the first renewal."""

        def _arrive(self, point: str) -> None:
            if point == when and not delivered.is_set():
                watcher.renew = 60.0  # no second renewal to tell of it
                delivered.set()
                deliver(imap, [message(1)])

        def idle_done(self) -> list[tuple[object, ...]]:
            self._arrive("before DONE")
            time.sleep(0.1)  # not yet told inside IDLE (Dovecot waits half a second)
            return super().idle_done()

        def noop(self) -> list[tuple[object, ...]]:
            self._arrive("before NOOP")
            answer = super().noop()
            self._arrive("before IDLE")
            return answer

    watcher, stop, thread = watch(
        inbox_settings(imap.account), recorder, renew=1.0, mailbox=Renewing
    )
    try:
        recorder.wait_for(1)  # the catch-up notification after connecting
        wait_until(delivered.is_set)
        recorder.wait_for(2, timeout=10)  # told by DONE's or NOOP's answer, or with IDLE's
        assert watcher.sessions == 1
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cut", "close"])
def test_a_silently_dropped_connection_is_detected_and_replaced(imap: ImapServer, how: str) -> None:
    """``cut``: the network swallows everything (found at the next renewal, when DONE gets
    no answer within the IMAP timeout). ``close``: the socket is closed without BYE
    (idle_check returns at once with nothing)."""
    proxy = Proxy(imap.account.host, imap.account.port)
    inbox = replace(inbox_settings(imap.account), port=proxy.port)
    recorder = Recorder()
    # a cut shows only when IDLE is renewed; a close must be seen at once, not at renewal
    renew = 1.0 if how == "cut" else 600.0
    watcher, stop, thread = watch(inbox, recorder, renew=renew, timeout=2.0)
    try:
        recorder.wait_for(1)
        wait_until(lambda: watcher.idling)  # break it during IDLE, not before
        getattr(proxy, how)()
        wait_until(lambda: watcher.sessions == 2, timeout=30)
        deliver(imap, [message(1)])
        recorder.wait_for(3)  # the catch-up after reconnecting, then the new mail
        assert proxy.accepted == watcher.sessions  # each connection made became a session
    finally:
        stop.set()
        thread.join(10)
        proxy.stop()


def test_a_server_without_idle_is_left_to_beat(tmp_path: Path) -> None:
    server = dovecot_without(tmp_path, "IDLE")
    try:
        recorder = Recorder()
        watcher, _stop, thread = watch(inbox_settings(server.account), recorder)
        thread.join(20)
        assert not thread.is_alive() and watcher.idle_supported is False
        assert recorder.calls == []  # beat's polling is the fallback
    finally:
        server.stop()


def test_a_poll_asked_for_during_a_poll_makes_it_poll_again(
    env: dict[str, str], imap: ImapServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mail that arrives after the running poll searched is not left to the next tick."""
    ctx = build_context(load_settings(env))
    fetch = pipeline._fetch_new
    nested: list[pipeline.PollResult] = []

    def fetch_while_watch_notifies(*args, **kwargs):  # type: ignore[no-untyped-def]
        nested.append(pipeline.poll(ctx, "default"))  # the watcher's poll meanwhile
        return fetch(*args, **kwargs)

    try:
        monkeypatch.setattr(pipeline, "_fetch_new", fetch_while_watch_notifies)
        first = pipeline.poll(ctx, "default")
        assert nested[0].skipped and first.again
        monkeypatch.setattr(pipeline, "_fetch_new", fetch)
        assert not pipeline.poll(ctx, "default").again  # the request was answered once
    finally:
        ctx.close()


@pytest.mark.slow
def test_watch_command_gets_mail_ingested_without_beat(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    senders_file: Path,
    tmp_path: Path,
) -> None:
    scenario = bulk_scenario(3, seed=91)
    senders_file.write_text(scenario.senders_csv(), encoding="utf-8")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | env
    worker = CeleryProcess("worker", child_env, tmp_path / "worker.log", ["--concurrency", "2"])
    ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
    with worker, open(tmp_path / "watch.log", "wb") as log:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "mailingest", "watch"],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: b"watching INBOX with IDLE" in (tmp_path / "watch.log").read_bytes())
            deliver(imap, [m.raw for m in scenario.mails])  # no beat runs: only IDLE can tell
            records = wait_decided(ledger, len(scenario.mails), timeout=60)
            assert len([r for r in records if r.state in L.DECIDED]) == len(scenario.mails)
        finally:
            watcher.terminate()
            assert watcher.wait(20) == 0  # SIGTERM: a clean stop
    assert outcome_problems(env, scenario) == []
    assert b"new mail; poll queued" in (tmp_path / "watch.log").read_bytes()


def test_what_the_server_said_is_read_without_regard_to_case() -> None:
    """Response names are case-insensitive (RFC 9051 2.2.1); Dovecot writes capitals,
    another server may not. Flags, expunges and OKs are not news of mail."""
    assert _new_mail([(7, b"Recent")]) and _new_mail([(b"OK", b"x"), (3, b"exists")])
    assert not _new_mail([(3, b"EXPUNGE"), (3, b"FETCH", (b"FLAGS", ())), (b"OK", b"exists")])
    assert _said_bye([(b"bye", b"Logging out")]) and not _said_bye([(b"OK", b"BYE")])
