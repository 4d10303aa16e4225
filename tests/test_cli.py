"""The operator's commands, run as processes against real servers."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest
import redis as redis_lib
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import demo_scenario
from mailingest_testbed.servers import ImapServer, free_port

from mailingest.adapters.ledger.leases import worker_name
from mailingest.application.cli import CELERY_ABOUT, build_parser

from .helpers import deliver, folder_counts, run_cli, write_senders

pytestmark = pytest.mark.servers


run = run_cli


@pytest.mark.slow  # seconds: left out of ./dev test --quick
def test_unknown_sender_added_then_replayed(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = demo_scenario(seed=8)
    stranger = scenario.mails[-1]
    write_senders(senders_file, scenario)
    deliver(imap, [stranger.raw])

    first = run(env, "poll-once", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["quarantined"] == 1
    status = json.loads(run(env, "status", "--json").stdout)
    (held,) = status["attention"]
    assert held["state"] == "quarantined" and held["filed_to"] == "Quarantine"
    assert held["reason"].startswith("unknown sender mallory@unknown.example")
    text = run(env, "status").stdout
    assert "quarantined 1" in text and held["mail_id"] in text
    assert "inbox default: last good poll" in text

    entity = "P-ma11oryMa11oryMa11o"
    added = run(env, "senders", "add", "Mallory@Unknown.example", entity)
    assert added.returncode == 0 and "mallory@unknown.example" in added.stdout
    assert run(env, "senders", "list").stdout == f"mallory@unknown.example,{entity}\n"

    replayed = run(env, "replay", held["mail_id"])
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed" in replayed.stdout
    assert folder_counts(imap, "INBOX", "Quarantine") == {"INBOX": 1, "Quarantine": 0}

    second = run(env, "poll-once", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["processed"] == 1
    (doc,) = sandbox.state.list(entity)
    assert (doc["name"], doc["extension"], doc["type"], doc["uploaded"]) == (
        "passport",
        "jpg",
        "passport",
        True,
    )
    counts = json.loads(run(env, "status", "--json").stdout)["counts"]
    assert (counts["done"], counts["replayed"], counts["quarantined"]) == (1, 1, 0)


def test_senders_import_and_remove(env: dict[str, str], tmp_path: Path) -> None:
    csv = tmp_path / "more.csv"
    csv.write_text(
        "email,entity_token\na@example.com,P-aaaaaaaaaaaaaaaaaaaa\nb@example.com,ext-7\n"
    )
    assert run(env, "senders", "import", str(csv)).stdout == "imported 2 sender(s)\n"
    assert run(env, "senders", "remove", "a@example.com").returncode == 0
    assert run(env, "senders", "list").stdout == "b@example.com,ext-7\n"
    bad = tmp_path / "bad.csv"
    bad.write_text("email,entity_token\nnot-an-address,P-1\n")
    failed = run(env, "senders", "import", str(bad))
    assert failed.returncode == 1
    assert failed.stderr.strip() == f"mailingest: {bad}:2: not an e-mail address: 'not-an-address'"


def test_same_mail_delivered_twice_is_uploaded_once(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = demo_scenario(seed=10)
    write_senders(senders_file, scenario)
    first = scenario.mails[0]  # two documents
    deliver(imap, [first.raw])
    assert json.loads(run(env, "poll-once", "--json").stdout)["processed"] == 1
    deliver(imap, [first.raw])  # the server delivers the very same mail again
    summary = json.loads(run(env, "poll-once", "--json").stdout)
    assert summary["processed"] == 1
    entity = scenario.senders["alice.martin@example.com"]
    assert len(sandbox.state.list(entity)) == 2  # adopted, not uploaded again
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 2}


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a command that failed wrote to stderr (never a traceback)."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow  # seconds: left out of ./dev test --quick
def test_redis_unreachable_is_one_line_naming_it_and_its_address(env: dict[str, str]) -> None:
    port = free_port()
    dead = env | {"MAILINGEST_REDIS_URL": f"redis://:redis-pw@127.0.0.1:{port}/0"}
    address = f"redis://:***@127.0.0.1:{port}/0"
    for args, service in (
        (("poll-now",), "Redis (Celery broker)"),
        (("watch",), "Redis (Celery broker)"),
        (("beat",), "Redis"),
        (("status",), "Redis"),
        (("senders", "list"), "Redis"),
        (("replay", "--failed"), "Redis"),
        (("poll-once",), "Redis"),
        (("seed", "--count", "1"), "Redis"),
    ):
        proc = run(dead, *args)
        line = one_line(proc)
        assert line.startswith(f"mailingest: {service} unavailable at {address} ("), (args, line)
        assert "redis-pw" not in proc.stdout + proc.stderr


def test_imap_unreachable_is_one_line_naming_the_inbox_and_its_address(
    env: dict[str, str],
) -> None:
    port = free_port()
    dead = env | {"MAILINGEST_IMAP_PORT": str(port)}
    for args in (("poll-once",), ("seed", "--count", "1")):
        proc = run(dead, *args)
        line = one_line(proc)
        assert line.startswith(f"mailingest: inbox default (127.0.0.1:{port}): cannot connect")
        assert env["MAILINGEST_IMAP_PASSWORD"] not in proc.stdout + proc.stderr
    status = json.loads(run(dead, "status", "--json").stdout)
    assert "cannot connect" in status["polls"]["default"]["error"]


def test_alloy_unreachable_is_one_line_and_no_mail_is_taken(
    env: dict[str, str], imap: ImapServer
) -> None:
    port = free_port()
    dead = env | {"MAILINGEST_ALLOY_URL": f"http://127.0.0.1:{port}/v1"}
    deliver(imap, [demo_scenario(seed=4).mails[0].raw])
    for args in (("poll-once",), ("replay", "default/INBOX/1/1")):
        line = one_line(run(dead, *args))
        assert line.startswith(f"mailingest: Alloy unavailable at http://127.0.0.1:{port}/v1 (")
    assert folder_counts(imap, "INBOX") == {"INBOX": 1}  # left where it was
    assert sum(json.loads(run(env, "status", "--json").stdout)["counts"].values()) == 0


def test_check_config_connect_prints_its_table_whatever_is_down(env: dict[str, str]) -> None:
    redis_port, alloy_port = free_port(), free_port()
    no_redis = env | {"MAILINGEST_REDIS_URL": f"redis://:redis-pw@127.0.0.1:{redis_port}/0"}
    proc = run(no_redis, "check-config", "--connect")
    assert proc.returncode == 1 and proc.stderr == ""
    rows = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert list(rows) == ["FAIL  redis", "ok    inbox default", "ok    alloy"]
    assert rows["FAIL  redis"].startswith(
        f"Redis unavailable at redis://:***@127.0.0.1:{redis_port}/0 (ConnectionError"
    )
    assert "redis-pw" not in proc.stdout  # and Alloy was asked without the rate limiter

    nothing = no_redis | {
        "MAILINGEST_IMAP_PORT": str(free_port()),
        "MAILINGEST_ALLOY_URL": f"http://127.0.0.1:{alloy_port}/v1",
    }
    proc = run(nothing, "check-config", "--connect", "--json")
    assert proc.returncode == 1 and proc.stderr == ""
    results = {r["check"]: r for r in json.loads(proc.stdout)}
    assert [name for name, r in results.items() if not r["ok"]] == [
        "redis",
        "inbox default",
        "alloy",
    ]
    assert "cannot connect" in results["inbox default"]["detail"]
    assert results["alloy"]["detail"].startswith(
        f"Alloy unavailable at http://127.0.0.1:{alloy_port}/v1 (connection failed"
    )


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict:
    """Every (sub)command of the parser by its words, e.g. ("senders", "add")."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[(*path, name)] = sub
                found |= _commands(sub, (*path, name))
    return found


