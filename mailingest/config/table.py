"""Every mailingest setting in one table: name, type, default, range, scope, help.

This is the one home of each setting's default and range. From it come the loader
(:mod:`mailingest.config.settings` parses, range-checks and defaults by it, and refuses
a name that is not in it), the defaults of the objects that also work without settings
(:class:`~mailingest.core.screening.Limits`, :class:`~mailingest.core.retry.RetryPolicy`,
:class:`~mailingest.adapters.alloy.AlloyClient`), and the two documents operators read:
README.md's settings table and ``.env.example`` (``python -m mailingest.config.docs``
writes both; a test fails when they differ from this table).

Pure data and string functions: :mod:`mailingest.core` may import this module, so it
imports nothing but the standard library and the core's own type names.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from mailingest.core.sniff import ALLOWED_KINDS

PREFIX = "MAILINGEST_"
# what an e-mail address setting (an agent, a forwarder, a rule's agent) must look like
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
KiB = 1024
MiB = 1024 * KiB
DAY = 86400

Kind = Literal[
    "text", "secret", "integer", "number", "choice", "email", "path", "folder", "url", "list"
]
Section = Literal[
    "redis", "inbox", "senders", "replies", "alloy", "screening", "console", "operations"
]


@dataclass(frozen=True)
class Setting:
    """One setting. ``default`` is what an unset setting means (None: nothing, or a value
    computed from other settings, described by ``default_text``)."""

    name: str  # without the prefix: IMAP_PORT is MAILINGEST_IMAP_PORT, imap_port in a file
    kind: Kind
    help: str  # one line: what it does and why one would change it
    default: str | int | float | None = None
    default_text: str = ""  # the default in words, when it is computed or depends
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()  # for URLs
    values_text: str = ""  # the allowed values in words, when the kind does not say it
    unit: Literal["", "s", "bytes"] = ""
    per_inbox: bool = False  # each [[inboxes]] table may have its own
    required: str = ""  # when it must be set, in words ("" when never)
    example: str | None = None  # what .env.example sets; None: listed commented out
    section: Section = "operations"
    env_only: bool = False  # neither a key of the file nor given as *_FILE

    @property
    def var(self) -> str:
        return PREFIX + self.name

    @property
    def key(self) -> str:
        """The setting's key in the TOML file."""
        return self.name.lower()

    @property
    def secret(self) -> bool:
        """Held in a Secret: never logged, never in a repr or an error message."""
        return self.kind == "secret"


SECONDS: Literal["s"] = "s"
ALLOWED_TYPES_DEFAULT = ",".join(
    # what sniff allows, less RTF: it carries embedded objects, and customers do not
    # send identity documents as RTF
    sorted(ALLOWED_KINDS - {"rtf"})
)

