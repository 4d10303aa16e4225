"""The IMAP adapter against a real server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mailingest_testbed.servers import ImapAccount, ServerNotAvailable, start_imap_server

from mailingest.adapters.imap import Mailbox
from mailingest.config.settings import InboxSettings, Secret
from mailingest.core.errors import MailboxError

from .conftest import require_or_skip
from .helpers import inbox_settings

pytestmark = pytest.mark.servers


def settings_for(host: str, port: int, user: str, password: str) -> InboxSettings:
    return inbox_settings(ImapAccount(host, port, user, password), password=Secret(password))


def test_non_ascii_password_logs_in_and_a_wrong_one_does_not_leak(tmp_path: Path) -> None:
    password = "pässwörd ünïcode"
    if os.environ.get("MAILINGEST_TEST_IMAP") == "pymap":
        require_or_skip("pymap offers no AUTHENTICATE PLAIN, the only way to send UTF-8")
    try:
        server = start_imap_server(tmp_path, "dovecot", password=password)
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    try:
        account = server.account
        with Mailbox(settings_for(account.host, account.port, account.user, password)) as box:
            box.ensure_folders("Processed")
            assert box.select("INBOX") > 0
        wrong = settings_for(account.host, account.port, account.user, "wröng-sécret")
        with pytest.raises(MailboxError) as err:
            Mailbox(wrong).connect()
        assert "login refused" in str(err.value)
        assert "wröng" not in str(err.value) and "sécret" not in str(err.value)
    finally:
        server.stop()


def test_unreachable_server_is_a_mailbox_error(tmp_path: Path) -> None:
    from mailingest_testbed.servers import free_port

    box = Mailbox(settings_for("127.0.0.1", free_port(), "u", "p"), timeout=2)
    with pytest.raises(MailboxError, match="cannot connect"):
        box.connect()
