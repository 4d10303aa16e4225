"""The one place that talks IMAP (imapclient): connect, list new UIDs, fetch, move.

Fetches use ``BODY.PEEK[]`` so a mail is never marked ``\\Seen`` by us; new
mail is found with ``UID SEARCH UID <watermark+1>:*`` and filtered (servers
answer the highest UID even when it is below the range); a move uses MOVE when
the server has it and otherwise COPY + ``\\Deleted`` + ``UID EXPUNGE`` of that
UID only (never a plain EXPUNGE, which would remove other people's deletions).
A connection keeps its folder selected between uses: a move on a kept selection sends
no SELECT and no search, only a NOOP and a ``UID FETCH`` of the mail's size in one round
trip, which vouch for the selection and the mail (:meth:`Mailbox.select_mail`); the
move's answer names the mail's new UID (UIDPLUS ``COPYUID``).
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
import io
import logging
import re
import select
import socket
import ssl
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, cast

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from imapclient.imapclient import SocketTimeout, _parse_untagged_response
from imapclient.response_parser import parse_fetch_response

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


# a COPY's or MOVE's answer (UIDPLUS, RFC 4315 and 6851): the destination's UIDVALIDITY,
# then the UIDs moved and their new UIDs, in the same order
_COPYUID = re.compile(rb"\[COPYUID (\d+) ([\d:,]+) ([\d:,]+)\]", re.IGNORECASE)

# untagged answers that leave the selected folder as it was: new mail, flags, expunges,
# a plain OK. Anything else (NO, BAD, BYE, a UIDVALIDITY, CLOSED or READ-ONLY code, a
# SELECT sent behind our back) and a kept selection is not trusted: SELECT again.
_CALM = frozenset({"EXISTS", "RECENT", "EXPUNGE", "FETCH", "VANISHED", "OK"})


@dataclass(frozen=True)
class Selection:
    """:meth:`Mailbox.select_mail`'s answer: the folder's UIDVALIDITY, and whether the
    mail is in it."""

    uidvalidity: int
    present: bool


@dataclass(frozen=True)
class Moved:
    """What the answer to a move says.

    ``to`` is the mail's ``<uidvalidity>:<uid>`` in the destination, when the server named
    it (UIDPLUS ``COPYUID``). ``missed``: nothing of ours moved, the UID was not in the
    selected folder (a server whose answers named the new UID before, on this connection
    and into this destination, named none). Neither: the server answered OK without
    naming a new UID; the caller saw the mail there just before (as before issue 12).
    """

    to: str = ""
    missed: bool = False


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
        # the folder this connection has selected read-write and its UIDVALIDITY, from
        # the SELECT's answer; None whenever that may no longer hold (see select)
        self._selected: str | None = None
        self._validity = 0
        # destinations whose move answers named the new UID on this connection (COPYUID):
        # there, an answer that names none of ours means the mail was not there
        self._names_moves: set[str] = set()
        self.last_used = 0.0  # monotonic time its last user let it go (Context.imap)
        self._known_folders: set[str] = set()  # folders this connection saw exist
        self._keeps_keywords = True  # the selected folder's PERMANENTFLAGS has \\*

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
        self._forget_selection()
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
        self._forget_selection()
        self._names_moves.clear()
        if client is not None:
            _quit(client)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except MailboxError:
            self._forget_selection()
            raise
        except _IMAP_ERRORS as exc:
            self._forget_selection()  # whatever the server made of it, SELECT again
            raise MailboxError(
                f"inbox {self.inbox.name}: {what} failed ({type(exc).__name__}: {_error_text(exc)})"
            ) from None

    # -- IDLE (RFC 2177) ----------------------------------------------------------
    def supports_idle(self) -> bool:
        return bool(self.client.has_capability("IDLE"))

    def idle(self) -> list[tuple[object, ...]]:
        """Start IDLE; what the server sent along with its ``+ idling``.

        A mail that came since the last answer is told of in the same packet as
        ``+ idling`` (Dovecot does). imaplib has then read it off the socket already, so
        imapclient's ``idle_check``, which waits on the socket, would not see it until
        the next DONE: :meth:`_read_already` hands it over.
        """
        with self._errors("IDLE"):
            # what DONE and NOOP answered is handed over, not kept in imaplib; and a watch's
            # connection never moves mail on this selection
            self.client._imap.untagged_responses.clear()
            self._forget_selection()
            self.client.idle()
            return self._read_already()

    def idle_check(self, timeout: float) -> list[tuple[object, ...]]:
        """What the server sent while idling, waiting at most ``timeout`` seconds."""
        with self._errors("IDLE"):
            return self._read_already() or list(self.client.idle_check(timeout=timeout))

    def _read_already(self) -> list[tuple[object, ...]]:
        """The lines read off the socket but not handed over: whole ones in imaplib's
        buffer, and what the TLS layer holds decrypted (a record larger than imaplib's
        reads). The socket stays quiet for them. Never waits for a line not yet sent."""
        imap, sock = self.client._imap, self.client.socket()
        responses: list[tuple[object, ...]] = []
        while b"\r\n" in self._buffered(imap, sock) or _tls_holds(sock):
            responses.append(_parse_untagged_response(imap._get_line()))
        return responses

    def _buffered(self, imap: imaplib.IMAP4, sock: socket.socket) -> bytes:
        """What imaplib holds read and not yet handed over (its buffer may also take in
        what is readable now); never waits."""
        if sys.version_info >= (3, 14):  # imaplib keeps its own buffer, and reads no file
            return b"".join(imap._readbuf)  # type: ignore[attr-defined]
        sock.setblocking(False)
        try:
            reader = cast(io.BufferedReader, imap.file)  # the socket's makefile("rb")
            return reader.peek(1)  # the buffer, or one read that never waits
        except (BlockingIOError, ssl.SSLWantReadError):
            return b""
        finally:
            sock.setblocking(True)
            self.client._set_read_timeout()

    def idle_done(self) -> list[tuple[object, ...]]:
        """End IDLE; what the server sent since the last ``idle_check`` (news of mail
        that came in between is here, not lost)."""
        with self._errors("IDLE DONE"):
            return list(self.client.idle_done()[1])

    def noop(self) -> list[tuple[object, ...]]:
        """A round trip; the untagged answers that came with it (``EXISTS`` among them)."""
        with self._errors("NOOP"):
            return list(self.client.noop()[1])

    def server_spoke(self) -> bool:
        """Whether the server sent something we have not read (a BYE, a closed socket, news
        of other sessions): a kept connection is then checked with NOOP before reuse."""
        try:
            sock = self.client.socket()
            if _tls_holds(sock):
                return True
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError, MailboxError):
            return True

    # -- folders ---------------------------------------------------------------
    def select(self, folder: str) -> int:
        """Select ``folder`` read-write (always a SELECT); return its UIDVALIDITY. The
        selection is remembered for :meth:`select_mail`."""
        with self._errors(f"SELECT {folder!r}"):
            return self._select(folder)

    def select_mail(self, folder: str, uid: int, *, size: int = 0) -> Selection:
        """Select ``folder`` to act on its mail ``uid``: the folder's UIDVALIDITY, and
        whether the mail is there.

        A connection that has ``folder`` selected read-write already does not select it
        again. A NOOP and ``UID FETCH <uid> (RFC822.SIZE)``, sent together (one round
        trip), vouch for the kept selection: their answers must leave the folder as it
        was (only new mail, flags, expunges: ``_CALM``), find the UID, and find it
        ``size`` bytes long (the size recorded when the mail was fetched; 0: not
        compared). Otherwise the folder is selected again and the UID looked at once
        more. A folder deleted and made again under a session (a restore) is acted on
        by name by both Dovecot and pymap, the new folder's mail of that UID moved:
        Dovecot says so only in a full sync (the NOOP's answer has a NO; a FETCH still
        answers the old mail's size), pymap says nothing but the FETCH answers the new
        mail's size. The NOOP also brings mail that came since into the view. After a
        fresh SELECT the UID is this mail whatever its size: UIDs are never reused
        within one UIDVALIDITY.
        """
        with self._errors(f"SELECT {folder!r}"):
            if self._selected == folder and self._calm():
                seen = self._noop_and_size(uid)
                if self._expunged_meanwhile():
                    # the FETCH may have been answered from the view before the NOOP's
                    # sync (Dovecot does): ask again in the synced view
                    seen = self._size_of(uid)
                if self._calm() and seen is not None and (not size or seen == size):
                    return Selection(self._validity, True)
            validity = self._select(folder)
            return Selection(validity, self._size_of(uid) is not None)

    def _select(self, folder: str) -> int:
        """``SELECT``, remembered with the UIDVALIDITY it answered."""
        self._forget_selection()
        info = self.client.select_folder(folder)
        validity = int(info[b"UIDVALIDITY"])
        self._keeps_keywords = b"\\*" in tuple(info.get(b"PERMANENTFLAGS") or (b"\\*",))
        self.client._imap.untagged_responses.clear()  # read: what comes later is news
        self._selected, self._validity = folder, validity
        return validity

    def _expunged_meanwhile(self) -> bool:
        untagged = self.client._imap.untagged_responses
        return "EXPUNGE" in untagged or "VANISHED" in untagged

    def _forget_selection(self) -> None:
        self._selected, self._validity = None, 0

    def _calm(self) -> bool:
        """Whether the remembered selection still holds as far as the server said since
        (also in a NOOP of Context.imap); what it said is cleared, as it would otherwise
        pile up between SELECTs."""
        imap = self.client._imap
        calm = (
            imap.state == "SELECTED"
            and not imap.is_readonly
            and set(imap.untagged_responses) <= _CALM
        )
        imap.untagged_responses.clear()
        if not calm:
            self._forget_selection()
        return calm

    def _size_of(self, uid: int) -> int | None:
        """``UID FETCH <uid> (RFC822.SIZE)``: its size, or None when it is not there."""
        return _size(self.client.fetch([uid], ["RFC822.SIZE"]).get(uid))

    def _noop_and_size(self, uid: int) -> int | None:
        """NOOP and ``UID FETCH <uid> (RFC822.SIZE)`` pipelined (RFC 9051 5.5: the two
        may run in any order; neither changes anything); the size, or None. Whatever
        else came back stays in imaplib's untagged responses for :meth:`_calm`."""
        imap = self.client._imap
        tags = [("NOOP", imap._command("NOOP"))]
        tags.append(("FETCH", imap._command("UID", "FETCH", str(uid), "(RFC822.SIZE)")))
        answers = [(name, *imap._command_complete(name, tag)) for name, tag in tags]
        for name, typ, data in answers:
            if typ != "OK":
                raise imaplib.IMAP4.error(f"{name} failed: {_reply_text(data)}")
        lines = imap.untagged_responses.pop("FETCH", [])
        return _size(parse_fetch_response(lines, True, True).get(uid))

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
    def uids_after(self, watermark: int, narrow: Sequence[object] | None = None) -> list[int]:
        """UIDs above the watermark in the selected folder, ascending; with ``narrow``,
        only those that also match these SEARCH criteria (the inbox's rules: ASCII
        only, so no CHARSET is ever needed)."""
        criteria: list[object] = ["UID", f"{watermark + 1}:*", *(narrow or ())]
        with self._errors("UID SEARCH"):
            uids = self.client.search(criteria)
        return sorted(int(u) for u in uids if int(u) > watermark)

    def mark(self, uid: int, flags: Sequence[str], keywords: Sequence[str]) -> None:
        """Set ``flags`` (``\\Seen``, ``\\Flagged``) and ``keywords`` on one mail of the
        selected folder, before it moves (MOVE and COPY keep them). Setting them twice
        changes nothing. A keyword is a Gmail label where the server offers labels
        (X-GM-EXT-1), else an IMAP keyword, which a server without ``\\*`` among its
        PERMANENTFLAGS does not keep (logged, not an error: the mail still moves)."""
        with self._errors("STORE"):
            if flags:
                self.client.add_flags([uid], [f.encode() for f in flags], silent=True)
            if not keywords:
                return
            if not self._keeps_keywords and not self.client.has_capability("X-GM-EXT-1"):
                log.warning(
                    "inbox %s: the server keeps no keywords of ours; %s not set",
                    self.inbox.name,
                    ", ".join(keywords),
                )
                return
            try:
                if self.client.has_capability("X-GM-EXT-1"):
                    self.client.add_gmail_labels([uid], list(keywords), silent=True)
                else:
                    self.client.add_flags([uid], [k.encode() for k in keywords], silent=True)
            except IMAPClientError as exc:  # refused (too long for it, say): the mail moves
                if isinstance(exc, imaplib.IMAP4.abort):
                    raise  # the connection, not the keyword
                log.warning(
                    "inbox %s: the server refused the keyword(s) %s (%s); the mail is filed "
                    "without them",
                    self.inbox.name,
                    ", ".join(keywords),
                    _error_text(exc),
                )

    def copy(self, uid: int, destination: str, *, copied_uid: str = "") -> Moved:
        """Copy one mail of the selected folder, which stays where it is; a ``copied_uid``
        recorded by an earlier run that the destination holds is not copied again."""
        with self._errors(f"COPY to {destination!r}"):
            if self._selected is None:
                raise MailboxError(f"inbox {self.inbox.name}: copy without a selected folder")
            self._folder_ready(destination)
            if copied_uid and self._holds_uid(destination, copied_uid):
                return Moved(copied_uid)
            return self._answered(destination, self._copy(uid, destination))

    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        if not uids:
            return {}
        with self._errors("FETCH RFC822.SIZE"):
            data = self.client.fetch(list(uids), ["RFC822.SIZE"])
        return {int(uid): int(item[b"RFC822.SIZE"]) for uid, item in data.items()}

    def headers(self, uids: Sequence[int]) -> list[Fetched]:
        """The header of each mail alone (``raw`` is its header block), without \\Seen."""
        if not uids:
            return []
        with self._errors("FETCH BODY.PEEK[HEADER]"):
            data = self.client.fetch(list(uids), ["BODY.PEEK[HEADER]", "INTERNALDATE"])
        return [
            Fetched(int(uid), 0, bytes(item[b"BODY[HEADER]"]), _date(item.get(b"INTERNALDATE")))
            for uid, item in sorted(data.items())
            if item.get(b"BODY[HEADER]") is not None
        ]

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
    ) -> Moved:
        """Move one mail of the selected folder; a UID that is already gone is not an error.

        What moved is read from the answer: UIDPLUS servers name the new UID (``COPYUID``,
        in the untagged OK that RFC 6851 sends before the EXPUNGE, or in the tagged OK).
        An answer naming none of ours, from a UIDPLUS server or where a destination's
        answers named it before on this connection, means the UID was not there
        (``missed``). The caller looks first
        (:meth:`select_mail`, :meth:`find_copy`): on servers that never name it, that look
        is all there is, as before issue 12.

        Without MOVE: COPY, ``\\Deleted``, ``UID EXPUNGE`` of that UID only. The COPY's
        answer names the new UID, handed to ``on_copied`` to record before the original
        is removed; a later run given it as ``copied_uid`` (one that died after the COPY)
        does not copy again when that UID is in the destination. Nothing else skips the
        COPY: a search could find another mail with the same Message-ID, and then this
        one would be expunged without a copy. A COPY that names nothing where copies are
        named removes nothing. A run that dies between an unanswered COPY and the expunge
        copies again: a second copy in the destination, never a lost mail.
        """
        with self._errors(f"MOVE to {destination!r}"):
            if self._selected is None:  # never act on a selection we cannot vouch for
                raise MailboxError(f"inbox {self.inbox.name}: move without a selected folder")
            self._folder_ready(destination)
            if self.client.has_capability("MOVE"):
                return self._answered(destination, self._uid_command("MOVE", uid, destination))
            if copied_uid and self._holds_uid(destination, copied_uid):
                copied = copied_uid
            else:
                copied = self._uid_command("COPY", uid, destination)
                moved = self._answered(destination, copied)
                if moved.missed:
                    return moved  # nothing was copied: nothing may be removed
                if copied and on_copied is not None:
                    on_copied(copied)
            self.client.add_flags([uid], [b"\\Deleted"], silent=True)
            if self.client.has_capability("UIDPLUS"):
                self.client.uid_expunge([uid])
            # without UIDPLUS the mail stays flagged \Deleted in the inbox for a person
            # to expunge: a plain EXPUNGE could remove other people's deleted mail.
            return Moved(copied)

    def _answered(self, destination: str, new_uid: str) -> Moved:
        if new_uid:
            self._names_moves.add(destination)
            return Moved(new_uid)
        # a UIDPLUS server names what it moved (RFC 4315, 6851); one that answers a
        # move with no COPYUID found nothing to move. A server that does not name it
        # after all only sends the caller down the slow path (find_copy), never wrong.
        return Moved(
            missed=destination in self._names_moves or self.client.has_capability("UIDPLUS")
        )

    def _copy(self, uid: int, destination: str) -> str:
        """``UID COPY``; the new ``<uidvalidity>:<uid>`` its answer names, or ""."""
        return self._uid_command("COPY", uid, destination)

    def _uid_command(self, command: str, uid: int, destination: str) -> str:
        """``UID COPY`` or ``UID MOVE`` of one mail; the new ``<uidvalidity>:<uid>`` from
        the answer's COPYUID code (UIDPLUS), or "". imapclient's ``copy`` and ``move``
        drop response codes, so the command goes through imaplib, which keeps the tagged
        answer and every untagged OK that came before it (MOVE names the new UID in one)."""
        client = self.client
        imap = client._imap
        folder = client._normalise_folder(destination)  # quoted, modified UTF-7
        imap.untagged_responses.pop("OK", None)  # only this command's answers count
        imap.untagged_responses.pop("COPYUID", None)
        typ, data = imap._simple_command("UID", command, str(uid), folder)
        answers = [*imap.untagged_responses.pop("OK", []), *data]
        imap.untagged_responses.pop("COPYUID", None)
        if typ != "OK":
            raise imaplib.IMAP4.error(f"{command} failed: {_reply_text(data)}")
        return _new_uid(answers, uid)

    def _holds_uid(self, folder: str, copied: str) -> bool:
        """Whether ``folder`` holds ``<uidvalidity>:<uid>``. The source is selected again
        after, and must still have the UIDVALIDITY it had (else MailboxError: the mail
        would be flagged and expunged in another folder of that name)."""
        source, source_validity = self._selected, self._validity
        if source is None:
            raise MailboxError(f"inbox {self.inbox.name}: move without a selected folder")
        self._forget_selection()
        validity, _, uid = copied.partition(":")
        info = self.client.select_folder(folder, readonly=True)
        held = int(info[b"UIDVALIDITY"]) == int(validity) and int(uid) in self.client.search(
            ["UID", uid]
        )
        if self._select(source) != source_validity:
            self._forget_selection()
            raise MailboxError(
                f"inbox {self.inbox.name}: UIDVALIDITY of {source} changed during a move"
            )
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
            self._forget_selection()
            self.client.select_folder(folder, readonly=True)
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


