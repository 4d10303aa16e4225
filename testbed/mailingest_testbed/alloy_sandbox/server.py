"""``SandboxServer``: the Alloy sandbox's lifecycle, addresses and fault state.

It binds the HTTP server (``http``) at construction, serves in a background thread
(``start``) or in the foreground (``serve_forever``), owns the state (``model``) and
the current ``Faults`` with their seeded RNG (``faults``), and closes every keep-alive
connection on ``stop`` so no handler outlives it.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

from .faults import Faults, Plan, plan
from .http import make_httpd, serve_tls
from .model import DEFAULT_MAX_UPLOAD_BYTES, SandboxState

__all__ = ["SandboxServer"]

# an unread body up to this size is drained to keep the connection (at least the upload limit)
MIN_DRAIN_LIMIT = 64 * 1024 * 1024


def _norm_base(base_path: str) -> str:
    b = "/" + base_path.strip().strip("/")
    return "" if b == "/" else b


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
        self._httpd = make_httpd(self, host, port)
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
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

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

    def draw_faults(self) -> Plan | None:
        """This request's faults: three draws of the seeded RNG while any is set."""
        f = self._faults
        if not f.active:
            return None
        with self._faults_lock:
            f = self._faults
            u = self._rng.random()
            v = self._rng.random()
            w = self._rng.random()
        return plan(f, u, v, w)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