COMMANDS = _commands(build_parser())
CELERY_OPTION = {"worker": "--concurrency", "beat": "--max-interval"}


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("words", list(COMMANDS), ids=" ".join)
def test_help_needs_no_settings_and_describes_every_argument(words: tuple[str, ...]) -> None:
    proc = run({}, *words, "--help")  # no MAILINGEST_* variable at all
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.startswith(f"usage: mailingest {' '.join(words)} ")
    parser = COMMANDS[words]
    if words[0] in CELERY_OPTION:  # mailingest's own lines, then Celery's options
        assert flat(CELERY_ABOUT[words[0]]) in flat(proc.stdout)
        assert CELERY_OPTION[words[0]] in proc.stdout
        return
    assert parser.description and flat(parser.description) in flat(proc.stdout)
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name} has no help"
        if "%(" not in action.help:
            assert flat(action.help) in flat(proc.stdout), name


def test_every_command_is_covered_by_the_help_test() -> None:
    top = {words[0] for words in COMMANDS}
    assert {"worker", "beat", "poll-once", "senders", "check-config", "demo"} <= top
    assert ("senders", "add") in COMMANDS


def test_poll_now_queues_a_poll_for_the_workers(env: dict[str, str]) -> None:
    proc = run(env, "poll-now")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "poll of inbox default queued\n"
    client = redis_lib.Redis.from_url(env["MAILINGEST_REDIS_URL"])
    (message,) = client.lrange("celery", 0, -1)  # the broker's default queue
    client.close()
    body = json.loads(message)
    assert body["headers"]["task"] == "mailingest.poll_inbox"
    assert body["headers"]["argsrepr"] == "['default']"
    unknown = run(env, "poll-now", "--inbox", "nope")
    assert unknown.returncode == 2 and "no inbox named 'nope'" in unknown.stderr


