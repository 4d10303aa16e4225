"""Celery worker, beat or Flower of mailingest as a child process (``CeleryProcess``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .common import log_tail

__all__ = ["CeleryProcess"]


class CeleryProcess:
    """``python -m celery -A mailingest <kind>`` (worker, beat or flower) as a child process.

    Runs in its own process group: ``stop()`` sends SIGTERM to the main process
    (Celery's warm shutdown: in-flight tasks finish) and waits, then SIGKILLs the
    group; ``kill()`` is a SIGKILL of the group at once (a crash, for the fault tests).
    """

    def __init__(
        self,
        kind: str,
        env: dict[str, str],
        log_path: Path,
        extra: Sequence[str] = (),
        *,
        ready_timeout: float = 60.0,
        via_cli: bool = False,
    ) -> None:
        if kind not in ("worker", "beat", "flower"):
            raise ValueError(kind)
        self.via_cli = via_cli and kind != "flower"  # `mailingest worker|beat` wrappers
        self.kind = kind
        self.env = env
        self.log_path = Path(log_path)
        self.extra = list(extra)
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def argv(self) -> list[str]:
        if self.via_cli:
            argv = [sys.executable, "-m", "mailingest", self.kind]
        else:
            argv = [sys.executable, "-m", "celery", "-A", "mailingest", self.kind]
        if self.kind == "worker":
            argv += [
                "--loglevel",
                "INFO",
                "--pool",
                "prefork",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"mailingest-{os.getpid()}-{id(self)}@%h",
            ]
        elif self.kind == "beat":
            argv += ["--loglevel", "INFO"]
        return argv + self.extra

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> CeleryProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(
            self.argv(),
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log_file.close()
        if self.kind == "worker":
            self._wait_for(b" ready.", self.ready_timeout)
        else:
            time.sleep(0.5)
            if self._proc.poll() is not None:
                raise RuntimeError(f"celery {self.kind} exited: {log_tail(self.log_path)}")
        return self

    def _wait_for(self, marker: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"celery {self.kind} exited: {log_tail(self.log_path)}")
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                if marker in log.read():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"celery {self.kind} not ready in {timeout}s: {log_tail(self.log_path)}")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # SIGTERM to the main process only, as `docker stop` does: Celery's warm
            # shutdown lets the pool finish the tasks it runs before it exits.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (pool children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def __enter__(self) -> CeleryProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
