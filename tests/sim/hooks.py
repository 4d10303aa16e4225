"""The seams: every Redis command, Alloy request and IMAP command is a checkpoint.

* :class:`SimRedis` (``redis_client=``): ``execute_command`` covers plain commands, Lua
  scripts (EVALSHA) and locks; its pipelines are one checkpoint per ``execute``.
* :class:`SimTransport` (``alloy_transport=``): the real HTTP transport to the sandbox,
  with the network faults the schedule draws.
* :func:`wrap_mailbox`: every public mail operation of an ``inbox.Mailbox`` is a checkpoint.

Checkpoints only happen in simulated threads; the harness's own calls pass straight through.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import ssl
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import redis
import redis.client

from mailingest.adapters.ledger.leases import ACQUIRE

from . import threads

LOCK_PREFIX = b"mailingest:lock:"
ACQUIRE_SHA = hashlib.sha1(ACQUIRE.encode()).hexdigest()  # how Redis names the script


class Observer(Protocol):
    """What the hooks tell the scheduler, and ask it."""

    def on_lock(self, key: bytes, token: bytes, ttl_ms: int) -> None: ...

    def network_fault(self, operation: str) -> str: ...

    def hold(self, held: HeldRequest) -> None: ...

    def queue_since(self) -> int | None: ...


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def key_kind(key: Any) -> str:
    """``mailingest:mail:default/...`` -> ``mail``: a label free of ids (traces must not
    depend on UIDs or tokens)."""
    parts = _text(key).split(":")
    if parts[0] == "mailingest" and len(parts) > 1:
        return parts[1] + (":" + parts[2] if parts[1] == "lock" and len(parts) > 2 else "")
    return "?"


def redis_label(args: tuple[Any, ...]) -> str:
    name = _text(args[0]).upper()
    if name in ("EVALSHA", "EVAL") and len(args) > 3 and int(args[2]) > 0:
        return f"{name} {key_kind(args[3])}"
    if len(args) > 1:
        return f"{name} {key_kind(args[1])}"
    return name


# -- Redis ---------------------------------------------------------------------------


class SimPipeline(redis.client.Pipeline):
    """A pipeline whose ``execute`` is one checkpoint (before) and one (after)."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        actor = threads.current()
        if actor is None:
            return super().execute(raise_on_error)
        kinds = sorted({key_kind(c[0][1]) for c in self.command_stack if len(c[0]) > 1})
        label = f"{'MULTI' if self.transaction else 'PIPELINE'} {','.join(kinds)}"
        actor.checkpoint(label)
        if actor.pending_errors:
            self.reset()
            raise actor.pending_errors.pop()
        result = super().execute(raise_on_error)
        actor.checkpoint(label + " ok")
        return result


class SimRedis(redis.Redis):
    """The worker's Redis client: each command is a checkpoint before and after."""

    def __init__(self, *args: Any, observer: Observer | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.observer = observer

    def execute_command(self, *args: Any, **options: Any) -> Any:
        actor = threads.current()
        if actor is None:
            return super().execute_command(*args, **options)
        label = redis_label(args)
        actor.checkpoint(label)
        if actor.pending_errors:  # the connection died under it (a Redis crash)
            raise actor.pending_errors.pop()
        result = super().execute_command(*args, **options)
        if (
            self.observer is not None
            and result
            and _text(args[0]).upper() == "SET"
            and isinstance(args[1], str | bytes)
            and _as_bytes(args[1]).startswith(LOCK_PREFIX)
        ):
            upper = [_text(a).upper() for a in args[3:]]
            if "NX" in upper and "PX" in upper:
                ttl = int(args[3 + upper.index("PX") + 1])
                self.observer.on_lock(_as_bytes(args[1]), _as_bytes(args[2]), ttl)
        if (  # a lease taken by its script (leases.ACQUIRE: key, note; token, lease ms)
            self.observer is not None
            and result
            and _text(args[0]).upper() == "EVALSHA"
            and _text(args[1]) == ACQUIRE_SHA
        ):
            self.observer.on_lock(_as_bytes(args[3]), _as_bytes(args[5]), int(args[6]))
        actor.checkpoint(label + " ok")
        return result

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> SimPipeline:
        return SimPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    def register_script(self, script: Any) -> Any:
        registered = super().register_script(script)
        # load it now, outside the schedule: a NOSCRIPT retry would add checkpoints that
        # depend on what ran before, and a run must not depend on that
        redis.Redis.execute_command(self, "SCRIPT", "LOAD", script)
        return registered


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


# -- Alloy ---------------------------------------------------------------------------


@dataclass
class HeldRequest:
    """A request Alloy received but commits only later (its answer was never seen)."""

    operation: str
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    content: bytes
    deadline_ms: int = 0

    def request(self) -> httpx.Request:
        return httpx.Request(self.method, self.url, headers=self.headers, content=self.content)


def operation(request: httpx.Request) -> str:
    parts = request.url.path.rstrip("/").split("/")
    if request.method == "POST":
        return "describe"
    if request.method == "PUT":
        return "upload"
    return "list" if parts and parts[-1] == "documents" else "download"


def _error(request: httpx.Request, minor: int, retry_after: str | None = None) -> httpx.Response:
    from mailingest_testbed.alloy_sandbox import AlloyLikeError

    err = AlloyLikeError.of(minor, {"message": "simulated", "path": None})
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(err.status, json=err.body(), headers=headers, request=request)


def _without_length(headers: httpx.Headers) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers.raw if k.lower() != b"content-length"]


