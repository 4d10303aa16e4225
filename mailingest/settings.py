"""One settings object, read from the environment once and validated at start-up.

Every variable is named ``MAILINGEST_*``; any of them may instead be given as
``MAILINGEST_*_FILE`` naming a file that holds the value (Docker/Kubernetes
secrets). A malformed value stops start-up with a :class:`ConfigError` that
names the variable and what is wrong, in one line. Which values are *required*
depends on the command: ``settings.require("imap", "alloy", "redis")``.

Secrets are held in :class:`Secret`, whose ``repr``/``str`` never show them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .authn import AuthPolicy
from .errors import ConfigError
from .screening import Limits

PREFIX = "MAILINGEST_"
DEFAULT_NOTE = "Uploaded from email customer sent"
DEFAULT_ALLOY_URL = "https://sandbox.alloy.co/v1"
IMAP_SECURITY = ("ssl", "starttls", "plain")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_INBOX_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Secret:
    """A string that never shows itself in logs, reprs or exceptions."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


IMAP_AUTH = ("password", "xoauth2")
# Token endpoints of the two providers most support mailboxes live on; any other
# OAuth2 server is given by MAILINGEST_OAUTH_TOKEN_URL.
OAUTH_PROVIDERS = {
    "google": ("https://oauth2.googleapis.com/token", "https://mail.google.com/"),
    "microsoft": (
        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
    ),
}


@dataclass(frozen=True)
class OAuthSettings:
    """An OAuth2 refresh-token grant that yields IMAP access tokens (XOAUTH2)."""

    token_url: str
    client_id: str
    client_secret: Secret | None
    refresh_token: Secret
    scope: str | None = None


@dataclass(frozen=True)
class InboxSettings:
    """One IMAP mailbox and what to do with its mail."""

    name: str
    host: str | None
    port: int
    user: str | None
    password: Secret | None
    security: str
    folder: str
    processed_folder: str
    quarantine_folder: str
    agent_email: str | None
    note: str
    poll_interval: float
    ca_file: Path | None = None  # trust this CA for the IMAP server's certificate
    auth: str = "password"  # or "xoauth2": log in with an access token from ``oauth``
    oauth: OAuthSettings | None = None


@dataclass(frozen=True)
class Settings:
    inboxes: tuple[InboxSettings, ...]
    alloy_url: str
    alloy_token: Secret | None
    alloy_secret: Secret | None
    alloy_ca_file: Path | None
    alloy_rate: float
    alloy_burst: int
    alloy_connect_timeout: float
    alloy_read_timeout: float
    redis_url: str | None
    broker_url: str | None
    senders_file: Path | None
    crm_url: str | None
    imap_timeout: float
    fetch_batch: int
    fetch_bytes: int
    poll_limit: int
    task_time_limit: int
    visibility_timeout: int
    stale_after: int
    finish_grace: int
    failed_retry_after: int
    failed_auto_retries: int
    limits: Limits
    sender_auth: AuthPolicy | None  # None: off, or on but without a trusted server yet
    sender_auth_on: bool
    staging_ttl: int
    staging_key: Secret | None
    max_attempts: int
    retry_base: float
    retry_cap: float
    log_level: str
    env_names: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    # -- access -----------------------------------------------------------
    def inbox(self, name: str) -> InboxSettings:
        for inbox in self.inboxes:
            if inbox.name == name:
                return inbox
        raise ConfigError("MAILINGEST_INBOX_NAME", f"no inbox named {name!r} is configured")

    def require(self, *groups: str) -> Settings:
        """Raise ConfigError naming the first missing variable of these groups."""
        missing = "is required but not set"
        needed: list[tuple[str, object, str]] = []
        for group in groups:
            if group == "redis":
                needed.append(("REDIS_URL", self.redis_url, missing))
            elif group == "imap":
                for inbox in self.inboxes:
                    needed += [
                        ("IMAP_HOST", inbox.host, missing),
                        ("IMAP_USER", inbox.user, missing),
                        ("IMAP_PASSWORD", inbox.password, missing),
                    ]
                needed.append(
                    (
                        "TRUSTED_AUTHSERV_ID",
                        self.sender_auth is not None or not self.sender_auth_on,
                        "is required while MAILINGEST_SENDER_AUTH is on: the authserv-id your "
                        "receiving server writes in Authentication-Results "
                        "(or set MAILINGEST_SENDER_AUTH=off)",
                    )
                )
            elif group == "alloy":
                needed += [
                    ("ALLOY_TOKEN", self.alloy_token, missing),
                    ("ALLOY_SECRET", self.alloy_secret, missing),
                ]
                needed += [("AGENT_EMAIL", inbox.agent_email, missing) for inbox in self.inboxes]
            else:  # pragma: no cover - programming error
                raise ValueError(group)
        for name, value, problem in needed:
            if not value:
                raise ConfigError(PREFIX + name, problem)
        return self


