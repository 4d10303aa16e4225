"""``mailingest console`` as a child process on a free loopback port, ready once its
``/healthz`` answers; stopped with SIGTERM (uvicorn's graceful shutdown), then its
process group killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .common import HOST, free_port, log_tail


class ConsoleProcess:
    def __init__(self, env: dict[str, str], log_path: Path, *, port: int | None = None) -> None:
        self.env = env
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> ConsoleProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailingest",
                "console",
                "--host",
                HOST,
                "--port",
                str(self.port),
            ],
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mailingest console exited: {log_tail(self.log_path)}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.url + "/healthz", timeout=2) as answer,
            ):
                if answer.status == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mailingest console not ready in {timeout}s: {log_tail(self.log_path)}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def __enter__(self) -> ConsoleProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
