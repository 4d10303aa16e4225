"""The services one process needs, built once from the settings: the context every step gets.

:class:`Services` is the one place that builds the connections (Redis, the broker,
Alloy, IMAP mailboxes and their token sources) for every command and worker;
:func:`build_context` adds what the pipeline's steps need on top.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from mailingest.adapters.alloy import AlloyClient
from mailingest.adapters.broker_queue import BrokerQueue
from mailingest.adapters.encryption import Sealer
from mailingest.adapters.imap import Mailbox
from mailingest.adapters.ledger import Ledger
from mailingest.adapters.ledger.clock import RedisClock
from mailingest.adapters.ledger.leases import Leases
from mailingest.adapters.oauth import TokenSource
from mailingest.adapters.rate_limit import AlloyPause, RateLimiter
from mailingest.adapters.senders import (
    CsvDirectory,
    HttpLookup,
    RedisDirectory,
    Resolver,
    SenderResolver,
)
from mailingest.application import metrics
from mailingest.config.settings import InboxSettings, Settings, redact_url
from mailingest.core.errors import AlloyError, ConfigError, MailboxError, MailingestError
from mailingest.core.retry import RetryPolicy

log = logging.getLogger(__name__)

# a kept IMAP connection idle longer than this is checked with NOOP before it is reused
# (servers log out idle sessions after 30 minutes at the earliest, RFC 9051)
REUSE_CHECK_AFTER = 60.0


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis
    ledger: Ledger
    alloy: AlloyClient
    resolvers: dict[str, SenderResolver]
    policy: RetryPolicy
    services: Services
    leases: Leases
    queue_since: Callable[[], int | None]  # decisions.Liveness.queued_since, read now
    closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def senders(self, inbox_name: str) -> SenderResolver:
        """Who the senders of this inbox's mail are."""
        return self.resolvers[inbox_name]

    def reply_tokens(self, inbox_name: str) -> TokenSource | None:
        """The access tokens the inbox's SMTP login uses (its IMAP grant's), if any."""
        replies = self.settings.inbox(inbox_name).replies
        if replies is None or replies.auth != "xoauth2":
            return None
        return self.services.tokens(inbox_name)

    # kept connections per inbox: one per thread at most (a thread-pool worker runs
    # several steps at once; list.pop and append are atomic)
    connections: dict[str, list[Mailbox]] = field(default_factory=dict, repr=False)

    @contextmanager
    def imap(self, inbox_name: str) -> Iterator[Mailbox]:
        """A logged-in connection to the inbox, reused across the tasks of this process.

        Logging in costs round trips (and providers cap connections per account), so
        a connection that ended its last use cleanly is kept for the next one. One the
        server spoke on meanwhile (a BYE, a restart) or idle for a while is checked with
        NOOP first; one whose use raised is closed, never reused. Each use has its
        connection to itself: threads running at once each take their own.

        A kept connection keeps its selected folder too, but that NOOP does not vouch
        for it: a folder deleted and made again under the session answers a NOOP with
        a NO on Dovecot and with nothing on pymap, and both then act on the new folder
        by name. Mailbox.select_mail vouches for it before a mail is acted on.
        """
        kept = self.connections.setdefault(inbox_name, [])
        try:
            box: Mailbox | None = kept.pop()
        except IndexError:
            box = None
        idle = time.monotonic() - (box.last_used if box else 0)
        if box is not None and (box.server_spoke() or idle > REUSE_CHECK_AFTER):
            try:
                box.noop()
            except MailboxError:
                box.close()
                box = None
        if box is None:
            box = self.mailbox(inbox_name)
            box.connect()
        try:
            yield box
        except BaseException:
            box.close()
            raise
        box.last_used = time.monotonic()
        kept.append(box)

    def mailbox(self, inbox_name: str) -> Mailbox:
        """A new IMAP connection (unopened) to the named inbox."""
        return self.services.mailbox(inbox_name)

    def close(self) -> None:
        for kept in self.connections.values():
            for box in kept:
                box.close()
        self.connections.clear()
        for close in reversed(self.closers):
            close()
        self.closers.clear()


# The Redis options of every client mailingest builds (RedBeat's too: celery_config): a dead
# socket is found by the timeouts, a connection idle for 30 s is checked (PING) before use.
REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": 30,
    "socket_connect_timeout": 10,
    "health_check_interval": 30,
}

