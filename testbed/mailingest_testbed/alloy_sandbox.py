"""A faithful, fast emulator of Alloy's document API, for tests and benchmarks.

Stdlib only. It serves the four document calls of Alloy's "Document Upload via
API" article under a configurable base path (default ``/v1``)::

    POST /v1/entities/{entity}/documents             describe -> document object
    PUT  /v1/entities/{entity}/documents/{document}  raw bytes -> uploaded: true
    GET  /v1/entities/{entity}/documents/{document}  -> the exact bytes
    GET  /v1/entities/{entity}/documents             -> bare JSON array

Every error has Alloy's shape::

    {"status_code": N, "error": {"minor_code": M, "type": ..., "message": ...,
     "details": {...} | null, "error_token": "<uuid4>"}, "timestamp": <ms>}

Decisions on what Alloy does not publish (see ``docs/ALLOY_API.md``):

* Oversized bodies: 413 / minor 4131 (limit ``max_upload_bytes``, default
  50 MiB).  A describe (JSON) body is capped at ``min(max_upload_bytes, 1 MiB)``.
* A second PUT of an uploaded document: 409 / 4091 (``allow_reupload=True``
  makes it replace the bytes instead).
* Downloading a described but not uploaded document: 404 / 4041.
* ``keep_bodies=False`` (``--digests-only``, for benchmarks): only the size and
  SHA-256 of each uploaded body are kept (``SandboxState.uploads()`` lists them
  with each upload's time); a download then answers 404 / 4041 saying so.
* A document that exists but belongs to another entity: 404 / 4041.
* No idempotency: a retried POST creates a second document.
* Entities: any non-empty path segment is accepted (an Alloy ``P-``/``B-``
  token or an external id), unless ``entities`` is given: then any other
  entity gets 400 / 4013 on every route.
* Agents: when ``agents`` is given, ``note_author_agent_email`` must be one of
  them (case-insensitive), else 400 / 4002.  Without it any e-mail passes.
* Validation follows Joi's conventions (which Alloy's messages show):
  ``"name" is required``, ``"name" must be a string``, ``"name" is not allowed
  to be empty``; the optional ``note`` / ``note_author_agent_email`` may be
  absent or null but not empty or of another type.  Unknown body fields are
  ignored.  ``extensions`` (optional) restricts the extension (case-insensitive).
* A note entry is created only when ``note`` is given.
* Unknown route: 404 / 4041.  Known route, wrong method: 405 / 4051 with an
  ``Allow`` header.  ``HEAD`` is answered like ``GET`` without a body.
* Header validation (4001): PUT requires ``Content-Type: application/octet-stream``
  (parameters such as ``; charset=`` are ignored).  POST accepts any content
  type and parses the body as JSON.
* Auth: when ``token`` and ``secret`` are given, every ``/v1`` request *and every
  admin request* needs HTTP Basic ``token:secret`` (401 / 4011 otherwise, with a
  ``WWW-Authenticate`` header).  Without credentials nothing is checked.
* Requests the HTTP layer cannot parse (bad request line, HTTP/2, bad header
  line, conflicting Content-Length, > 100 headers, unknown method) are answered
  in the same error shape with ``minor_code = status * 10`` (4000, 5050, 4310,
  5010) and ``Connection: close``.  Headers are parsed by a small strict parser
  instead of the stdlib's e-mail parser (the main per-request cost).
* Request bodies are read by Content-Length exactly (chunked bodies are decoded
  too).  An error answered before the body was read drains the body (up to
  ``max(max_upload_bytes, 64 MiB)``) to keep the connection alive; a larger
  unread body gets ``Connection: close``.

Fault injection (``Faults``), ``/v1`` only, never the admin routes.  While any
drawn fault is set (any but ``clock_offset_ms``), each request draws exactly three
numbers from ``random.Random(seed)``, whatever the settings:

* one outcome draw, partitioned in this order: ``drop_fraction``, ``rate_429``,
  ``error_503``, ``error_500``, ``refuse_fraction``, ``late_commit_fraction``.
  Each fraction is therefore exactly the share of requests getting that fault
  (if the sum exceeds 1 the later kinds get what is left).  The last two only
  take from what the first four leave, so setting them never changes which
  requests of a seeded run get the first four (nor the other two draws).  429
  (minor 4033), 503 (5031) and 500 (5000) are answered WITHOUT applying the
  request; auth is not checked for them (they simulate the edge).
* a drop closes the connection without any response.  With
  ``drop_after_apply=False`` (default) the request is NOT applied (the request
  body is read, then the connection closed).  With ``drop_after_apply=True`` the
  request IS applied (document created/uploaded) and the response is lost —
  the "did my POST happen?" case.
* ``retry_after_fraction`` of the 429s carry ``Retry-After: retry_after_seconds``
  (an integer when integral, otherwise a decimal such as ``0.2``, non-standard
  but handy for fast tests).  (The second draw.)
* ``slow_fraction`` of the answered requests have their response delayed by
  ``slow_ms``.  A slow request is a *slow success*: its effect is applied at once
  (visible to other requests), only the response is late, so a client that timed
  out and retries sees the effect (a duplicate document, or 409 on re-upload).
  (The third draw; it also delays errors, refusals and late commits, after the
  hold.)
* a refusal (``refuse_fraction``) is a *final* 4xx from Alloy's application,
  WITHOUT applying the request.  Only a describe (``POST .../documents``) or an
  upload (``PUT .../documents/{document}``) is refused; any other request that
  draws it is served as if it drew no fault (and is not counted).  Auth, route
  and method are checked first (a 401/404/405 wins, and is not counted as a
  refusal); the refusal comes before any other check.  A describe gets 400 /
  4002 ``Request Body Validation Failure`` with details ``{"path": "type",
  "message": '"type" was refused ...'}``; an upload (whose body is raw bytes, so
  only its headers are validated) gets 400 / 4001 ``Header Validation Failure``
  with details ``{"path": "content-type", ...}``.  The body is drained, the
  connection kept.
* a late commit (``late_commit_fraction``, ``late_commit_ms``) holds the request
  before applying it: the body is read in full, then nothing happens for
  ``late_commit_ms`` (neither the effect nor the answer), then the request is
  processed as usual (validated, applied: document created / bytes stored) and
  answered.  A client whose read timeout is shorter than ``late_commit_ms`` sees
  a timeout, and the document appears (or its bytes are stored) afterwards: the
  "Alloy queued my POST past my read timeout and committed it later" case.
  Contrast ``slow``, which applies at once and only delays the answer.  Only a
  describe or an upload is held (any other request that draws it is served as
  if it drew no fault, and is not counted); auth, route and method are checked
  first, and a body over the limit is answered 413 at once (not counted).  Other
  requests are served normally meanwhile (one thread per connection).  The
  document's ``timestamp`` is the time it was applied.  Counted in stats when
  applied (just before the answer).  ``late_commit_ms = 0`` makes it no fault.
  If the sandbox stops during the hold, the connection is closed and the
  request NOT applied.
* ``latency_ms`` is added before every ``/v1`` request is processed.
* ``clock_offset_ms`` (an integer, may be negative, at most 10 years either way;
  not a fraction, not drawn, not counted) shifts every timestamp the sandbox
  writes, as if Alloy's clock were off by it: a document's ``timestamp``, its
  notes' ``created_at`` / ``updated_at``, every error body's ``timestamp`` and
  the ``Date`` header of every response (admin ones included).  Delays still
  follow the real clock, and ``SandboxState.uploads()``' ``uploaded_at`` (for
  benchmarks, not written by the API) is not shifted.
* Validation (``Faults`` raises ``FaultsError``; ``PUT /_admin/faults`` answers
  400 / 4002 with the field as details' path): fractions are numbers in [0, 1];
  ``latency_ms``, ``slow_ms``, ``late_commit_ms`` and ``retry_after_seconds``
  finite numbers >= 0; ``drop_after_apply`` a boolean; ``seed`` an integer or
  null; ``clock_offset_ms`` an integer; unknown fields are rejected.

Admin (JSON, same Basic auth as ``/v1`` when configured, never faulted, not
counted in stats)::

    GET  /_admin/faults   current faults
    PUT  /_admin/faults   partial update (only given fields); unknown field -> 400/4002
    POST /_admin/reset    clears documents and counters (faults kept; RNG re-seeded
                          when a seed is set)
    GET  /_admin/stats    {"requests_total", "requests": {"POST /v1/entities/{entity}/documents": n,
                          ...}, "statuses": {"200": n, ...}, "documents", "uploaded",
                          "bytes_stored", "entities", "faults": {"drop", "rate_429",
                          "retry_after", "error_503", "error_500", "slow",
                          "late_commit", "refused"}}

Run: ``python -m mailingest_testbed.alloy_sandbox --port 8080`` (or ``mailingest sandbox``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import builtins
import dataclasses
import hashlib
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import unquote

from mailingest.core.documents import (
    DOCUMENT_TYPES,  # the six types Alloy allows, known in one place
)

__all__ = [
    "DOCUMENT_TYPES",
    "AlloyLikeError",
    "Faults",
    "FaultsError",
    "SandboxServer",
    "SandboxState",
    "add_arguments",
    "faults_from_args",
    "is_entity_token",
    "new_entity_token",
    "run_from_args",
]

DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
JSON_BODY_CAP = 1024 * 1024
MIN_DRAIN_LIMIT = 64 * 1024 * 1024
ENTITY_TOKEN_RE = re.compile(r"[PB]-[A-Za-z0-9]{20}")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_SINGLE_WRITE_MAX = 64 * 1024
_IDLE_TIMEOUT_S = 300.0

ROUTE_COLLECTION = "/entities/{entity}/documents"
ROUTE_DOCUMENT = "/entities/{entity}/documents/{document}"
_ALLOWED = {ROUTE_COLLECTION: ("GET", "HEAD", "POST"), ROUTE_DOCUMENT: ("GET", "HEAD", "PUT")}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _random_id(n: int = 20) -> str:
    return "".join(_ALPHABET[b % 62] for b in os.urandom(n))


def is_entity_token(value: str) -> bool:
    """True for an Alloy entity token (``P-``/``B-`` + 20 letters/digits)."""
    return ENTITY_TOKEN_RE.fullmatch(value) is not None


def new_entity_token(kind: str = "P") -> str:
    """A fresh, well-formed entity token (``P-...`` person, ``B-...`` business)."""
    if kind not in ("P", "B"):
        raise ValueError("kind must be 'P' or 'B'")
    return f"{kind}-{_random_id()}"


# --------------------------------------------------------------------------- errors

# minor code -> (HTTP status, type, default message)
ERROR_CATALOGUE: dict[int, tuple[int, str, str]] = {
    4000: (400, "Bad Request", "The request could not be parsed"),
    4001: (400, "Header Validation Failure", "Your request headers contained invalid field(s)"),
    4002: (400, "Request Body Validation Failure", "Your request body contained invalid field(s)"),
    4013: (400, "Authorization Failure", "Not authorized for this object, or it does not exist"),
    4011: (401, "Authentication Failure", "Invalid auth credentials"),
    4041: (404, "Resource Not Found", "The requested resource could not be found"),
    4051: (405, "Method Not Allowed", "The method is not allowed for the requested resource"),
    4091: (409, "Resource Conflict", "The request conflicts with the state of the resource"),
    4131: (413, "Payload Too Large", "The request body is larger than the limit"),
    4033: (429, "Rate Limit Exceeded", "You have exceeded your rate limit, retry later"),
    5000: (500, "Unhandled Service Error", "An unexpected error occurred"),
    5031: (503, "Service Unavailable", "The service is temporarily offline"),
}


class AlloyLikeError(Exception):
    """An error answered in Alloy's error shape."""

    def __init__(
        self,
        status: int,
        minor: int,
        type: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status}/{minor} {type}: {message}")
        self.status = status
        self.minor = minor
        self.type = type
        self.message = message
        self.details = details
        self.headers: dict[str, str] = {}

    @classmethod
    def of(
        cls, minor: int, details: dict[str, Any] | None = None, message: str | None = None
    ) -> AlloyLikeError:
        status, type_, default = ERROR_CATALOGUE[minor]
        return cls(status, minor, type_, message or default, details)

    def body(self, clock_offset_ms: int = 0) -> dict[str, Any]:
        """The JSON body; ``clock_offset_ms`` shifts its ``timestamp`` (clock skew fault)."""
        return {
            "status_code": self.status,
            "error": {
                "minor_code": self.minor,
                "type": self.type,
                "message": self.message,
                "details": self.details,
                "error_token": str(uuid.uuid4()),
            },
            "timestamp": now_ms() + clock_offset_ms,
        }


