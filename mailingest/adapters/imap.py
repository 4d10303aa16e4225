"""The one place that talks IMAP (imapclient): connect, list new UIDs, fetch, move.

Fetches use ``BODY.PEEK[]`` so a mail is never marked ``\\Seen`` by us; new
mail is found with ``UID SEARCH UID <watermark+1>:*`` and filtered (servers
answer the highest UID even when it is below the range); a move uses MOVE when
the server has it and otherwise COPY + ``\\Deleted`` + ``UID EXPUNGE`` of that
UID only (never a plain EXPUNGE, which would remove other people's deletions).
Every socket has a timeout; every failure surfaces as
:class:`~mailingest.core.errors.MailboxError` without the password or token.

An ``xoauth2`` inbox logs in with ``AUTHENTICATE XOAUTH2`` and an access token from
its token source (:class:`~mailingest.adapters.oauth.TokenSource`).  A refused token (expired
or revoked early at the provider) is invalidated and a fresh one tried once, on a new
connection: servers slow down or drop a connection after a failed login.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import select
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from imapclient.imapclient import SocketTimeout

from mailingest.config.settings import InboxSettings
from mailingest.core.errors import MailboxError

log = logging.getLogger(__name__)

# imapclient logs whole protocol exchanges (mail bodies, attachments) at DEBUG:
# never let them into our logs, whatever the log level
logging.getLogger("imapclient").setLevel(logging.INFO)

_IMAP_ERRORS = (
    IMAPClientError,
    imaplib.IMAP4.error,
    OSError,
    ssl.SSLError,
    socket.timeout,
    UnicodeError,
)


class AccessTokens(Protocol):
    """Where an ``xoauth2`` inbox's access tokens come from (``oauth.TokenSource``)."""

    def access_token(self) -> str: ...

    def invalidate(self) -> None: ...


@dataclass(frozen=True)
class Fetched:
    uid: int
    size: int
    raw: bytes
    internaldate: str = ""  # the server's arrival time, ISO 8601 as it gave it


_COPYUID = re.compile(rb"\[COPYUID (\d+) [^ \]]+ (\d+)\]", re.IGNORECASE)


