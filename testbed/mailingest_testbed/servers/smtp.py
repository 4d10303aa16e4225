"""A private SMTP server in this process (aiosmtpd) that keeps what it receives.

On a free loopback port, optionally with STARTTLS (a certificate of the test CA) and a
login. ``fail`` makes it answer the next MAIL, RCPT or DATA with a given reply (a 4xx,
a 5xx); ``drop_after_data`` makes it take a message and close the connection before it
answers (the reply is then *in doubt* for the sender). Each message received is kept
as (envelope sender, recipients, bytes).
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from .common import HOST, free_port


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Faults:
    """Random faults, each a fraction of the commands it applies to: a 4xx to MAIL
    (``temporary``), a 5xx to DATA (``permanent``, the message not kept), and an answer
    to DATA ``slow_s`` late after the message was kept (``slow``: a sender killed then
    never learns it went)."""

    temporary: float = 0.0
    permanent: float = 0.0
    slow: float = 0.0
    slow_s: float = 0.5
    seed: int = 0


@dataclass
class _Handler:
    received: list[Received] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # phase -> reply, once
    drop_after_data: bool = False
    faults: Faults = field(default_factory=Faults)
    counts: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    lock: threading.Lock = field(default_factory=threading.Lock)
    answering_late: threading.Event = field(default_factory=threading.Event)
    # checks an XOAUTH2 login (user, access token); None: the mechanism is refused
    xoauth2: Callable[[str, str], bool] | None = None

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        """``AUTH XOAUTH2``: ``user=<user>^Aauth=Bearer <token>^A^A`` (Google, Microsoft)."""
        if self.xoauth2 is None:
            return AuthResult(success=False)
        if len(args) == 1:
            data = await server.challenge_auth("")
            if not isinstance(data, bytes):
                return AuthResult(success=False)
        else:
            data = base64.b64decode(args[1])
        fields = dict(
            part.split("=", 1)
            for part in data.decode(errors="replace").split("\x01")
            if "=" in part
        )
        token = fields.get("auth", "").removeprefix("Bearer ")
        return AuthResult(success=self.xoauth2(fields.get("user", ""), token), handled=False)

    def _failure(self, phase: str) -> str | None:
        with self.lock:
            failure = self.failures.pop(phase, None)
            if failure is not None:
                return failure
            chance = {"MAIL": self.faults.temporary, "DATA": self.faults.permanent}.get(phase)
            if chance and self.rng.random() < chance:
                name = "answered 4xx" if phase == "MAIL" else "answered 5xx"
                self.counts[name] = self.counts.get(name, 0) + 1
                return "451 4.3.0 try again later" if phase == "MAIL" else "554 5.6.0 refused"
            return None

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        failure = self._failure("MAIL")
        if failure:
            return failure
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        failure = self._failure("RCPT")
        if failure:
            return failure
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        failure = self._failure("DATA")
        if failure:
            return failure
        with self.lock:
            self.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
            )
            drop = self.drop_after_data
            self.drop_after_data = False
            slow = self.faults.slow and self.rng.random() < self.faults.slow
            if slow:
                self.counts["answered late"] = self.counts.get("answered late", 0) + 1
        if slow:
            self.answering_late.set()  # kept, not answered yet: a sender killed now
            await asyncio.sleep(self.faults.slow_s)  # never learns it went
            self.answering_late.clear()
        if drop:
            server.transport.close()  # taken, never answered: in doubt for the sender
            return "421 closing"
        return "250 Message accepted"


class _Smtp(SMTP):
    """aiosmtpd's server, whose answer to the DATA command itself (before the message,
    where a handler hook cannot answer) may be set: ``fail("DATA command", ...)``."""

    async def smtp_DATA(self, arg: str) -> None:
        handler = self.event_handler
        failure = handler._failure("DATA command") if isinstance(handler, _Handler) else None
        if failure is not None:
            await self.push(failure)
            return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _Smtp(self.handler, **self.SMTP_kwargs)


class SmtpServer:
    """aiosmtpd on a free loopback port; ``start()``, ``stop()``, or use ``with``."""

    def __init__(
        self,
        *,
        tls: tuple[Path, Path] | None = None,
        login: tuple[str, str] | None = None,
        xoauth2: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.host = HOST
        self.port = free_port()
        self.handler = _Handler(xoauth2=xoauth2)
        self.login = login
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
        kwargs: dict[str, Any] = {}
        if login is not None or xoauth2 is not None:
            kwargs |= {
                "authenticator": self._authenticate,
                "auth_require_tls": tls is not None,
                "auth_required": True,
            }
        self._options: dict[str, Any] = {
            "tls_context": context,
            "require_starttls": tls is not None,
            **kwargs,
        }
        self.controller = self._controller()

    def _controller(self) -> Controller:
        return _Controller(self.handler, hostname=self.host, port=self.port, **self._options)

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword) and self.login is not None:
            ok = (data.login.decode(), data.password.decode()) == self.login
            return AuthResult(success=ok, handled=False)
        return AuthResult(success=False, handled=False)

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    def fail(self, phase: str, reply: str) -> None:
        """Answer the next ``phase`` with ``reply`` ("451 busy"): MAIL, RCPT, "DATA
        command" (refused before the message is sent) or DATA (the message refused)."""
        with self.handler.lock:
            self.handler.failures[phase] = reply

    def drop_after_data(self) -> None:
        with self.handler.lock:
            self.handler.drop_after_data = True

    def wait_answering_late(self, timeout: float) -> bool:
        """Until a message is kept and its answer held back (a ``slow`` fault)."""
        return self.handler.answering_late.wait(timeout)

    def set_faults(self, faults: Faults) -> None:
        with self.handler.lock:
            self.handler.faults = faults
            self.handler.rng = random.Random(faults.seed)

    @property
    def counts(self) -> dict[str, int]:
        """How many faults of each kind it made."""
        with self.handler.lock:
            return dict(self.handler.counts)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (a connection then is refused), wait ``down_s``, start on the same port."""
        self.controller.stop()
        time.sleep(down_s)
        self.controller = self._controller()  # a stopped Controller cannot start again
        self.controller.start()

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
