"""Beat, ``watch`` and the workers ride out an outage of Redis or of the IMAP server.

Real processes on private servers: Redis (AOF, ``appendfsync everysec``) is killed with
SIGKILL and started again on the same port; Dovecot is stopped and started again. Each
test checks that the process is still running afterwards, that it does its job again
(a poll reaches the worker, a new mail is ingested), and that its log says in one line
that the outage began and in one line that it ended, without a traceback. The first
tests drive beat's scheduler in this process (fast); the others are ``slow``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.samples import bulk_scenario
from mailingest_testbed.servers import (
    CeleryProcess,
    DovecotServer,
    ImapServer,
    RedisServer,
    ServerNotAvailable,
)

from mailingest.adapters import ledger as L
from mailingest.adapters.ledger import Ledger
from mailingest.application.beat import Scheduler
from mailingest.application.celery_config import celery_config
from mailingest.application.services import connect_redis
from mailingest.config.settings import load_settings

from .conftest import ALLOY_SECRET, ALLOY_TOKEN, require_or_skip
from .helpers import deliver, wait_decided, wait_until

pytestmark = pytest.mark.servers

LOCK = "mailingest:redbeat:lock"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone (it is killed), with AOF as in production."""
    try:
        server = RedisServer(tmp_path / "redis", persist=True).start()
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    yield server
    server.stop()


def environment(
    redis_url: str, imap: ImapServer, sandbox: SandboxServer, senders: Path, **more: str
) -> dict[str, str]:
    settings = local_environment(
        redis_url,
        imap.account,
        sandbox.url,
        senders,
        alloy_token=ALLOY_TOKEN,
        alloy_secret=ALLOY_SECRET,
        **more,
    )
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | settings


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def one_line_each(log: str, began: str, ended: str) -> None:
    """The outage's beginning and its end, one line each, and no traceback."""
    assert "Traceback" not in log, log[-3000:]
    assert log.count(began) == 1, (began, log[-3000:])
    assert log.count(ended) == 1, (ended, log[-3000:])


# -- beat's scheduler, in this process ------------------------------------------------


