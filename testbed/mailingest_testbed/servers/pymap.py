"""pymap served in this process (``PymapServer``): the IMAP server where Dovecot is not.

Its asyncio server runs on its own event loop in a daemon thread (``python -m pymap``
does not work: the package has no ``__main__``).  Its dict backend keeps mail in
memory: ``restart()`` (and ``stop()``) lose all mail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

from .common import (
    DEFAULT_IMAP_PASSWORD,
    DEFAULT_IMAP_USER,
    HOST,
    PORT_ATTEMPTS,
    STOP_TIMEOUT,
    ServerNotAvailable,
    live,
)
from .imap import ImapServer, imap_login_works

__all__ = ["PymapServer"]

log = logging.getLogger(__name__)


class PymapServer(ImapServer):
    """pymap's in-memory dict backend served from a thread of this process, no TLS.

    Mail lives in memory: stop() and restart() lose it.
    """

    kind = "pymap"

    def __init__(
        self,
        workdir: Path,
        *,
        user: str = DEFAULT_IMAP_USER,
        password: str = DEFAULT_IMAP_PASSWORD,
        port: int | None = None,
    ) -> None:
        super().__init__(workdir, user=user, password=password, port=port)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._listening = threading.Event()
        self._stop_requested = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _namespace(self) -> argparse.Namespace:
        from pymap.backend.dict import DictBackend
        from pymap.imap import IMAPService

        parser = argparse.ArgumentParser(prog="pymap", add_help=False)
        parser.add_argument("--debug", action="store_true")
        sub = parser.add_subparsers(dest="backend", required=True)
        DictBackend.add_subparser("dict", sub)
        IMAPService.add_arguments(parser)
        parser.set_defaults(passlib_cfg=None, skip_services=[])
        return parser.parse_args(
            ["--host", HOST, "--port", str(self.port), "--no-tls", "dict",
             "--demo-user", self.account.user, "--demo-password", self.account.password]
        )  # fmt: skip

    async def _serve(self, args: argparse.Namespace) -> None:
        from pymap.backend.dict import DictBackend
        from pymap.concurrent import Subsystem
        from pymap.imap import IMAPService
        from pysasl.hashing import Cleartext

        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_requested.is_set():  # stop() came before the loop existed
            self._stop_event.set()
        with ThreadPoolExecutor(1, thread_name_prefix=f"pymap-{self.port}-cpu") as executor:
            # Cleartext like dovecot's {PLAIN}: pymap's default pbkdf2 (500k rounds)
            # costs ~0.3 s per LOGIN; no delay for unknown users either.
            backend, config = await DictBackend.init(
                args,
                cpu_subsystem=Subsystem.for_threading(executor),
                hash_context=Cleartext(),
                invalid_user_sleep=0.0,
            )
            config.apply_context()
            async with contextlib.AsyncExitStack() as stack:
                await backend.start(stack)
                await IMAPService(backend, config).start(stack)
                self._listening.set()
                await self._stop_event.wait()
                # Cancel open connections first, else closing the server waits for them.
                me = asyncio.current_task()
                others = [t for t in asyncio.all_tasks() if t is not me]
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)

    def _run(self, args: argparse.Namespace) -> None:
        try:
            asyncio.run(self._serve(args))
        except BaseException as exc:  # reported to start() / logged
            self._error = exc
            log.debug("pymap server thread failed", exc_info=True)
        finally:
            self._listening.set()

    def start(self) -> Self:
        """Start serving in a daemon thread and wait until LOGIN works (15 s)."""
        if self.running:
            return self
        try:
            import pymap.backend.dict
            import pymap.imap  # noqa: F401
        except ImportError as exc:
            raise ServerNotAvailable(f"pymap is not installed: pip install pymap ({exc})") from exc
        for attempt in range(PORT_ATTEMPTS):
            self._error = None
            self._listening.clear()
            self._stop_requested.clear()
            thread = threading.Thread(
                target=self._run, args=(self._namespace(),), name=f"pymap-{self.port}", daemon=True
            )
            self._thread = thread
            thread.start()
            self._listening.wait(15.0)
            if self._error is None and thread.is_alive():
                deadline = time.monotonic() + 15.0
                while time.monotonic() < deadline:
                    if imap_login_works(self.account):
                        self._started_once = True
                        live.add(self)
                        log.info("pymap ready on %s:%d (in-process)", HOST, self.port)
                        return self
                    time.sleep(0.05)
            error = self._error
            self.stop()
            if (
                isinstance(error, OSError)
                and self._auto_port
                and not self._started_once
                and attempt + 1 < PORT_ATTEMPTS
            ):
                log.info("port %d unusable (%s), retrying pymap on another", self.port, error)
                self._new_port()
                continue
            raise RuntimeError(f"pymap on port {self.port} did not become ready: {error!r}")
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop serving and join the thread; all mail is lost."""
        live.discard(self)
        if self._thread is None:
            return
        self._stop_requested.set()  # before reading _loop: see _serve()
        thread, loop, event = self._thread, self._loop, self._stop_event
        if loop is not None and event is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            log.warning("pymap thread on port %d did not stop within %ss", self.port, STOP_TIMEOUT)
        self._thread = self._loop = self._stop_event = None
        log.info("pymap on port %d stopped", self.port)