def refused(request: httpx.Request) -> httpx.Request:
    """The same request made invalid, so the real sandbox refuses it for good (4xx)."""
    if request.method == "POST":  # describe: an invalid type -> 400/4002
        body = json.loads(request.content)
        body["type"] = "simulated-invalid-type"
        return httpx.Request(
            "POST", request.url, headers=_without_length(request.headers), json=body
        )
    headers = [(k, v) for k, v in _without_length(request.headers) if k.lower() != b"content-type"]
    headers.append((b"content-type", b"text/plain"))  # upload: wrong type -> 400/4001
    return httpx.Request("PUT", request.url, headers=headers, content=request.content)


_TLS = ssl.create_default_context()  # made once: each one costs tens of milliseconds


def plain_transport() -> httpx.HTTPTransport:
    return httpx.HTTPTransport(verify=_TLS)


class SimTransport(httpx.BaseTransport):
    """The real transport to the sandbox, one checkpoint before and after each request,
    and the fault the schedule chose for it."""

    def __init__(self, observer: Observer) -> None:
        self.inner = plain_transport()
        self.observer = observer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        actor = threads.current()
        if actor is None:
            return self._send(request)
        op = operation(request)
        if request.method != "POST":
            # A describe is sent right after its send guard (pipeline: a run that stalled
            # more than SEND_GUARD since recording the attempt does not send): no thread
            # switch and no time passes between that check and the socket write. A stall
            # exactly there is the one hazard no client can close (docs/reliability.md).
            actor.checkpoint(f"alloy {op}")
        request.read()
        fault = self.observer.network_fault(op)
        if fault == "connect":
            raise httpx.ConnectError("simulated: connection refused", request=request)
        if fault in ("e503", "e429", "e500"):  # answered without being carried out
            minor = {"e503": 5031, "e429": 4033, "e500": 5000}[fault]
            return _error(request, minor, "3" if fault == "e429" else None)
        if fault == "late":  # sent, but Alloy commits it only later
            self.observer.hold(
                HeldRequest(
                    op,
                    request.method,
                    str(request.url),
                    list(request.headers.raw),
                    request.content,
                )
            )
            raise httpx.ReadTimeout("simulated: no answer (committed later)", request=request)
        response = self._send(refused(request) if fault == "refuse" else request)
        if fault == "lost":
            raise httpx.ReadTimeout("simulated: the answer was lost", request=request)
        if fault == "e500_applied":
            return _error(request, 5000)
        actor.checkpoint(f"alloy {op} answered")
        return response

    def _send(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        try:
            content = response.read()
        finally:
            response.close()
        return httpx.Response(
            response.status_code, headers=response.headers, content=content, request=request
        )

    def close(self) -> None:
        self.inner.close()


# -- IMAP ----------------------------------------------------------------------------

# connection upkeep: no checkpoint, so a kept or a new connection makes the same schedule
_NOT_CHECKPOINTS = {
    "connect",
    "close",
    "noop",
    "server_spoke",
    "supports_idle",
    "idle",
    "idle_check",
    "idle_done",
}

_classes: dict[type, type] = {}


def _checkpointed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
        actor = threads.current()
        if actor is None:
            return fn(self, *args, **kw)
        actor.checkpoint(f"imap {name}")
        result = fn(self, *args, **kw)
        actor.checkpoint(f"imap {name} ok")
        return result

    return wrapper


def _close(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(self: Any) -> None:
        actor = threads.current()
        if actor is not None and actor.crashing:
            hard_close(self)  # the process died: the socket closes, no LOGOUT is sent
            raise threads.Crash("imap close")
        fn(self)

    return wrapper


def hard_close(box: Any) -> None:
    """Drop a mailbox's connection without a word (what kill -9 does to its socket)."""
    client = box.__dict__.get("_client")
    box.__dict__["_client"] = None
    if client is not None:
        with contextlib.suppress(Exception):  # already gone
            client.shutdown()


def mailbox_class(base: type) -> type:
    """A subclass of ``base`` (``inbox.Mailbox``) whose public operations are checkpoints."""
    if base in _classes:
        return _classes[base]
    attrs: dict[str, Any] = {}
    for name, fn in inspect.getmembers(base, inspect.isfunction):
        if name == "close":
            attrs[name] = _close(fn)
        elif not name.startswith("_") and name not in _NOT_CHECKPOINTS:
            attrs[name] = _checkpointed(name, fn)
    cls = type("Sim" + base.__name__, (base,), attrs)
    _classes[base] = cls
    return cls


def wrap_mailbox(box: Any) -> Any:
    box.__class__ = mailbox_class(type(box))
    return box
