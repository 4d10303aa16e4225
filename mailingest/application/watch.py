"""``mailingest watch``: IMAP IDLE on every inbox, so new mail is polled within a second.

One thread per inbox holds a connection in IDLE (RFC 2177). When the server says
mail arrived (``EXISTS``), the watcher asks the workers to poll that inbox, the
same task beat sends, so everything after it is the ordinary, tested path; a poll
asked for while another runs makes the running one poll again. Beat keeps
polling at ``POLL_INTERVAL`` as the safety net: a watcher that is down, or a
server without IDLE, costs latency, never mail.

A connection is taken for dead, and made again with backoff (1 s doubling to
60 s, with jitter), when the server says ``BYE``; when the socket hit end of file
(``idle_check`` then returns at once with nothing); or when IDLE is renewed (DONE,
NOOP, IDLE, every ``MAILINGEST_IDLE_RENEW`` seconds, well inside the 29 minutes
servers allow) and the server does not answer within the IMAP timeout: that is
how a connection dropped without a word (a NAT timeout, a pulled cable) shows.
After every (re)connection the inbox is polled once, for what came meanwhile.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial

from mailingest.adapters.imap import Mailbox
from mailingest.config.settings import InboxSettings
from mailingest.core.errors import MailboxError

log = logging.getLogger(__name__)

BACKOFF_FIRST, BACKOFF_CAP = 1.0, 60.0
CHECK_EVERY = 1.0  # seconds per idle_check: how quickly a stop request is seen
EMPTY_WAKEUPS = 3  # idle_check returning at once with nothing, in a row: the socket hit EOF


class ConnectionLost(MailboxError):
    """The IDLE connection is gone (BYE, end of file, no answer)."""


class InboxWatcher:
    """Holds IDLE on one inbox and calls ``notify(inbox name)`` when mail may have come."""

    def __init__(
        self,
        inbox: InboxSettings,
        open_mailbox: Callable[[], Mailbox],
        notify: Callable[[str], None],
        stop: threading.Event,
        *,
        renew: float = 300.0,
        check_every: float = CHECK_EVERY,
    ) -> None:
        self.inbox = inbox
        self.open_mailbox = open_mailbox
        self.notify = notify
        self.stop = stop
        self.renew = renew
        self.check_every = check_every
        self.sessions = 0  # connections made (for status and tests)
        self.idle_supported: bool | None = None
        self.idling = False  # an IDLE command is running now

    def run(self) -> None:
        """Until ``stop`` is set: watch, and reconnect with backoff when the connection dies."""
        delay = BACKOFF_FIRST
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except MailboxError as exc:
                log.warning("inbox %s: IDLE connection lost: %s", self.inbox.name, exc)
            except Exception:
                log.exception("inbox %s: IDLE watcher error", self.inbox.name)
            if self.stop.is_set() or self.idle_supported is False:
                return
            if time.monotonic() - started > 2 * BACKOFF_CAP:
                delay = BACKOFF_FIRST  # the last connection was good for a while
            wait = delay * random.uniform(0.5, 1.0)
            log.info("inbox %s: reconnecting in %.1fs", self.inbox.name, wait)
            self.stop.wait(wait)
            delay = min(delay * 2, BACKOFF_CAP)

    def _session(self) -> None:
        with self.open_mailbox() as box:
            box.select(self.inbox.folder)
            self.idle_supported = box.supports_idle()
            if not self.idle_supported:
                log.warning(
                    "inbox %s: the server does not offer IDLE; beat polls it every %gs",
                    self.inbox.name,
                    self.inbox.poll_interval,
                )
                return
            self.sessions += 1
            log.info("inbox %s: watching %s with IDLE", self.inbox.name, self.inbox.folder)
            self.notify(self.inbox.name)  # whatever came while we were not watching
            while not self.stop.is_set():
                self._idle(box)
                box.noop()  # a round trip: a silently dropped connection times out here

    def _idle(self, box: Mailbox) -> None:
        """One IDLE command, ended after ``renew`` seconds (or on stop)."""
        box.idle()
        self.idling = True
        try:
            self._wait_in_idle(box)
        finally:
            self.idling = False
        box.idle_done()

    def _wait_in_idle(self, box: Mailbox) -> None:
        deadline = time.monotonic() + self.renew
        empty = 0
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            asked = min(self.check_every, left)
            began = time.monotonic()
            responses = box.idle_check(asked)
            if _said_bye(responses):
                raise ConnectionLost(f"inbox {self.inbox.name}: the server said BYE")
            if not responses and time.monotonic() - began < asked / 2:
                empty += 1  # select() said readable, yet nothing came: end of file
                if empty >= EMPTY_WAKEUPS:
                    raise ConnectionLost(f"inbox {self.inbox.name}: connection closed")
                continue
            empty = 0
            if _new_mail(responses):
                self.notify(self.inbox.name)


def _said_bye(responses: Sequence[tuple[object, ...]]) -> bool:
    return any(r and r[0] == b"BYE" for r in responses)


def _new_mail(responses: Sequence[tuple[object, ...]]) -> bool:
    return any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses)


class Watch:
    """A watcher thread per inbox; ``stop()`` ends them all within about a second."""

    def __init__(
        self,
        inboxes: Sequence[InboxSettings],
        open_mailbox: Callable[[InboxSettings], Mailbox],
        notify: Callable[[str], None],
        *,
        renew: float = 300.0,
    ) -> None:
        self.stopping = threading.Event()
        self.watchers = [
            InboxWatcher(inbox, partial(open_mailbox, inbox), notify, self.stopping, renew=renew)
            for inbox in inboxes
        ]
        self.threads = [
            threading.Thread(target=w.run, name=f"watch-{w.inbox.name}", daemon=True)
            for w in self.watchers
        ]

    def start(self) -> Watch:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout)

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