SETTINGS: tuple[Setting, ...] = (
    # -- Redis ------------------------------------------------------------------------
    Setting(
        "REDIS_URL",
        "url",
        "Redis for the ledger, staged bytes, RedBeat lock, rate limit and OAuth tokens; "
        "a password goes in the URL (`redis://:pw@host:6379/0`); every host points at the "
        "same Redis",
        schemes=("redis", "rediss", "unix"),
        required="required",
        example="redis://redis:6379/0",
        section="redis",
    ),
    Setting(
        "BROKER_URL",
        "url",
        "the Celery broker, if not the same Redis",
        default_text="`MAILINGEST_REDIS_URL`",
        schemes=("redis", "rediss", "unix"),
        example="",
        section="redis",
    ),
    Setting(
        "STAGING_KEY",
        "secret",
        "32 random bytes in URL-safe base64 that encrypt staged mail bytes and OAuth tokens "
        "in Redis (AES-256-GCM), the same on every worker; make one with "
        '`python3 -c "import base64, os; '
        'print(base64.urlsafe_b64encode(os.urandom(32)).decode())"`',
        values_text="32 bytes, URL-safe base64",
        required="required for `xoauth2` inboxes",
        example="",
        section="redis",
    ),
    Setting(
        "STAGING_TTL",
        "integer",
        "how long staged bytes live in Redis at most",
        default=7 * DAY,
        minimum=60,
        maximum=90 * DAY,
        unit=SECONDS,
        section="redis",
    ),
    # -- the inbox --------------------------------------------------------------------
    Setting(
        "CONFIG",
        "path",
        "a TOML file of several inboxes (see above); the environment overrides it",
        env_only=True,
        section="inbox",
    ),
    Setting(
        "INBOX_NAME",
        "text",
        "the inbox's name in task arguments, the ledger and metrics",
        default="default",
        values_text="1-64 letters, digits, `-`, `_`",
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "IMAP_HOST",
        "text",
        "the IMAP server",
        per_inbox=True,
        required="required",
        example="imap.example.com",
        section="inbox",
    ),
    Setting(
        "IMAP_SECURITY",
        "choice",
        "`plain` only on a trusted network; certificates are always verified",
        default="ssl",
        choices=("ssl", "starttls", "plain"),
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "IMAP_PORT",
        "integer",
        "the IMAP port",
        default_text="993 for `ssl`, else 143",
        minimum=1,
        maximum=65535,
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "IMAP_USER",
        "text",
        "the IMAP login",
        per_inbox=True,
        required="required",
        example="documents@example.com",
        section="inbox",
    ),
    Setting(
        "IMAP_PASSWORD",
        "secret",
        "the IMAP password",
        per_inbox=True,
        required="required for `password` auth",
        example="change-me",
        section="inbox",
    ),
    Setting(
        "IMAP_AUTH",
        "choice",
        "`xoauth2` logs in with an access token from the OAuth settings below",
        default="password",
        choices=("password", "xoauth2"),
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "IMAP_FOLDER",
        "folder",
        "the folder mail is ingested from",
        default="INBOX",
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "PROCESSED_FOLDER",
        "folder",
        "where a mail goes once every document is in Alloy",
        default="Processed",
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "QUARANTINE_FOLDER",
        "folder",
        "where a mail that cannot be handled goes",
        default="Quarantine",
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "POLL_INTERVAL",
        "number",
        "time between polls of the inbox",
        default=60.0,
        minimum=1,
        maximum=DAY,
        unit=SECONDS,
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "IMAP_CA_FILE",
        "path",
        "a private CA to trust for the IMAP server's certificate, besides the system's",
        default_text="system CAs",
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "OAUTH_PROVIDER",
        "choice",
        "`google` or `microsoft` set the token endpoint and scope",
        default="custom",
        choices=("custom", "google", "microsoft"),
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "OAUTH_TENANT",
        "text",
        "the Microsoft tenant",
        default="common",
        values_text="tenant id or domain name",
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "OAUTH_TOKEN_URL",
        "url",
        "any other OAuth2 token endpoint (plain `http` only to loopback)",
        default_text="by provider",
        schemes=("https", "http"),
        per_inbox=True,
        required="required for `xoauth2` without a provider",
        section="inbox",
    ),
    Setting(
        "OAUTH_SCOPE",
        "text",
        "the scope asked of the token endpoint",
        default_text="by provider",
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "OAUTH_CLIENT_ID",
        "text",
        "the OAuth client",
        per_inbox=True,
        required="required for `xoauth2`",
        section="inbox",
    ),
    Setting(
        "OAUTH_CLIENT_SECRET",
        "secret",
        "the OAuth client's secret, if it has one",
        per_inbox=True,
        section="inbox",
    ),
    Setting(
        "OAUTH_REFRESH_TOKEN",
        "secret",
        "the refresh token of the mailbox's consent (rotated ones are kept in Redis, "
        "encrypted with `MAILINGEST_STAGING_KEY`)",
        per_inbox=True,
        required="required for `xoauth2`",
        section="inbox",
    ),
    Setting(
        "OAUTH_CA_FILE",
        "path",
        "a private CA to trust for the token endpoint's certificate",
        default_text="system CAs",
        per_inbox=True,
        section="inbox",
    ),
    # -- who the senders are ------------------------------------------------------------
    Setting(
        "TRUSTED_AUTHSERV_ID",
        "list",
        "the receiving server whose `Authentication-Results` header is trusted "
        "(e.g. `mx.google.com`; see docs/security.md)",
        per_inbox=True,
        required="required while sender authentication is on",
        example="mx.example.com",
        section="senders",
    ),
    Setting(
        "SENDER_AUTH",
        "list",
        "how senders are authenticated (aligned); `off` is warned about at start-up",
        default="dmarc",
        values_text="`dmarc`, a list of `dmarc,dkim,spf`, or `off`",
        per_inbox=True,
        section="senders",
    ),
    Setting(
        "SENDER_DOMAINS",
        "list",
        "accept only these From: domains",
        default_text="any",
        per_inbox=True,
        section="senders",
    ),
    Setting(
        "ADDRESS_KEY",
        "secret",
        "the key of the signed reply addresses (`docs+<external id>.<mac>@...`, "
        "`mailingest address`): 32 random bytes in URL-safe base64, the same on every "
        "worker; unset, signed addresses are not used",
        values_text="32 bytes, URL-safe base64",
        section="senders",
    ),
    Setting(
        "REPLY_ADDRESS",
        "email",
        "the address customers write to: with MAILINGEST_ADDRESS_KEY, a mail to "
        "`<local>+<external id>.<mac>@<domain>` on it is filed on that external entity id",
        per_inbox=True,
        section="senders",
    ),
    Setting(
        "FORWARDERS",
        "list",
        "internal addresses (agents) whose forwarded mail is filed on the entity of the "
        "forwarded mail's own sender, not on theirs; their mail must pass sender "
        "authentication like any other",
        default_text="none",
        per_inbox=True,
        section="senders",
    ),
    Setting(
        "SENDERS_FILE",
        "path",
        "sender -> entity: a CSV file with the header `email,entity_token`, asked first "
        "(then the directory in Redis, then the CRM hook)",
        per_inbox=True,
        section="senders",
    ),
    Setting(
        "CRM_URL",
        "url",
        'a lookup hook: `GET <url>?email=` answers `{"entity_token": ...}`, 404 if unknown',
        schemes=("https", "http"),
        per_inbox=True,
        section="senders",
    ),
    # -- replies to customers (README: Replies to customers) -------------------------------
    Setting(
        "REPLIES",
        "list",
        "the replies sent to customers: any of `received` (what was filed), `refused` "
        "(each refused part and what to send instead), `unknown` (this address is not on "
        "file); empty: none. Never to an unauthenticated sender, a robot or a list",
        default_text="none",
        values_text="`received`, `refused`, `unknown`",
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "SMTP_HOST",
        "text",
        "the SMTP server replies are sent through",
        per_inbox=True,
        required="required when MAILINGEST_REPLIES is set",
        section="replies",
    ),
    Setting(
        "SMTP_SECURITY",
        "choice",
        "`plain` only on a trusted network; certificates are always verified",
        default="ssl",
        choices=("ssl", "starttls", "plain"),
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "SMTP_PORT",
        "integer",
        "the SMTP port",
        default_text="465 for `ssl`, 587 for `starttls`, 25 for `plain`",
        minimum=1,
        maximum=65535,
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "SMTP_USER",
        "text",
        "the SMTP login; unset: no login (a relay that trusts this host)",
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "SMTP_PASSWORD",
        "secret",
        "the SMTP password",
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "SMTP_AUTH",
        "choice",
        "`xoauth2` logs in with an access token of the inbox's OAuth settings (as IMAP does)",
        default="password",
        choices=("password", "xoauth2"),
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "SMTP_CA_FILE",
        "path",
        "trust this CA (PEM) for the SMTP server's certificate, beside the system's",
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "REPLY_FROM",
        "email",
        "the address replies come from (and the domain of their Message-IDs)",
        per_inbox=True,
        required="required when MAILINGEST_REPLIES is set",
        section="replies",
    ),
    Setting(
        "REPLY_FROM_NAME",
        "text",
        "the display name of the replies' From",
        default="Customer support",
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "REPLY_LANGUAGE",
        "text",
        "the language of the replies: a folder of the templates (`en` and `de` are shipped)",
        default="en",
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "REPLY_TEMPLATES",
        "path",
        "a folder of your own templates (`<language>/<kind>.txt`, optional "
        "`<kind>.html`); what it lacks comes from the shipped ones",
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "REPLY_LIMIT",
        "integer",
        "at most this many replies of each kind to one address per MAILINGEST_REPLY_WINDOW, "
        "counted across every worker (stops loops and floods)",
        default=5,
        minimum=1,
        maximum=1000,
        per_inbox=True,
        section="replies",
    ),
    Setting(
        "REPLY_WINDOW",
        "integer",
        "the window of MAILINGEST_REPLY_LIMIT",
        default=DAY,
        minimum=60,
        maximum=30 * DAY,
        unit=SECONDS,
        per_inbox=True,
        section="replies",
    ),
    # -- Alloy ----------------------------------------------------------------------------
    Setting(
        "ALLOY_URL",
        "url",
        "the Alloy API (plain `http` only to loopback)",
        default="https://sandbox.alloy.co/v1",
        schemes=("https", "http"),
        section="alloy",
    ),
    Setting(
        "ALLOY_TOKEN",
        "secret",
        "the Alloy API token (Basic auth user)",
        required="required",
        example="change-me",
        section="alloy",
    ),
    Setting(
        "ALLOY_SECRET",
        "secret",
        "the Alloy API secret",
        required="required",
        example="change-me",
        section="alloy",
    ),
    Setting(
        "AGENT_EMAIL",
        "email",
        "the Alloy agent named as the author of each document's note",
        per_inbox=True,
        required="required",
        example="kyc.agent@example.com",
        section="alloy",
    ),
    Setting(
        "NOTE",
        "text",
        "the note on every document",
        default="Uploaded from email customer sent",
        per_inbox=True,
        section="alloy",
    ),
    Setting(
        "ALLOY_CA_FILE",
        "path",
        "a private CA to trust for Alloy's certificate, besides the system's",
        default_text="system CAs",
        section="alloy",
    ),
    Setting(
        "ALLOY_RATE",
        "number",
        "requests per second to Alloy shared by all workers on all hosts (a token bucket "
        "in Redis), for a team that knows the limit of its Alloy contract; 0 is off: "
        "Alloy publishes no limit, and its 429s pause every worker for `Retry-After`",
        default=0.0,
        default_text="off",
        minimum=0,
        maximum=100_000,
        section="alloy",
    ),
    Setting(
        "ALLOY_BURST",
        "integer",
        "the token bucket's size: requests that may go at once after a quiet spell",
        default_text="2 x rate, at least 1",
        minimum=1,
        maximum=100_000,
        section="alloy",
    ),
    Setting(
        "ALLOY_CONNECT_TIMEOUT",
        "number",
        "how long connecting to Alloy may take",
        default=5.0,
        minimum=0.1,
        maximum=120,
        unit=SECONDS,
        section="alloy",
    ),
    Setting(
        "ALLOY_READ_TIMEOUT",
        "number",
        "how long Alloy's answer may take",
        default=30.0,
        minimum=0.1,
        maximum=600,
        unit=SECONDS,
        section="alloy",
    ),
    Setting(
        "ALLOY_COMMIT_HORIZON",
        "number",
        "how long Alloy may take to commit a request after our read timeout: a describe "
        "whose answer was lost is looked for at Alloy, not sent again, for connect + read "
        "timeout + this + 5 s; keep it above Alloy's longest queueing, or a late commit "
        "leaves a twin",
        default=60.0,
        minimum=0,
        maximum=3600,
        unit=SECONDS,
        section="alloy",
    ),
    # -- what is accepted (docs/security.md) ----------------------------------------------
    Setting(
        "MAX_MESSAGE_BYTES",
        "integer",
        "larger mail is quarantined (checked before it is fetched)",
        default=40 * MiB,
        minimum=KiB,
        maximum=2**31,
        unit="bytes",
        section="screening",
    ),
    Setting(
        "MAX_ATTACHMENT_BYTES",
        "integer",
        "a mail with a larger attachment is quarantined",
        default=25 * MiB,
        minimum=KiB,
        maximum=2**31,
        unit="bytes",
        section="screening",
    ),
    Setting(
        "MAX_PARTS",
        "integer",
        "MIME parts per mail at most",
        default=100,
        minimum=1,
        maximum=100_000,
        section="screening",
    ),
    Setting(
        "MAX_DEPTH",
        "integer",
        "MIME nesting depth at most",
        default=10,
        minimum=1,
        maximum=1000,
        section="screening",
    ),
    Setting(
        "MAX_DOCUMENTS",
        "integer",
        "documents per mail at most",
        default=20,
        minimum=1,
        maximum=10_000,
        section="screening",
    ),
    Setting(
        "ALLOWED_TYPES",
        "list",
        "the content types accepted, sniffed from the bytes (see docs/security.md)",
        default=ALLOWED_TYPES_DEFAULT,
        values_text="a list of " + ", ".join(f"`{kind}`" for kind in sorted(ALLOWED_KINDS)),
        section="screening",
    ),
    Setting(
        "ON_REFUSED_PART",
        "choice",
        "a part refused by screening (a type not allowed, too large): `skip` files the "
        "mail's other documents and records the refusal; `quarantine` sets the whole "
        "mail aside",
        default="skip",
        choices=("skip", "quarantine"),
        per_inbox=True,
        section="screening",
    ),
    Setting(
        "FORWARDED",
        "choice",
        "a forwarded mail (`message/rfc822`): `documents` files the attachments inside it "
        "(forwarded again: inside that too), `eml` files it whole as one .eml, `both` "
        "does both",
        default="documents",
        choices=("documents", "eml", "both"),
        per_inbox=True,
        section="screening",
    ),
    Setting(
        "INLINE_IMAGE_FLOOR",
        "integer",
        "inline images smaller than this are skipped (signature logos)",
        default=4096,
        minimum=0,
        maximum=10 * MiB,
        unit="bytes",
        section="screening",
    ),
    # -- the operator console (mailingest console) -------------------------------------------
    Setting(
        "CONSOLE_USERS",
        "path",
        "a file of `name:role:hash` lines, one per person (role `viewer` or `operator`); "
        "`mailingest console-user NAME --role ROLE` makes a line",
        section="console",
    ),
    Setting(
        "CONSOLE_TRUSTED_HEADER",
        "text",
        "instead of the users file: the header an authenticating reverse proxy (OIDC in "
        "front) sets to the signed-in user's name; only behind such a proxy",
        values_text="a header name",
        section="console",
    ),
    Setting(
        "CONSOLE_SECRET",
        "secret",
        "the key of the console's sessions and CSRF tokens: 32 or more random characters",
        values_text="32+ characters",
        section="console",
    ),
    # -- operations -----------------------------------------------------------------------
    Setting(
        "LOG_FORMAT",
        "choice",
        "`json`: one JSON object per line (for log shippers), with `inbox`, `mail_id`, "
        "`uid`, `message_id`, `document`, `document_token`, `task_id`; `text` for people",
        default="text",
        choices=("text", "json"),
        example="json",
    ),
    Setting(
        "TASK_EVENTS",
        "choice",
        "`on`: workers send Celery task events, which Flower shows (on wherever Flower runs); "
        "`off` saves a few Redis PUBLISHes per task",
        default="off",
        choices=("off", "on"),
        example="on",
    ),
    Setting(
        "LOG_LEVEL",
        "choice",
        "the least important log records written",
        default="info",
        choices=("debug", "info", "warning", "error"),
    ),
    Setting(
        "TASK_TIME_LIMIT",
        "integer",
        "how long a task may run (a soft limit a fifth earlier retries the step); keep a "
        "worker's stop grace period above it",
        default=300,
        minimum=10,
        maximum=3600,
        unit=SECONDS,
    ),
    Setting(
        "LEASE",
        "integer",
        "how long a running step's or poll's lease lasts unrenewed (its process renews it "
        "every third of that); a worker killed mid-step frees its mails this long after",
        default=15,
        minimum=3,
        maximum=300,
        unit=SECONDS,
    ),
    Setting(
        "VISIBILITY_TIMEOUT",
        "integer",
        "how long before Redis hands an unacknowledged task to another worker; at least "
        "task time limit + retry cap + 30 s (checked at start-up), or tasks run twice",
        default_text="the larger of 3600 s and that floor",
        minimum=1,
        maximum=7 * DAY,
        unit=SECONDS,
    ),
    Setting(
        "STALE_AFTER",
        "integer",
        "backstop: how long a mail no lease holds may wait while tasks queued before it "
        "still wait too, before the sweep queues it again",
        default_text="2 x task time limit",
        minimum=10,
        maximum=7 * DAY,
        values_text="task time limit to 604800 s",
        unit=SECONDS,
    ),
    Setting(
        "FINISH_GRACE",
        "integer",
        "how long before a decided mail that was not moved is moved again",
        default=60,
        minimum=0,
        maximum=DAY,
        unit=SECONDS,
    ),
    Setting(
        "MAX_ATTEMPTS",
        "integer",
        "tries of a step before the mail is `failed`",
        default=8,
        minimum=1,
        maximum=100,
    ),
    Setting(
        "RETRY_BASE",
        "number",
        "backoff: the first delay between tries (doubling, with jitter)",
        default=2.0,
        minimum=0.01,
        maximum=3600,
        unit=SECONDS,
    ),
    Setting(
        "RETRY_CAP",
        "number",
        "backoff: the longest delay between tries",
        default=300.0,
        minimum=0.01,
        maximum=6 * 3600,
        unit=SECONDS,
    ),
    Setting(
        "FAILED_RETRY_AFTER",
        "integer",
        "how long after a mail failed it is tried again",
        default=3600,
        minimum=1,
        maximum=7 * DAY,
        unit=SECONDS,
    ),
    Setting(
        "FAILED_AUTO_RETRIES",
        "integer",
        "how many times a failed mail is tried again by itself",
        default=3,
        minimum=0,
        maximum=100,
    ),
    Setting(
        "IMAP_TIMEOUT",
        "number",
        "IMAP connect and read timeout",
        default=30.0,
        minimum=1,
        maximum=600,
        unit=SECONDS,
    ),
    Setting(
        "FETCH_BATCH",
        "integer",
        "mails per IMAP FETCH at most (a poll starts at 2 and doubles, so the first mails "
        "reach the workers at once)",
        default=50,
        minimum=1,
        maximum=500,
    ),
    Setting(
        "FETCH_BYTES",
        "integer",
        "about this many bytes per IMAP FETCH at most",
        default=64 * MiB,
        minimum=MiB,
        maximum=2**31,
        unit="bytes",
    ),
    Setting(
        "POLL_LIMIT",
        "integer",
        "an inbox's mails in flight (recorded, not yet decided) at most: a poll takes new "
        "mail only up to this, so a backlog waits in the mailbox, not in Redis",
        default=500,
        minimum=1,
        maximum=100_000,
    ),
    Setting(
        "IDLE_RENEW",
        "number",
        "time between IDLE renewals of `mailingest watch`: a connection dropped without a "
        "word is found at the next one (under the 29 minutes servers allow, RFC 2177)",
        default=300.0,
        minimum=1,
        maximum=1740,
        unit=SECONDS,
    ),
    Setting(
        "METRICS_PORT",
        "integer",
        "the worker serves Prometheus metrics on this port (`/metrics`); 0 is off",
        default=0,
        default_text="off",
        minimum=0,
        maximum=65535,
    ),
)

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
INBOX_KEYS = frozenset(setting.name for setting in SETTINGS if setting.per_inbox)

