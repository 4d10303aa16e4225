"""The Alloy sandbox's state and the API's rules, without HTTP.

Documents per entity, the validation of a describe, the conflict and size rules of
an upload, the counters of ``/_admin/stats``, and Alloy's error shape
(:class:`AlloyLikeError`).  The package docstring lists the decisions taken where
Alloy publishes nothing.  Timestamps come from :func:`now_ms` (the simulation in
``tests/sim`` replaces it with its own clock).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mailingest.core.documents import (
    DOCUMENT_TYPES,  # the six types Alloy allows, known in one place
)

from .faults import FAULT_KINDS

__all__ = [
    "DOCUMENT_TYPES",
    "AlloyLikeError",
    "SandboxState",
    "field_error",
    "is_entity_token",
    "new_entity_token",
    "now_ms",
]

DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
JSON_BODY_CAP = 1024 * 1024
ENTITY_TOKEN_RE = re.compile(r"[PB]-[A-Za-z0-9]{20}")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def now_ms() -> int:
    """Now in epoch milliseconds (Alloy's unit for timestamps)."""
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


def field_error(path: str | None, message: str) -> AlloyLikeError:
    """400 / 4002 about one field of a JSON body (``path`` None: the body itself)."""
    return AlloyLikeError.of(4002, {"message": message, "path": path})


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
            raise field_error(None, '"value" must be an object')
        for name in ("name", "extension", "type"):
            if name not in body:
                raise field_error(name, f'"{name}" is required')
            v = body[name]
            if not isinstance(v, str):
                raise field_error(name, f'"{name}" must be a string')
            if v == "":
                raise field_error(name, f'"{name}" is not allowed to be empty')
        if body["type"] not in DOCUMENT_TYPES:
            raise field_error("type", f'"type" must be one of [{", ".join(DOCUMENT_TYPES)}]')
        if self.extensions is not None and body["extension"].lower() not in self.extensions:
            raise field_error(
                "extension",
                f'"extension" must be one of [{", ".join(sorted(self.extensions))}]',
            )
        for name in ("note", "note_author_agent_email"):
            v = body.get(name)
            if v is None:
                continue
            if not isinstance(v, str):
                raise field_error(name, f'"{name}" must be a string')
            if v == "":
                raise field_error(name, f'"{name}" is not allowed to be empty')
        email = body.get("note_author_agent_email")
        if email is not None and self.agents is not None and email.lower() not in self.agents:
            raise field_error(
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
