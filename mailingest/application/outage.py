"""Riding out a server that stopped answering: one log line when it went, one when it is back.

The long-running processes (beat, ``watch``) keep going through an outage of Redis, the
broker or an IMAP server and try again with :class:`Backoff`; :class:`Outage` keeps the log
to one line when the outage began (with what failed) and one when it ended (with how long
it lasted), whatever the number of tries between. The problem text is the caller's: it must
already be free of passwords (``Services.failure`` gives such a line for Redis and the
broker, ``MailboxError`` for IMAP).
"""

from __future__ import annotations

import logging
import random
import time

# how many seconds after the outage began each try's failure is logged again (at INFO)
REMIND_EVERY = 300.0


class Backoff:
    """Delays between tries: ``first`` seconds, doubling up to ``cap``, each with jitter
    (a random half of it may be left out, so that processes retrying together spread)."""

    def __init__(self, first: float = 1.0, cap: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def delay(self) -> float:
        """The wait before the next try (and the one after that doubles)."""
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._next = self.first


class Outage:
    """Whether ``what`` is away, since when; logs its beginning and its end, one line each.

    ``failed(problem)`` after every failed try: the first one logs a WARNING naming
    ``what`` and the problem, later ones only at DEBUG (and one INFO reminder every
    :data:`REMIND_EVERY` seconds); ``answered()`` after every good try: the first one
    after an outage logs that it ended and how long it lasted.
    """

    def __init__(
        self,
        what: str,
        log: logging.Logger,
        *,
        retrying: str = "",
        gone: str = "unreachable",
        back: str = "reachable again",
    ) -> None:
        self.what = what
        self.log = log
        self.retrying = retrying  # what happens meanwhile, e.g. "trying again with backoff"
        self.gone, self.back = gone, back
        self.since: float | None = None
        self.tries = 0
        self._reminded = 0.0

    @property
    def away(self) -> bool:
        return self.since is not None

    def failed(self, problem: str) -> bool:
        """Count a failed try; True if it began the outage (and was logged)."""
        now = time.monotonic()
        self.tries += 1
        if self.since is None:
            self.since = self._reminded = now
            self.tries = 1
            then = f"; {self.retrying}" if self.retrying else ""
            self.log.warning("%s %s (%s)%s", self.what, self.gone, problem, then)
            return True
        if now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            self.log.info(
                "%s still %s after %.0f s (%d tries): %s",
                self.what,
                self.gone,
                now - self.since,
                self.tries,
                problem,
            )
        else:
            self.log.debug("%s still %s: %s", self.what, self.gone, problem)
        return False

    def lasted(self) -> float:
        """Seconds since the outage began (0 while none is on)."""
        return 0.0 if self.since is None else time.monotonic() - self.since

    def answered(self) -> float | None:
        """A good try: the length of the outage it ended (logged), or None if none was on."""
        if self.since is None:
            return None
        lasted = self.lasted()
        self.since = None
        self.log.warning("%s %s after %.1f s", self.what, self.back, lasted)
        return lasted