def test_status_shows_backlog_and_oldest_pending(
    env: dict[str, str], imap: ImapServer, senders_file: Path
) -> None:
    from mailingest.application.pipeline import poll
    from mailingest.application.services import build_context
    from mailingest.config.settings import load_settings

    scenario = demo_scenario(seed=12)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails[:3]])
    ctx = build_context(load_settings(env))
    try:
        poll(ctx, "default")  # recorded and queued, not yet ingested
    finally:
        ctx.close()
    status = json.loads(run(env, "status", "--json").stdout)
    assert status["polls"]["default"]["backlog"] == 3
    assert status["polls"]["default"]["oldest_pending_s"] >= 0
    assert "backlog 3, oldest pending" in run(env, "status").stdout


def test_status_tells_a_mail_in_progress_from_a_stalled_one(
    env: dict[str, str], imap: ImapServer, senders_file: Path
) -> None:
    """Two mails idle for a minute: one a live worker holds the lease of (a slow
    upload), one no one holds while the broker's queue is empty (its task was lost)."""
    from mailingest.adapters import keys
    from mailingest.application.pipeline import poll
    from mailingest.application.services import build_context
    from mailingest.config.settings import load_settings

    scenario = demo_scenario(seed=13)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails[:2]])
    ctx = build_context(load_settings(env), heartbeat=False)
    try:
        working, lost = sorted(step.mail_id for step in poll(ctx, "default").steps)
        for mail_id in (working, lost):
            ctx.ledger.update(mail_id, updated_at=ctx.ledger.now() - 60_000)
        lease = ctx.leases.acquire(keys.step_lock(f"ingest:{working}"))
        assert lease is not None
        status = json.loads(run(env, "status", "--json").stdout)
        text = run(env, "status").stdout
    finally:
        ctx.close()
    assert [r["mail_id"] for r in status["in_progress"]] == [working]
    assert status["in_progress"][0]["lease_held_by"] == worker_name()
    assert [r["mail_id"] for r in status["stalled"]] == [lost]
    held = rf"in progress  {working}  queued for 6\ds \(lease held by worker {worker_name()}\)"
    assert re.search(held, text), text
    assert re.search(rf"stalled      {lost}  queued for 6\ds, no lease held", text), text


def test_check_config_describes_then_connects_and_names_what_fails(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer
) -> None:
    described = run(env, "check-config")
    assert described.returncode == 0, described.stderr
    assert "ok    settings: from the environment: 1 inbox(es)" in described.stdout
    assert "INBOX -> Processed | Quarantine" in described.stdout

    deliver(imap, [demo_scenario(seed=3).mails[0].raw])
    good = run(env, "check-config", "--connect", "--json")
    assert good.returncode == 0, good.stdout + good.stderr
    results = {r["check"]: r for r in json.loads(good.stdout)}
    assert set(results) == {"redis", "inbox default", "alloy"}
    assert all(r["ok"] for r in results.values())
    assert "INBOX holds 1 mail(s)" in results["inbox default"]["detail"]
    assert "Processed, Quarantine will be created" in results["inbox default"]["detail"]
    assert folder_counts(imap, "INBOX") == {"INBOX": 1}  # nothing was moved or created

    wrong = env | {
        "MAILINGEST_IMAP_PASSWORD": "not-the-password",
        "MAILINGEST_ALLOY_SECRET": "not-the-secret",
    }
    bad = run(wrong, "check-config", "--connect")
    assert bad.returncode == 1
    lines = dict(line.split(": ", 1) for line in bad.stdout.splitlines())
    assert lines["ok    redis"].startswith("PING answered")
    assert lines["FAIL  inbox default"].startswith("inbox default (")
    assert "login refused" in lines["FAIL  inbox default"]
    assert lines["FAIL  alloy"].startswith("Alloy list answered 401/4011")
    assert "not-the-password" not in bad.stdout + bad.stderr
    assert "not-the-secret" not in bad.stdout + bad.stderr


