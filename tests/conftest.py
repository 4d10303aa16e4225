"""Real servers for the tests, started on free loopback ports and stopped afterwards.

* ``redis_server``: a private redis-server for the session; each test gets an
  empty database through ``redis_url``.
* ``imap_server``: Dovecot when installed, else pymap (``MAILINGEST_TEST_IMAP``
  = ``dovecot`` | ``pymap`` | ``auto`` chooses); each test gets empty folders.
* ``sandbox``: a fresh Alloy sandbox per test.

With ``MAILINGEST_REQUIRE_SERVERS=1`` (set by ``.ci/run``) a server that cannot
start fails the test instead of skipping it, so CI always takes the real path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from imapclient import IMAPClient
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.samples import AGENT_EMAIL
from mailingest_testbed.servers import (
    ImapServer,
    RedisServer,
    ServerNotAvailable,
    start_imap_server,
)

ALLOY_TOKEN, ALLOY_SECRET = "test-token", "test-secret-value"


def require_or_skip(reason: str) -> None:
    """Skip, unless CI demands real servers: then fail."""
    if os.environ.get("MAILINGEST_REQUIRE_SERVERS") == "1":
        pytest.fail(f"MAILINGEST_REQUIRE_SERVERS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def imap_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImapServer]:
    kind = os.environ.get("MAILINGEST_TEST_IMAP", "auto")
    try:
        server = start_imap_server(tmp_path_factory.mktemp("imap"), kind)
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    if kind == "auto" and server.kind != "dovecot" and os.environ.get("CI"):
        server.stop()
        require_or_skip("Dovecot is not installed (CI must test on Dovecot)")
    yield server
    server.stop()


@pytest.fixture
def imap(imap_server: ImapServer) -> ImapServer:
    """The IMAP server with an empty INBOX and no other folders."""
    account = imap_server.account
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=10)
    client.login(account.user, account.password)
    for _flags, _delim, name in client.list_folders():
        if name.upper() == "INBOX":
            client.select_folder(name)
            uids = client.search(["ALL"])
            if uids:
                client.delete_messages(uids)
                client.expunge()
            if client.has_capability("UNSELECT"):
                client.unselect_folder()
            else:  # pymap: CLOSE (it would expunge, and nothing is left to)
                client.close_folder()
    for _flags, _delim, name in sorted(client.list_folders(), key=lambda f: -len(f[2])):
        if name.upper() != "INBOX":
            client.delete_folder(name)
    client.logout()
    return imap_server


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    server = SandboxServer(token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL]).start()
    yield server
    server.stop()


@pytest.fixture
def senders_file(tmp_path: Path) -> Path:
    path = tmp_path / "senders.csv"
    path.write_text("email,entity_token\n", encoding="utf-8")
    return path


@pytest.fixture
def env(
    redis_url: str, imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> dict[str, str]:
    """A complete MAILINGEST_* environment pointing at this test's servers."""
    return local_environment(
        redis_url,
        imap.account,
        sandbox.url,
        senders_file,
        alloy_token=ALLOY_TOKEN,
        alloy_secret=ALLOY_SECRET,
        poll_interval="1",
        retry_base="0.05",
        retry_cap="0.5",
        alloy_read_timeout="5",
    )
