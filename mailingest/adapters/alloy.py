"""The four document calls of Alloy's API, over one pooled httpx client.

    describe  POST /entities/{entity}/documents             -> Document (uploaded false)
    upload    PUT  /entities/{entity}/documents/{document}  -> Document (uploaded true)
    download  GET  /entities/{entity}/documents/{document}  -> bytes
    list      GET  /entities/{entity}/documents             -> [Document]

Errors come back as :class:`~mailingest.core.errors.AlloyRejected` (final) or
:class:`~mailingest.core.errors.AlloyUnavailable` (429, 5xx, timeouts, dropped
connections: retry later, honouring ``retry_after``). The client itself does
not retry: the caller (a Celery task, or ``poll-once``) owns the schedule, so a
worker never blocks on a backoff. It only waits its turn before a request, a few
seconds at most: out the pause every worker keeps after a 429, and for a token of the
shared rate limit when one is set (:mod:`mailingest.adapters.rate_limit`).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from mailingest import __version__
from mailingest.adapters.rate_limit import AlloyPause, Deferred, RateLimiter
from mailingest.application import metrics
from mailingest.config.secret import Secret
from mailingest.config.table import default_float
from mailingest.core.errors import AlloyError, AlloyRejected, AlloyUnavailable
from mailingest.core.records import Document  # Alloy's answer, as data (re-exported)

# each operation's path as a metric label (no entity or document token in a label)
ENDPOINTS = {
    "describe": "/entities/{entity}/documents",
    "list": "/entities/{entity}/documents",
    "upload": "/entities/{entity}/documents/{document}",
    "download": "/entities/{entity}/documents/{document}",
}
# a well-formed entity token no customer has: check_credentials lists its documents
CREDENTIALS_PROBE = "P-mailingestCheck00000"


# httpx/httpcore trace requests at DEBUG; keep the wire out of our logs
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime

        when = parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def error_from_response(response: httpx.Response, operation: str) -> AlloyError:
    """Turn an error answer into a typed exception carrying Alloy's own words."""
    status = response.status_code
    minor = error_type = token = None
    details: object = None
    message = response.reason_phrase or "error"
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        minor = err.get("minor_code") if isinstance(err.get("minor_code"), int) else None
        error_type = err.get("type") if isinstance(err.get("type"), str) else None
        message = str(err.get("message") or error_type or message)[:500]
        token = err.get("error_token") if isinstance(err.get("error_token"), str) else None
        details = err.get("details")
    # 401 is about our credentials, not this document: retried (and the mail eventually
    # `failed`, never quarantined), so one expired secret cannot quarantine every mail;
    # 408 (request timeout) and 425 (too early) say "not now", not "never"
    cls = AlloyUnavailable if status in (401, 408, 425, 429) or status >= 500 else AlloyRejected
    error = cls(
        message,
        status=status,
        minor_code=minor,
        error_type=error_type,
        error_token=token,
        details=details,
        retry_after=_retry_after(response.headers.get("retry-after")),
        operation=operation,
    )
    # an answer that says the request was not carried out: rate limited, offline, refused
    error.applied = not (status in (401, 429, 503) or status < 500)
    return error