def scheduler_for(redis_url: str, imap: ImapServer, sandbox: SandboxServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    senders = tmp_path / "senders.csv"
    senders.write_text("email,entity_token\n", encoding="utf-8")
    env = environment(redis_url, imap, sandbox, senders, poll_interval="1")
    app = Celery("outage-test", set_as_current=False)
    app.conf.update(celery_config(load_settings(env)))
    return Scheduler(app=app)


def queued_polls(client: redis.Redis) -> int:
    return int(client.llen("celery"))  # the default queue: beat's polls wait there


def tick_until_sent(scheduler: Scheduler, client: redis.Redis, count: int) -> None:
    """Tick as beat does until ``count`` polls are queued (every 1 s, the poll interval)."""

    def sent() -> bool:
        scheduler.tick()
        return queued_polls(client) >= count

    wait_until(sent, 10, f"{count} poll(s) sent")


def test_a_beat_tick_rides_out_redis_and_sends_again(
    private_redis: RedisServer,
    imap: ImapServer,
    sandbox: SandboxServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    scheduler = scheduler_for(private_redis.url, imap, sandbox, tmp_path)
    client = connect_redis(private_redis.url)
    try:
        tick_until_sent(scheduler, client, 1)
        assert scheduler.lock is not None and client.exists(LOCK)
        time.sleep(1.1)  # AOF everysec: on disk
        private_redis.kill()
        delays = [scheduler.tick() for _ in range(3)]  # stock RedBeat: ConnectionError
        assert all(0 < delay <= 5 for delay in delays), delays
        private_redis.start()  # on its AOF: the schedule and the lock are there again
        assert queued_polls(client) == 1
        scheduler.tick()
        assert queued_polls(client) == 2  # sent at once, by the beat that held the lock
        assert client.exists(LOCK)
        scheduler.close()
        assert not client.exists(LOCK)  # released at the end, as RedBeat does
    finally:
        scheduler.close()
        client.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("mailingest")]
    assert len([line for line in lines if " unreachable (" in line]) == 1, lines
    assert len([line for line in lines if "reachable again after" in line]) == 1, lines
    assert f":{private_redis.port}/0 unreachable (ConnectionError" in "\n".join(lines)


def test_a_beat_whose_lock_expired_in_the_outage_waits_if_another_took_it(
    private_redis: RedisServer,
    imap: ImapServer,
    sandbox: SandboxServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    scheduler = scheduler_for(private_redis.url, imap, sandbox, tmp_path)
    client = connect_redis(private_redis.url)
    try:
        tick_until_sent(scheduler, client, 1)
        private_redis.kill()
        scheduler.tick()
        private_redis.start()
        client.set(LOCK, "another beat", px=60_000)  # the lock expired; another beat took it
        before = queued_polls(client)
        for _ in range(3):
            scheduler.tick()
            time.sleep(0.4)
        assert queued_polls(client) == before  # nothing sent without the lock
        assert scheduler.lock is None
        assert client.get(LOCK) == b"another beat"  # the other one keeps it
        client.delete(LOCK)  # that beat stopped: this one takes over
        tick_until_sent(scheduler, client, before + 1)
        assert scheduler.lock is not None and client.get(LOCK) != b"another beat"
    finally:
        scheduler.close()
        client.close()
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "lost the lock mailingest:redbeat:lock" in messages
    assert "another beat holds the lock" in messages


def test_a_beat_meeting_a_refused_password_does_not_ride_it_out(
    private_redis: RedisServer, imap: ImapServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Only an outage is ridden out: a changed password is a configuration error."""
    scheduler = scheduler_for(private_redis.url, imap, sandbox, tmp_path)
    client = connect_redis(private_redis.url)
    try:
        scheduler.tick()
        client.config_set("requirepass", "a-new-password")
        client.client_kill_filter(skipme=False)  # every connection logs in again
        with pytest.raises(redis.AuthenticationError):
            scheduler.tick()
    finally:
        client.close()
        admin = redis.Redis.from_url(private_redis.url, password="a-new-password")
        admin.config_set("requirepass", "")
        admin.close()
        scheduler.close()


# -- watch's poll sender, in this process ------------------------------------------------


def test_the_poll_sender_holds_polls_while_the_broker_is_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests made while sending fails become one poll per inbox, sent once it works;
    one line when the broker went, one when it is back; IDLE never waits on it."""
    import threading

    from mailingest.application.watch import PollSender

    caplog.set_level(logging.INFO)
    away = threading.Event()
    away.set()
    sent: list[str] = []

    def send(name: str) -> None:
        if away.is_set():
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Refused.")
        sent.append(name)

    stop = threading.Event()
    sender = PollSender(send, stop, broker="the broker (Redis) at redis://127.0.0.1:1/0")
    thread = threading.Thread(target=sender.run, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        for name in ("eu", "us", "eu", "eu"):
            sender.request(name)  # returns at once, whatever the broker does
        assert time.monotonic() - started < 0.4  # not one broker try (0.5-1 s backoff) waited
        wait_until(lambda: sender.outage.away, 5)
        time.sleep(2.5)  # a few tries, each failing
        assert sent == []
        away.clear()
        wait_until(lambda: sorted(sent) == ["eu", "us"], 15, "the held polls sent")
        time.sleep(1.5)
        assert sorted(sent) == ["eu", "us"]  # one poll per inbox, not one per request
    finally:
        stop.set()
        thread.join(5)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([line for line in lines if "unreachable (" in line]) == 1, lines
    assert len([line for line in lines if "reachable again after" in line]) == 1, lines


# -- start-up: a configuration error is not an outage -----------------------------------


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailingest", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_refused_redis_password_stops_worker_and_beat_at_start_up_with_one_line(
    private_redis: RedisServer, imap: ImapServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    admin = connect_redis(private_redis.url)
    admin.config_set("requirepass", "the-right-one")
    admin.close()
    senders = tmp_path / "senders.csv"
    senders.write_text("email,entity_token\n", encoding="utf-8")
    url = f"redis://:not-the-right-one@127.0.0.1:{private_redis.port}/0"
    env = environment(url, imap, sandbox, senders)
    for command in ("worker", "beat"):
        proc = run_cli(env, command)
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr[-2000:])
        assert proc.stderr.splitlines() == [
            f"mailingest: Redis unavailable at redis://:***@127.0.0.1:{private_redis.port}/0 "
            "(AuthenticationError: invalid username-password pair or user is disabled.)"
        ], command
        assert "not-the-right-one" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_worker_started_before_redis_waits_for_it(
    imap: ImapServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Compose and Kubernetes may start a worker before Redis: it waits, as Celery's
    ``broker_connection_retry_on_startup`` says, and starts working once Redis is up."""
    server = RedisServer(tmp_path / "redis", persist=True)  # its port, not started yet
    senders = tmp_path / "senders.csv"
    senders.write_text("email,entity_token\n", encoding="utf-8")
    env = environment(server.url, imap, sandbox, senders)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "mailingest", "worker", "--concurrency", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "Cannot connect to" in text(log_path), 30, "the worker waiting")
        assert worker.poll() is None
        server.start()
        wait_until(lambda: " ready." in text(log_path), 60, "the worker ready")
        poll_now(env)
        wait_until(lambda: "polled inbox default" in text(log_path), 30, "a poll")
    finally:
        worker.terminate()
        worker.wait(30)
        server.stop()


# -- real processes --------------------------------------------------------------------


@pytest.mark.slow
def test_beat_survives_a_redis_restart_and_one_beat_polls_again(
    private_redis: RedisServer, imap: ImapServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Two beats (one holds the lock, one waits) and a worker; Redis is killed for longer
    than the lock's 30 s, so the lock expires in the outage: afterwards both beats still
    run, exactly one of them sends the polls, and they reach the worker again."""
    senders = tmp_path / "senders.csv"
    senders.write_text("email,entity_token\n", encoding="utf-8")
    env = environment(private_redis.url, imap, sandbox, senders, poll_interval="1")
    ledger = Ledger(connect_redis(private_redis.url))
    worker = CeleryProcess("worker", env, tmp_path / "worker.log", ["--concurrency", "1"])
    beats = [CeleryProcess("beat", env, tmp_path / f"beat{i}.log", via_cli=True) for i in (1, 2)]
    try:
        worker.start()
        beats[0].start()
        wait_until(lambda: "Acquired lock" in text(beats[0].log_path), 30, "the lock")
        beats[1].start()  # waits for the lock
        wait_until(lambda: "another beat holds the lock" in text(beats[1].log_path), 30)
        wait_until(lambda: ledger.poll_status("default").get("ok_at"), 30, "a first poll")
        private_redis.kill()
        time.sleep(40)  # longer than the lock (30 s): it expires while Redis is away
        assert all(beat.running() for beat in beats)
        sent_before = [text(b.log_path).count("Sending due task") for b in beats]
        private_redis.start()
        back_ms = int(time.time() * 1000)

        def polled_after_restart() -> int:
            ok_at = int(ledger.poll_status("default").get("ok_at") or 0)
            return ok_at if ok_at > back_ms else 0

        first_poll_ms = wait_until(polled_after_restart, 60, "a poll after the restart")
        print(f"\nfirst poll {(first_poll_ms - back_ms) / 1000:.1f} s after Redis was back")
        time.sleep(5)  # a few more ticks
        assert all(beat.running() for beat in beats), [text(b.log_path)[-2000:] for b in beats]
        assert worker.running()
        sent_after = [
            text(b.log_path).count("Sending due task") - n
            for b, n in zip(beats, sent_before, strict=True)
        ]
        assert sorted(sent_after)[0] == 0 and sorted(sent_after)[1] >= 3, sent_after
    finally:
        for process in (*beats, worker):
            process.stop()
        ledger.redis.close()
    for beat in beats:
        one_line_each(text(beat.log_path), " unreachable (", "reachable again after")


@pytest.mark.slow
def test_a_worker_finishes_the_step_redis_cut_off_and_keeps_consuming(
    private_redis: RedisServer, imap: ImapServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Redis is killed while a step waits on Alloy: once it is back (10 s later) the step
    finishes (its Redis commands waited), the mail is filed, and the next mail, asked for
    after the restart, is ingested too. Without riding it out, the step would fail and the
    mail would wait for the sweep (10 minutes)."""
    scenario = bulk_scenario(2, seed=5)
    senders = tmp_path / "senders.csv"
    senders.write_text(scenario.senders_csv(), encoding="utf-8")
    env = environment(private_redis.url, imap, sandbox, senders, poll_interval="3600")
    ledger = Ledger(connect_redis(private_redis.url))
    worker = CeleryProcess("worker", env, tmp_path / "worker.log", ["--concurrency", "2"])
    first, *rest = scenario.mails
    try:
        worker.start()
        sandbox.set_faults(latency_ms=3000)  # every Alloy request takes 3 s
        deliver(imap, [first.raw])
        poll_now(env)
        wait_until(lambda: ledger.mails((L.DOCUMENTS_PENDING,)), 30, "a describe step")
        time.sleep(1.5)  # inside an Alloy request of the describe step
        private_redis.kill()
        time.sleep(10)
        private_redis.start()
        sandbox.set_faults(latency_ms=0)
        wait_decided(ledger, 1, timeout=90)
        deliver(imap, [m.raw for m in rest])
        poll_now(env)
        wait_decided(ledger, len(scenario.mails), timeout=90)
        assert worker.running()
    finally:
        worker.stop()
        ledger.redis.close()
    log = text(worker.log_path)
    assert "Traceback" not in log, log[-3000:]
    assert log.count("Connection to broker lost") == 1  # the loss, in one line
    assert "worker_cancel_long_running_tasks_on_connection_loss" not in log


def poll_now(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "mailingest", "poll-now"], env=env, check=True, timeout=60
    )


@pytest.mark.slow
def test_polls_failing_while_dovecot_is_down_are_logged_once_and_their_end_once(
    private_redis: RedisServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Beat polls every second; Dovecot is away for a few seconds: every one of those
    polls fails (each tick tries again), the log says it once, and once that a poll
    succeeded again."""
    try:
        dovecot = DovecotServer(tmp_path / "imap").start()
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    senders = tmp_path / "senders.csv"
    senders.write_text("email,entity_token\n", encoding="utf-8")
    env = environment(private_redis.url, dovecot, sandbox, senders, poll_interval="1")
    ledger = Ledger(connect_redis(private_redis.url))
    worker = CeleryProcess("worker", env, tmp_path / "worker.log", ["--concurrency", "1"])
    beat = CeleryProcess("beat", env, tmp_path / "beat.log", via_cli=True)
    try:
        worker.start()
        beat.start()
        wait_until(lambda: ledger.poll_status("default").get("ok_at"), 30, "a first poll")
        dovecot.stop()
        wait_until(lambda: text(worker.log_path).count("poll of inbox default failed"), 30)
        time.sleep(5)  # a few more ticks, each poll failing
        dovecot.start()
        wait_until(lambda: "a poll succeeded again" in text(worker.log_path), 30)
        time.sleep(3)
        failed = ledger.poll_status("default")
        assert not failed.get("error") and beat.running() and worker.running()
    finally:
        beat.stop()
        worker.stop()
        dovecot.stop()
        ledger.redis.close()
    log = text(worker.log_path)
    one_line_each(log, "poll of inbox default failed", "a poll succeeded again")


@pytest.mark.slow
def test_watch_survives_a_redis_and_a_dovecot_restart_and_wakes_on_new_mail(
    private_redis: RedisServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """No beat: only watch asks for polls. A mail arrives while Redis is down (the poll
    is held and sent when it is back); Dovecot is stopped for 20 s and started again; a
    new mail after that wakes watch again."""
    try:
        dovecot = DovecotServer(tmp_path / "imap").start()
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    scenario = bulk_scenario(1, seed=6)  # a customer's mail and a stranger's
    senders = tmp_path / "senders.csv"
    senders.write_text(scenario.senders_csv(), encoding="utf-8")
    env = environment(private_redis.url, dovecot, sandbox, senders, poll_interval="3600")
    ledger = Ledger(connect_redis(private_redis.url))
    worker = CeleryProcess("worker", env, tmp_path / "worker.log", ["--concurrency", "1"])
    log_path = tmp_path / "watch.log"
    watch = None
    try:
        worker.start()
        with open(log_path, "wb") as out:
            watch = subprocess.Popen(
                [sys.executable, "-m", "mailingest", "watch"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: "watching INBOX with IDLE" in text(log_path), 30)
        private_redis.kill()
        deliver(dovecot, [scenario.mails[0].raw])  # IDLE says EXISTS: the poll is held
        wait_until(lambda: " unreachable (" in text(log_path), 30, "the outage noticed")
        time.sleep(10)
        private_redis.start()
        wait_decided(ledger, 1, timeout=90)

        dovecot.stop()
        wait_until(lambda: "IDLE connection lost" in text(log_path), 30)
        time.sleep(20)
        dovecot.start()
        wait_until(lambda: "IDLE connection made again" in text(log_path), 60)
        deliver(dovecot, [scenario.mails[1].raw])  # woken by IDLE: no beat runs
        wait_decided(ledger, 2, timeout=90)
        assert watch.poll() is None and worker.running()
    finally:
        if watch is not None:
            watch.terminate()
            assert watch.wait(20) == 0  # SIGTERM: a clean stop
        worker.stop()
        dovecot.stop()
        ledger.redis.close()
    log = text(log_path)
    one_line_each(log, " unreachable (", "reachable again after")
    one_line_each(log, "IDLE connection lost", "IDLE connection made again")
