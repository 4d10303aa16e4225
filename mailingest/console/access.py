"""Who may use the console, and what protects each request (pure logic, and the two
Redis counters of failed logins).

* Basic auth checks the name and password against the users file's scrypt hash; a
  check that passed is remembered in this process (keyed by an HMAC of the pair) so
  that a page costs a hash, not 50 ms of scrypt.
* Behind an authenticating proxy (``MAILINGEST_CONSOLE_TRUSTED_HEADER``), the header
  names the user; the users file, when given, sets each listed user's role (its hash
  unused), anyone else is a viewer.
* Every action carries a CSRF token: an HMAC, under ``MAILINGEST_CONSOLE_SECRET``, of
  the session cookie and the user, compared in constant time.
* Failed logins are counted per name and per client address for 15 minutes; from the
  tenth on, the console answers 429 without checking the password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from mailingest.adapters import keys
from mailingest.core.console_users import ConsoleUser, verify_password

log = logging.getLogger(__name__)

LOGIN_WINDOW_S = 15 * 60
LOGIN_FAILURES_ALLOWED = 10
SESSION_COOKIE = "mailingest_console"
# what the browser may do with the console's pages: nothing from elsewhere, no frames,
# no inline script or style (htmx is a file of the console's own)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


@dataclass(frozen=True)
class Person:
    """Who is using the console."""

    name: str
    role: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"

    @property
    def actor(self) -> str:
        """How the ledger's history and the audit log name them."""
        return f"console:{self.name}"


class Refused(Exception):
    """No entry: ``status`` 401 (who are you?) or 429 (too many failed logins)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """The name and password of an ``Authorization: Basic`` header (None if none)."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, colon, password = decoded.partition(":")
    return (name, password) if colon else None


class Gate:
    """The console's door: one per process."""

    def __init__(
        self,
        *,
        users: Mapping[str, ConsoleUser],
        trusted_header: str | None,
        secret: bytes,
        client: redis.Redis,
    ) -> None:
        self.users = users
        self.trusted_header = trusted_header
        self.secret = secret
        self.redis = client
        self._passed: set[bytes] = set()  # HMACs of name and password checked already

    def person(self, headers: Mapping[str, str], client_address: str) -> Person:
        """Who sent the request; :class:`Refused` when no one we know."""
        if self.trusted_header:
            name = (headers.get(self.trusted_header.lower()) or "").strip()
            if not name:
                raise Refused(401, "sign in through the proxy")
            user = self.users.get(name)
            return Person(name, user.role if user else "viewer")
        creds = basic_credentials(headers.get("authorization"))
        if creds is None:
            raise Refused(401, "authentication required")
        name, password = creds
        self._not_too_many(name, client_address)
        user = self.users.get(name)
        if user is not None and self._checks(user, password):
            return Person(user.name, user.role)
        self._failed(name, client_address)
        raise Refused(401, "authentication required")

    def _checks(self, user: ConsoleUser, password: str) -> bool:
        mark = hmac.digest(self.secret, f"{user.name}\0{password}".encode(), "sha256")
        if mark in self._passed:
            return True
        if not verify_password(password, user.password_hash):
            return False
        if len(self._passed) > 10_000:
            self._passed.clear()
        self._passed.add(mark)
        return True

    def _not_too_many(self, name: str, address: str) -> None:
        counts = self.redis.mget([keys.console_logins("u:" + name), keys.console_logins(address)])
        if any(int(n or 0) >= LOGIN_FAILURES_ALLOWED for n in counts):
            raise Refused(429, "too many failed logins: try again in 15 minutes")

    def _failed(self, name: str, address: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for who in ("u:" + name, address):
            pipe.incr(keys.console_logins(who))
            pipe.expire(keys.console_logins(who), LOGIN_WINDOW_S, nx=True)
        pipe.execute()
        shown = name if name in self.users else f"unknown user ({len(name)} characters)"
        log.warning("console: failed login for %s from %s", shown, address)

    def csrf_token(self, session: str, person: Person) -> str:
        return hmac.new(
            self.secret, f"csrf\0{session}\0{person.name}".encode(), hashlib.sha256
        ).hexdigest()

    def csrf_ok(self, session: str, person: Person, token: str) -> bool:
        if not session or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session, person), token)


def new_session() -> str:
    return secrets.token_urlsafe(32)


def new_nonce() -> str:
    """One per confirmation page: the action's key against a second send."""
    return secrets.token_urlsafe(16)