# -- reading ---------------------------------------------------------------


class _Env:
    """Reads MAILINGEST_* values, following NAME_FILE indirection."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def raw(self, name: str, *, strip: bool = True) -> str | None:
        var = PREFIX + name
        direct = self.environ.get(var)
        path = self.environ.get(var + "_FILE")
        if direct not in (None, "") and path not in (None, ""):
            raise ConfigError(var, f"is set both directly and via {var}_FILE; set one")
        if path:
            try:
                return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(var + "_FILE", f"cannot read {path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(var + "_FILE", f"{path} is not UTF-8 text") from None
        if direct is None or direct.strip() == "":
            return None
        return direct.strip() if strip else direct

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name)
        return default if value is None else value

    def secret(self, name: str) -> Secret | None:
        value = self.raw(name, strip=False)  # a password may begin or end with a space
        return None if value is None else Secret(value)

    def number(
        self, name: str, default: float, *, minimum: float, maximum: float, integer: bool = False
    ) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise ConfigError(PREFIX + name, f"must be {kind}, got {value!r}") from None
        if not (minimum <= number <= maximum):
            raise ConfigError(
                PREFIX + name, f"must be between {minimum:g} and {maximum:g}, got {value}"
            )
        return number

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        return int(self.number(name, default, minimum=minimum, maximum=maximum, integer=True))

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.raw(name) or default).lower()
        if value not in choices:
            raise ConfigError(PREFIX + name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def email(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and not _EMAIL.match(value):
            raise ConfigError(PREFIX + name, f"must be an e-mail address, got {value!r}")
        return value.lower() if value else None

    def path(self, name: str) -> Path | None:
        value = self.raw(name)
        if value is None:
            return None
        if not Path(value).is_file():
            raise ConfigError(PREFIX + name, f"{value} is not a readable file")
        return Path(value)

    def folder(self, name: str, default: str) -> str:
        value = self.text(name, default) or default
        if any(ch in value for ch in "\r\n\0"):
            raise ConfigError(PREFIX + name, "must not contain line breaks or NUL")
        return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_url(var: str, value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.hostname or parts.scheme == "unix"):
        raise ConfigError(var, f"must be a {'/'.join(schemes)} URL, got {_redact_url(value)!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(var, f"has an invalid port in {_redact_url(value)!r}") from None
    return value


def _redact_url(url: str) -> str:
    """The URL without a password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