# A worker's commands ride out a Redis outage of about a minute (a restart, a failover):
# each command that cannot reach Redis is tried again up to this many times, after 0.25-0.5 s
# at first, doubling to 2.5-5 s (redis-py's equal jitter), 54-108 s in all. A step
# caught by the outage then finishes once Redis is back (its locks released, its next step
# queued) instead of failing and waiting for the sweep. A command whose answer the outage
# cut off may be applied twice, as with redis-py's own (shorter) retries: the ledger's
# moves are compare-and-set scripts that find the work done, sets and hashes are written
# the same again; only the count of polls that got no body for a UID may gain one.
OUTAGE_RETRIES = 24


def outage_retry() -> Retry:
    return Retry(EqualJitterBackoff(cap=5.0, base=0.25), OUTAGE_RETRIES)


def connect_redis(url: str, *, ride_out: bool = False) -> redis.Redis:
    """A Redis client; ``ride_out`` (a worker's tasks) waits out an outage of about a
    minute in each command, instead of failing after a few seconds (commands, checks)."""
    retry = {"retry": outage_retry()} if ride_out else {}
    return redis.Redis.from_url(url, **REDIS_OPTIONS, **retry)


def build_resolver(inbox: InboxSettings, client: redis.Redis) -> SenderResolver:
    """The inbox's CSV directory, then the directory the CLI keeps in Redis, then its CRM."""
    resolvers: list[Resolver] = []
    if inbox.senders_file is not None:
        resolvers.append(CsvDirectory(inbox.senders_file))
    resolvers.append(RedisDirectory(client))
    if inbox.crm_url:
        resolvers.append(HttpLookup(inbox.crm_url))
    return SenderResolver(resolvers)


def token_source(
    settings: Settings, inbox: InboxSettings, client: redis.Redis
) -> TokenSource | None:
    """The access tokens of an ``xoauth2`` inbox (None for a password inbox)."""
    if inbox.auth != "xoauth2":
        return None
    assert inbox.oauth is not None and settings.staging_key is not None  # checked at load
    return TokenSource(
        client, inbox.name, inbox.oauth, Sealer(settings.staging_key), ca_file=inbox.oauth.ca_file
    )


class Unavailable(MailingestError):
    """A service could not be reached (or failed): one line naming it and its address.

    The address is the configured URL with any password replaced by ``***``, and the
    underlying error's text is scrubbed of that password too, so the line is safe to
    print and log.
    """

    def __init__(self, service: str, url: str, problem: str) -> None:
        self.service = service
        self.address = redact_url(url)
        password = urlsplit(url).password
        if password:
            problem = problem.replace(password, "***")
        self.problem = problem
        super().__init__(f"{service} unavailable at {self.address} ({problem})")


