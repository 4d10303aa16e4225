"""The only code that talks SMTP: one reply, to one recipient, through the inbox's server.

``ssl`` (implicit TLS, 465), ``starttls`` (587) or ``plain`` (25, a trusted network
only); certificates are always verified, against the system's CAs and the inbox's
``SMTP_CA_FILE``. A login with a password, or with an access token from the inbox's
OAuth grant (``SMTP_AUTH = xoauth2``, the machinery IMAP uses), or none at all.

The steps are sent one by one, so a failure says whether the reply may have gone:
anything before ``DATA`` was answered means it was not sent (retried when the server
said 4xx or the connection failed, given up on a 5xx); a connection lost while the
message was sent or its answer awaited leaves it *in doubt* (:class:`ReplyError` with
``in_doubt``), which the caller records and never sends again.
"""

from __future__ import annotations

import email.policy
import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from typing import Protocol

from mailingest.config.settings import ReplySettings
from mailingest.core.errors import MailingestError, ReplyError


class AccessTokens(Protocol):
    def access_token(self) -> str: ...

    def invalidate(self) -> None: ...


_LEADING_DOT = re.compile(rb"(?m)^\.")
_CONNECTION_ERRORS = (OSError, smtplib.SMTPException, ssl.SSLError, socket.timeout)


def send(
    replies: ReplySettings,
    message: EmailMessage,
    *,
    to: str,
    before_data: Callable[[], None],
    timeout: float = 30.0,
    tokens: AccessTokens | None = None,
) -> str:
    """Send ``message`` to ``to`` alone; return the server's answer to the message.

    ``before_data`` is called when the server is ready for the message (its 354 to
    DATA): from there on a failure leaves the reply in doubt; before it, nothing went.
    An exception ``before_data`` raises stops the send."""
    # CR LF line ends (smtplib sends bytes as they are: LF alone makes one long line of
    # the whole message to a server, which refuses it past 1,000 bytes)
    data = message.as_bytes(policy=email.policy.SMTP)
    with _session(replies, timeout, tokens) as (smtp, where):
        if not to.isascii():  # smtplib would fail encoding it, mid-command
            raise ReplyError(f"{where}: the address {to!r} is not ASCII (SMTPUTF8 is not used)")
        _step(where, "MAIL FROM", *smtp.mail(replies.from_address))
        _step(where, "RCPT TO", *smtp.rcpt(to), ok=(250, 251))
        _step(where, "DATA", *smtp.docmd("DATA"), ok=(354,))  # not sent: 4xx retry, 5xx fail
        before_data()
        try:
            smtp.send(_dot_stuffed(data) + b".\r\n")
            code, answer = smtp.getreply()
        except _CONNECTION_ERRORS as exc:
            raise ReplyError(
                f"{where}: the connection failed while the reply was sent ({_text(exc)})",
                in_doubt=True,
            ) from None
        _step(where, "the message", code, answer)
        return answer.decode("utf-8", "replace")


def reach(
    replies: ReplySettings, *, timeout: float = 30.0, tokens: AccessTokens | None = None
) -> str:
    """Connect and log in as a reply would, send nothing; what was found."""
    with _session(replies, timeout, tokens) as (_, where):
        login = f"accepted the login as {replies.user}" if replies.user else "answered (no login)"
        return f"{where} ({replies.security}) {login}"


@contextmanager
def _session(
    replies: ReplySettings, timeout: float, tokens: AccessTokens | None
) -> Iterator[tuple[smtplib.SMTP, str]]:
    """A connection, logged in; every failure a ReplyError that says whether to retry."""
    where = f"SMTP {replies.host}:{replies.port}"
    try:
        smtp = _connect(replies, timeout)
    except _CONNECTION_ERRORS as exc:
        raise ReplyError(f"{where}: cannot connect ({_text(exc)})", retryable=True) from None
    try:
        _login(smtp, replies, tokens, where)
        yield smtp, where
    except ReplyError:
        raise
    except _CONNECTION_ERRORS as exc:
        raise ReplyError(f"{where}: {_text(exc)}", retryable=True) from None
    except MailingestError as exc:  # an OAuth token that could not be refreshed
        raise ReplyError(f"{where}: {exc}", retryable=True) from None
    finally:
        try:
            smtp.quit()
        except _CONNECTION_ERRORS:
            smtp.close()


def _connect(replies: ReplySettings, timeout: float) -> smtplib.SMTP:
    context = ssl.create_default_context(cafile=str(replies.ca_file) if replies.ca_file else None)
    if replies.security == "ssl":
        return smtplib.SMTP_SSL(replies.host, replies.port, timeout=timeout, context=context)
    smtp = smtplib.SMTP(replies.host, replies.port, timeout=timeout)
    try:
        smtp.ehlo()
        if replies.security == "starttls":
            if not smtp.has_extn("starttls"):
                raise ReplyError(
                    f"SMTP {replies.host}:{replies.port}: the server does not offer STARTTLS",
                    retryable=True,
                )
            smtp.starttls(context=context)
            smtp.ehlo()
    except BaseException:
        smtp.close()
        raise
    return smtp


def _login(
    smtp: smtplib.SMTP, replies: ReplySettings, tokens: AccessTokens | None, where: str
) -> None:
    if not replies.user:
        return
    try:
        if replies.auth == "xoauth2":
            if tokens is None:
                raise ReplyError(f"{where}: xoauth2 without an OAuth grant", retryable=False)
            token = tokens.access_token()
            smtp.ehlo_or_helo_if_needed()
            smtp.auth(
                "XOAUTH2",
                lambda challenge=None: f"user={replies.user}\x01auth=Bearer {token}\x01\x01",
                initial_response_ok=True,
            )
        else:
            password = replies.password.reveal() if replies.password else ""
            if not (replies.user.isascii() and password.isascii()):
                # smtplib would fail encoding them, its error quoting a character
                raise ReplyError(f"{where}: the SMTP user or password is not ASCII")
            smtp.login(replies.user, password)
    except smtplib.SMTPAuthenticationError as exc:
        if replies.auth == "xoauth2" and tokens is not None:
            tokens.invalidate()  # the next try refreshes it
        raise ReplyError(
            f"{where}: login as {replies.user} refused ({exc.smtp_code} "
            f"{_decoded(exc.smtp_error)})",
            retryable=True,
        ) from None
    except smtplib.SMTPNotSupportedError:
        raise ReplyError(f"{where}: the server offers no login", retryable=False) from None


def _step(where: str, what: str, code: int, answer: bytes, ok: tuple[int, ...] = (250,)) -> None:
    if code in ok:
        return
    said = f"{where}: {what} answered {code} {_decoded(answer)}"
    # 4xx: try again later; 5xx: this reply will not go (RFC 5321 4.2.1)
    raise ReplyError(said, retryable=400 <= code < 500 or code < 0)


def _dot_stuffed(data: bytes) -> bytes:
    """The message as DATA carries it (RFC 5321 4.5.2): a line starting with a dot gets
    another, and it ends with CR LF, before the lone dot that ends it."""
    stuffed = _LEADING_DOT.sub(b"..", data)
    return stuffed if stuffed.endswith(b"\r\n") else stuffed + b"\r\n"


def _decoded(answer: bytes | str) -> str:
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
    return " ".join(text.split())[:300]


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_decoded(str(exc))}"