class Mailbox:
    """A logged-in IMAP connection to one inbox; use as a context manager."""

    def __init__(
        self,
        inbox: InboxSettings,
        *,
        timeout: float = 30.0,
        token_source: AccessTokens | None = None,
    ) -> None:
        self.inbox = inbox
        self.timeout = timeout
        self.token_source = token_source  # required when inbox.auth == "xoauth2"
        self._client: IMAPClient | None = None
        self._selected: str | None = None
        self.last_used = 0.0  # monotonic time its last user let it go (Context.imap)
        self._known_folders: set[str] = set()  # folders this connection saw exist

    # -- connection ------------------------------------------------------------
    def __enter__(self) -> Mailbox:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> IMAPClient:
        if self._client is None:
            raise MailboxError(f"inbox {self.inbox.name}: not connected")
        return self._client

    def connect(self) -> None:
        inbox = self.inbox
        if inbox.auth == "xoauth2":
            self._client = self._connect_xoauth2()
            return
        where = self._where
        try:
            client = self._open()
            user = inbox.user or ""
            password = inbox.password.reveal() if inbox.password else ""
            if (user + password).isascii():
                client.login(user, password)
            else:  # LOGIN is ASCII-only; AUTHENTICATE PLAIN carries UTF-8
                client.plain_login(user, password)
        except IMAPClientError as exc:
            raise MailboxError(f"{where}: login refused ({_error_text(exc)})") from None
        except _IMAP_ERRORS as exc:
            raise MailboxError(
                f"{where}: cannot connect ({type(exc).__name__}: {_error_text(exc)})"
            ) from None
        self._client = client

    @property
    def _where(self) -> str:
        return f"inbox {self.inbox.name} ({self.inbox.host}:{self.inbox.port})"

    def _open(self) -> IMAPClient:
        """A connection, TLS set up as configured, not logged in yet."""
        inbox = self.inbox
        # certificates are always verified (hostname too); a private CA may be added
        context = ssl.create_default_context(cafile=str(inbox.ca_file) if inbox.ca_file else None)
        client = IMAPClient(
            inbox.host or "",
            port=inbox.port,
            ssl=inbox.security == "ssl",
            ssl_context=context,
            timeout=SocketTimeout(connect=self.timeout, read=self.timeout),
        )
        if inbox.security == "starttls":
            client.starttls(context)
        return client

    def _connect_xoauth2(self) -> IMAPClient:
        """``AUTHENTICATE XOAUTH2``; a refused token is refreshed and tried once more."""
        where = self._where
        tokens = self.token_source
        if tokens is None:
            raise MailboxError(f"{where}: auth is xoauth2 but no OAuth token source was given")
        user = self.inbox.user or ""
        for attempt in (1, 2):
            token = tokens.access_token()  # OAuthError (a MailboxError) names the inbox
            try:
                client = self._open()
            except _IMAP_ERRORS as exc:
                raise MailboxError(
                    f"{where}: cannot connect ({type(exc).__name__}: {_error_text(exc)})"
                ) from None
            try:
                client.oauth2_login(user, token, mech="XOAUTH2")
                return client
            except IMAPClientError as exc:
                refused = _error_text(exc).replace(token, "********")
                offered = _offers(client, "AUTH=XOAUTH2")
                _quit(client)
            except _IMAP_ERRORS as exc:
                _quit(client)
                raise MailboxError(
                    f"{where}: cannot connect ({type(exc).__name__}: {_error_text(exc)})"
                ) from None
            if not offered:
                raise MailboxError(f"{where}: the server does not offer XOAUTH2 login ({refused})")
            if attempt == 2:
                raise MailboxError(
                    f"{where}: XOAUTH2 login refused with a freshly refreshed access token "
                    f"({refused}); check the IMAP user and that the token's scope covers IMAP"
                )
            log.info("%s: XOAUTH2 login refused (%s); refreshing the access token", where, refused)
            tokens.invalidate()
        raise AssertionError("unreachable")

    def close(self) -> None:
        client, self._client = self._client, None
        self._known_folders.clear()
        if client is not None:
            _quit(client)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except MailboxError:
            raise
        except _IMAP_ERRORS as exc:
            raise MailboxError(
                f"inbox {self.inbox.name}: {what} failed ({type(exc).__name__}: {_error_text(exc)})"
            ) from None

    # -- IDLE (RFC 2177) ----------------------------------------------------------
    def supports_idle(self) -> bool:
        return bool(self.client.has_capability("IDLE"))

    def idle(self) -> None:
        with self._errors("IDLE"):
            self.client.idle()

    def idle_check(self, timeout: float) -> list[tuple[object, ...]]:
        """What the server sent while idling, waiting at most ``timeout`` seconds."""
        with self._errors("IDLE"):
            return list(self.client.idle_check(timeout=timeout))

    def idle_done(self) -> None:
        with self._errors("IDLE DONE"):
            self.client.idle_done()

    def noop(self) -> None:
        with self._errors("NOOP"):
            self.client.noop()

    def server_spoke(self) -> bool:
        """Whether the server sent something we have not read (a BYE, a closed socket, news
        of other sessions): a kept connection is then checked with NOOP before reuse."""
        try:
            sock = self.client.socket()
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return True
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError, MailboxError):
            return True

    # -- folders ---------------------------------------------------------------
    def select(self, folder: str) -> int:
        """Select ``folder`` read-write; return its UIDVALIDITY."""
        with self._errors(f"SELECT {folder!r}"):
            info = self.client.select_folder(folder)
        self._selected = folder
        return int(info[b"UIDVALIDITY"])

    def folder_exists(self, folder: str) -> bool:
        with self._errors(f"LIST {folder!r}"):
            return bool(self.client.folder_exists(folder))

    def ensure_folders(self, *folders: str) -> None:
        with self._errors("CREATE"):
            for folder in folders:
                self._folder_ready(folder)

    def _folder_ready(self, folder: str) -> None:
        """Create ``folder`` if missing; asked once per connection (a connection is reused)."""
        if folder in self._known_folders:
            return
        if not self.client.folder_exists(folder):
            self.client.create_folder(folder)
        self._known_folders.add(folder)

    # -- mail ------------------------------------------------------------------
    def uids_after(self, watermark: int) -> list[int]:
        """UIDs above the watermark in the selected folder, ascending."""
        with self._errors("UID SEARCH"):
            uids = self.client.search(["UID", f"{watermark + 1}:*"])
        return sorted(int(u) for u in uids if int(u) > watermark)

    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        if not uids:
            return {}
        with self._errors("FETCH RFC822.SIZE"):
            data = self.client.fetch(list(uids), ["RFC822.SIZE"])
        return {int(uid): int(item[b"RFC822.SIZE"]) for uid, item in data.items()}

    def fetch(self, uids: Sequence[int]) -> list[Fetched]:
        """The full bytes of each mail, without setting ``\\Seen``; vanished UIDs are left out."""
        if not uids:
            return []
        with self._errors("FETCH BODY.PEEK[]"):
            data = self.client.fetch(list(uids), ["BODY.PEEK[]", "RFC822.SIZE", "INTERNALDATE"])
        out = []
        for uid, item in sorted(data.items()):
            raw = item.get(b"BODY[]")
            if raw is None:
                continue
            size = int(item.get(b"RFC822.SIZE", len(raw)))
            out.append(Fetched(int(uid), size, bytes(raw), _date(item.get(b"INTERNALDATE"))))
        return out

    def move(
        self,
        uid: int,
        destination: str,
        *,
        copied_uid: str = "",
        on_copied: Callable[[str], None] | None = None,
    ) -> None:
        """Move one mail of the selected folder; a UID that is already gone is not an error.

        Without MOVE: COPY, ``\\Deleted``, ``UID EXPUNGE`` of that UID only. The COPY's
        answer names the new UID (UIDPLUS ``COPYUID``), handed to ``on_copied`` to record
        before the original is removed; a later run given it as ``copied_uid`` (one that
        died after the COPY) does not copy again when that UID is in the destination.
        Nothing else skips the COPY: a search could find another mail with the same
        Message-ID, and then this one would be expunged without a copy. A run that dies
        between an unanswered COPY and the expunge copies again: a second copy in the
        destination, never a lost mail.
        """
        with self._errors(f"MOVE to {destination!r}"):
            self._folder_ready(destination)
            if self.client.has_capability("MOVE"):
                self.client.move([uid], destination)
                return
            if not (copied_uid and self._holds_uid(destination, copied_uid)):
                copied = self._copy(uid, destination)
                if copied and on_copied is not None:
                    on_copied(copied)
            self.client.add_flags([uid], [b"\\Deleted"], silent=True)
            if self.client.has_capability("UIDPLUS"):
                self.client.uid_expunge([uid])
            # without UIDPLUS the mail stays flagged \Deleted in the inbox for a person
            # to expunge: a plain EXPUNGE could remove other people's deleted mail.

    def _copy(self, uid: int, destination: str) -> str:
        """``UID COPY``; the new ``<uidvalidity>:<uid>`` from the answer's COPYUID code
        (UIDPLUS), or "". imapclient's ``copy`` drops the tagged answer's response code,
        so the command goes through imaplib, which keeps it."""
        client = self.client
        folder = client._normalise_folder(destination)  # quoted, modified UTF-7
        typ, data = client._imap._simple_command("UID", "COPY", str(uid), folder)
        if typ != "OK":
            raise imaplib.IMAP4.error(f"COPY failed: {_reply_text(data)}")
        found = _COPYUID.search(b" ".join(d for d in data if isinstance(d, bytes)))
        return f"{int(found[1])}:{int(found[2])}" if found else ""

    def _holds_uid(self, folder: str, copied: str) -> bool:
        """Whether ``folder`` holds ``<uidvalidity>:<uid>``; the selection is restored."""
        source = self._selected
        validity, _, uid = copied.partition(":")
        info = self.client.select_folder(folder, readonly=True)
        held = int(info[b"UIDVALIDITY"]) == int(validity) and int(uid) in self.client.search(
            ["UID", uid]
        )
        if source:
            self.client.select_folder(source)
        return held

    def find_copy(
        self, folder: str, *, size: int, internaldate: str, message_id: str = ""
    ) -> list[int]:
        """UIDs in ``folder`` of this very mail: the same size and arrival time (COPY and
        MOVE keep both), and Message-ID when it has one. Another delivery of the same
        mail differs in size (its trace headers) or arrival time. Selects ``folder``."""
        with self._errors(f"SEARCH {folder!r}"):
            if not self.client.folder_exists(folder):
                return []
            self.client.select_folder(folder, readonly=True)
            self._selected = None
            criteria: list[object] = ["LARGER", max(0, size - 1), "SMALLER", size + 1]
            if message_id:
                criteria += ["HEADER", "Message-ID", f"<{message_id}>"]
            uids = sorted(int(u) for u in self.client.search(criteria))
            if not uids or not internaldate:
                return uids if not internaldate else []
            dates = self.client.fetch(uids, ["INTERNALDATE"])
            return [
                uid
                for uid in uids
                if _date(dates.get(uid, {}).get(b"INTERNALDATE")) == internaldate
            ]

    def append(self, folder: str, raw: bytes) -> None:
        with self._errors(f"APPEND to {folder!r}"):
            self.client.append(folder, raw)

    def exists(self, uid: int) -> bool:
        with self._errors("UID SEARCH"):
            return uid in self.client.search(["UID", str(uid)])


def _reply_text(data: object) -> str:
    parts = data if isinstance(data, list) else [data]
    return " ".join(
        p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in parts
    )[:200]


def _date(value: object) -> str:
    """An INTERNALDATE as imapclient gives it (a datetime), as text; "" when absent."""
    if value is None:
        return ""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _quit(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - the connection is going away either way
        with contextlib.suppress(Exception):  # going away either way
            client.shutdown()


def _offers(client: IMAPClient, capability: str) -> bool:
    """Whether the server advertises ``capability`` (True when it cannot tell)."""
    try:
        return bool(client.has_capability(capability))
    except Exception:  # noqa: BLE001 - a dead connection: assume it does, retry
        return True


def _error_text(exc: BaseException) -> str:
    """An exception's text, bounded, for a message that may be logged."""
    if isinstance(exc, UnicodeError):  # its text would quote the offending (secret) value
        return "a value cannot be encoded for IMAP"
    text = str(exc).replace("\r", " ").replace("\n", " ")
    return text[:200]
