"""``mailingest console`` as a child process (:class:`~.common.Child`) on a free
loopback port, ready once its ``/healthz`` answers; stopped with SIGTERM (uvicorn's
graceful shutdown), then its process group killed."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from .common import HOST, Child, free_port, live, log_tail, wait_ready


class ConsoleProcess:
    def __init__(self, env: dict[str, str], log_path: Path, *, port: int | None = None) -> None:
        self.env = env
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self._child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> ConsoleProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "mailingest", "console", "--host", HOST]
        child = Child(
            "mailingest console",
            [*argv, "--port", str(self.port)],
            self.log_path,
            self.log_path.parent,
            env=self.env,
        )
        child.spawn()
        error = wait_ready(child, self._healthy_yet, timeout, "mailingest console")
        if error is not None:
            child.stop()
            raise RuntimeError(f"{error}: {log_tail(self.log_path)}")
        self._child = child
        live.add(self)
        return self

    def _healthy_yet(self) -> bool:
        """Not listening yet is not an error (wait_ready reports one as a failure)."""
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:  # refused (urllib's URLError is an OSError too)
            return False

    def stop(self) -> None:
        live.discard(self)
        child, self._child = self._child, None
        if child is not None:
            child.stop()

    def __enter__(self) -> ConsoleProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
