"""A TCP proxy for the tests that must break a connection the way networks do.

``cut()`` stops relaying on the open connections and leaves them open: the peer
hears nothing, as after a NAT timeout or a pulled cable. ``close()`` closes them
without a word (no IMAP BYE). New connections are relayed as usual either way.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
            muted = threading.Event()
            with self._lock:
                self.connections.append((client, server, muted))
                self.accepted += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b, muted), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, muted: threading.Event) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            if muted.is_set():
                continue  # swallowed: the other side never hears of it
            try:
                sink.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        """Relay nothing more on the open connections; keep them open."""
        with self._lock:
            for _, _, muted in self.connections:
                muted.set()

    def close(self) -> None:
        """Close the open connections on both sides, without a word."""
        with self._lock:
            connections, self.connections = self.connections, []
        for client, server, _ in connections:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def stop(self) -> None:
        self._closed.set()
        self.listener.close()
        self.close()