redact_url = _redact_url


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings; raise ConfigError on the first bad value."""
    env = _Env(os.environ if environ is None else environ)

    alloy_url = env.text("ALLOY_URL", DEFAULT_ALLOY_URL) or DEFAULT_ALLOY_URL
    _check_url(PREFIX + "ALLOY_URL", alloy_url, ("https", "http"))
    parts = urlsplit(alloy_url)
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise ConfigError(
            PREFIX + "ALLOY_URL",
            "must use https (plain http is allowed only to a loopback address)",
        )

    redis_url = env.text("REDIS_URL")
    if redis_url:
        _check_url(PREFIX + "REDIS_URL", redis_url, ("redis", "rediss", "unix"))
    broker_env = env.text("BROKER_URL")
    if broker_env:
        _check_url(PREFIX + "BROKER_URL", broker_env, ("redis", "rediss", "unix"))
    broker_url = broker_env or redis_url

    senders_file = env.text("SENDERS_FILE")
    senders_path = Path(senders_file) if senders_file else None
    if senders_path is not None and not senders_path.is_file():
        raise ConfigError(PREFIX + "SENDERS_FILE", f"{senders_file} is not a readable file")

    crm_url = env.text("CRM_URL")
    if crm_url:
        _check_url(PREFIX + "CRM_URL", crm_url, ("https", "http"))

    name = env.text("INBOX_NAME", "default") or "default"
    if not _INBOX_NAME.match(name):
        raise ConfigError(PREFIX + "INBOX_NAME", "must be 1-64 letters, digits, '-' or '_'")

    security = env.choice("IMAP_SECURITY", "ssl", IMAP_SECURITY)
    default_port = {"ssl": 993, "starttls": 143, "plain": 143}[security]
    inbox = InboxSettings(
        name=name,
        host=env.text("IMAP_HOST"),
        port=env.integer("IMAP_PORT", default_port, minimum=1, maximum=65535),
        user=env.text("IMAP_USER"),
        password=env.secret("IMAP_PASSWORD"),
        security=security,
        folder=env.folder("IMAP_FOLDER", "INBOX"),
        processed_folder=env.folder("PROCESSED_FOLDER", "Processed"),
        quarantine_folder=env.folder("QUARANTINE_FOLDER", "Quarantine"),
        agent_email=env.email("AGENT_EMAIL"),
        note=env.text("NOTE", DEFAULT_NOTE) or DEFAULT_NOTE,
        poll_interval=env.number("POLL_INTERVAL", 60.0, minimum=1, maximum=86400),
        ca_file=env.path("IMAP_CA_FILE"),
    )
    folders = {inbox.folder, inbox.processed_folder, inbox.quarantine_folder}
    if len(folders) != 3:
        raise ConfigError(
            PREFIX + "PROCESSED_FOLDER",
            "the inbox, processed and quarantine folders must be three different folders",
        )

    staging_key = env.secret("STAGING_KEY")
    if staging_key is not None:
        from .sealing import Sealer, SealingError

        try:
            Sealer(staging_key)
        except SealingError as exc:
            raise ConfigError(PREFIX + "STAGING_KEY", str(exc)) from None
    # requests per second to Alloy, shared by every worker; 0 turns the limit off
    alloy_rate = env.number("ALLOY_RATE", 25.0, minimum=0, maximum=100_000)
    limits = _limits(env)
    sender_auth = _sender_auth(env)
    task_time_limit = env.integer("TASK_TIME_LIMIT", 300, minimum=10, maximum=3600)
    retry_cap = env.number("RETRY_CAP", 300.0, minimum=0.01, maximum=6 * 3600)
    # Redis hands an unacknowledged task to another worker after the visibility timeout:
    # it must outlast the longest task plus the longest retry countdown it may wait out,
    # or tasks run twice while the first run is still going.
    floor = int(task_time_limit + retry_cap + 30)
    visibility_timeout = env.integer(
        "VISIBILITY_TIMEOUT", max(3600, floor), minimum=1, maximum=7 * 86400
    )
    if visibility_timeout < floor:
        raise ConfigError(
            PREFIX + "VISIBILITY_TIMEOUT",
            f"must be at least {floor} s (task time limit {task_time_limit} s + retry cap "
            f"{retry_cap:g} s + 30 s), got {visibility_timeout}",
        )
    if senders_path is not None:
        from .senders import parse_directory  # validated now, not at the first mail

        try:
            parse_directory(senders_path.read_text(encoding="utf-8-sig"), str(senders_path))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(PREFIX + "SENDERS_FILE", str(exc)) from None

    return Settings(
        inboxes=(inbox,),
        alloy_url=alloy_url.rstrip("/"),
        alloy_token=env.secret("ALLOY_TOKEN"),
        alloy_secret=env.secret("ALLOY_SECRET"),
        alloy_ca_file=env.path("ALLOY_CA_FILE"),
        alloy_rate=alloy_rate,
        alloy_burst=env.integer(
            "ALLOY_BURST", max(1, int(alloy_rate * 2)), minimum=1, maximum=100_000
        ),
        alloy_connect_timeout=env.number("ALLOY_CONNECT_TIMEOUT", 5.0, minimum=0.1, maximum=120),
        alloy_read_timeout=env.number("ALLOY_READ_TIMEOUT", 30.0, minimum=0.1, maximum=600),
        redis_url=redis_url,
        broker_url=broker_url,
        senders_file=senders_path,
        crm_url=crm_url,
        imap_timeout=env.number("IMAP_TIMEOUT", 30.0, minimum=1, maximum=600),
        fetch_batch=env.integer("FETCH_BATCH", 50, minimum=1, maximum=500),
        fetch_bytes=env.integer(
            "FETCH_BYTES", 64 * 1024 * 1024, minimum=1024 * 1024, maximum=2**31
        ),
        poll_limit=env.integer("POLL_LIMIT", 500, minimum=1, maximum=100_000),
        task_time_limit=task_time_limit,
        visibility_timeout=visibility_timeout,
        stale_after=env.integer(
            "STALE_AFTER", 2 * task_time_limit, minimum=task_time_limit, maximum=7 * 86400
        ),
        finish_grace=env.integer("FINISH_GRACE", 60, minimum=0, maximum=86400),
        failed_retry_after=env.integer("FAILED_RETRY_AFTER", 3600, minimum=1, maximum=7 * 86400),
        failed_auto_retries=env.integer("FAILED_AUTO_RETRIES", 3, minimum=0, maximum=100),
        limits=limits,
        sender_auth=sender_auth,
        sender_auth_on=_list(env.text("SENDER_AUTH", "dmarc")) != ("off",),
        staging_ttl=env.integer("STAGING_TTL", 7 * 86400, minimum=60, maximum=90 * 86400),
        staging_key=staging_key,
        max_attempts=env.integer("MAX_ATTEMPTS", 8, minimum=1, maximum=100),
        retry_base=env.number("RETRY_BASE", 2.0, minimum=0.01, maximum=3600),
        retry_cap=retry_cap,
        log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
    )


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in (value or "").split(",") if v.strip())


def _limits(env: _Env) -> Limits:
    from .sniff import KNOWN_KINDS

    default = Limits()
    kinds = _list(env.text("ALLOWED_TYPES")) or tuple(sorted(default.allowed_kinds))
    unknown = [k for k in kinds if k not in KNOWN_KINDS]
    if unknown:
        raise ConfigError(
            PREFIX + "ALLOWED_TYPES",
            f"names unknown type(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_KINDS))}",
        )
    mib = 1024 * 1024
    return Limits(
        max_message_bytes=env.integer("MAX_MESSAGE_BYTES", 40 * mib, minimum=1024, maximum=2**31),
        max_parts=env.integer("MAX_PARTS", 100, minimum=1, maximum=100_000),
        max_depth=env.integer("MAX_DEPTH", 10, minimum=1, maximum=1000),
        max_attachment_bytes=env.integer(
            "MAX_ATTACHMENT_BYTES", 25 * mib, minimum=1024, maximum=2**31
        ),
        max_documents=env.integer("MAX_DOCUMENTS", 20, minimum=1, maximum=10_000),
        allowed_kinds=frozenset(kinds),
        inline_image_floor=env.integer("INLINE_IMAGE_FLOOR", 4096, minimum=0, maximum=10 * mib),
    )


def _sender_auth(env: _Env) -> AuthPolicy | None:
    mode = _list(env.text("SENDER_AUTH", "dmarc"))
    if mode == ("off",):
        return None
    bad = [m for m in mode if m not in ("dmarc", "dkim", "spf")]
    if bad or not mode:
        raise ConfigError(
            PREFIX + "SENDER_AUTH",
            f"must be 'off' or a list of dmarc, dkim, spf; got {env.text('SENDER_AUTH')!r}",
        )
    ids = _list(env.text("TRUSTED_AUTHSERV_ID"))
    if not ids:
        return None  # required by the commands that read mail (Settings.require)
    try:
        return AuthPolicy(
            trusted_authserv_ids=ids,
            accept=mode,
            allowed_domains=_list(env.text("SENDER_DOMAINS")),
        )
    except ValueError as exc:
        raise ConfigError(PREFIX + "SENDER_DOMAINS", str(exc)) from None
