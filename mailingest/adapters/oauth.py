"""XOAUTH2 access tokens for IMAP, from an OAuth2 refresh-token grant all workers share.

One Redis hash per inbox (:func:`~mailingest.adapters.keys.oauth`) holds the access token, its
expiry and the current refresh token, each sealed with the staging key so Redis never
holds a token in clear, and a SHA-256 fingerprint of the *configured* refresh token:

* an access token valid for more than ``refresh_margin`` seconds is used as it is;
* otherwise one process refreshes (RFC 6749 §6) under a Redis lock
  (:func:`~mailingest.adapters.keys.oauth_lock`); the others wait for the lock, read the hash
  again and use its result, so the provider sees one refresh, not one per worker;
* a provider that rotates refresh tokens (Microsoft) answers a new one and revokes the
  old one: it is written to the hash before the access token is returned, and every
  process refreshes with it from then on;
* a configured refresh token whose fingerprint differs from the stored one is new (the
  mailbox owner consented again): it wins over the stored rotated token.  Otherwise the
  stored token wins over the configured one, which the provider may have revoked.

Every failure is an :class:`~mailingest.core.errors.OAuthError` (a ``MailboxError``: the
poll is retried) that names the inbox and the token endpoint, never a token or secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import redis

from mailingest.adapters import keys
from mailingest.adapters.encryption import Sealer, SealingError
from mailingest.config.settings import OAuthSettings, is_loopback
from mailingest.core.errors import ConfigError, OAuthError

__all__ = ["DEFAULT_EXPIRES_IN", "OAuthError", "TokenSource"]

log = logging.getLogger(__name__)

# httpx/httpcore trace requests (form bodies: the refresh token) at DEBUG: keep them out
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

DEFAULT_EXPIRES_IN = 3600.0  # RFC 6749 §5.1 makes expires_in optional; providers use 1 h
_DESCRIPTION_MAX = 200
_ERROR_CODE = re.compile(r"^[\x20-\x7e]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Retrying cannot help these: a person has to act (RFC 6749 §5.2 error codes)
_OPERATOR_HINTS = {
    "invalid_grant": (
        "the refresh token was revoked or has expired: the mailbox owner must consent "
        "again and the new refresh token be configured"
    ),
    "invalid_client": "the provider does not accept the client id/secret: fix the OAuth client",
    "unauthorized_client": "the OAuth client may not use the refresh-token grant: fix the client",
    "invalid_scope": "the scope is not granted to this client: fix the scope or consent again",
}

# Fields of the hash; token values are stored as base64 of sealed bytes
_ACCESS = "access_token"
_EXPIRES_AT = "expires_at"
_LIFETIME = "expires_in"
_REFRESH = "refresh_token"
_CONFIGURED = "configured_sha256"
_REFRESHED_AT = "refreshed_at"


@dataclass(frozen=True)
class _Stored:
    """What the hash holds, opened."""

    access: str | None = None
    expires_at: float = 0.0
    lifetime: float = 0.0
    refresh: str | None = None
    configured: str | None = None


def _display_url(url: str) -> str:
    """The token URL as messages show it: no credentials, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def fingerprint(refresh_token: str) -> str:
    """SHA-256 of a refresh token: tells a re-configured token without storing it."""
    return hashlib.sha256(refresh_token.encode("utf-8")).hexdigest()


def _number(value: object, default: float) -> float:
    try:
        number = float(keys.as_text(value))
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


