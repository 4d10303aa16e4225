"""The operator's commands, run as processes against real servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import demo_scenario
from mailingest_testbed.servers import ImapServer

from .helpers import deliver, folder_counts, write_senders

pytestmark = pytest.mark.servers


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailingest", *args],
        env={"PATH": "/usr/bin:/bin"} | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


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


def test_unreachable_servers_give_one_line(env: dict[str, str]) -> None:
    from mailingest_testbed.servers import free_port

    dead_redis = env | {"MAILINGEST_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for args in (("status",), ("senders", "list")):
        proc = run(dead_redis, *args)
        assert proc.returncode == 1
        assert proc.stderr.startswith("mailingest: Redis unavailable (ConnectionError")
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    dead_imap = env | {"MAILINGEST_IMAP_PORT": str(free_port())}
    proc = run(dead_imap, "poll-once")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("mailingest: inbox default (127.0.0.1:")
    assert "Traceback" not in proc.stderr
    assert env["MAILINGEST_IMAP_PASSWORD"] not in proc.stderr
    status = json.loads(run(dead_imap, "status", "--json").stdout)
    assert "cannot connect" in status["polls"]["default"]["error"]


def test_poll_now_queues_a_poll_for_the_workers(env: dict[str, str]) -> None:
    import redis as redis_lib

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