def _field_error(path: str | None, message: str) -> AlloyLikeError:
    return AlloyLikeError.of(4002, {"message": message, "path": path})


# --------------------------------------------------------------------------- faults


class FaultsError(ValueError):
    """A bad fault setting; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_FRACTIONS = (
    "error_500",
    "error_503",
    "rate_429",
    "retry_after_fraction",
    "slow_fraction",
    "drop_fraction",
    "refuse_fraction",
    "late_commit_fraction",
)
_DURATIONS = ("retry_after_seconds", "latency_ms", "slow_ms", "late_commit_ms")
MAX_CLOCK_OFFSET_MS = 3650 * 86_400_000  # 10 years either way
# the stats' "faults" keys, in this order
FAULT_KINDS = (
    "drop",
    "rate_429",
    "retry_after",
    "error_503",
    "error_500",
    "slow",
    "late_commit",
    "refused",
)


@dataclass(frozen=True)
class Faults:
    """Injected faults; see the module docstring for the exact semantics."""

    error_500: float = 0.0  # fraction of /v1 requests answered 500/5000, not applied
    error_503: float = 0.0  # fraction answered 503/5031, not applied
    rate_429: float = 0.0  # fraction answered 429/4033, not applied
    retry_after_fraction: float = 0.5  # of the 429s, share carrying Retry-After
    retry_after_seconds: float = 1.0
    latency_ms: float = 0.0  # added before processing every /v1 request
    slow_fraction: float = 0.0  # share of responses delayed by slow_ms (request applied)
    slow_ms: float = 0.0
    drop_fraction: float = 0.0  # share of connections closed without a response
    drop_after_apply: bool = False  # whether a dropped request was applied first
    seed: int | None = None
    refuse_fraction: float = 0.0  # describes/uploads answered a final 400, not applied
    late_commit_fraction: float = 0.0  # describes/uploads held late_commit_ms, then applied
    late_commit_ms: float = 0.0
    clock_offset_ms: int = 0  # added to every timestamp written (Alloy's clock is off)

    def __post_init__(self) -> None:
        for name in _FRACTIONS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise FaultsError(name, "must be a number between 0 and 1")
        for name in _DURATIONS:
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not (math.isfinite(v) and v >= 0)
            ):
                raise FaultsError(name, "must be a finite number >= 0")
        if not isinstance(self.drop_after_apply, bool):
            raise FaultsError("drop_after_apply", "must be a boolean")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise FaultsError("seed", "must be an integer or null")
        off = self.clock_offset_ms
        if isinstance(off, bool) or not isinstance(off, int) or abs(off) > MAX_CLOCK_OFFSET_MS:
            raise FaultsError(
                "clock_offset_ms",
                f"must be an integer between -{MAX_CLOCK_OFFSET_MS} and {MAX_CLOCK_OFFSET_MS}",
            )

    @property
    def active(self) -> bool:
        """Whether requests draw faults (``clock_offset_ms`` needs no draw)."""
        return bool(
            self.error_500
            or self.error_503
            or self.rate_429
            or self.latency_ms
            or self.slow_fraction
            or self.drop_fraction
            or self.refuse_fraction
            or self.late_commit_fraction
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base: Faults | None = None) -> Faults:
        """Build from a mapping; fields not given keep ``base``'s (or default) values."""
        if not isinstance(d, Mapping):
            raise FaultsError("", "faults must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise FaultsError(str(key), "is not a fault setting")
        return dataclasses.replace(base if base is not None else cls(), **dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class _Plan:
    latency_s: float = 0.0
    drop: bool = False
    drop_after_apply: bool = False
    error_minor: int = 0
    retry_after: str | None = None
    slow_s: float = 0.0
    refuse: bool = False  # a describe/upload gets a final 400, not applied
    late_s: float = 0.0  # a describe/upload is held this long, then applied


def _fmt_seconds(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _Doc:
    entity: str
    meta: dict[str, Any]
    data: bytes | None = None  # the uploaded bytes (None when not kept, see keep_bodies)
    size: int = -1  # bytes uploaded; -1 until the first upload
    sha256: str = ""  # of the uploaded bytes, when they are not kept
    uploaded_at: float = 0.0  # time.time() of the (last) upload

    @property
    def received(self) -> bool:
        return self.size >= 0


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    out = dict(meta)
    out["notes"] = [dict(n) for n in meta["notes"]]
    return out


class SandboxState:
    """Thread-safe store of documents and counters (one lock, O(1) lookups)."""

    def __init__(
        self,
        *,
        agents: Iterable[str] | None = None,
        entities: Iterable[str] | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        extensions: Iterable[str] | None = None,
        allow_reupload: bool = False,
        keep_bodies: bool = True,
    ) -> None:
        if max_upload_bytes < 0:
            raise ValueError("max_upload_bytes must be >= 0")
        # False (benchmarks): keep only the size and SHA-256 of each uploaded body, so
        # thousands of large documents cost no memory; downloads then answer 404/4041
        self.keep_bodies = keep_bodies
        self.agents: frozenset[str] | None = (
            None if agents is None else frozenset(a.strip().lower() for a in agents if a.strip())
        )
        self.entities: frozenset[str] | None = None if entities is None else frozenset(entities)
        self.extensions: frozenset[str] | None = (
            None
            if extensions is None
            else frozenset(e.strip().lower().lstrip(".") for e in extensions if e.strip())
        )
        self.max_upload_bytes = max_upload_bytes
        self.allow_reupload = allow_reupload
        # Faults.clock_offset_ms, kept in step by SandboxServer: shifts written timestamps
        self.clock_offset_ms = 0
        self._lock = threading.Lock()
        self._docs: dict[str, _Doc] = {}
        self._by_entity: dict[str, dict[str, _Doc]] = {}
        self._uploaded = 0
        self._bytes = 0
        self._requests: Counter[str] = Counter()
        self._statuses: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._total = 0

    # -- validation -------------------------------------------------------------
    def check_entity(self, entity: str) -> None:
        if not entity or (self.entities is not None and entity not in self.entities):
            raise AlloyLikeError.of(
                4013,
                {
                    "message": f'entity "{entity}" does not exist or is not authorized',
                    "path": "entity",
                },
            )

    def _validate_describe(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _field_error(None, '"value" must be an object')
        for name in ("name", "extension", "type"):
            if name not in body:
                raise _field_error(name, f'"{name}" is required')
            v = body[name]
            if not isinstance(v, str):
                raise _field_error(name, f'"{name}" must be a string')
            if v == "":
                raise _field_error(name, f'"{name}" is not allowed to be empty')
        if body["type"] not in DOCUMENT_TYPES:
            raise _field_error("type", f'"type" must be one of [{", ".join(DOCUMENT_TYPES)}]')
        if self.extensions is not None and body["extension"].lower() not in self.extensions:
            raise _field_error(
                "extension",
                f'"extension" must be one of [{", ".join(sorted(self.extensions))}]',
            )
        for name in ("note", "note_author_agent_email"):
            v = body.get(name)
            if v is None:
                continue
            if not isinstance(v, str):
                raise _field_error(name, f'"{name}" must be a string')
            if v == "":
                raise _field_error(name, f'"{name}" is not allowed to be empty')
        email = body.get("note_author_agent_email")
        if email is not None and self.agents is not None and email.lower() not in self.agents:
            raise _field_error(
                "note_author_agent_email",
                '"note_author_agent_email" must be the e-mail address of an agent of this account',
            )
        return body

    def clock_ms(self) -> int:
        """Alloy's clock: now in epoch milliseconds, shifted by ``clock_offset_ms``."""
        return now_ms() + self.clock_offset_ms

    # -- the four calls ---------------------------------------------------------
    def describe(self, entity: str, body: Any) -> dict[str, Any]:
        self.check_entity(entity)
        b = self._validate_describe(body)
        ts = self.clock_ms()
        notes: builtins.list[dict[str, Any]] = []
        if b.get("note") is not None:
            notes.append(
                {
                    "note": b["note"],
                    "note_author_agent_email": b.get("note_author_agent_email"),
                    "created_at": ts,
                    "updated_at": ts,
                }
            )
        meta: dict[str, Any] = {
            "document_token": "",
            "type": b["type"],
            "name": b["name"],
            "extension": b["extension"],
            "uploaded": False,
            "timestamp": ts,
            "approved": None,
            "approval_agent_email": None,
            "approval_timestamp": None,
            "notes": notes,
        }
        with self._lock:
            token = "D-" + _random_id()
            while token in self._docs:  # pragma: no cover - 62**20 space
                token = "D-" + _random_id()
            meta["document_token"] = token
            doc = _Doc(entity, meta)
            self._docs[token] = doc
            self._by_entity.setdefault(entity, {})[token] = doc
            return _public(meta)

    def _lookup(self, entity: str, document: str) -> _Doc:
        doc = self._docs.get(document)
        if doc is None or doc.entity != entity:
            raise AlloyLikeError.of(
                4041, {"message": f'document "{document}" not found', "path": "document"}
            )
        return doc

    def _too_large(self, size: int) -> AlloyLikeError:
        return AlloyLikeError.of(
            4131,
            {
                "message": f"body of {size} bytes exceeds the limit of "
                f"{self.max_upload_bytes} bytes",
                "path": None,
            },
        )

    def check_upload(self, entity: str, document: str, length: int | None) -> None:
        """Checks that need no body (entity, document, conflict, declared size)."""
        self.check_entity(entity)
        with self._lock:
            doc = self._lookup(entity, document)
            if doc.received and not self.allow_reupload:
                raise self._conflict(document)
        if length is not None and length > self.max_upload_bytes:
            raise self._too_large(length)

    @staticmethod
    def _conflict(document: str) -> AlloyLikeError:
        return AlloyLikeError.of(
            4091,
            {"message": f'document "{document}" has already been uploaded', "path": "document"},
        )

    def upload(self, entity: str, document: str, data: bytes) -> dict[str, Any]:
        self.check_entity(entity)
        if len(data) > self.max_upload_bytes:
            raise self._too_large(len(data))
        data = bytes(data)
        digest = "" if self.keep_bodies else hashlib.sha256(data).hexdigest()
        with self._lock:
            doc = self._lookup(entity, document)
            if doc.received:
                if not self.allow_reupload:
                    raise self._conflict(document)
                self._bytes -= doc.size
            else:
                self._uploaded += 1
            doc.data = data if self.keep_bodies else None
            doc.size, doc.sha256, doc.uploaded_at = len(data), digest, time.time()
            self._bytes += len(data)
            doc.meta["uploaded"] = True
            return _public(doc.meta)

    def download(self, entity: str, document: str) -> bytes:
        self.check_entity(entity)
        with self._lock:
            doc = self._lookup(entity, document)
            data, received = doc.data, doc.received
        if not received:
            raise AlloyLikeError.of(
                4041,
                {"message": f'document "{document}" has not been uploaded', "path": "document"},
            )
        if data is None:
            raise AlloyLikeError.of(
                4041,
                {
                    "message": f'document "{document}" was uploaded, but this sandbox keeps '
                    "only the size and SHA-256 of uploaded bodies (--digests-only)",
                    "path": "document",
                },
            )
        return data

    def document(self, entity: str, document: str) -> dict[str, Any]:
        """The metadata of one document (not an HTTP route; for tests)."""
        self.check_entity(entity)
        with self._lock:
            return _public(self._lookup(entity, document).meta)

    def list(self, entity: str) -> builtins.list[dict[str, Any]]:
        self.check_entity(entity)
        with self._lock:
            docs = self._by_entity.get(entity)
            return [] if not docs else [_public(d.meta) for d in docs.values()]

    def uploads(self) -> builtins.list[dict[str, Any]]:
        """Every uploaded document (not an HTTP route; for tests and benchmarks): entity,
        token, name, extension, type, size, SHA-256 and ``uploaded_at`` (``time.time()``
        of its upload), in upload order."""
        with self._lock:
            docs = [d for d in self._docs.values() if d.received]
        out = [
            {
                "entity": d.entity,
                "document_token": d.meta["document_token"],
                "name": d.meta["name"],
                "extension": d.meta["extension"],
                "type": d.meta["type"],
                "size": d.size,
                "sha256": d.sha256 or hashlib.sha256(d.data or b"").hexdigest(),
                "uploaded_at": d.uploaded_at,
            }
            for d in docs
        ]
        return sorted(out, key=lambda u: u["uploaded_at"])

    # -- counters ---------------------------------------------------------------
    def record(self, route: str, status: int | None, faults: Iterable[str] = ()) -> None:
        with self._lock:
            self._total += 1
            self._requests[route] += 1
            if status is not None:
                self._statuses[str(status)] += 1
            for kind in faults:
                self._faults[kind] += 1

    def reset(self) -> None:
        with self._lock:
            self._docs.clear()
            self._by_entity.clear()
            self._uploaded = 0
            self._bytes = 0
            self._requests.clear()
            self._statuses.clear()
            self._faults.clear()
            self._total = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests_total": self._total,
                "requests": dict(self._requests),
                "statuses": dict(self._statuses),
                "documents": len(self._docs),
                "uploaded": self._uploaded,
                "bytes_stored": self._bytes,
                "entities": len(self._by_entity),
                "faults": {k: self._faults.get(k, 0) for k in FAULT_KINDS},
            }


# --------------------------------------------------------------------------- HTTP


class _ClientGone(Exception):
    pass


_date_cache: tuple[int, str] = (0, "")


def _http_date(clock_offset_ms: int = 0) -> str:
    global _date_cache
    sec = (time.time_ns() // 1_000_000 + clock_offset_ms) // 1000
    if _date_cache[0] != sec:
        _date_cache = (sec, formatdate(sec, usegmt=True))
    return _date_cache[1]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_PHRASES = {int(s): s.phrase for s in HTTPStatus}
_MAX_HEADERS = 100


class _Headers:
    """Request headers, case-insensitive; ``get`` returns the first occurrence.

    A light stand-in for the ``email.message.Message`` that ``http.server`` builds
    with the (slow) e-mail parser; it offers what the handler uses.
    """

    __slots__ = ("_items", "_first")

    def __init__(self, items: builtins.list[tuple[str, str]]) -> None:
        self._items = items
        self._first: dict[str, str] = {}
        for k, v in items:
            self._first.setdefault(k.lower(), v)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._first.get(name.lower(), default)

    def get_all(self, name: str) -> builtins.list[str]:
        n = name.lower()
        return [v for k, v in self._items if k.lower() == n]

    def __getitem__(self, name: str) -> str | None:
        return self._first.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def items(self) -> builtins.list[tuple[str, str]]:
        return builtins.list(self._items)

    def __str__(self) -> str:
        return "".join(f"{k}: {v}\n" for k, v in self._items) + "\n"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512
    sandbox: SandboxServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (a timeout, a killed worker) is routine, not an error.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "AlloySandbox/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = _IDLE_TIMEOUT_S

    raw_requestline: bytes
    # per-request body bookkeeping
    _length: int | None = None
    _chunked = False
    _consumed = True
    _held: bytes | None = None  # a body read ahead of processing (late commit)

    # -- connection lifecycle ---------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self._sb().track(self.request, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._sb().track(self.request, False)

    def _sb(self) -> SandboxServer:
        return self.server.sandbox  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        if self._sb().verbose:
            super().log_message(format, *args)

    # -- request parsing ----------------------------------------------------------
    def parse_request(self) -> bool:
        """``BaseHTTPRequestHandler.parse_request`` with a fast, strict header parser.

        Same semantics as the stdlib (HTTP/1.x only, ``//`` path squashing,
        Connection/keep-alive, ``Expect: 100-continue``, 431 on too many or too
        long header lines) without the e-mail parser, the main per-request cost.
        """
        self.command = None  # type: ignore[assignment]
        self.request_version = version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) != 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({requestline!r})")
            return False
        command, path, version = words
        if not version.startswith("HTTP/1.") or version[7:] not in ("0", "1"):
            if version.startswith("HTTP/") and version[5:6].isdigit() and version[5] >= "2":
                self.send_error(
                    HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Invalid HTTP version ({version})"
                )
            else:
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
            return False
        self.request_version = version
        if version == "HTTP/1.1":
            self.close_connection = False
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
        self.command, self.path = command, path

        items: builtins.list[tuple[str, str]] = []
        rfile = self.rfile
        while True:
            line = rfile.readline(65537)
            if len(line) > 65536:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            if len(items) >= _MAX_HEADERS:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
                return False
            text = line.decode("iso-8859-1").rstrip("\r\n")
            if text[:1] in (" ", "\t"):
                if not items:
                    self.send_error(HTTPStatus.BAD_REQUEST, "Bad header continuation")
                    return False
                k, v = items[-1]
                items[-1] = (k, f"{v} {text.strip()}")
                continue
            name, sep, value = text.partition(":")
            if not sep or not name or name != name.strip():
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad header line ({text!r})")
                return False
            items.append((name, value.strip()))
        headers = _Headers(items)
        self.headers = headers  # type: ignore[assignment]
        lengths = {v.strip() for v in headers.get_all("Content-Length")}
        if len(lengths) > 1:
            self.send_error(HTTPStatus.BAD_REQUEST, "Conflicting Content-Length headers")
            return False

        conntype = (headers.get("Connection") or "").lower()
        if "close" in conntype:
            self.close_connection = True
        elif "keep-alive" in conntype:  # also HTTP/1.0 keep-alive, echoed in _write
            self.close_connection = False
        expect = (headers.get("Expect") or "").lower()
        if expect == "100-continue" and version >= "HTTP/1.1":
            if not self.handle_expect_100():
                return False
        return True

    # -- body -------------------------------------------------------------------
    def _start_body(self) -> None:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        self._chunked = "chunked" in te
        self._length = None
        self._consumed = True
        self._held = None
        if self._chunked:
            self._consumed = False
            return
        cl = self.headers.get("Content-Length")
        if cl is None:
            return
        cl = cl.strip()
        if not cl.isdigit():
            self.close_connection = True
            raise AlloyLikeError.of(
                4001,
                {
                    "message": '"content-length" must be a non-negative integer',
                    "path": "content-length",
                },
            )
        self._length = int(cl)
        self._consumed = self._length == 0

    def _read_chunked(self, limit: int, keep: bool) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise _ClientGone()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise AlloyLikeError.of(4000, None, "Malformed chunked request body") from None
            if size == 0:
                break
            total += size
            if total > limit:
                self.close_connection = True
                self._consumed = True
                raise self._sb().state._too_large(total)
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise _ClientGone()
            if keep:
                parts.append(chunk)
            self.rfile.readline(3)
        while True:  # trailers
            line = self.rfile.readline(65537)
            if not line:
                raise _ClientGone()
            if line in (b"\r\n", b"\n"):
                break
        self._consumed = True
        return b"".join(parts)

    def _read_body(self, limit: int) -> bytes:
        if self._held is not None:
            data, self._held = self._held, None
            return data
        if self._consumed:
            return b""
        if self._chunked:
            return self._read_chunked(limit, True)
        assert self._length is not None
        if self._length > limit:
            raise self._sb().state._too_large(self._length)
        data = self.rfile.read(self._length)
        if len(data) < self._length:
            raise _ClientGone()
        self._consumed = True
        return data

    def _discard_body(self) -> None:
        """Drain an unread body so the connection can be kept, or mark it to close."""
        if self._consumed:
            return
        self._consumed = True
        limit = self._sb().drain_limit
        try:
            if self._chunked:
                self._read_chunked(limit, False)
                return
            remaining = self._length or 0
            if remaining > limit:
                self.close_connection = True
                return
            while remaining > 0:
                got = self.rfile.read(min(remaining, 1 << 16))
                if not got:
                    raise _ClientGone()
                remaining -= len(got)
        except (AlloyLikeError, _ClientGone, OSError):
            self.close_connection = True

    # -- responses --------------------------------------------------------------
    def _write(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._discard_body()
        phrase = _PHRASES.get(status, "")
        lines = [
            f"HTTP/1.1 {status} {phrase}",
            f"Server: {self.server_version}",
            f"Date: {_http_date(self._sb().faults.clock_offset_ms)}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        if headers:
            lines.extend(f"{k}: {v}" for k, v in headers.items())
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self._sb().verbose:
            self.log_request(status, len(body))
        try:
            if getattr(self, "command", None) == "HEAD":
                self.wfile.write(head)
            elif len(body) <= _SINGLE_WRITE_MAX:
                self.wfile.write(head + body)
            else:
                self.wfile.write(head)
                self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def _error_body(self, err: AlloyLikeError) -> bytes:
        return _dumps(err.body(self._sb().faults.clock_offset_ms))

    def _write_error(self, err: AlloyLikeError) -> None:
        self._write(err.status, self._error_body(err), headers=err.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Used by BaseHTTPRequestHandler for unparsable requests: answer in Alloy's shape.
        self.close_connection = True
        self._consumed = True
        try:
            st = HTTPStatus(code)
            type_, default = st.phrase, st.description or st.phrase
        except ValueError:
            type_, default = "Error", "Error"
        err = AlloyLikeError(code, code * 10, type_, message or default, None)
        self._write_error(err)

    def _json(self, obj: Any, status: int = 200) -> tuple[int, bytes, str, dict[str, str]]:
        return status, _dumps(obj), "application/json", {}

    # -- dispatch ---------------------------------------------------------------
    def _dispatch(self) -> None:
        sb = self._sb()
        try:
            self._start_body()
        except AlloyLikeError as e:
            self._write_error(e)
            return
        path = self.path.partition("?")[0]
        if not path.startswith("/") and "://" in path:  # absolute-form request target
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        try:
            if path == "/_admin" or path.startswith("/_admin/"):
                self._admin(path[len("/_admin") :])
                return
            base = sb.base_path
            if path.startswith(base + "/"):
                self._v1(path[len(base) :])
                return
            sb.state.record(f"{self.command} <unknown>", 404)
            self._write_error(AlloyLikeError.of(4041, {"message": "unknown route", "path": path}))
        except _ClientGone:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _authorized(self) -> bool:
        expected = self._sb().credentials
        if expected is None:
            return True
        header = self.headers.get("Authorization")
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(raw, expected)

    def _auth_error(self) -> AlloyLikeError:
        err = AlloyLikeError.of(4011)
        err.headers["WWW-Authenticate"] = 'Basic realm="alloy"'
        return err

    def _drop(self) -> None:
        self._discard_body()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _v1(self, sub: str) -> None:
        sb = self._sb()
        match = _match(sub)
        route_key = (
            f"{self.command} {sb.base_path}{match[0]}" if match else f"{self.command} <unknown>"
        )
        plan = sb.draw_faults()
        kinds: list[str] = []
        if plan is not None:
            if plan.latency_s:
                sb.sleep(plan.latency_s)
            if plan.drop and not plan.drop_after_apply:
                kinds.append("drop")
                self._drop()
                sb.state.record(route_key, None, kinds)
                return
            if plan.error_minor:
                err = AlloyLikeError.of(plan.error_minor)
                kinds.append(
                    {4033: "rate_429", 5031: "error_503", 5000: "error_500"}[plan.error_minor]
                )
                if plan.retry_after is not None:
                    err.headers["Retry-After"] = plan.retry_after
                    kinds.append("retry_after")
                if plan.slow_s:
                    kinds.append("slow")
                    sb.sleep(plan.slow_s)
                # counted before the answer leaves: a client that saw it sees it counted
                sb.state.record(route_key, err.status, kinds)
                self._write_error(err)
                return

        status: int
        body: bytes
        ctype = "application/json"
        headers: dict[str, str] = {}
        try:
            if not self._authorized():
                raise self._auth_error()
            if match is None:
                raise AlloyLikeError.of(4041, {"message": "unknown route", "path": self.path})
            tpl, entity, document = match
            allowed = _ALLOWED[tpl]
            if self.command not in allowed:
                err = AlloyLikeError.of(
                    4051, {"message": f"{self.command} is not allowed here", "path": None}
                )
                err.headers["Allow"] = ", ".join(allowed)
                raise err
            if plan is not None and (plan.refuse or plan.late_s):
                write = (tpl == ROUTE_COLLECTION and self.command == "POST") or (
                    tpl == ROUTE_DOCUMENT and self.command == "PUT"
                )
                if write and plan.refuse:
                    kinds.append("refused")
                    raise _refusal(tpl)
                if write and plan.late_s:
                    limit = sb.state.max_upload_bytes
                    if tpl == ROUTE_COLLECTION:
                        limit = min(limit, JSON_BODY_CAP)
                    self._held = self._read_body(limit)  # read in full, not applied yet
                    kinds.append("late_commit")
                    if sb.sleep(plan.late_s):  # the sandbox stopped: never applied
                        self._drop()
                        sb.state.record(route_key, None, kinds)
                        return
            status, body, ctype, headers = self._route(tpl, entity, document)
        except AlloyLikeError as e:
            status, body, headers = e.status, self._error_body(e), e.headers
            ctype = "application/json"
        except _ClientGone:
            raise
        except Exception as exc:  # a bug in the sandbox: still answer in Alloy's shape
            bug = AlloyLikeError.of(5000, {"message": repr(exc), "path": None})
            status, body, headers = bug.status, self._error_body(bug), bug.headers
            ctype = "application/json"

        if plan is not None:
            if plan.drop:  # drop_after_apply: effect applied, response lost
                kinds.append("drop")
                self._drop()
                sb.state.record(route_key, None, kinds)
                return
            if plan.slow_s:
                kinds.append("slow")
                sb.sleep(plan.slow_s)
        sb.state.record(route_key, status, kinds)  # before the answer leaves (see above)
        self._write(status, body, ctype, headers)

    def _route(
        self, tpl: str, entity: str, document: str | None
    ) -> tuple[int, bytes, str, dict[str, str]]:
        state = self._sb().state
        cmd = "GET" if self.command == "HEAD" else self.command
        if tpl == ROUTE_COLLECTION:
            if cmd == "GET":
                return self._json(state.list(entity))
            # POST: describe
            state.check_entity(entity)
            raw = self._read_body(min(state.max_upload_bytes, JSON_BODY_CAP))
            try:
                payload = json.loads(raw)
            except ValueError as exc:
                raise _field_error(None, f"request body is not valid JSON: {exc}") from None
            return self._json(state.describe(entity, payload))
        assert document is not None
        if cmd == "GET":
            data = state.download(entity, document)
            return 200, data, "application/octet-stream", {}
        # PUT: upload
        state.check_entity(entity)
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/octet-stream":
            raise AlloyLikeError.of(
                4001,
                {
                    "message": '"content-type" must be application/octet-stream',
                    "path": "content-type",
                },
            )
        state.check_upload(entity, document, None if self._chunked else self._length or 0)
        data = self._read_body(state.max_upload_bytes)
        return self._json(state.upload(entity, document, data))

    # -- admin ------------------------------------------------------------------
    def _admin(self, sub: str) -> None:
        sb = self._sb()
        routes: dict[str, tuple[str, ...]] = {
            "/faults": ("GET", "HEAD", "PUT"),
            "/reset": ("POST",),
            "/stats": ("GET", "HEAD"),
        }
        try:
            if not self._authorized():
                raise self._auth_error()
            allowed = routes.get(sub)
            if allowed is None:
                raise AlloyLikeError.of(4041, {"message": "unknown admin route", "path": sub})
            if self.command not in allowed:
                err = AlloyLikeError.of(
                    4051, {"message": f"{self.command} is not allowed here", "path": None}
                )
                err.headers["Allow"] = ", ".join(allowed)
                raise err
            if sub == "/faults":
                if self.command == "PUT":
                    raw = self._read_body(JSON_BODY_CAP)
                    try:
                        update = json.loads(raw or b"{}")
                    except ValueError as exc:
                        raise _field_error(None, f"request body is not valid JSON: {exc}") from None
                    if not isinstance(update, dict):
                        raise _field_error(None, '"value" must be an object')
                    try:
                        sb.set_faults(**update)
                    except FaultsError as exc:
                        raise _field_error(exc.field or None, exc.message) from None
                result: Any = sb.faults.to_dict()
            elif sub == "/reset":
                sb.reset()
                result = {"reset": True}
            else:
                result = sb.state.stats()
            self._write(200, _dumps(result))
        except AlloyLikeError as e:
            self._write_error(e)


def _refusal(tpl: str) -> AlloyLikeError:
    """The final 400 of the refusal fault (see the module docstring)."""
    why = "by the sandbox (injected fault: refuse_fraction)"
    if tpl == ROUTE_COLLECTION:
        return _field_error("type", f'"type" was refused {why}')
    return AlloyLikeError.of(
        4001, {"message": f'"content-type" was refused {why}', "path": "content-type"}
    )


def _match(sub: str) -> tuple[str, str, str | None] | None:
    """``/entities/E/documents[/D]`` -> (route template, entity, document)."""
    parts = sub.split("/")
    n = len(parts)
    if n not in (4, 5) or parts[0] or parts[1] != "entities" or parts[3] != "documents":
        return None
    entity = unquote(parts[2])
    if not entity:
        return None
    if n == 4:
        return ROUTE_COLLECTION, entity, None
    document = unquote(parts[4])
    if not document:
        return None
    return ROUTE_DOCUMENT, entity, document


# --------------------------------------------------------------------------- server


def _norm_base(base_path: str) -> str:
    b = "/" + base_path.strip().strip("/")
    return "" if b == "/" else b


def serve_tls(httpd: HTTPServer, tls: tuple[str, str] | None) -> str:
    """With ``tls`` (certificate, key) the server speaks HTTPS (for the TLS tests);
    returns the URL scheme it serves."""
    if tls is None:
        return "http"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    return "https"


class SandboxServer:
    """The Alloy document-API emulator, bound at construction (``port=0``: any free port)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        secret: str | None = None,
        agents: Iterable[str] | None = None,
        entities: Iterable[str] | None = None,
        faults: Faults | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        base_path: str = "/v1",
        extensions: Iterable[str] | None = None,
        allow_reupload: bool = False,
        verbose: bool = False,
        tls: tuple[str, str] | None = None,
        keep_bodies: bool = True,
    ) -> None:
        if (token is None) != (secret is None):
            raise ValueError("give both token and secret, or neither")
        self.credentials: bytes | None = None if token is None else f"{token}:{secret}".encode()
        self.base_path = _norm_base(base_path)
        self.state = SandboxState(
            agents=agents,
            entities=entities,
            max_upload_bytes=max_upload_bytes,
            extensions=extensions,
            allow_reupload=allow_reupload,
            keep_bodies=keep_bodies,
        )
        self.drain_limit = max(max_upload_bytes, MIN_DRAIN_LIMIT)
        self.verbose = verbose
        self._faults = faults if faults is not None else Faults()
        self.state.clock_offset_ms = self._faults.clock_offset_ms
        self._rng = random.Random(self._faults.seed)
        self._faults_lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._serving = False
        self._closed = False
        cls = _HTTPServer6 if ":" in host else _HTTPServer
        self._httpd = cls((host, port), _Handler)
        self._httpd.sandbox = self
        self.scheme = serve_tls(self._httpd, tls)
        self.host = host
        self.port: int = self._httpd.server_address[1]

    # -- addresses --------------------------------------------------------------
    @property
    def _url_host(self) -> str:
        if self.host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if self.host == "::":
            return "[::1]"
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def root_url(self) -> str:
        return f"{self.scheme}://{self._url_host}:{self.port}"

    @property
    def url(self) -> str:
        return self.root_url + self.base_path

    @property
    def admin_url(self) -> str:
        return self.root_url + "/_admin"

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> SandboxServer:
        if self._closed:
            raise RuntimeError("sandbox server already stopped")
        if self._thread is None:
            self._serving = True
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.01},  # stop() returns within ~10 ms
                name=f"alloy-sandbox-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the foreground until Ctrl-C, SIGTERM or ``stop()`` from another thread."""
        if self._closed:
            raise RuntimeError("sandbox server already stopped")
        if self._thread is not None:
            raise RuntimeError("sandbox server already started in the background")
        previous: Any = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        self._serving = True
        try:
            self._httpd.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self._serving = False
            if in_main:
                signal.signal(signal.SIGTERM, previous)
            self.stop()

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()  # wakes requests sleeping on latency/slow faults
        if self._serving:
            self._httpd.shutdown()
            self._serving = False
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._httpd.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:  # close keep-alive connections so no handler outlives the server
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def track(self, conn: Any, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, less if the sandbox stops; True when it stopped."""
        return self._stopping.wait(seconds)

    # -- faults -----------------------------------------------------------------
    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, **kw: Any) -> None:
        """Partial update of the faults; giving ``seed`` re-seeds the RNG."""
        with self._faults_lock:
            new = Faults.from_dict(kw, base=self._faults)
            if "seed" in kw:
                self._rng = random.Random(new.seed)
            self._faults = new
            self.state.clock_offset_ms = new.clock_offset_ms

    def reset(self) -> None:
        """Clear documents and counters; faults are kept, the RNG re-seeded if seeded."""
        with self._faults_lock:
            if self._faults.seed is not None:
                self._rng = random.Random(self._faults.seed)
        self.state.reset()

    def draw_faults(self) -> _Plan | None:
        f = self._faults
        if not f.active:
            return None
        with self._faults_lock:
            f = self._faults
            u = self._rng.random()
            v = self._rng.random()
            w = self._rng.random()
        plan = _Plan(latency_s=f.latency_ms / 1000.0)
        edge = f.drop_fraction
        if u < edge:
            plan.drop = True
            plan.drop_after_apply = f.drop_after_apply
        elif u < (edge := edge + f.rate_429):
            plan.error_minor = 4033
            if v < f.retry_after_fraction:
                plan.retry_after = _fmt_seconds(f.retry_after_seconds)
        elif u < (edge := edge + f.error_503):
            plan.error_minor = 5031
        elif u < (edge := edge + f.error_500):
            plan.error_minor = 5000
        elif u < (edge := edge + f.refuse_fraction):
            plan.refuse = True
        elif u < edge + f.late_commit_fraction:
            plan.late_s = f.late_commit_ms / 1000.0
        if w < f.slow_fraction and f.slow_ms > 0:
            plan.slow_s = f.slow_ms / 1000.0
        return plan


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- CLI


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mailingest sandbox`` / ``python -m mailingest_testbed.alloy_sandbox``."""
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    a("--port", type=int, default=8080, help="port to bind, 0 for any free port (default 8080)")
    a("--base-path", default="/v1", help="API base path (default /v1)")
    a("--token", default=None, help="API token; with --secret, Basic auth is required")
    a("--secret", default=None, help="API secret; with --token, Basic auth is required")
    a("--agents", default=None, help="comma-separated agent e-mails allowed as note authors")
    a("--entities", default=None, help="comma-separated entities; others get 400/4013")
    a("--extensions", default=None, help="comma-separated allowed extensions (default: any)")
    a("--allow-reupload", action="store_true", help="a second PUT replaces bytes instead of 409")
    a(
        "--digests-only",
        action="store_true",
        help="keep only the size and SHA-256 of uploaded bodies (benchmarks); downloads get 404",
    )
    a(
        "--max-upload-bytes",
        type=int,
        default=DEFAULT_MAX_UPLOAD_BYTES,
        help="largest accepted body in bytes, larger gets 413/4131 (default 50 MiB)",
    )
    a("--error-500", type=float, default=0.0, help="fraction of /v1 requests answered 500/5000")
    a("--error-503", type=float, default=0.0, help="fraction of /v1 requests answered 503/5031")
    a("--rate-429", type=float, default=0.0, help="fraction of /v1 requests answered 429/4033")
    a(
        "--retry-after-fraction",
        type=float,
        default=0.5,
        help="fraction of 429s carrying Retry-After (default 0.5)",
    )
    a(
        "--retry-after-seconds",
        type=float,
        default=1.0,
        help="Retry-After value in seconds (default 1)",
    )
    a("--latency-ms", type=float, default=0.0, help="delay added to every /v1 request, in ms")
    a(
        "--slow-fraction",
        type=float,
        default=0.0,
        help="fraction of responses delayed by --slow-ms (the request is still applied)",
    )
    a("--slow-ms", type=float, default=0.0, help="delay of a slow response, in ms")
    a(
        "--drop-fraction",
        type=float,
        default=0.0,
        help="fraction of requests whose connection is closed without a response",
    )
    a(
        "--drop-after-apply",
        action="store_true",
        help="apply dropped requests before closing (default: not applied)",
    )
    a(
        "--refuse-fraction",
        type=float,
        default=0.0,
        help="fraction of describes/uploads refused with a final 400 (4002/4001), not applied",
    )
    a(
        "--late-commit-fraction",
        type=float,
        default=0.0,
        help="fraction of describes/uploads held --late-commit-ms before being applied",
    )
    a(
        "--late-commit-ms",
        type=float,
        default=0.0,
        help="how long a late commit is held (neither applied nor answered), in ms",
    )
    a(
        "--clock-offset-ms",
        type=int,
        default=0,
        help="shift every timestamp written (bodies, Date header) by this many ms, may be < 0",
    )
    a("--seed", type=int, default=None, help="seed of the fault RNG (default: random)")
    a("--verbose", action="store_true", help="log every request to stderr")


def faults_from_args(args: argparse.Namespace) -> Faults:
    """The ``Faults`` the options of ``add_arguments`` ask for (``FaultsError`` if bad)."""
    return Faults(
        error_500=args.error_500,
        error_503=getattr(args, "error_503", 0.0),
        rate_429=args.rate_429,
        retry_after_fraction=args.retry_after_fraction,
        retry_after_seconds=getattr(args, "retry_after_seconds", 1.0),
        latency_ms=args.latency_ms,
        slow_fraction=args.slow_fraction,
        slow_ms=args.slow_ms,
        drop_fraction=args.drop_fraction,
        drop_after_apply=getattr(args, "drop_after_apply", False),
        seed=args.seed,
        refuse_fraction=getattr(args, "refuse_fraction", 0.0),
        late_commit_fraction=getattr(args, "late_commit_fraction", 0.0),
        late_commit_ms=getattr(args, "late_commit_ms", 0.0),
        clock_offset_ms=getattr(args, "clock_offset_ms", 0),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Build a SandboxServer from parsed options and serve in the foreground."""
    try:
        faults = faults_from_args(args)
        server = SandboxServer(
            args.host,
            args.port,
            token=args.token,
            secret=args.secret,
            agents=_csv(args.agents),
            entities=_csv(args.entities),
            faults=faults,
            max_upload_bytes=args.max_upload_bytes,
            base_path=getattr(args, "base_path", "/v1"),
            extensions=_csv(getattr(args, "extensions", None)),
            allow_reupload=getattr(args, "allow_reupload", False),
            verbose=getattr(args, "verbose", False),
            keep_bodies=not getattr(args, "digests_only", False),
        )
    except (ValueError, OSError) as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    print(f"Alloy sandbox on http://{server._url_host}:{server.port}{server.base_path}", flush=True)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailingest_testbed.alloy_sandbox", description="Alloy document-API emulator"
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
