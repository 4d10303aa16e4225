"""Who may use the console, and what protects each request (pure logic, and the two
Redis counters of failed logins).

* Basic auth checks the name and password against the users file's scrypt hash; a
  check that passed is remembered in this process for its session (an HMAC of the
  session, the name and the password), so that a page costs a hash, not 50 ms of
  scrypt, and a locked-out guesser learns nothing from a cached answer.
* Behind an authenticating proxy (``MAILINGEST_CONSOLE_TRUSTED_HEADER``), the header
  names the user; the users file, when given, sets each listed user's role (its hash
  unused), anyone else is a viewer.
* Every action carries a CSRF token: an HMAC, under ``MAILINGEST_CONSOLE_SECRET``, of
  the session cookie and the user, compared in constant time.
* Logins are counted per name from a client address (ten allowed) and per address (50),
  for 15 minutes, atomically before the password is checked (a good one is taken back
  off): past that, the console answers 429 without checking. A name is never locked for
  every address, so a stranger's guesses cannot lock its owner out. At most four
  scrypt checks run at once; an unknown name is checked against a dummy hash, so the
  time does not tell which names exist.
* Behind a proxy, the header must come once and be a well-formed name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import redis
from starlette.datastructures import Headers

from mailingest.adapters import keys
from mailingest.core.console_users import NAME, ConsoleUser, hash_password, verify_password

log = logging.getLogger(__name__)

SCRYPT_AT_ONCE = 4
SCRYPT_WAIT_S = 0.5  # a login waits this long for a check at most (then 503): a flood of
# logins holds no thread of the pool the pages share
UNCOUNT = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('DECR', key) end
end
return 0
"""
LOGIN_WINDOW_S = 15 * 60
LOGIN_FAILURES_ALLOWED = 10  # per name from one address
ADDRESS_FAILURES_ALLOWED = 50  # per address, whatever the names
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


# checked against when the name is unknown, so that it takes as long as a known one
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


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
        # scrypt costs 16 MB and 50 ms a check: a few at once, the rest wait their turn
        self._checking = threading.BoundedSemaphore(SCRYPT_AT_ONCE)
        self._uncount = client.register_script(UNCOUNT)

    def person(self, headers: Headers, client_address: str, session: str) -> Person:
        """Who sent the request; :class:`Refused` when no one we know. A login this
        session passed before is not checked again (no scrypt, no Redis): the cache is
        per session, so it tells a guesser nothing; any other request is counted and
        checked, however well the password is known."""
        if self.trusted_header:
            return self._proxied(headers)
        creds = basic_credentials(headers.get("authorization"))
        if creds is None:
            raise Refused(401, "authentication required")
        name, password = creds
        user = self.users.get(name)
        if user is not None and self._mark(user.name, password, session) in self._passed:
            return Person(user.name, user.role)  # this session's login, checked before
        where = network_of(client_address)
        counters = [
            keys.console_logins(f"a:{where}"),
            keys.console_logins(f"n:{name}\0{where}"),
        ]
        self._count_attempt(counters)  # before the check: attempts at once count too
        if not self._checking.acquire(timeout=SCRYPT_WAIT_S):
            self._uncount_attempt(counters)  # not checked: not counted
            raise Refused(503, "too many logins at once: try again in a moment")
        try:
            # an unknown name costs what a known one does: no telling names by the time
            ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
        finally:
            self._checking.release()
        if user is not None and ok:
            self._uncount_attempt(counters)
            if len(self._passed) > 10_000:
                self._passed.clear()
            self._passed.add(self._mark(user.name, password, session))
            return Person(user.name, user.role)
        shown = name if name in self.users else f"an unknown user ({len(name)} characters)"
        log.warning("console: failed login for %s from %s", shown, client_address)
        raise Refused(401, "authentication required")

    def _proxied(self, headers: Headers) -> Person:
        """The user the authenticating proxy names (one header, one well-formed name)."""
        assert self.trusted_header is not None
        given = headers.getlist(self.trusted_header.lower())
        if not given or not given[0].strip():
            raise Refused(401, "sign in through the proxy")
        if len(given) > 1:
            log.warning("console: %s sent more than once: refused", self.trusted_header)
            raise Refused(401, "sign in through the proxy")
        name = given[0].strip()
        if not NAME.fullmatch(name):
            raise Refused(401, "sign in through the proxy")
        user = self.users.get(name)
        return Person(name, user.role if user else "viewer")

    def _mark(self, name: str, password: str, session: str) -> bytes:
        return hmac.digest(self.secret, f"{session}\0{name}\0{password}".encode(), "sha256")

    def _count_attempt(self, counters: list[str]) -> None:
        """One more login tried: by this address, and by this name from it. Counted
        atomically before the password is checked, so attempts sent at once are held
        to the limit too. A name is never locked for every address: a stranger's
        guesses do not lock its owner out."""
        pipe = self.redis.pipeline(transaction=True)
        for key in counters:
            pipe.incr(key)
            pipe.expire(key, LOGIN_WINDOW_S, nx=True)
        by_address, by_name_there = (int(n) for n in pipe.execute()[0::2])
        if by_name_there > LOGIN_FAILURES_ALLOWED or by_address > ADDRESS_FAILURES_ALLOWED:
            raise Refused(429, "too many failed logins: try again in 15 minutes")

    def _uncount_attempt(self, counters: list[str]) -> None:
        """Take an attempt back off, if its window has not ended meanwhile (a DECR of a
        key gone would make one without an expiry)."""
        self._uncount(keys=counters)

    def csrf_token(self, session: str, person: Person) -> str:
        return hmac.new(
            self.secret, f"csrf\0{session}\0{person.name}".encode(), hashlib.sha256
        ).hexdigest()

    def csrf_ok(self, session: str, person: Person, token: str) -> bool:
        if not session or not token:
            return False
        return hmac.compare_digest(self.csrf_token(session, person), token)

    def nonce(self, person: Person, action: str, subject: str) -> str:
        """A form's one-time key, signed over who may send it and what it does."""
        fresh = secrets.token_urlsafe(12)
        return f"{fresh}.{self._nonce_mac(fresh, person, action, subject)}"

    def nonce_ok(self, nonce: str, person: Person, action: str, subject: str) -> bool:
        fresh, _, mac = nonce.partition(".")
        if not fresh or len(nonce) > 128:
            return False
        return hmac.compare_digest(self._nonce_mac(fresh, person, action, subject), mac)

    def _nonce_mac(self, fresh: str, person: Person, action: str, subject: str) -> str:
        text = f"nonce\0{fresh}\0{person.name}\0{action}\0{subject}"
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()[:32]


def network_of(address: str) -> str:
    """What logins are counted by: an IPv4 address, or an IPv6 address's /64 (one
    customer line holds a whole /64: its addresses are not so many attackers)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 6 and parsed.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed.ipv4_mapped or parsed) if parsed.version == 6 else str(parsed)


def new_session() -> str:
    return secrets.token_urlsafe(32)
