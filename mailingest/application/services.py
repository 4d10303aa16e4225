"""The services one process needs, built once from the settings: the context every step gets."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import redis

from mailingest.adapters.alloy import AlloyClient
from mailingest.adapters.encryption import Sealer
from mailingest.adapters.imap import Mailbox
from mailingest.adapters.ledger import Ledger
from mailingest.adapters.oauth import TokenSource
from mailingest.adapters.rate_limit import RateLimiter
from mailingest.adapters.senders import (
    CsvDirectory,
    HttpLookup,
    RedisDirectory,
    Resolver,
    SenderResolver,
)
from mailingest.application import metrics
from mailingest.config.settings import InboxSettings, Settings
from mailingest.core.errors import MailboxError
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
    closers: list = field(default_factory=list, repr=False)

    def senders(self, inbox_name: str) -> SenderResolver:
        """Who the senders of this inbox's mail are."""
        return self.resolvers[inbox_name]

    tokens: dict[str, TokenSource] = field(default_factory=dict, repr=False)
    connections: dict[str, Mailbox] = field(default_factory=dict, repr=False)

    @contextmanager
    def imap(self, inbox_name: str) -> Iterator[Mailbox]:
        """A logged-in connection to the inbox, reused across the tasks of this process.

        Logging in costs round trips (and providers cap connections per account), so
        a connection that ended its last use cleanly is kept for the next one. One the
        server spoke on meanwhile (a BYE, a restart) or idle for a while is checked with
        NOOP first; one whose use raised is closed, never reused.
        """
        box = self.connections.pop(inbox_name, None)
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
        self.connections[inbox_name] = box

    def mailbox(self, inbox_name: str) -> Mailbox:
        """A new IMAP connection (unopened) to the named inbox."""
        inbox = self.settings.inbox(inbox_name)
        return Mailbox(
            inbox, timeout=self.settings.imap_timeout, token_source=self.tokens.get(inbox.name)
        )

    def close(self) -> None:
        for box in self.connections.values():
            box.close()
        self.connections.clear()
        for close in reversed(self.closers):
            close()
        self.closers.clear()


def connect_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30
    )


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
) -> Context:
    """Everything a worker process needs; call after fork, once per process.

    ``redis_client``, ``alloy_transport`` and ``clock`` (ms) replace the ones built from
    the settings: the seams the deterministic simulation (``tests/sim``) drives."""
    settings.require("redis", "imap", "alloy")
    assert settings.redis_url is not None
    client = redis_client if redis_client is not None else connect_redis(settings.redis_url)
    alloy = AlloyClient(
        settings.alloy_url,
        settings.alloy_token,
        settings.alloy_secret,
        connect_timeout=settings.alloy_connect_timeout,
        ca_file=settings.alloy_ca_file,
        limiter=(
            RateLimiter(client, rate=settings.alloy_rate, burst=settings.alloy_burst)
            if settings.alloy_rate > 0
            else None
        ),
        read_timeout=settings.alloy_read_timeout,
        transport=alloy_transport,
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
            clock=clock,
        ),
        alloy=alloy,
        resolvers={inbox.name: build_resolver(inbox, client) for inbox in settings.inboxes},
        policy=RetryPolicy(settings.max_attempts, settings.retry_base, settings.retry_cap),
    )
    ctx.closers += [client.close, alloy.close]
    for inbox in settings.inboxes:
        tokens = token_source(settings, inbox, client)
        if tokens is not None:  # one per process: it caches and refreshes the token
            ctx.tokens[inbox.name] = tokens
            ctx.closers.append(tokens.close)
    warn_if_senders_unauthenticated(settings)
    metrics.declare(inbox.name for inbox in settings.inboxes)
    return ctx
