"""The Alloy sandbox's HTTP layer: the request handler, its server and TLS serving.

The stdlib's ``ThreadingHTTPServer`` (one thread per connection, HTTP/1.1 keep-alive)
with a ``BaseHTTPRequestHandler`` that routes ``/v1`` and ``/_admin`` requests to the
state (``model``), carries out the faults ``SandboxServer`` draws for each request
(drops, late and lost replies, refusals: ``faults``), and answers every error in
Alloy's shape.

* Requests the HTTP layer cannot parse (bad request line, HTTP/2, bad header
  line, conflicting Content-Length, > 100 headers, unknown method) are answered
  in the same error shape with ``minor_code = status * 10`` (4000, 5050, 4310,
  5010) and ``Connection: close``.  Headers are parsed by a small strict parser
  instead of ``BaseHTTPRequestHandler.parse_request``, whose e-mail parser takes a
  header line without a colon and conflicting Content-Length headers without a word.
* Request bodies are read by Content-Length exactly (chunked bodies are decoded
  too).  An error answered before the body was read drains the body (up to
  ``max(max_upload_bytes, 64 MiB)``) to keep the connection alive; a larger
  unread body gets ``Connection: close``.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import hmac
import json
import socket
import socketserver
import ssl
import sys
import time
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .faults import FaultsError
from .model import JSON_BODY_CAP, AlloyLikeError, field_error

if TYPE_CHECKING:
    from .server import SandboxServer

__all__ = ["ROUTE_COLLECTION", "ROUTE_DOCUMENT", "make_httpd", "serve_tls"]

ROUTE_COLLECTION = "/entities/{entity}/documents"
ROUTE_DOCUMENT = "/entities/{entity}/documents/{document}"
_ALLOWED = {ROUTE_COLLECTION: ("GET", "HEAD", "POST"), ROUTE_DOCUMENT: ("GET", "HEAD", "PUT")}
_SINGLE_WRITE_MAX = 64 * 1024
_IDLE_TIMEOUT_S = 300.0


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

    __slots__ = ("_first", "_items")

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
        return not (
            expect == "100-continue" and version >= "HTTP/1.1" and not self.handle_expect_100()
        )

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
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

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
                sb.state.record(route_key, None, kinds)  # before the close, as below
                self._drop()
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
                # counted before the answer leaves (and before a slow answer's wait): a
                # client that saw it, or gave up waiting for it, sees it counted
                sb.state.record(route_key, err.status, kinds)
                if plan.slow_s:
                    sb.sleep(plan.slow_s)
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
                        sb.state.record(route_key, None, kinds)
                        self._drop()
                        return
            status, body, ctype, headers = self._route(tpl, entity, document)
        except AlloyLikeError as e:
            status, body, headers = e.status, self._error_body(e), e.headers
            ctype = "application/json"
        except _ClientGone:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in the sandbox: still answer in Alloy's shape
            bug = AlloyLikeError.of(5000, {"message": repr(exc), "path": None})
            status, body, headers = bug.status, self._error_body(bug), bug.headers
            ctype = "application/json"

        if plan is not None:
            if plan.drop:  # drop_after_apply: effect applied, response lost
                kinds.append("drop")
                # counted before the close: a client that saw it dropped sees it counted
                sb.state.record(route_key, None, kinds)
                self._drop()
                return
            if plan.slow_s:
                kinds.append("slow")
        sb.state.record(route_key, status, kinds)  # before the answer leaves (see above)
        if plan is not None and plan.slow_s:
            sb.sleep(plan.slow_s)  # applied and counted: only the answer is late
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
                raise field_error(None, f"request body is not valid JSON: {exc}") from None
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
                        raise field_error(None, f"request body is not valid JSON: {exc}") from None
                    if not isinstance(update, dict):
                        raise field_error(None, '"value" must be an object')
                    try:
                        sb.set_faults(**update)
                    except FaultsError as exc:
                        raise field_error(exc.field or None, exc.message) from None
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
    """The final 400 of the refusal fault (see ``faults``)."""
    why = "by the sandbox (injected fault: refuse_fraction)"
    if tpl == ROUTE_COLLECTION:
        return field_error("type", f'"type" was refused {why}')
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


def serve_tls(httpd: HTTPServer, tls: tuple[str, str] | None) -> str:
    """With ``tls`` (certificate, key) the server speaks HTTPS (for the TLS tests);
    returns the URL scheme it serves."""
    if tls is None:
        return "http"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    return "https"


def make_httpd(sandbox: SandboxServer, host: str, port: int) -> HTTPServer:
    """The HTTP server of ``sandbox``, bound to ``host``:``port`` (IPv6 when ``host`` is)."""
    cls = _HTTPServer6 if ":" in host else _HTTPServer
    httpd = cls((host, port), _Handler)
    httpd.sandbox = sandbox
    return httpd
