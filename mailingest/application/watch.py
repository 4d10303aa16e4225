"""``mailingest watch``: IMAP IDLE on every inbox, so new mail is polled within a second.

One thread per inbox holds a connection in IDLE (RFC 2177). When the server says
mail arrived (``EXISTS``), the watcher asks for a poll of that inbox, the same task
beat sends, so everything after it is the ordinary, tested path; a poll asked for
while another runs makes the running one poll again. Beat keeps polling at
``POLL_INTERVAL`` as the safety net: a watcher that is down, or a server without
IDLE, costs latency, never mail.

A connection is taken for dead, and made again with backoff (1 s doubling to 15 s,
with jitter; to 60 s once the server has been away for 5 minutes), when the server
says ``BYE``; when the socket hit end of file (``idle_check`` then returns at once
with nothing); or when IDLE is renewed (DONE, NOOP, IDLE, every
``MAILINGEST_IDLE_RENEW`` seconds, well inside the 29 minutes servers allow) and the
server does not answer within the IMAP timeout: that is how a connection dropped
without a word (a NAT timeout, a pulled cable) shows. After every (re)connection the
inbox is polled once, for what came meanwhile. The log says in one line that the
connection was lost (and why) and in one line that it was made again (and after how
long), however many tries it took (:class:`~mailingest.application.outage.Outage`).

The polls are queued on the broker by one :class:`PollSender` thread, never by an IDLE
session itself: while the broker (Redis) does not answer, the polls asked for are held,
one per inbox, and sent when it answers again (with backoff, 1 s doubling to 5 s), and
IDLE goes on meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial

import redis

from mailingest.adapters.imap import Mailbox
from mailingest.application.outage import Backoff, Outage
from mailingest.config.settings import InboxSettings
from mailingest.core.errors import MailboxError

log = logging.getLogger(__name__)

# IMAP reconnections: 1 s doubling to 15 s; to 60 s once the server has been away this long
BACKOFF_FIRST, BACKOFF_CAP, BACKOFF_CAP_LONG, LONG_OUTAGE = 1.0, 15.0, 60.0, 300.0
# queuing polls while the broker does not answer: 1 s doubling to 5 s
SEND_BACKOFF_FIRST, SEND_BACKOFF_CAP = 1.0, 5.0
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
        report: Callable[[str, str], None] | None = None,
    ) -> None:
        self.inbox = inbox
        self.open_mailbox = open_mailbox
        self.notify = notify
        self.stop = stop
        # told (inbox, what the watcher is doing) at each change and each renewed IDLE:
        # the console's inbox page shows it
        self._report = report
        self.renew = renew
        self.check_every = check_every
        self.sessions = 0  # connections made (for status and tests)
        self.idle_supported: bool | None = None
        self.idling = False  # an IDLE command is running now
        self.backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        self.outage = Outage(
            f"inbox {inbox.name}: IDLE connection",
            log,
            gone="lost",
            back="made again",
            retrying=f"reconnecting with backoff (every {BACKOFF_CAP:g} s at most)",
        )

    def run(self) -> None:
        """Until ``stop`` is set: watch, and reconnect with backoff when the connection dies."""
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except MailboxError as exc:  # its text names the inbox and never a password
                self.outage.failed(str(exc))
                self.report(f"reconnecting: {exc}")
            except redis.RedisError as exc:  # an XOAUTH2 inbox's token cache is in Redis
                self.outage.failed(f"its OAuth token cache in Redis: {type(exc).__name__}")
                self.report(f"reconnecting: Redis {type(exc).__name__}")
            except Exception as exc:
                log.exception("inbox %s: IDLE watcher error", self.inbox.name)
                self.outage.failed(type(exc).__name__)
                self.report(f"reconnecting: {type(exc).__name__}")
            if self.stop.is_set() or self.idle_supported is False:
                self.report("stopped" if self.stop.is_set() else "not offered by the server")
                return
            if time.monotonic() - started > 2 * BACKOFF_CAP:
                self.backoff.reset()  # the last connection was good for a while
            if self.outage.lasted() > LONG_OUTAGE:
                self.backoff.cap = BACKOFF_CAP_LONG
            wait = self.backoff.delay()
            log.debug("inbox %s: reconnecting in %.1fs", self.inbox.name, wait)
            self.stop.wait(wait)

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
            self.outage.answered()
            self.backoff.cap = BACKOFF_CAP
            log.info("inbox %s: watching %s with IDLE", self.inbox.name, self.inbox.folder)
            self.notify(self.inbox.name)  # whatever came while we were not watching
            while not self.stop.is_set():
                self._idle(box)
                # a round trip: a silently dropped connection times out here. Its answer,
                # like DONE's, may carry the news of a mail that came between two IDLEs
                # (Dovecot tells an IDLE session half a second after the change)
                self._heard(box.noop())

    def report(self, doing: str) -> None:
        if self._report is None:
            return
        try:
            self._report(self.inbox.name, doing)
        except redis.RedisError as exc:  # a report is for the console: never stops a watch
            log.debug("inbox %s: IDLE state not recorded: %s", self.inbox.name, exc)

    def _idle(self, box: Mailbox) -> None:
        """One IDLE command, ended after ``renew`` seconds (or on stop)."""
        self._heard(box.idle())  # news of a mail that came just before it began
        self.report("watching")
        self.idling = True
        try:
            self._wait_in_idle(box)
        finally:
            self.idling = False
        self._heard(box.idle_done())

    def _heard(self, responses: Sequence[tuple[object, ...]]) -> None:
        """What the server said (in IDLE, with its start, or answering DONE or NOOP): BYE
        ends the session, news of mail asks for a poll."""
        if _said_bye(responses):
            raise ConnectionLost(f"inbox {self.inbox.name}: the server said BYE")
        if _new_mail(responses):
            self.notify(self.inbox.name)

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
            if not responses and time.monotonic() - began < asked / 2:
                empty += 1  # select() said readable, yet nothing came: end of file
                if empty >= EMPTY_WAKEUPS:
                    raise ConnectionLost(f"inbox {self.inbox.name}: connection closed")
                continue
            empty = 0
            self._heard(responses)


def _said_bye(responses: Sequence[tuple[object, ...]]) -> bool:
    return any(r and _word(r[0]) == b"BYE" for r in responses)


def _new_mail(responses: Sequence[tuple[object, ...]]) -> bool:
    # "* 3 EXISTS": a number, then the name (not "* OK ..." whose text says exists)
    return any(
        len(r) > 1 and isinstance(r[0], int) and _word(r[1]) in (b"EXISTS", b"RECENT")
        for r in responses
    )


def _word(value: object) -> object:
    """A response's name as IMAP compares it: without regard to case (RFC 9051 2.2.1)."""
    return value.upper() if isinstance(value, bytes) else value


