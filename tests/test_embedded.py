"""Tests of mailingest_testbed.servers against real redis-server, Dovecot and pymap."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from imapclient import IMAPClient
from mailingest_testbed import servers as embedded
from mailingest_testbed.servers import (
    DovecotServer,
    ImapAccount,
    ImapServer,
    PymapServer,
    RedisServer,
    ServerNotAvailable,
    free_port,
    start_imap_server,
)

from .conftest import require_or_skip
from .helpers import wait_until


def _port_is_free(port: int) -> bool:
    """Nothing listens and a server (SO_REUSEADDR, as all of them) could bind it again.

    A plain bind() may still fail for a minute because of TIME_WAIT connections.
    """
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _live_group_members(pgid: int) -> list[int]:
    """Pids of processes in process group pgid that are not zombies (Linux /proc).

    Zombies are dead already; one whose parent died before reaping it belongs to
    init, which reaps it in its own time.
    """
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc")
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rfind(b")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != b"Z":
            live.append(int(entry))
    return live


def _connect(account: ImapAccount) -> IMAPClient:
    client = IMAPClient(account.host, account.port, ssl=False, timeout=10)
    client.login(account.user, account.password)
    return client


MESSAGES = [
    b"From: alice@example.com\r\nTo: customer-support@example.com\r\n"
    b"Subject: my passport\r\nMessage-ID: <m1@example.com>\r\n\r\nPassport attached.\r\n",
    b"From: bob@example.com\r\nTo: customer-support@example.com\r\n"
    b"Subject: =?utf-8?q?F=C3=BChrerschein?=\r\nMessage-ID: <m2@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe, mein F\xc3\xbchrerschein.\r\n",
    b"From: carol@example.com\r\nTo: customer-support@example.com\r\nSubject: id card\r\n"
    b"Message-ID: <m3@example.com>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
    b"Content-Type: text/plain\r\n\r\nsee attachment\r\n--b1\r\n"
    b'Content-Type: image/png\r\nContent-Disposition: attachment; filename="id.png"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==\r\n"
    b"--b1--\r\n",
]


# --------------------------------------------------------------------------- redis


@pytest.fixture
def redis_binary() -> str:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if binary is None:
        require_or_skip("redis-server not installed")
    return binary


def test_require_or_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILINGEST_REQUIRE_SERVERS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_or_skip("no server")
    monkeypatch.setenv("MAILINGEST_REQUIRE_SERVERS", "1")
    with pytest.raises(pytest.fail.Exception, match="MAILINGEST_REQUIRE_SERVERS=1"):
        require_or_skip("no server")


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    assert _port_is_free(port)


@pytest.mark.servers
def test_redis_persist_restart_keeps_data_and_stop_frees_port(
    tmp_path: Path, redis_binary: str
) -> None:
    server = RedisServer(tmp_path / "redis", persist=True, binary=redis_binary)
    with server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.set("mailingest:key", "value")
        assert client.get("mailingest:key") == b"value"
        port = server.port
        server.restart()
        assert server.port == port
        assert redis.Redis.from_url(server.url).get("mailingest:key") == b"value"
        assert (tmp_path / "redis" / "appendonlydir").is_dir()
        client.close()
    assert _port_is_free(port)
    server.stop()  # idempotent


@pytest.mark.servers
def test_redis_without_persist_forgets_on_restart(tmp_path: Path, redis_binary: str) -> None:
    with RedisServer(tmp_path, binary=redis_binary) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.restart()
        assert redis.Redis.from_url(server.url).get("k") is None


@pytest.mark.servers
def test_redis_kill_then_start_again(tmp_path: Path, redis_binary: str) -> None:
    server = RedisServer(tmp_path, persist=True, binary=redis_binary).start()
    try:
        pid = server.pid
        assert pid is not None
        server.kill()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        server.start()
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def test_redis_missing_binary_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ServerNotAvailable, match="install"):
        RedisServer(tmp_path, binary=str(tmp_path / "no-such-redis-server")).start()


# --------------------------------------------------------------------------- IMAP


@pytest.fixture(params=["dovecot", "pymap"])
def imap_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ImapServer]:
    kind: str = request.param
    try:
        server = start_imap_server(tmp_path / kind, kind)
    except ServerNotAvailable as exc:
        require_or_skip(f"{kind} not available: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.servers
def test_imap_roundtrip(imap_server: ImapServer) -> None:
    account = imap_server.account
    assert account.host == "127.0.0.1" and account.security == "plain"
    client = _connect(account)
    with client:  # LOGOUT on exit
        caps = client.capabilities()
        assert b"MOVE" in caps and b"UIDPLUS" in caps
        for folder in ("Processed", "Quarantine", "Processed/Sub"):
            client.create_folder(folder)
        names = {name for _flags, _delim, name in client.list_folders()}
        assert {"INBOX", "Processed", "Quarantine", "Processed/Sub"} <= names

        for message in MESSAGES:
            client.append("INBOX", message)
        info = client.select_folder("INBOX")
        assert int(info[b"UIDVALIDITY"]) > 0
        assert info[b"EXISTS"] == 3
        uids = client.search("ALL")
        assert len(uids) == 3

        fetched = client.fetch(uids, ["BODY.PEEK[]"])
        assert [fetched[uid][b"BODY[]"] for uid in sorted(uids)] == MESSAGES
        flags = client.get_flags(uids)
        assert all(b"\\Seen" not in flags[uid] for uid in uids)

        first = sorted(uids)[0]
        client.move([first], "Processed")
        assert sorted(client.search("ALL")) == sorted(uids)[1:]
        client.select_folder("Processed", readonly=True)
        moved = client.search("ALL")
        assert len(moved) == 1
        assert client.fetch(moved, ["BODY.PEEK[]"])[moved[0]][b"BODY[]"] == MESSAGES[0]

    port = account.port
    imap_server.stop()
    assert _port_is_free(port)
    imap_server.stop()  # idempotent


@pytest.mark.servers
def test_imap_restart_same_port(imap_server: ImapServer) -> None:
    """Dovecot keeps mail across restart(); pymap's in-memory backend loses it."""
    account = imap_server.account
    client = _connect(account)
    client.create_folder("Processed")
    client.append("INBOX", MESSAGES[0])
    uidvalidity = client.select_folder("INBOX")[b"UIDVALIDITY"]
    client.logout()

    imap_server.restart()
    assert imap_server.account == account

    client = _connect(account)
    info = client.select_folder("INBOX")
    if imap_server.kind == "dovecot":
        assert info[b"EXISTS"] == 1
        assert info[b"UIDVALIDITY"] == uidvalidity
        assert client.folder_exists("Processed")
    else:
        assert imap_server.kind == "pymap"
        assert info[b"EXISTS"] == 0
    client.logout()