def problem(exc: BaseException) -> str:
    """An error as ``Type: text`` (the text may hold a URL: pass it through
    :class:`Unavailable` before it is logged)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def is_outage(exc: BaseException) -> bool:
    """Whether an error of Redis or the broker passes once the server answers again.

    A refused, dropped or timed-out connection, a Redis loading its data after a restart
    (``LOADING``) and a replica that is not yet the primary (``READONLY``, during a
    failover) are outages: the long-running processes ride them out. A refused password
    (``AuthenticationError``, also a ``ConnectionError`` to redis-py) and every other
    answer of a server that works are not.
    """
    from kombu.exceptions import OperationalError

    if isinstance(exc, redis.AuthenticationError):
        return False
    if isinstance(exc, OperationalError):  # kombu's wrapper of what the transport raised
        return exc.__cause__ is None or is_outage(exc.__cause__)
    return isinstance(
        exc, (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, OSError)
    )


class Services:
    """The connections a process makes, each built from the settings on first use.

    The one place that builds them for every command and worker: the Redis client,
    the Celery broker connection (to queue polls), the Alloy client (sharing the
    pause after a 429 and the rate limit with every worker through Redis, or not:
    ``check-config`` must reach Alloy while Redis is down) and
    IMAP mailboxes with their XOAUTH2 token sources (one per inbox and process: it
    caches and refreshes the token). Nothing is contacted until it is used, so a
    command pays only for what it needs. ``close`` ends what was built (so does
    leaving a ``with`` block); in a ``with`` block or :meth:`naming_failures`, a failure
    of Redis or the broker leaves as :class:`Unavailable`, one line naming the service
    and its address.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        redis_client: redis.Redis | None = None,
        alloy_transport: httpx.BaseTransport | None = None,
        ride_out: bool = False,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.ride_out = ride_out  # Redis commands wait out an outage (connect_redis)
        self._redis = redis_client
        self._clock = clock  # ms on the clock every worker shares (Redis'), built on first use
        self._alloy_transport = alloy_transport
        self._alloy: dict[bool, AlloyClient] = {}
        self._broker: Any = None
        self._tokens: dict[str, TokenSource | None] = {}
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()  # watch opens mailboxes from one thread per inbox
        if redis_client is not None:  # closed with the rest, like one built here
            self._closers.append(redis_client.close)

    @property
    def redis_url(self) -> str:
        if self.settings.redis_url is None:
            raise ConfigError("MAILINGEST_REDIS_URL", "is required but not set")
        return self.settings.redis_url

    @property
    def redis(self) -> redis.Redis:
        with self._lock:
            if self._redis is None:
                self._redis = connect_redis(self.redis_url, ride_out=self.ride_out)
                self._closers.append(self._redis.close)
            return self._redis

    @property
    def clock(self) -> Callable[[], int]:
        """Milliseconds on the clock every worker shares: Redis' (no round trip a call)."""
        if self._clock is None:
            self._clock = RedisClock(self.redis)
        return self._clock

    def alloy(self, *, rate_limited: bool = True) -> AlloyClient:
        """The Alloy client. ``rate_limited``: it shares with every worker, through Redis,
        the pause after a 429 and the token bucket of ``MAILINGEST_ALLOY_RATE`` (when set)."""
        settings = self.settings
        if rate_limited not in self._alloy:
            limiter = pause = None
            if rate_limited:
                pause = AlloyPause(self.redis, clock=self.clock, max_pause=settings.retry_cap)
                if settings.alloy_rate > 0:
                    limiter = RateLimiter(
                        self.redis, rate=settings.alloy_rate, burst=settings.alloy_burst
                    )
            client = AlloyClient(
                settings.alloy_url,
                settings.alloy_token,
                settings.alloy_secret,
                connect_timeout=settings.alloy_connect_timeout,
                ca_file=settings.alloy_ca_file,
                limiter=limiter,
                pause=pause,
                read_timeout=settings.alloy_read_timeout,
                transport=self._alloy_transport,
            )
            self._alloy[rate_limited] = client
            self._closers.append(client.close)
        return self._alloy[rate_limited]

    @property
    def broker_queue(self) -> BrokerQueue:
        """The broker's task queues, read for their age (a Redis broker; else unknown)."""
        url = self.settings.broker_url or ""
        client = None
        if url.startswith(("redis://", "rediss://", "unix://")):
            client = self.redis if url == self.settings.redis_url else connect_redis(url)
            if client is not self.redis:
                self._closers.append(client.close)
        from mailingest.application.celery_config import QUEUES  # it imports this module

        return BrokerQueue(client, QUEUES)

    @property
    def broker(self) -> Any:
        """A Celery client of the broker, to queue tasks for the workers (not a worker app)."""
        if self._broker is None:
            from celery import Celery

            self._broker = Celery(broker=self.settings.broker_url, set_as_current=False)
            self._closers.append(self._broker.close)
        return self._broker

    def tokens(self, inbox_name: str) -> TokenSource | None:
        """The XOAUTH2 token source of the inbox (None for a password inbox)."""
        inbox = self.settings.inbox(inbox_name)
        if inbox.auth != "xoauth2":
            return None
        client = self.redis  # the token cache all workers share
        with self._lock:
            if inbox_name not in self._tokens:
                source = token_source(self.settings, inbox, client)
                self._tokens[inbox_name] = source
                if source is not None:
                    self._closers.append(source.close)
            return self._tokens[inbox_name]

    def mailbox(self, inbox_name: str) -> Mailbox:
        """A new IMAP connection (unopened) to the named inbox."""
        inbox = self.settings.inbox(inbox_name)
        return Mailbox(
            inbox, timeout=self.settings.imap_timeout, token_source=self.tokens(inbox_name)
        )

    def reach_redis(self) -> str:
        """Redis's version, or :class:`Unavailable`."""
        with self.naming_failures():
            self.redis.ping()
            return str(self.redis.info("server").get("redis_version", "?"))

    def reach_broker(self) -> None:
        """Raise :class:`Unavailable` unless the broker accepts a connection."""
        with self.naming_failures(), self.broker.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)

    def reach_alloy(self, *, credentials: bool = False) -> None:
        """Raise :class:`Unavailable` unless Alloy answers; with ``credentials``, also
        the :class:`AlloyError` of an answer that refuses them (``check-config``).

        Commands that send mail to Alloy ask first (any HTTP answer will do), so that a
        mail is not taken from its inbox, retried and marked failed while Alloy cannot
        be reached. The rate limit and the pause after a 429 (both in Redis) are
        bypassed: Alloy is asked even while Redis is down.
        """
        try:
            self.alloy(rate_limited=False).check_credentials()
        except AlloyError as exc:
            if exc.status is None:  # no answer at all
                raise Unavailable("Alloy", self.settings.alloy_url, exc.message) from None
            if credentials:
                raise

    def failure(self, exc: BaseException) -> Unavailable | None:
        """The one line for an error of Redis or the broker, or None for any other."""
        from kombu.exceptions import OperationalError

        if isinstance(exc, redis.RedisError):
            return Unavailable("Redis", self.redis_url, problem(exc))
        if isinstance(exc, OperationalError):
            return Unavailable(
                "Redis (Celery broker)", self.settings.broker_url or "", problem(exc)
            )
        return None

    @contextmanager
    def naming_failures(self) -> Iterator[Services]:
        """Let a failure of Redis or the broker leave as :class:`Unavailable`."""
        try:
            yield self
        except Exception as exc:
            failure = self.failure(exc)
            if failure is None:
                raise
            raise failure from None

    def __enter__(self) -> Services:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        """Close what was built; a failure of Redis or the broker leaves as Unavailable."""
        self.close()
        failure = self.failure(exc) if isinstance(exc, Exception) else None
        if failure is not None:
            raise failure from None

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers.clear()