def _new_uid(answers: Sequence[object], uid: int) -> str:
    """``<uidvalidity>:<new uid>`` of ``uid`` from the COPYUID codes among ``answers``, or
    "" when none names it. The two sets pair up in order (``2:4 7:9``: 2 is now 7)."""
    for answer in answers:
        if not isinstance(answer, bytes):
            continue
        for validity, sources, targets in _COPYUID.findall(answer):
            index = _position(_ranges(sources), uid)
            target = _at(_ranges(targets), index) if index is not None else None
            if target is not None:
                return f"{int(validity)}:{target}"
    return ""


def _ranges(text: bytes) -> list[tuple[int, int]]:
    """The ranges of a UID set (``1,3:5`` -> (1, 1), (3, 5)); [] when malformed. Never
    expanded: a range may be large."""
    out = []
    for part in text.split(b","):
        first, _, last = part.partition(b":")
        if not first.isdigit() or (last and not last.isdigit()):
            return []
        low, high = int(first), int(last or first)
        out.append((min(low, high), max(low, high)))
    return out


def _position(ranges: list[tuple[int, int]], uid: int) -> int | None:
    offset = 0
    for low, high in ranges:
        if low <= uid <= high:
            return offset + uid - low
        offset += high - low + 1
    return None


def _at(ranges: list[tuple[int, int]], index: int) -> int | None:
    for low, high in ranges:
        if index <= high - low:
            return low + index
        index -= high - low + 1
    return None


def _size(item: object) -> int | None:
    """RFC822.SIZE of a mail's FETCH answer (None: no answer for it)."""
    if isinstance(item, dict) and b"RFC822.SIZE" in item:
        return int(item[b"RFC822.SIZE"])
    return None


def _tls_holds(sock: socket.socket) -> bool:
    """Whether the TLS layer holds bytes it decrypted and nobody read (``select`` on the
    socket does not see them)."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


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