# Names with the prefix that are not settings but are known: the test suite's own knobs
# (its child processes inherit them, and must start).
NOT_SETTINGS = frozenset(
    {
        "REQUIRE_SERVERS",
        "TEST_IMAP",
        "SIM_SCHEDULES",
        "SIM_SEED_BASE",
        "SIM_JOBS",
        "SIM_MUTATION_LIMIT",
        "FAULT_MAILS",
        "FAULT_KILLS",
    }
)
# The variables Kubernetes sets for every Service of the namespace (service links): a
# Service named mailingest-flower gives MAILINGEST_FLOWER_SERVICE_HOST and the like, one
# named plain mailingest gives MAILINGEST_SERVICE_HOST, MAILINGEST_PORT_9808_TCP...
_SERVICE_LINK = re.compile(
    r"([A-Z0-9_]+_)?(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)"
)
_SERVICE_LINK_PORT = re.compile(r"(tcp|udp|sctp)://\S+")  # FOO_PORT=tcp://10.0.0.11:6379


def default(name: str) -> int | float | str:
    """The default of a setting that has a plain one (for objects built without settings)."""
    value = BY_NAME[name].default
    if value is None:
        raise KeyError(f"{name} has no plain default")
    return value


def default_int(name: str) -> int:
    value = default(name)
    assert isinstance(value, int)
    return value


