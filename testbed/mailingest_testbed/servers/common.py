"""What the private servers share: the loopback host, free ports, child processes.

* :func:`free_port`, readiness and shutdown waits on 127.0.0.1 ports;
* :class:`Child`, a subprocess leading its own process group, so that stopping it
  signals that group only;
* the ``atexit`` safety net: servers still running at interpreter exit are stopped;
* :class:`ServerNotAvailable`, raised when a server's binary or package is missing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

__all__ = [
    "DEFAULT_IMAP_PASSWORD",
    "DEFAULT_IMAP_USER",
    "HOST",
    "ServerNotAvailable",
    "free_port",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_IMAP_USER = "customer-support"
DEFAULT_IMAP_PASSWORD = "s3cret-pw"

STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 3
_UNSAFE_PATH = re.compile(r"[\s%\"'\\#{}$]")


class _Stoppable(Protocol):
    def stop(self) -> None: ...


# Servers started and not yet stopped; stopped at interpreter exit as a safety net.
live: set[_Stoppable] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(live):
        log.warning("stopping %s still running at exit", type(server).__name__)
        with contextlib.suppress(Exception):
            server.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerNotAvailable(RuntimeError):
    """The server's binary or package is missing; the message says what to install."""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(log {path} is empty)"


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port_closed(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while port_accepts(port, timeout=0.2) and time.monotonic() < deadline:
        time.sleep(0.05)


def find_binary(name: str, given: str | None, extra_dirs: Sequence[str]) -> str | None:
    if given:
        return given if os.access(given, os.X_OK) else shutil.which(given)
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def check_path(path: Path) -> Path:
    path = path.resolve()
    if _UNSAFE_PATH.search(str(path)):
        raise ValueError(f"workdir {path} contains characters unsafe for a server config")
    return path


class Child:
    """A subprocess leading its own process group; stopping it kills that group only."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        cwd: Path,
        *,
        term_group: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.term_group = term_group
        self.env = env  # None: this process's
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.debug("%s started, pid %d: %s", self.name, self.proc.pid, " ".join(self.argv))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def leader_exited(self) -> bool:
        """True once the leader has exited (it stays unreaped, so its pgid stays ours)."""
        if self.proc is None:
            return True
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _killpg(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _reap(self) -> None:
        # Leader is dead but unreaped: its pgid cannot have been recycled, so
        # SIGKILL to the group only hits stragglers of this tree.
        self._killpg(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait()
        log.debug("%s (pid %d) exited with %s", self.name, self.proc.pid, self.proc.returncode)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        if not self.leader_exited():
            if self.term_group:
                self._killpg(signal.SIGTERM)
            else:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self.leader_exited() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not self.leader_exited():
                log.warning("%s (pid %d) ignored SIGTERM, killing it", self.name, self.pid)
        self._reap()

    def kill(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self._killpg(signal.SIGKILL)
        self._reap()


def wait_ready(child: Child, is_ready: Callable[[], bool], timeout: float, what: str) -> str | None:
    """Poll until ready (None) or the child died / timed out (an error message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.leader_exited():
            return f"{what} exited during startup"
        try:
            if is_ready():
                return None
        except Exception as exc:  # noqa: BLE001 - the caller stops the child and reports
            return f"{what}: readiness check failed ({type(exc).__name__})"
        time.sleep(0.05)
    return f"{what} not ready after {timeout:.0f}s"
