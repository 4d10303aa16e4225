"""Shared test helpers: deliver mail, read a folder, check a scenario's outcome."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from imapclient import IMAPClient
from mailingest_testbed.demo import check_outcome
from mailingest_testbed.samples import Scenario
from mailingest_testbed.servers import DovecotServer, ImapAccount, ImapServer, ServerNotAvailable

from mailingest.adapters import ledger as L
from mailingest.adapters.alloy import AlloyClient
from mailingest.adapters.ledger import Ledger
from mailingest.application.poll_once import Summary, poll_once
from mailingest.application.services import build_context, connect_redis
from mailingest.config.settings import InboxSettings, Secret, load_settings

from .conftest import ALLOY_SECRET, ALLOY_TOKEN


def deliver(imap: ImapServer, raws: list[bytes], folder: str = "INBOX") -> None:
    account = imap.account
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=10)
    client.login(account.user, account.password)
    for raw in raws:
        client.append(folder, raw)
    client.logout()


def folder_counts(imap: ImapServer, *folders: str) -> dict[str, int]:
    account = imap.account
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=10)
    client.login(account.user, account.password)
    counts = {}
    for folder in folders:
        if client.folder_exists(folder):
            counts[folder] = client.select_folder(folder, readonly=True)[b"EXISTS"]
        else:
            counts[folder] = 0
    client.logout()
    return counts


def seen_flags(imap: ImapServer, folder: str) -> list[bool]:
    account = imap.account
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=10)
    client.login(account.user, account.password)
    client.select_folder(folder, readonly=True)
    data = client.fetch(client.search(["ALL"]), ["FLAGS"])
    client.logout()
    return [b"\\Seen" in item[b"FLAGS"] for item in data.values()]


def write_senders(path: Path, scenario: Scenario) -> None:
    path.write_text(scenario.senders_csv(), encoding="utf-8")


def outcome_problems(env: Mapping[str, str], scenario: Scenario, **expect: str) -> list[str]:
    """``expect``: ``agent_email`` and ``note_text`` when not the defaults."""
    redis_client = connect_redis(env["MAILINGEST_REDIS_URL"])
    with AlloyClient(env["MAILINGEST_ALLOY_URL"], Secret(ALLOY_TOKEN), Secret(ALLOY_SECRET)) as a:
        problems = check_outcome(scenario, a, Ledger(redis_client), **expect)
    redis_client.close()
    return problems


def inbox_settings(account: ImapAccount, **changes: object) -> InboxSettings:
    """Settings for one inbox on a test server (``changes`` replace fields)."""
    inbox = InboxSettings(
        name="test",
        host=account.host,
        port=account.port,
        user=account.user,
        password=Secret(account.password),
        security=account.security,
        folder="INBOX",
        processed_folder="Processed",
        quarantine_folder="Quarantine",
        agent_email="kyc.agent@support.example",
        note="Uploaded from email customer sent",
        poll_interval=60,
    )
    return replace(inbox, **changes)  # type: ignore[arg-type]


def dovecot_without_move(workdir: Path) -> DovecotServer:
    """A started Dovecot that does not advertise MOVE (skips where Dovecot is missing)."""
    return dovecot_without(workdir, "MOVE")


def dovecot_without(workdir: Path, capability: str) -> DovecotServer:
    """A started Dovecot that does not advertise ``capability`` (skips without Dovecot)."""
    from .conftest import require_or_skip

    probe = DovecotServer(workdir / "probe")
    try:
        probe.start()
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    client = IMAPClient(probe.account.host, port=probe.account.port, ssl=False, timeout=10)
    client.login(probe.account.user, probe.account.password)
    capabilities = [c.decode() for c in client.capabilities() if c != capability.encode()]
    client.logout()
    probe.stop()
    assert "UIDPLUS" in capabilities and capability not in capabilities
    return DovecotServer(
        workdir / f"no-{capability.lower()}",
        extra_config=f"imap_capability = {' '.join(capabilities)}\n",
    ).start()


T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 20.0, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds naming ``what``. Tests wait on a condition, never on a sleep: how
    long a step takes depends on the machine's load."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what or condition}")
        time.sleep(0.02)


def wait_decided(ledger: Ledger, count: int, timeout: float = 120) -> list[L.MailRecord]:
    """Wait until ``count`` mails are decided and moved out of the inbox; their records."""

    def decided() -> list[L.MailRecord]:
        records = ledger.mails(L.MAIL_STATES)
        done = sum(1 for r in records if r.state in L.DECIDED and r.filed_to)
        return records if done >= count else []

    return wait_until(decided, timeout, f"{count} mails decided ({ledger.counts()})")


def run_cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m mailingest ARGS`` as an operator runs it, with only ``env`` set."""
    return subprocess.run(
        [sys.executable, "-m", "mailingest", *args],
        env={"PATH": "/usr/bin:/bin"} | dict(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def poll_once_on(env: Mapping[str, str], **settings: str) -> Summary:
    """One complete cycle in this process with ``env`` and MAILINGEST_<NAME> changes."""
    changes = {f"MAILINGEST_{name.upper()}": value for name, value in settings.items()}
    ctx = build_context(load_settings(dict(env) | changes))
    try:
        return poll_once(ctx)
    finally:
        ctx.close()