def test_check_config_stops_on_a_bad_file_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "mailingest.toml"
    path.write_text('[[inboxes]]\nname = "eu"\nimap_hots = "imap.example.com"\n')
    proc = run({"MAILINGEST_CONFIG": str(path)}, "check-config")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        "mailingest: configuration error: mailingest.toml: inboxes[eu].imap_hots is not a "
        "per-inbox setting; did you mean imap_host?"
    )
    assert "mailingest: configuration error: MAILINGEST_REDIS_URL is required but not set" in lines
    assert all(line.startswith("mailingest: configuration error: ") for line in lines)


@pytest.mark.slow  # seconds: left out of ./dev test --quick
def test_seed_delivers_sample_mail_that_a_poll_then_ingests(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer
) -> None:
    seeded = run(env, "seed", "--count", "4", "--seed", "5")
    assert seeded.returncode == 0, seeded.stderr
    assert seeded.stdout == (
        "appended 5 mail(s) to inbox default (INBOX); 3 sender(s) in the directory\n"
    )
    assert folder_counts(imap, "INBOX") == {"INBOX": 5}  # four and the stranger
    assert len(run(env, "senders", "list").stdout.splitlines()) == 3
    polled = run(env, "poll-once", "--json")
    summary = json.loads(polled.stdout)
    assert (summary["processed"], summary["quarantined"]) == (4, 1)

    down = env | {"MAILINGEST_IMAP_PORT": "1"}
    failed = run(down, "seed", "--wait", "0")
    assert failed.returncode == 1 and "cannot connect" in failed.stderr


def test_status_shows_when_the_alloy_rate_limit_sets_the_pace(env: dict[str, str]) -> None:
    from mailingest.adapters.ledger.clock import RedisClock
    from mailingest.adapters.rate_limit import AlloyPause, RateLimiter

    limited = env | {"MAILINGEST_ALLOY_RATE": "2", "MAILINGEST_ALLOY_BURST": "4"}
    quiet = run(limited, "status")
    assert quiet.returncode == 0, quiet.stderr
    assert (
        "Alloy rate limit: 2/s shared (bursts of 4); no request in the last minute\n"
        in quiet.stdout
    )
    assert "429" not in quiet.stdout

    client = redis_lib.Redis.from_url(env["MAILINGEST_REDIS_URL"])
    limiter = RateLimiter(client, rate=2, burst=4, max_wait=100)
    waits = [limiter.reserve() for _ in range(10)]  # what workers asked at this moment
    assert sum(1 for w in waits if w > 0) == 6
    AlloyPause(client, clock=RedisClock(client)).begin(30)  # a worker got a 429
    client.close()

    busy = run(limited, "status")
    assert busy.returncode == 0, busy.stderr
    (line,) = [x for x in busy.stdout.splitlines() if x.startswith("Alloy rate limit")]
    assert line.startswith("Alloy rate limit: 2/s shared (bursts of 4); it delayed 6 of 10 ")
    assert " s waited) in the last minute; " in line and "waiting for a token now" in line
    assert line.endswith(": it sets the pace")
    assert re.search(
        r"^Alloy answered 429 to 1 request in the last minute; every worker holds its "
        r"requests (2\d|30)\.\d s more$",  # 30 s less the time the status command took
        busy.stdout,
        re.MULTILINE,
    ), busy.stdout
    shown = json.loads(run(limited, "status", "--json").stdout)["alloy_rate_limit"]
    assert shown["rate"] == 2 and shown["burst"] == 4 and shown["sets_the_pace"] is True
    assert shown["last_minute"] | {"waited_s": 0} == {
        "requests": 10,
        "delayed": 6,
        "waited_s": 0,
        "deferred": 0,
        "answered_429": 1,
    }
    assert shown["last_minute"]["waited_s"] > 5
    assert 25 < shown["pause_s"] <= 30

    off = run(env | {"MAILINGEST_ALLOY_RATE": "0"}, "status")
    assert off.returncode == 0, off.stderr
    assert (
        "Alloy rate limit: off (MAILINGEST_ALLOY_RATE=0; Alloy's 429s pause every worker)\n"
        in off.stdout
    )
    assert "it sets the pace" not in off.stdout
    assert "Alloy answered 429 to 1 request in the last minute" in off.stdout
    shown = json.loads(run(env | {"MAILINGEST_ALLOY_RATE": "0"}, "status", "--json").stdout)
    assert shown["alloy_rate_limit"]["rate"] is None
    assert shown["alloy_rate_limit"]["sets_the_pace"] is False