def warn_if_senders_unauthenticated(settings: Settings) -> None:
    for name in settings.sender_auth_off:
        log.warning(
            "inbox %s: sender authentication is off: senders are NOT authenticated; anyone "
            "who forges a customer's From: address can file documents on that customer",
            name,
        )


def build_context(
    settings: Settings,
    *,
    redis_client: redis.Redis | None = None,
    alloy_transport: httpx.BaseTransport | None = None,
    clock: Callable[[], int] | None = None,
    heartbeat: bool = True,
    queue_since: Callable[[], int | None] | None = None,
    ride_out: bool = False,
) -> Context:
    """Everything a worker process needs; call after fork, once per process.

    ``redis_client``, ``alloy_transport``, ``clock`` (ms), ``heartbeat`` (False: no
    thread renews leases) and ``queue_since`` replace the ones built from the settings:
    the seams the deterministic simulation (``tests/sim``) drives.
    ``ride_out``: Redis commands wait out an outage of about a minute (the worker's tasks;
    a command run from a shell fails within seconds instead)."""
    settings.require("redis", "imap", "alloy")
    services = Services(
        settings,
        redis_client=redis_client,
        alloy_transport=alloy_transport,
        ride_out=ride_out,
        clock=clock,
    )
    client = services.redis
    leases = Leases(
        client,
        lease_ms=settings.lease * 1000,
        heartbeat=heartbeat,
        max_hold_ms=(settings.task_time_limit + 30) * 1000,
    )
    ctx = Context(
        settings=settings,
        redis=client,
        ledger=Ledger(
            client,
            staging_ttl=settings.staging_ttl,
            sealer=Sealer(settings.staging_key) if settings.staging_key else None,
            on_recorded=lambda ref: metrics.mail_seen(ref.inbox),
            on_decided=metrics.mail_decided,
            clock=services.clock,  # the one the Alloy pause reads too
        ),
        alloy=services.alloy(),
        resolvers={inbox.name: build_resolver(inbox, client) for inbox in settings.inboxes},
        policy=RetryPolicy(settings.max_attempts, settings.retry_base, settings.retry_cap),
        services=services,
        leases=leases,
        queue_since=queue_since or services.broker_queue.oldest_sent_ms,
    )
    ctx.closers.append(leases.close)
    ctx.closers.append(services.close)
    for inbox in settings.inboxes:
        services.tokens(inbox.name)  # built now: a bad OAuth setting stops start-up
    warn_if_senders_unauthenticated(settings)
    metrics.declare(inbox.name for inbox in settings.inboxes)
    return ctx