class AlloyClient:
    """One per process: a pooled, keep-alive HTTP client with explicit timeouts."""

    def __init__(
        self,
        base_url: str,
        token: Secret | None,
        secret: Secret | None,
        *,
        connect_timeout: float = default_float("ALLOY_CONNECT_TIMEOUT"),
        read_timeout: float = default_float("ALLOY_READ_TIMEOUT"),
        max_connections: int = 20,
        transport: httpx.BaseTransport | None = None,
        ca_file: Path | None = None,
        limiter: RateLimiter | None = None,
        pause: AlloyPause | None = None,
    ) -> None:
        self.limiter = limiter  # the shared token bucket (MAILINGEST_ALLOY_RATE)
        self.pause = pause  # the shared hold after a 429
        auth = None
        if token is not None and secret is not None:
            auth = httpx.BasicAuth(token.reveal(), secret.reveal())
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            auth=auth,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={"User-Agent": f"mailingest/{__version__}"},
            transport=transport,
            # certificates are always verified; a private CA is added, never a bypass
            verify=ssl.create_default_context(cafile=str(ca_file)) if ca_file else True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AlloyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the four calls ----------------------------------------------------
    def describe(
        self,
        entity: str,
        *,
        name: str,
        extension: str,
        type: str,
        note: str | None,
        note_author_agent_email: str | None,
        turn_taken: bool = False,
    ) -> Document:
        """``turn_taken``: the caller waited its turn (:meth:`wait_turn`) just before, so
        the request goes at once (the pipeline sends a describe within a few seconds of
        recording its attempt, and waits for its turn before recording it)."""
        body: dict[str, str] = {"name": name, "extension": extension, "type": type}
        if note:
            body["note"] = note
        if note_author_agent_email:
            body["note_author_agent_email"] = note_author_agent_email
        with self._call("describe", turn_taken=turn_taken) as call:
            response = call("POST", self._path(entity), json=body)
        return Document.from_json(self._json(response, "describe"))

    def upload(self, entity: str, document: str, data: bytes) -> Document:
        with self._call("upload") as call:
            response = call(
                "PUT",
                self._path(entity, document),
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
        return Document.from_json(self._json(response, "upload"))

    def download(self, entity: str, document: str) -> bytes:
        with self._call("download") as call:
            response = call("GET", self._path(entity, document))
        return bytes(response.content)

    def list(self, entity: str) -> list[Document]:
        with self._call("list") as call:
            response = call("GET", self._path(entity))
        body = self._json(response, "list")
        if not isinstance(body, list):
            raise AlloyRejected("answer is not a list of documents", operation="list")
        return [Document.from_json(item) for item in body]

    def check_credentials(self) -> None:
        """Raise AlloyError unless Alloy accepts the credentials (for ``check-config``).

        Alloy has no "who am I" call for API keys; listing the documents of an entity
        that does not exist answers 400/4013 to good credentials and 401 to bad ones.
        """
        try:
            self.list(CREDENTIALS_PROBE)
        except AlloyRejected as exc:
            if exc.minor_code != 4013:
                raise

    # -- plumbing ----------------------------------------------------------
    @staticmethod
    def _path(entity: str, document: str | None = None) -> str:
        path = f"entities/{quote(entity, safe='')}/documents"
        if document is not None:
            path += "/" + quote(document, safe="")
        return path

    @staticmethod
    def _json(response: httpx.Response, operation: str) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AlloyUnavailable(
                f"answered {response.status_code} with a body that is not JSON", operation=operation
            ) from None

    def wait_turn(self, operation: str) -> None:
        """Hold until this process may send one request: while another worker's 429
        pauses every worker, then for a token of the shared rate limit (when set). A
        hold longer than a few seconds raises AlloyUnavailable (not sent: retry after
        its ``retry_after``) instead of waiting in the worker."""
        try:
            if self.pause is not None:
                held = self.pause.hold()
                if held:
                    metrics.alloy_held("pause", held)
            if self.limiter is not None:
                waited = self.limiter.acquire()  # one rate for all workers
                if waited:
                    metrics.alloy_held("rate_limit", waited)
        except Deferred as exc:
            metrics.alloy_deferred(exc.cause)
            error = AlloyUnavailable(str(exc), retry_after=exc.retry_after, operation=operation)
            error.applied = False  # never sent
            raise error from None

    @contextmanager
    def _call(self, operation: str, *, turn_taken: bool = False) -> Iterator[Any]:
        def call(method: str, url: str, **kw: Any) -> httpx.Response:
            if not turn_taken:
                self.wait_turn(operation)
            endpoint = ENDPOINTS.get(operation, operation)
            started = time.perf_counter()
            try:
                response = self._http.request(method, url, **kw)
            except httpx.TransportError:
                metrics.alloy_answered(method, endpoint, 0, time.perf_counter() - started)
                raise
            metrics.alloy_answered(
                method, endpoint, response.status_code, time.perf_counter() - started
            )
            if response.status_code >= 400:
                error = error_from_response(response, operation)
                if response.status_code == 429 and self.pause is not None:
                    self.pause.begin(error.retry_after)  # every worker holds, not just us
                raise error
            return response

        try:
            yield call
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # the request never left
            text = (
                "TLS certificate not trusted (a private CA goes in MAILINGEST_ALLOY_CA_FILE)"
                if "CERTIFICATE_VERIFY_FAILED" in str(exc)
                else f"connection failed ({type(exc).__name__})"
            )
            error = AlloyUnavailable(text, operation=operation)
            error.applied = False
            raise error from None
        except httpx.TimeoutException as exc:
            raise AlloyUnavailable(
                f"timed out ({type(exc).__name__})", operation=operation
            ) from None
        except httpx.TransportError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise AlloyUnavailable(
                    "TLS certificate not trusted (a private CA goes in MAILINGEST_ALLOY_CA_FILE)",
                    operation=operation,
                ) from None
            raise AlloyUnavailable(
                f"connection failed ({type(exc).__name__})", operation=operation
            ) from None
