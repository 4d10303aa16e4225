"""Certificates are verified by default, for IMAP and for Alloy; a private CA can be added."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.servers import DovecotServer, ImapAccount, ServerNotAvailable

from mailingest.adapters.alloy import AlloyClient
from mailingest.adapters.imap import Mailbox
from mailingest.config.settings import InboxSettings, Secret
from mailingest.core.errors import AlloyUnavailable, MailboxError

from .conftest import require_or_skip
from .helpers import inbox_settings
from .tls import make_tls_files

pytestmark = pytest.mark.servers


def inbox_for(server: DovecotServer, ca_file: Path | None) -> InboxSettings:
    return inbox_settings(server.account, ca_file=ca_file)


@pytest.fixture
def tls_dovecot(tmp_path: Path) -> Iterator[tuple[DovecotServer, Path]]:
    """A Dovecot speaking implicit TLS with a certificate of a private CA; and the CA."""
    ca, cert, key = make_tls_files(tmp_path / "pki")
    try:
        server = DovecotServer(tmp_path / "imap", tls=(cert, key)).start()
    except ServerNotAvailable as exc:
        require_or_skip(str(exc))
    try:
        yield server, ca
    finally:
        server.stop()


def test_imap_certificate_is_verified(tls_dovecot: tuple[DovecotServer, Path]) -> None:
    server, ca = tls_dovecot
    with pytest.raises(MailboxError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        Mailbox(inbox_for(server, None)).connect()  # untrusted: refused, no bypass
    with Mailbox(inbox_for(server, ca)) as box:  # the private CA added: accepted
        assert box.select("INBOX") > 0


def test_alloy_certificate_is_verified(tmp_path: Path) -> None:
    ca, cert, key = make_tls_files(tmp_path / "pki")
    sandbox = SandboxServer(token="t", secret="s", tls=(str(cert), str(key))).start()
    try:
        assert sandbox.url.startswith("https://127.0.0.1:")
        with AlloyClient(sandbox.url, Secret("t"), Secret("s")) as alloy:
            with pytest.raises(AlloyUnavailable, match="TLS certificate not trusted"):
                alloy.list("P-aaaaaaaaaaaaaaaaaaaa")
        with AlloyClient(sandbox.url, Secret("t"), Secret("s"), ca_file=ca) as alloy:
            assert alloy.list("P-aaaaaaaaaaaaaaaaaaaa") == []
    finally:
        sandbox.stop()


def test_news_sent_with_idles_first_answer_is_read_over_tls(
    tls_dovecot: tuple[DovecotServer, Path],
) -> None:
    """A mail that came just before IDLE is told of with ``+ idling``: read at once over
    TLS too, where it sits decrypted in imaplib's buffer and the socket stays quiet."""
    server, ca = tls_dovecot
    inbox = inbox_for(server, ca)
    with Mailbox(inbox) as watching, Mailbox(inbox) as other:
        watching.select("INBOX")
        watching.noop()
        other.client.append("INBOX", b"From: a@example.com\r\nSubject: 1\r\n\r\nhi\r\n")
        told = watching.idle()
        if not told:  # the news came in a TLS record of its own, not yet read
            told = watching.idle_check(3.0)
        watching.idle_done()
    assert (1, b"EXISTS") in told


def test_news_in_a_tls_record_larger_than_imaplibs_reads_is_read(tmp_path: Path) -> None:
    """One TLS record of 12 KB after ``+ idling``: imaplib reads 8 KB of it, the rest
    stays decrypted in the TLS layer while the socket is quiet, the EXISTS at its end.
    Dovecot writes records of its own choosing, so a scripted server sends this one."""
    ca, cert, key = make_tls_files(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    news = b"".join(b"* %d FETCH (FLAGS (\\Seen))\r\n" % n for n in range(1, 480))
    assert 12_000 < len(news) < 16_000  # more than one read of imaplib, one TLS record

    def serve() -> None:
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as conn:
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1 IDLE] scripted\r\n")
            idle_tag = b""
            for line in conn.makefile("rb"):
                tag, command = [*line.split(), b""][:2]
                if tag == b"DONE":
                    conn.sendall(idle_tag + b" OK IDLE done\r\n")
                elif command == b"IDLE":
                    idle_tag = tag
                    conn.sendall(b"+ idling\r\n" + news + b"* 480 EXISTS\r\n")  # one write
                elif command == b"SELECT":
                    conn.sendall(b"* 479 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n")
                    conn.sendall(tag + b" OK [READ-WRITE] ok\r\n")
                elif command == b"LOGOUT":
                    conn.sendall(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
                    return
                else:  # LOGIN, CAPABILITY, NOOP
                    conn.sendall(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    account = ImapAccount("127.0.0.1", listener.getsockname()[1], "u", "p", security="ssl")
    try:
        with Mailbox(inbox_settings(account, ca_file=ca)) as watching:
            watching.select("INBOX")
            told = watching.idle()
            if (480, b"EXISTS") not in told:  # (not read at once: it must come within 3 s)
                told += watching.idle_check(3.0)
            watching.idle_done()
        assert (480, b"EXISTS") in told and len(told) == 480
    finally:
        listener.close()
        server.join(5)
