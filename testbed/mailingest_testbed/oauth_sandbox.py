"""A small OAuth2 authorization server for the tests and the demo (stdlib only).

It plays the mail provider's identity platform: the refresh-token grant mailingest
uses and the token introspection Dovecot's ``oauth2`` passdb asks::

    POST /token        grant_type=refresh_token (RFC 6749 §6) -> access token
    POST /introspect   token=<access token> (RFC 7662) -> {"active": true, "username": ...}
    GET  /introspect?token=...  or  Authorization: Bearer <access token>: the same

Decisions:

* A refresh token comes from :meth:`OAuthSandbox.consent` (the mailbox owner's
  consent, done once by an operator).  With ``rotate=True`` (the default, like
  Microsoft) every refresh answers a new refresh token and revokes the one used, so
  a client that keeps using an old one gets ``invalid_grant``.
* Client authentication: ``client_id``/``client_secret`` in the form or HTTP Basic;
  a wrong or missing one gets 401 ``invalid_client``.  An unknown or revoked refresh
  token gets 400 ``invalid_grant``.
* Access tokens live ``access_lifetime`` seconds; an expired or revoked one is
  introspected ``{"active": false}``.  :meth:`expire_access_tokens` makes every
  issued token expire now, so an expiry test does not have to wait.
* Introspection is not authenticated (loopback only) and counts every answer.
* ``tls=(certificate, key)`` serves HTTPS instead, for the certificate tests.
* :meth:`fail_token_requests` answers the next token requests with an error (a 503
  by default), for the retry tests; ``token_delay`` slows every grant down, so
  concurrent refreshes really overlap.

Run: ``python -m mailingest_testbed.oauth_sandbox --user customer-support`` prints a refresh
token and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mailingest_testbed.alloy_sandbox import serve_tls

__all__ = ["OAuthSandbox"]

_BODY_MAX = 64 * 1024


@dataclass
class _Grant:
    """A refresh token: the consent of one user."""

    username: str
    scope: str
    revoked: bool = False


@dataclass
class _Access:
    username: str
    scope: str
    issued_at: float
    expires_at: float
    revoked: bool = False


class OAuthSandbox:
    """The token and introspection endpoints on 127.0.0.1, served from a daemon thread."""

    def __init__(
        self,
        *,
        client_id: str = "mailingest-test",
        client_secret: str | None = "sandbox-client-secret",
        access_lifetime: float = 3600.0,
        rotate: bool = True,
        scope: str = "imap",
        token_delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.access_lifetime = access_lifetime
        self.rotate = rotate
        self.scope = scope
        self.token_delay = token_delay
        self.clock = clock
        self.refreshes = 0  # successful refresh grants
        self.token_requests = 0  # every request to /token
        self.introspections = 0  # every introspection answered
        self.active_introspections = 0  # ... that answered active: true
        self._grants: dict[str, _Grant] = {}
        self._access: dict[str, _Access] = {}
        self._failures: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # port 0: the kernel picks a free port at bind time (no race with other tests)
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.sandbox = self  # type: ignore[attr-defined]
        self.scheme = serve_tls(self._httpd, tls)
        self.host = host
        self.port: int = self._httpd.server_address[1]

    # -- addresses ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def introspection_url(self) -> str:
        return self.url + "/introspect"

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> OAuthSandbox:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.01},
                name=f"oauth-sandbox-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._httpd.shutdown()
            thread.join(5)
        self._httpd.server_close()

    def __enter__(self) -> OAuthSandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what tests and the demo do -------------------------------------------------
    def consent(self, username: str, scope: str | None = None) -> str:
        """A new refresh token for ``username``: what the operator configures."""
        token = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self._grants[token] = _Grant(username, scope or self.scope)
        return token

    def revoke(self, token: str) -> None:
        """Revoke a refresh token or an access token."""
        with self._lock:
            if token in self._grants:
                self._grants[token].revoked = True
            if token in self._access:
                self._access[token].revoked = True

    def expire_access_tokens(self) -> None:
        """Every access token issued so far expires now (introspected inactive)."""
        now = self.clock()
        with self._lock:
            for access in self._access.values():
                access.expires_at = min(access.expires_at, now)

    def fail_token_requests(self, count: int = 1, status: int = 503) -> None:
        """Answer the next ``count`` token requests with ``status`` (not applied)."""
        error = "temporarily_unavailable" if status >= 500 else "invalid_request"
        with self._lock:
            self._failures += [(status, error)] * count

    def is_active(self, access_token: str) -> bool:
        with self._lock:
            return self._active(access_token) is not None

    def refresh_token_valid(self, refresh_token: str) -> bool:
        with self._lock:
            grant = self._grants.get(refresh_token)
            return grant is not None and not grant.revoked

    @property
    def issued_access_tokens(self) -> list[str]:
        with self._lock:
            return list(self._access)

    @property
    def issued_refresh_tokens(self) -> list[str]:
        """Every refresh token issued (consented or rotated), revoked ones too."""
        with self._lock:
            return list(self._grants)

    # -- the endpoints (called from the handler threads) ----------------------------
    def _active(self, token: str) -> _Access | None:
        access = self._access.get(token)
        if access is None or access.revoked or access.expires_at <= self.clock():
            return None
        return access

    def token(
        self, form: dict[str, str], basic: tuple[str, str] | None
    ) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.token_requests += 1
            if self._failures:
                status, error = self._failures.pop(0)
                return status, {"error": error, "error_description": "sandbox fault"}
        if self.token_delay:
            time.sleep(self.token_delay)
        client_id, client_secret = basic or (form.get("client_id"), form.get("client_secret"))
        if client_id != self.client_id or not _same(client_secret, self.client_secret):
            return 401, {"error": "invalid_client", "error_description": "unknown client"}
        if form.get("grant_type") != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        presented = form.get("refresh_token", "")
        with self._lock:
            grant = self._grants.get(presented)
            if grant is None or grant.revoked:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "the refresh token is unknown, revoked or expired",
                }
            scope = form.get("scope") or grant.scope
            if set(scope.split()) - set(grant.scope.split()):
                return 400, {"error": "invalid_scope", "error_description": "not consented"}
            now = self.clock()
            access = "at-" + secrets.token_urlsafe(24)
            self._access[access] = _Access(grant.username, scope, now, now + self.access_lifetime)
            answer: dict[str, Any] = {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": int(self.access_lifetime),
                "scope": scope,
            }
            if self.rotate:
                grant.revoked = True
                rotated = "rt-" + secrets.token_urlsafe(24)
                self._grants[rotated] = _Grant(grant.username, grant.scope)
                answer["refresh_token"] = rotated
            self.refreshes += 1
        return 200, answer

    def introspect(self, token: str) -> dict[str, Any]:
        with self._lock:
            self.introspections += 1
            access = self._active(token)
            if access is None:
                return {"active": False}
            self.active_introspections += 1
            return {
                "active": True,
                "username": access.username,
                "client_id": self.client_id,
                "scope": access.scope,
                "token_type": "Bearer",
                "iat": int(access.issued_at),
                "exp": int(access.expires_at),
            }


def _same(given: str | None, expected: str | None) -> bool:
    if expected is None:
        return True  # a public client: no secret checked
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mailingest-oauth-sandbox"
    timeout = 30  # an idle keep-alive connection frees its thread

    @property
    def sandbox(self) -> OAuthSandbox:
        return self.server.sandbox  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: request lines would carry tokens in GET queries

    def _form(self) -> dict[str, str] | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _BODY_MAX:
            return None
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def _basic(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user, password

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="oauth-sandbox"')
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        form = self._form()
        if form is None:
            self.close_connection = True
            self._send(413, {"error": "invalid_request", "error_description": "too large"})
        elif path == "/token":
            self._send(*self.sandbox.token(form, self._basic()))
        elif path == "/introspect":
            self._send(200, self.sandbox.introspect(form.get("token") or self._bearer()))
        else:
            self._send(404, {"error": "not_found"})

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/introspect":
            query = parse_qs(parts.query)
            token = (query.get("token") or query.get("access_token") or [""])[0]
            self._send(200, self.sandbox.introspect(token or self._bearer()))
        else:
            self._send(404, {"error": "not_found"})

    def _bearer(self) -> str:
        header = self.headers.get("Authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailingest_testbed.oauth_sandbox",
        description="OAuth2 refresh-token grant and introspection, for the demo",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any)")
    parser.add_argument("--user", default="customer-support", help="the user to consent for")
    parser.add_argument("--client-id", default="mailingest-test")
    parser.add_argument("--client-secret", default="sandbox-client-secret")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="access token seconds")
    parser.add_argument("--no-rotate", action="store_true", help="keep refresh tokens")
    args = parser.parse_args(argv)
    server = OAuthSandbox(
        client_id=args.client_id,
        client_secret=args.client_secret or None,
        access_lifetime=args.lifetime,
        rotate=not args.no_rotate,
        port=args.port,
    )
    print(f"token URL          {server.token_url}")
    print(f"introspection URL  {server.introspection_url}")
    print(f"refresh token      {server.consent(args.user)}", flush=True)
    server.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
