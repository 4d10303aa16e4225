"""Fault injection of the Alloy sandbox: the knobs (``Faults``) and the draw (``plan``).

Pure: no I/O and no clock.  ``SandboxServer`` owns the seeded RNG and hands its three
numbers to :func:`plan`; the HTTP handler carries the resulting :class:`Plan` out.

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FAULT_KINDS", "Faults", "FaultsError", "Plan", "plan"]


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
class Plan:
    """What one request draws (see the module docstring)."""

    latency_s: float = 0.0
    drop: bool = False
    drop_after_apply: bool = False
    error_minor: int = 0
    retry_after: str | None = None
    slow_s: float = 0.0
    refuse: bool = False  # a describe/upload gets a final 400, not applied
    late_s: float = 0.0  # a describe/upload is held this long, then applied


def fmt_seconds(v: float) -> str:
    """A ``Retry-After`` value: an integer when integral, else a decimal such as ``0.2``."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def plan(f: Faults, u: float, v: float, w: float) -> Plan:
    """The faults one request gets from its three draws (outcome, Retry-After, slow)."""
    p = Plan(latency_s=f.latency_ms / 1000.0)
    edge = f.drop_fraction
    if u < edge:
        p.drop = True
        p.drop_after_apply = f.drop_after_apply
    elif u < (edge := edge + f.rate_429):
        p.error_minor = 4033
        if v < f.retry_after_fraction:
            p.retry_after = fmt_seconds(f.retry_after_seconds)
    elif u < (edge := edge + f.error_503):
        p.error_minor = 5031
    elif u < (edge := edge + f.error_500):
        p.error_minor = 5000
    elif u < (edge := edge + f.refuse_fraction):
        p.refuse = True
    elif u < edge + f.late_commit_fraction:
        p.late_s = f.late_commit_ms / 1000.0
    if w < f.slow_fraction and f.slow_ms > 0:
        p.slow_s = f.slow_ms / 1000.0
    return p
