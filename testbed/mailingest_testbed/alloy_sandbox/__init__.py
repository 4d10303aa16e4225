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
* The HTTP layer's own rules (unparsable requests, bodies): see ``http``.

Fault injection (``Faults``, ``/v1`` only): see ``faults``.

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

The package, along its seams:

* ``model``: documents, entities, the API's validation rules, Alloy's error shape
* ``faults``: the fault knobs and the seeded draw of each request's faults
* ``http``: the request handler (strict parser, routes, admin, faults carried out),
  its threading HTTP/1.1 server and TLS serving
* ``server``: ``SandboxServer``, lifecycle and fault state
* ``cli``: the options of ``mailingest sandbox`` and running it
"""

from __future__ import annotations

from .cli import add_arguments, faults_from_args, main, run_from_args
from .faults import Faults, FaultsError
from .http import serve_tls
from .model import (
    DOCUMENT_TYPES,
    AlloyLikeError,
    SandboxState,
    is_entity_token,
    new_entity_token,
)
from .server import SandboxServer

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
    "main",
    "new_entity_token",
    "run_from_args",
    "serve_tls",
]