def _dovecot_installed() -> bool:
    return embedded._dovecot_binary() is not None


@pytest.fixture
def dovecot_available() -> None:
    if not _dovecot_installed():
        require_or_skip("dovecot not installed (apt-get install dovecot-imapd)")


@pytest.mark.servers
def test_dovecot_stop_kills_whole_tree_and_long_workdir(
    tmp_path: Path, dovecot_available: None
) -> None:
    # A workdir too long for unix sockets under it: base_dir goes to a short temp dir.
    workdir = tmp_path / ("long-" + "x" * 90)
    server = DovecotServer(workdir, user="support", password="pw-2")
    with server:
        assert server.kind == "dovecot"
        pid = server.pid
        assert pid is not None
        client = _connect(server.account)
        client.select_folder("INBOX")  # stays connected across stop()
        assert (workdir / "mail" / "support").is_dir()
        base_dir = Path(
            next(
                line.split("=", 1)[1].strip()
                for line in server.config_path.read_text().splitlines()
                if line.startswith("base_dir")
            )
        )
        assert len(str(base_dir)) < 70 and base_dir.is_dir()
    client.shutdown()
    # no process of the tree is left (the group was killed; its members exit at once)
    wait_until(lambda: _live_group_members(pid) == [], 5, "the server's processes gone")
    assert _port_is_free(server.port)
    assert not base_dir.exists()


@pytest.mark.servers
def test_pymap_runs_in_process(tmp_path: Path) -> None:
    with PymapServer(tmp_path, user="u", password="p") as server:
        assert server.running
        client = _connect(server.account)
        client.select_folder("INBOX")  # stays connected across stop()
    client.shutdown()
    assert not server.running
    assert _port_is_free(server.port)


@pytest.mark.servers
def test_without_dovecot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded.dovecot, "_dovecot_binary", lambda: None)
    with pytest.raises(ServerNotAvailable, match="install dovecot-imapd"):
        start_imap_server(tmp_path, "dovecot")
    server = start_imap_server(tmp_path, "auto")
    try:
        assert isinstance(server, PymapServer)
    finally:
        server.stop()


def test_start_imap_server_rejects_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown IMAP server kind"):
        start_imap_server(tmp_path, "exchange")


@pytest.mark.servers
def test_start_imap_server_auto_prefers_dovecot(tmp_path: Path) -> None:
    binary = embedded._dovecot_binary()
    usable = binary is not None and embedded._dovecot_version(binary) == (2, 3)
    server = start_imap_server(tmp_path, "auto")
    try:
        assert server.kind == ("dovecot" if usable else "pymap")
    finally:
        server.stop()