class PollSender:
    """Queues the polls the watchers ask for, from its own thread, riding out the broker.

    ``request(inbox)`` returns at once, so an IDLE session never waits on the broker.
    ``send(inbox)`` queues the poll task (it may raise while the broker is away). A
    request is kept until it is sent: while the broker does not answer, the requests of
    an inbox make one poll (a poll takes all new mail), sent when it answers again; the
    log says once that it went (``describe`` gives the error's text, free of passwords)
    and once that it is back.
    """

    def __init__(
        self,
        send: Callable[[str], None],
        stop: threading.Event,
        *,
        broker: str = "the broker",
        describe: Callable[[BaseException], str] = lambda exc: type(exc).__name__,
    ) -> None:
        self.send = send
        self.stop = stop
        self.describe = describe
        self.pending: dict[str, None] = {}  # inbox names, in the order asked
        self.changed = threading.Condition()
        self.sent = 0  # polls queued (for tests)
        self.backoff = Backoff(SEND_BACKOFF_FIRST, SEND_BACKOFF_CAP)
        self.outage = Outage(
            f"watch: {broker}",
            log,
            retrying="the polls asked for are held and queued when it answers",
        )

    def request(self, inbox: str) -> None:
        with self.changed:
            self.pending[inbox] = None
            self.changed.notify_all()

    def run(self) -> None:
        while not self.stop.is_set():
            with self.changed:
                self.changed.wait_for(lambda: bool(self.pending), timeout=CHECK_EVERY)
                if not self.pending:
                    continue
                name = next(iter(self.pending))
                del self.pending[name]  # asked again while it is sent: sent again
            try:
                self.send(name)
            except Exception as exc:  # noqa: BLE001 - held and tried again, whatever failed
                self.request(name)
                self.outage.failed(self.describe(exc))
                self.stop.wait(self.backoff.delay())
                continue
            self.sent += 1
            if self.outage.answered() is not None:
                self.backoff.reset()
            log.info("inbox %s: new mail; poll queued", name)


class Watch:
    """A watcher thread per inbox and the poll sender; ``stop()`` ends them all within
    about a second."""

    def __init__(
        self,
        inboxes: Sequence[InboxSettings],
        open_mailbox: Callable[[InboxSettings], Mailbox],
        send: Callable[[str], None],
        *,
        renew: float = 300.0,
        broker: str = "the broker",
        describe: Callable[[BaseException], str] = lambda exc: type(exc).__name__,
        report: Callable[[str, str], None] | None = None,
    ) -> None:
        self.stopping = threading.Event()
        self.sender = PollSender(send, self.stopping, broker=broker, describe=describe)
        self.watchers = [
            InboxWatcher(
                inbox,
                partial(open_mailbox, inbox),
                self.sender.request,
                self.stopping,
                renew=renew,
                report=report,
            )
            for inbox in inboxes
        ]
        self.threads = [
            threading.Thread(target=w.run, name=f"watch-{w.inbox.name}", daemon=True)
            for w in self.watchers
        ]
        sender = threading.Thread(target=self.sender.run, name="watch-polls", daemon=True)
        self.threads.append(sender)

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