def default_float(name: str) -> float:
    value = default(name)
    assert isinstance(value, int | float)
    return float(value)


def is_setting(name: str, *, in_file: bool = False) -> bool:
    """Whether ``name`` (no prefix) is a setting or a setting's ``*_FILE`` form."""
    setting = BY_NAME.get(name)
    if setting is None and name.endswith("_FILE"):
        setting = BY_NAME.get(name.removesuffix("_FILE"))
        if setting is not None and setting.env_only:
            return False  # MAILINGEST_CONFIG is a path already
    return setting is not None and not (in_file and setting.env_only)


def nearest(name: str, names: list[str]) -> str | None:
    """The valid name ``name`` was most likely meant to be (a typo), if any is close."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return close[0] if close else None


def valid_names(*, per_inbox: bool = False, in_file: bool = False) -> list[str]:
    """Every accepted name (no prefix), ``*_FILE`` forms included."""
    names = []
    for setting in SETTINGS:
        if (per_inbox and not setting.per_inbox) or (in_file and setting.env_only):
            continue
        names.append(setting.name)
        if not setting.env_only:
            names.append(setting.name + "_FILE")
    return names


def unknown_variable(var: str, value: str) -> str | None:
    """What is wrong with environment variable ``var`` (prefixed), or None if nothing.

    A prefixed variable that is no setting is a typo until shown otherwise: an optional
    setting misspelt would silently keep its default (an unencrypted staging area, the
    sandbox's URL, a bigger limit), so the loader reports it like a malformed value.
    """
    name = var.removeprefix(PREFIX)
    if is_setting(name) or name in NOT_SETTINGS:
        return None
    if _SERVICE_LINK.fullmatch(name):
        return None
    if (name == "PORT" or name.endswith("_PORT")) and _SERVICE_LINK_PORT.fullmatch(value.strip()):
        return None
    stem = name.removesuffix("_FILE")
    guess = nearest(name, valid_names()) or (stem if stem in BY_NAME else None)
    if guess:
        return f"is not a setting; did you mean {PREFIX}{guess}?"
    return "is not a setting (see README.md, Configuration)"
