"""``mailingest check-config``: is this configuration right, and does it reach everything?

Without ``connect`` only the settings are read and validated (they already were, by
:func:`~mailingest.config.settings.load_settings`) and described. With it, each service is
tried the way a worker would use it: Redis answers PING, each inbox logs in (password
or OAuth), its folder opens and its processed and quarantine folders are found, and
Alloy accepts the credentials. Every check reports what it found; none stops the
others, and none changes anything (a missing folder is reported, not created).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from mailingest.adapters import smtp
from mailingest.adapters.imap import Mailbox
from mailingest.application.services import Services, Unavailable
from mailingest.config.settings import InboxSettings, Settings, redact_url
from mailingest.core import rules
from mailingest.core.errors import MailingestError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def describe(settings: Settings) -> list[Check]:
    """What the settings say, one line per service (nothing is contacted)."""
    where = str(settings.config_file) if settings.config_file else "the environment"
    checks = [
        Check("settings", True, f"from {where}: {len(settings.inboxes)} inbox(es)"),
        Check("redis", True, redact_url(settings.redis_url or "")),
        Check(
            "alloy",
            True,
            f"{settings.alloy_url}, rate limit "
            + (
                f"{settings.alloy_rate:g}/s shared (bursts of {settings.alloy_burst})"
                if settings.alloy_rate
                else "off (a 429 pauses every worker for Retry-After)"
            ),
        ),
    ]
    for inbox in settings.inboxes:
        checks.append(Check(f"inbox {inbox.name}", True, _inbox_line(inbox)))
        if inbox.replies is not None:
            checks.append(Check(f"replies of inbox {inbox.name}", True, _replies_line(inbox)))
        checks += [
            Check(f"inbox {inbox.name} rule {number}", True, rules.describe(rule))
            for number, rule in enumerate(inbox.rules, 1)
        ]
    return checks


def _replies_line(inbox: InboxSettings) -> str:
    replies = inbox.replies
    if replies is None:
        return "off"
    login = f" as {replies.user} ({replies.auth})" if replies.user else ", no login"
    return (
        f"{', '.join(sorted(replies.kinds))} from {replies.from_address} via "
        f"{replies.security} {replies.host}:{replies.port}{login}; language "
        f"{replies.language}; at most {replies.limit} of a kind per address per "
        f"{replies.window} s"
    )


def _inbox_line(inbox: InboxSettings) -> str:
    senders = ["csv " + str(inbox.senders_file)] if inbox.senders_file else []
    senders.append("redis directory")
    if inbox.crm_url:
        senders.append("crm " + redact_url(inbox.crm_url))
    auth = (
        inbox.auth
        if inbox.auth == "password"
        else f"xoauth2 via {inbox.oauth and inbox.oauth.token_url}"
    )
    policy = inbox.sender_auth
    return (
        f"{inbox.security} {inbox.host}:{inbox.port} as {inbox.user} ({auth}); "
        f"{inbox.folder} -> {inbox.processed_folder} | {inbox.quarantine_folder}; "
        f"every {inbox.poll_interval:g}s; agent {inbox.agent_email}; "
        f"senders: {', '.join(senders)}; sender auth: "
        + (
            ", ".join(policy.accept) + " from " + ", ".join(policy.trusted_authserv_ids)
            if policy
            else "OFF"
        )
    )


def connect(services: Services) -> list[Check]:
    """Try every service as a worker would; each result says what was found.

    One row for Redis, one per inbox, one for Alloy, whatever is down: a check never
    stops the others. The Alloy check bypasses the rate limiter (a Redis token bucket),
    so it tells whether Alloy answers even while Redis does not.
    """
    checks = [_redis(services)]
    checks += [_inbox(services, inbox) for inbox in services.settings.inboxes]
    checks += [_smtp(services, i) for i in services.settings.inboxes if i.replies is not None]
    checks.append(_alloy(services))
    return checks


def _smtp(services: Services, inbox: InboxSettings) -> Check:
    """The inbox's SMTP server, logged in to as a reply would be, nothing sent."""
    assert inbox.replies is not None
    name = f"replies of inbox {inbox.name}"
    tokens = services.tokens(inbox.name) if inbox.replies.auth == "xoauth2" else None
    try:
        return Check(name, True, smtp.reach(inbox.replies, tokens=tokens))
    except MailingestError as exc:
        return Check(name, False, str(exc))


def _redis(services: Services) -> Check:
    try:
        version = services.reach_redis()
    except Unavailable as exc:
        return Check("redis", False, str(exc))
    return Check("redis", True, f"PING answered (Redis {version})")


def _inbox(services: Services, inbox: InboxSettings) -> Check:
    name = f"inbox {inbox.name}"
    try:
        with services.naming_failures(), services.mailbox(inbox.name) as mailbox:
            mailbox.select(inbox.folder)
            waiting = len(mailbox.uids_after(0))
            narrowing = _narrowing(mailbox, inbox)
            missing = [
                folder
                for folder in (inbox.processed_folder, inbox.quarantine_folder)
                if not mailbox.folder_exists(folder)
            ]
    except Unavailable as exc:  # an XOAUTH2 inbox keeps its tokens in Redis
        return Check(name, False, f"its XOAUTH2 tokens are kept in Redis: {exc}")
    except MailingestError as exc:
        return Check(name, False, str(exc))
    detail = f"logged in as {inbox.user}; {inbox.folder} holds {waiting} mail(s){narrowing}"
    if missing:
        detail += f"; {', '.join(missing)} will be created at the first move"
    return Check(name, True, detail)


def _narrowing(mailbox: Mailbox, inbox: InboxSettings) -> str:
    """What the server answers to the rules' SEARCH (what a poll will ask it)."""
    narrow = rules.search_criteria(inbox.rules, datetime.now(UTC))
    if narrow is None:
        return ""
    return f"; the rules' search finds {len(mailbox.uids_after(0, narrow))}"


def _alloy(services: Services) -> Check:
    try:
        services.reach_alloy(credentials=True)
    except MailingestError as exc:
        return Check("alloy", False, str(exc))
    return Check("alloy", True, f"{services.settings.alloy_url} accepted the credentials")
