"""What every private IMAP server shares: its account and the ``ImapServer`` base.

``imap_login_works`` is the readiness check of both servers (Dovecot, pymap): a
real LOGIN (or AUTHENTICATE PLAIN for non-ASCII credentials), not an open port.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from .common import HOST, free_port

__all__ = ["ImapAccount", "ImapServer", "imap_login_works"]


@dataclass(frozen=True)
class ImapAccount:
    """Where and how to log in to an embedded IMAP server."""

    host: str
    port: int
    user: str
    password: str
    security: str = "plain"  # what MAILINGEST_IMAP_SECURITY should be for this server


def imap_login_works(account: ImapAccount, timeout: float = 3.0) -> bool:
    try:
        if account.security == "ssl":  # readiness only: the test's own client verifies
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                account.host, account.port, ssl_context=context, timeout=timeout
            )
        else:
            conn = imaplib.IMAP4(account.host, account.port, timeout=timeout)
    except OSError:
        return False
    try:
        if (account.user + account.password).isascii():
            conn.login(account.user, account.password)
        else:  # LOGIN is ASCII-only; AUTHENTICATE PLAIN carries UTF-8
            plain = f"\0{account.user}\0{account.password}".encode()
            conn.authenticate("PLAIN", lambda _: plain)
        conn.logout()
        return True
    except (imaplib.IMAP4.error, OSError):
        with contextlib.suppress(Exception):
            conn.shutdown()
        return False


class ImapServer(ABC):
    """An IMAP server on 127.0.0.1 with a single account."""

    kind: str = ""

    def __init__(self, workdir: Path, *, user: str, password: str, port: int | None) -> None:
        if not user or re.search(r"[\s:/%\\]", user):
            raise ValueError(f"unsupported IMAP user name {user!r}")
        if not password or re.search(r"[:\x00-\x1f]", password):
            raise ValueError("IMAP password must be non-empty, without ':' or control chars")
        self.workdir = Path(workdir).absolute()
        self._auto_port = port is None
        self._started_once = False
        self.account = ImapAccount(
            HOST, port if port is not None else free_port(), user, password, "plain"
        )

    @property
    def port(self) -> int:
        return self.account.port

    def _new_port(self) -> None:
        self.account = ImapAccount(
            HOST, free_port(), self.account.user, self.account.password, self.account.security
        )

    @abstractmethod
    def start(self) -> Self:
        """Start and wait until LOGIN works; idempotent."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server; idempotent."""

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