class TokenSource:
    """Valid access tokens for one inbox's XOAUTH2 login, refreshed once for all workers.

    ``access_token()`` may block while another process refreshes (up to ``wait_timeout``
    seconds) and performs at most one HTTP request itself.  ``invalidate()`` is for a
    token the IMAP server refused: the next ``access_token()`` refreshes.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        inbox_name: str,
        oauth: OAuthSettings,
        sealer: Sealer,
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = 300.0,
        ca_file: Path | None = None,
        timeout: float = 15.0,
        lock_timeout: float = 60.0,
        wait_timeout: float = 45.0,
    ) -> None:
        parts = urlsplit(oauth.token_url)
        host = parts.hostname or ""
        if not host or not (
            parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host))
        ):
            raise ConfigError(
                f"inbox {inbox_name}: the OAuth token URL",
                "must be an https URL (plain http is allowed only to a loopback address)",
            )
        self.inbox = inbox_name
        self.oauth = oauth
        self.token_url = _display_url(oauth.token_url)
        self.refresh_margin = refresh_margin
        self.lock_timeout = lock_timeout
        self.wait_timeout = wait_timeout
        self._redis = redis_client
        self._sealer = sealer
        self._clock = clock
        self._key = keys.oauth(inbox_name)
        self._configured = oauth.refresh_token.reveal()
        self._fingerprint = fingerprint(self._configured)
        self._handed_out: str | None = None  # what invalidate() drops, if still current
        self._own_http = http is None
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            # always verified (hostname too); a private CA may be added
            verify=ssl.create_default_context(cafile=str(ca_file)) if ca_file else True,
            follow_redirects=False,
        )

    def close(self) -> None:
        """Close the HTTP client, if this source made it."""
        if self._own_http:
            self._http.close()

    def __enter__(self) -> TokenSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the token ---------------------------------------------------------------
    def access_token(self) -> str:
        """An access token valid for more than ``refresh_margin`` seconds (refreshed if not)."""
        token = self._usable(self._read())
        if token is None:
            lock = self._redis.lock(
                keys.oauth_lock(self.inbox),
                timeout=self.lock_timeout,
                blocking_timeout=self.wait_timeout,
            )
            if not lock.acquire():
                token = self._usable(self._read())  # the other refresh may have just ended
                if token is None:
                    raise OAuthError(
                        self.inbox,
                        self.token_url,
                        f"did not finish: another worker held the refresh lock for more "
                        f"than {self.wait_timeout:g}s",
                    )
            else:
                try:
                    stored = self._read()  # another process may have refreshed meanwhile
                    token = self._usable(stored)
                    if token is None:
                        token = self._refresh(stored)
                finally:
                    _release(lock)
        self._handed_out = token
        return token

    def invalidate(self) -> None:
        """Drop the cached access token (the server refused it) unless it was replaced already.

        Only the token this source handed out last is dropped: a newer one another worker
        stored meanwhile is kept, so one refused token costs one refresh, not one per worker.
        """
        refused, self._handed_out = self._handed_out, None

        dropped = False

        def drop(pipe: redis.client.Pipeline) -> None:
            nonlocal dropped
            stored = self._open(_ACCESS, pipe.hget(self._key, _ACCESS))
            dropped = stored is not None and refused in (None, stored)
            if dropped:
                pipe.multi()
                pipe.hdel(self._key, _ACCESS, _EXPIRES_AT)

        # WATCHed: a token another worker stores between the read and the delete stays
        self._redis.transaction(drop, self._key)
        if dropped:
            log.info("inbox %s: OAuth access token dropped (refused by IMAP)", self.inbox)

    # -- Redis -------------------------------------------------------------------
    def _seal(self, field: str, value: str) -> str:
        # the inbox and field are sealed with the value: a value copied to another
        # inbox's hash or another field does not open
        plain = f"{self.inbox}\n{field}\n{value}".encode()
        return base64.b64encode(self._sealer.seal(plain)).decode("ascii")

    def _open(self, field: str, value: object) -> str | None:
        if value is None:
            return None
        try:
            plain = self._sealer.open(base64.b64decode(keys.as_text(value), validate=True))
        except (binascii.Error, ValueError, SealingError):
            plain = b""
        prefix = f"{self.inbox}\n{field}\n".encode()
        if not plain.startswith(prefix) or len(plain) == len(prefix):
            log.warning(
                "inbox %s: the stored OAuth %s does not open with the staging key; ignored",
                self.inbox,
                field,
            )
            return None
        return plain[len(prefix) :].decode("utf-8", "replace")

    def _read(self) -> _Stored:
        fields = {keys.as_text(k): v for k, v in self._redis.hgetall(self._key).items()}
        configured = fields.get(_CONFIGURED)
        return _Stored(
            access=self._open(_ACCESS, fields.get(_ACCESS)),
            expires_at=_number(fields.get(_EXPIRES_AT), 0.0),
            lifetime=_number(fields.get(_LIFETIME), 0.0),
            refresh=self._open(_REFRESH, fields.get(_REFRESH)),
            configured=keys.as_text(configured) if configured is not None else None,
        )

    def _usable(self, stored: _Stored) -> str | None:
        if stored.access is None or stored.configured != self._fingerprint:
            return None  # none yet, or from a refresh token the operator has replaced
        # a token living shorter than the margin is used for half its life, not refreshed
        # on every call
        margin = min(self.refresh_margin, stored.lifetime / 2)
        return stored.access if stored.expires_at - self._clock() > margin else None

    # -- refresh -----------------------------------------------------------------
    def _refresh(self, stored: _Stored) -> str:
        """Refresh (the caller holds the lock) and store the result before returning it."""
        for attempt in (1, 2):
            current = stored.configured == self._fingerprint and stored.refresh is not None
            refresh_token = stored.refresh if current and stored.refresh else self._configured
            try:
                access, lifetime, rotated = self._grant(refresh_token)
            except OAuthError as exc:
                if attempt == 2 or exc.error != "invalid_grant":
                    raise
                # our lock may have expired during a slow request while another worker
                # refreshed and rotated the token: use what it stored, once
                stored = self._read()
                token = self._usable(stored)
                if token is not None:
                    return token
                if stored.configured != self._fingerprint or stored.refresh in (
                    None,
                    refresh_token,
                ):
                    raise
                continue
            now = self._clock()
            # one HSET: the rotated refresh token is stored with (and before anyone can
            # use) the access token it came with
            self._redis.hset(
                self._key,
                mapping={
                    _ACCESS: self._seal(_ACCESS, access),
                    _EXPIRES_AT: repr(now + lifetime),
                    _LIFETIME: repr(lifetime),
                    _REFRESH: self._seal(_REFRESH, rotated or refresh_token),
                    _CONFIGURED: self._fingerprint,
                    _REFRESHED_AT: repr(now),
                },
            )
            log.info(
                "inbox %s: OAuth access token refreshed (valid %ds%s)",
                self.inbox,
                lifetime,
                ", refresh token rotated" if rotated and rotated != refresh_token else "",
            )
            return access
        raise AssertionError("unreachable")

    def _grant(self, refresh_token: str) -> tuple[str, float, str | None]:
        """POST the refresh-token grant; (access token, lifetime in s, rotated refresh token)."""
        oauth = self.oauth
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": oauth.client_id,
        }
        if oauth.client_secret:
            form["client_secret"] = oauth.client_secret.reveal()
        if oauth.scope:
            form["scope"] = oauth.scope
        try:
            response = self._http.post(
                oauth.token_url, data=form, headers={"Accept": "application/json"}
            )
        except httpx.TimeoutException as exc:
            raise self._error(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise self._error(
                    "failed: TLS certificate not trusted (a private CA can be given as ca_file)"
                ) from None
            raise self._error(f"could not connect ({type(exc).__name__})") from None
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        status = response.status_code
        if status != 200:
            raise self._refused(status, body if isinstance(body, dict) else {}, refresh_token)
        if not isinstance(body, dict):
            raise self._error("answered 200 with a body that is not a JSON object", status=200)
        access = body.get("access_token")
        if not isinstance(access, str) or not access or not access.isascii():
            raise self._error("answered 200 without a usable access_token", status=200)
        token_type = body.get("token_type")
        if isinstance(token_type, str) and token_type.lower() != "bearer":
            raise self._error(f"answered a {token_type[:20]!r} token, not a Bearer", status=200)
        lifetime = max(0.0, _number(body.get("expires_in", DEFAULT_EXPIRES_IN), DEFAULT_EXPIRES_IN))
        rotated = body.get("refresh_token")
        return access, lifetime, rotated if isinstance(rotated, str) and rotated else None

    def _refused(self, status: int, body: Mapping[str, object], refresh_token: str) -> OAuthError:
        code = body.get("error")
        error = code if isinstance(code, str) and _ERROR_CODE.match(code) else None
        description = body.get("error_description")
        text = self._scrub(description, refresh_token) if isinstance(description, str) else None
        hint = _OPERATOR_HINTS.get(error or "")
        if hint is None and status == 401 and error is None:
            hint = _OPERATOR_HINTS["invalid_client"]
        if hint is not None:
            return self._error(
                "was refused", status=status, error=error, description=text, hint=hint, final=True
            )
        if status == 429 or status >= 500:
            return self._error(
                "failed", status=status, error=error, description=text, hint="retried later"
            )
        return self._error("was refused", status=status, error=error, description=text)

    def _scrub(self, text: str, refresh_token: str) -> str:
        """A provider's error_description, bounded, on one line, without our secrets."""
        secrets = [refresh_token, self._configured]
        if self.oauth.client_secret:
            secrets.append(self.oauth.client_secret.reveal())
        for secret in secrets:
            text = text.replace(secret, "********")
        text = _CONTROL.sub(" ", text).strip()
        return text if len(text) <= _DESCRIPTION_MAX else text[: _DESCRIPTION_MAX - 1] + "…"

    def _error(
        self,
        problem: str,
        *,
        status: int | None = None,
        error: str | None = None,
        description: str | None = None,
        hint: str | None = None,
        final: bool = False,
    ) -> OAuthError:
        return OAuthError(
            self.inbox,
            self.token_url,
            problem,
            status=status,
            error=error,
            description=description,
            needs_operator=final,
            hint=hint,
        )


def _release(lock: redis.lock.Lock) -> None:
    try:
        lock.release()
    except redis.exceptions.LockError:  # expired during a slow refresh: nothing to free
        log.warning("OAuth refresh outlived its lock (%s)", lock.name)
