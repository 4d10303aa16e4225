"""One settings object, read from the environment once and validated at start-up.

Every variable is named ``MAILINGEST_*``; any of them may instead be given as
``MAILINGEST_*_FILE`` naming a file that holds the value (Docker/Kubernetes
secrets). A malformed value stops start-up with a :class:`ConfigError` that
names the variable and what is wrong, in one line. Which values are *required*
depends on the command: ``settings.require("imap", "alloy", "redis")``.

Secrets are held in :class:`~mailingest.config.secret.Secret`, whose ``repr``/``str``
never show them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from mailingest.adapters.encryption import Sealer, SealingError
from mailingest.config.secret import Secret
from mailingest.core.errors import ConfigError
from mailingest.core.screening import Limits
from mailingest.core.sender_auth import AuthPolicy

PREFIX = "MAILINGEST_"
DEFAULT_NOTE = "Uploaded from email customer sent"
DEFAULT_ALLOY_URL = "https://sandbox.alloy.co/v1"
IMAP_SECURITY = ("ssl", "starttls", "plain")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_INBOX_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
    ca_file: Path | None = None  # trust this CA for the token endpoint's certificate


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
    # who the senders are: the CSV directory, then the CLI's directory in Redis, then a CRM
    senders_file: Path | None = None
    crm_url: str | None = None
    # how senders are authenticated: None is off, or on without a trusted server yet
    sender_auth: AuthPolicy | None = None
    sender_auth_on: bool = True
    # where a missing value is named in errors: "" for the environment, else the file's table
    origin: str = field(default="", compare=False)

    def setting(self, name: str) -> str:
        """How an error names this inbox's setting ``name`` (e.g. ``IMAP_HOST``)."""
        if not self.origin:
            return PREFIX + name
        return f"{self.origin}.{'name' if name == 'INBOX_NAME' else name.lower()}"


# seconds between recording a describe attempt and sending it, at most: a run that took
# longer (frozen, paused) does not send it (see Settings.in_doubt_ms)
SEND_GUARD = 5.0


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
    alloy_commit_horizon: float
    redis_url: str | None
    broker_url: str | None
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
    staging_ttl: int
    staging_key: Secret | None
    max_attempts: int
    retry_base: float
    retry_cap: float
    log_level: str
    log_format: str = "text"
    idle_renew: float = 300.0  # seconds between IDLE renewals of `mailingest watch`
    metrics_port: int | None = None
    config_file: Path | None = None

    @property
    def in_doubt_ms(self) -> int:
        """How long a POST whose answer never came may still become an Alloy document,
        counted from the attempt's record: the send happens within ``SEND_GUARD`` of it
        (or not at all), the connection within the connect timeout, the answer within the
        read timeout, and Alloy may take ``ALLOY_COMMIT_HORIZON`` more to commit a
        request it queued. Until then the document is not described again; it is looked
        for at Alloy instead."""
        seconds = self.alloy_connect_timeout + self.alloy_read_timeout + self.alloy_commit_horizon
        return int((seconds + SEND_GUARD) * 1000)

    # -- access -----------------------------------------------------------
    def inbox(self, name: str) -> InboxSettings:
        for inbox in self.inboxes:
            if inbox.name == name:
                return inbox
        raise ConfigError("MAILINGEST_INBOX_NAME", f"no inbox named {name!r} is configured")

    @property
    def sender_auth_off(self) -> tuple[str, ...]:
        """Names of the inboxes whose senders are not authenticated (a start-up warning)."""
        return tuple(inbox.name for inbox in self.inboxes if not inbox.sender_auth_on)

    def require(self, *groups: str) -> Settings:
        """Raise ConfigError naming the first missing setting of these groups."""
        missing = "is required but not set"
        needed: list[tuple[str, object, str]] = []
        for group in groups:
            if group == "redis":
                needed.append((PREFIX + "REDIS_URL", self.redis_url, missing))
            elif group == "imap":
                for inbox in self.inboxes:
                    needed += [
                        (inbox.setting("IMAP_HOST"), inbox.host, missing),
                        (inbox.setting("IMAP_USER"), inbox.user, missing),
                    ]
                    if inbox.auth == "password":
                        needed.append((inbox.setting("IMAP_PASSWORD"), inbox.password, missing))
                    needed.append(
                        (
                            inbox.setting("TRUSTED_AUTHSERV_ID"),
                            inbox.sender_auth is not None or not inbox.sender_auth_on,
                            "is required while sender authentication is on: the authserv-id "
                            "your receiving server writes in Authentication-Results "
                            "(or set MAILINGEST_SENDER_AUTH=off)",
                        )
                    )
            elif group == "alloy":
                needed += [
                    (PREFIX + "ALLOY_TOKEN", self.alloy_token, missing),
                    (PREFIX + "ALLOY_SECRET", self.alloy_secret, missing),
                ]
                needed += [
                    (inbox.setting("AGENT_EMAIL"), inbox.agent_email, missing)
                    for inbox in self.inboxes
                ]
            else:  # pragma: no cover - programming error
                raise ValueError(group)
        for name, value, problem in needed:
            if not value:
                raise ConfigError(name, problem)
        return self


# -- reading ---------------------------------------------------------------

# The settings each inbox has for itself; every other setting is shared by all inboxes.
INBOX_KEYS = frozenset(
    {
        "INBOX_NAME",
        "IMAP_HOST",
        "IMAP_PORT",
        "IMAP_USER",
        "IMAP_PASSWORD",
        "IMAP_SECURITY",
        "IMAP_FOLDER",
        "IMAP_CA_FILE",
        "IMAP_AUTH",
        "OAUTH_PROVIDER",
        "OAUTH_TENANT",
        "OAUTH_TOKEN_URL",
        "OAUTH_CLIENT_ID",
        "OAUTH_CLIENT_SECRET",
        "OAUTH_REFRESH_TOKEN",
        "OAUTH_SCOPE",
        "OAUTH_CA_FILE",
        "PROCESSED_FOLDER",
        "QUARANTINE_FOLDER",
        "AGENT_EMAIL",
        "NOTE",
        "POLL_INTERVAL",
        "SENDERS_FILE",
        "CRM_URL",
        "SENDER_AUTH",
        "TRUSTED_AUTHSERV_ID",
        "SENDER_DOMAINS",
    }
)
# An account's identity: from the environment it would make every inbox of a file the same.
_ONE_INBOX_ONLY = ("INBOX_NAME", "IMAP_USER", "IMAP_PASSWORD", "OAUTH_REFRESH_TOKEN")

Layer = dict[str, tuple[str, str]]  # variable -> (value, how an error names it)


def _overlay(below: Layer, above: Layer) -> Layer:
    """``above`` wins; a value given directly or as ``*_FILE`` replaces both forms below."""
    out = dict(below)
    for var in above:
        for form in (var, var + "_FILE", var.removesuffix("_FILE")):
            out.pop(form, None)
    out.update(above)
    return out


class _Env:
    """Reads MAILINGEST_* values from layered sources, following NAME_FILE indirection.

    Records every name it was asked for, so that a file's unknown keys can be refused.
    """

    def __init__(self, values: Layer, origin: str = "") -> None:
        self.values = values
        self.origin = origin  # the file table an inbox comes from, to name what it lacks
        self.asked: set[str] = set()

    def label(self, name: str) -> str:
        """How an error names setting ``name``: the variable, or the file and key it came from."""
        var = PREFIX + name
        for form in (var, var + "_FILE"):
            if form in self.values:
                return self.values[form][1]
        return f"{self.origin}.{name.lower()}" if self.origin else var

    def _get(self, var: str) -> str | None:
        entry = self.values.get(var)
        return entry[0] if entry else None

    def raw(self, name: str, *, strip: bool = True) -> str | None:
        var = PREFIX + name
        self.asked.update((var, var + "_FILE"))
        direct = self._get(var)
        path = self._get(var + "_FILE")
        if direct not in (None, "") and path not in (None, ""):
            raise ConfigError(
                self.values[var][1], f"is set both directly and via {var}_FILE; set one"
            )
        if path:
            where = self.values[var + "_FILE"][1]
            try:
                return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(where, f"{path} is not UTF-8 text") from None
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
            raise ConfigError(self.label(name), f"must be {kind}, got {value!r}") from None
        if not (minimum <= number <= maximum):
            raise ConfigError(
                self.label(name), f"must be between {minimum:g} and {maximum:g}, got {value}"
            )
        return number

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        return int(self.number(name, default, minimum=minimum, maximum=maximum, integer=True))

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.raw(name) or default).lower()
        if value not in choices:
            raise ConfigError(
                self.label(name), f"must be one of {', '.join(choices)}, got {value!r}"
            )
        return value

    def email(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and not _EMAIL.match(value):
            raise ConfigError(self.label(name), f"must be an e-mail address, got {value!r}")
        return value.lower() if value else None

    def path(self, name: str) -> Path | None:
        value = self.raw(name)
        if value is None:
            return None
        if not Path(value).is_file():
            raise ConfigError(self.label(name), f"{value} is not a readable file")
        return Path(value)

    def folder(self, name: str, default: str) -> str:
        value = self.text(name, default) or default
        if any(ch in value for ch in "\r\n\0"):
            raise ConfigError(self.label(name), "must not contain line breaks or NUL")
        return value

    def url(self, name: str, schemes: tuple[str, ...], default: str | None = None) -> str | None:
        value = self.text(name, default)
        if value:
            _check_url(self.label(name), value, schemes)
        return value


def _environment_layer(environ: Mapping[str, str]) -> Layer:
    return {
        var: (value, var)
        for var, value in environ.items()
        if var.startswith(PREFIX) and var != PREFIX + "CONFIG" and value.strip() != ""
    }


def _file_layer(table: Mapping[str, object], where: str, base_dir: Path) -> Layer:
    """A TOML table as variables: ``poll_interval = 30`` is ``MAILINGEST_POLL_INTERVAL``.

    Relative paths (``*_file`` keys) are taken from the file's directory.
    """
    layer: Layer = {}
    for key, value in table.items():
        label = f"{where}.{key}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise ConfigError(label, "is not a setting name (lower case, digits and '_')")
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, int | float | str):
            text = str(value)
        elif isinstance(value, list) and all(
            isinstance(v, int | float | str) and not isinstance(v, bool) for v in value
        ):
            text = ",".join(str(v) for v in value)
        else:
            raise ConfigError(
                label, f"must be a string, number, boolean or list, got {type(value).__name__}"
            )
        if key.endswith("_file") and text and not Path(text).is_absolute():
            text = str(base_dir / text)
        layer[PREFIX + key.upper()] = (text, label)
    return layer


def _read_config(path_text: str) -> tuple[Path, dict[str, object]]:
    var = PREFIX + "CONFIG"
    path = Path(path_text)
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(var, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(var, f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(var, f"{path} is not valid TOML: {exc}") from None


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
    """Build and validate the settings; raise ConfigError on the first bad value.

    Without ``MAILINGEST_CONFIG`` the environment describes one inbox. With it, the
    TOML file's top-level keys are settings for everything (``redis_url = ...``) and
    each ``[[inboxes]]`` table one inbox; the environment overrides the file.
    """
    environ = os.environ if environ is None else environ
    env_layer = _environment_layer(environ)
    config_text = (environ.get(PREFIX + "CONFIG") or "").strip()
    top: Layer = {}
    tables: list[tuple[str, Layer]] = []
    config_path: Path | None = None
    if config_text:
        config_path, data = _read_config(config_text)
        where, base_dir = config_path.name, config_path.resolve().parent
        inboxes = data.pop("inboxes", [])
        if not isinstance(inboxes, list) or not all(isinstance(t, dict) for t in inboxes):
            raise ConfigError(f"{where}: inboxes", "must be a list of tables ([[inboxes]])")
        top = _file_layer(data, where, base_dir)
        for number, table in enumerate(inboxes, 1):
            table = dict(table)
            name = table.pop("name", None)
            label = f"{where}: inboxes[{name if isinstance(name, str) else number}]"
            layer = _file_layer(table, label, base_dir)
            if name is not None:
                layer[PREFIX + "INBOX_NAME"] = (str(name), f"{label}.name")
            tables.append((label, layer))
        if len(tables) > 1:
            for key in _ONE_INBOX_ONLY:
                for form in (PREFIX + key, PREFIX + key + "_FILE"):
                    if form in env_layer:
                        raise ConfigError(
                            form,
                            f"cannot apply to every inbox of {where}; set it per inbox there",
                        )

    env = _Env(_overlay(top, env_layer))
    settings = _shared(env)
    readers = [env]
    inbox_list: list[InboxSettings] = []
    for label, layer in tables or [("", {})]:
        inbox_env = _Env(_overlay(_overlay(top, layer), env_layer), label)
        inbox_list.append(_inbox(inbox_env, label))
        readers.append(inbox_env)
        _refuse_shared_keys(layer, INBOX_KEYS)
    _refuse_unknown_keys(top, readers)
    _check_inboxes(inbox_list, settings.staging_key, env)
    return replace(settings, inboxes=tuple(inbox_list), config_file=config_path)


def _refuse_shared_keys(layer: Layer, allowed: frozenset[str]) -> None:
    for var, (_, label) in layer.items():
        name = var.removeprefix(PREFIX)
        if name not in allowed and name.removesuffix("_FILE") not in allowed:
            raise ConfigError(
                label, "is not a per-inbox setting (set it at the top of the file) or unknown"
            )


def _refuse_unknown_keys(top: Layer, readers: list[_Env]) -> None:
    asked = set().union(*(reader.asked for reader in readers))
    for var, (_, label) in top.items():
        if var not in asked:
            raise ConfigError(label, "is not a mailingest setting")


def _check_inboxes(inboxes: list[InboxSettings], staging_key: Secret | None, env: _Env) -> None:
    seen: dict[str, InboxSettings] = {}
    places: dict[tuple[object, ...], InboxSettings] = {}
    for inbox in inboxes:
        if inbox.name in seen:
            raise ConfigError(inbox.setting("INBOX_NAME"), f"{inbox.name!r} names two inboxes")
        seen[inbox.name] = inbox
        place = (inbox.host, inbox.port, (inbox.user or "").lower(), inbox.folder)
        if inbox.host and inbox.user and place in places:
            raise ConfigError(
                inbox.setting("IMAP_FOLDER"),
                f"inboxes {places[place].name!r} and {inbox.name!r} read the same folder",
            )
        places[place] = inbox
        if inbox.auth == "xoauth2" and staging_key is None:
            raise ConfigError(
                env.label("STAGING_KEY"),
                f"is required for inbox {inbox.name!r} (imap_auth=xoauth2): refreshed OAuth "
                "tokens are kept in Redis encrypted with it",
            )


def _inbox(env: _Env, origin: str) -> InboxSettings:
    """One inbox's settings (its own keys, else the shared defaults)."""
    name = env.text("INBOX_NAME", "default") or "default"
    if not _INBOX_NAME.match(name):
        raise ConfigError(env.label("INBOX_NAME"), "must be 1-64 letters, digits, '-' or '_'")
    security = env.choice("IMAP_SECURITY", "ssl", IMAP_SECURITY)
    default_port = {"ssl": 993, "starttls": 143, "plain": 143}[security]
    senders_path = env.path("SENDERS_FILE")
    if senders_path is not None:
        from mailingest.adapters.senders import (
            parse_directory,  # validated now, not at the first mail
        )

        try:
            parse_directory(senders_path.read_text(encoding="utf-8-sig"), str(senders_path))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(env.label("SENDERS_FILE"), str(exc)) from None
    sender_auth, sender_auth_on = _sender_auth(env)
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
        auth=env.choice("IMAP_AUTH", "password", IMAP_AUTH),
        oauth=_oauth(env),
        senders_file=senders_path,
        crm_url=env.url("CRM_URL", ("https", "http")),
        sender_auth=sender_auth,
        sender_auth_on=sender_auth_on,
        origin=origin,
    )
    if len({inbox.folder, inbox.processed_folder, inbox.quarantine_folder}) != 3:
        raise ConfigError(
            env.label("PROCESSED_FOLDER"),
            "the inbox, processed and quarantine folders must be three different folders",
        )
    return inbox


def _oauth(env: _Env) -> OAuthSettings | None:
    """The refresh-token grant of an ``imap_auth = xoauth2`` inbox (every key is read)."""
    auth = env.choice("IMAP_AUTH", "password", IMAP_AUTH)
    provider = env.choice("OAUTH_PROVIDER", "custom", ("custom", *OAUTH_PROVIDERS))
    tenant = env.text("OAUTH_TENANT", "common") or "common"
    token_url = env.text("OAUTH_TOKEN_URL")
    client_id = env.text("OAUTH_CLIENT_ID")
    client_secret = env.secret("OAUTH_CLIENT_SECRET")
    refresh_token = env.secret("OAUTH_REFRESH_TOKEN")
    scope = env.text("OAUTH_SCOPE")
    ca_file = env.path("OAUTH_CA_FILE")
    if auth != "xoauth2":
        return None
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,100}", tenant):
        raise ConfigError(env.label("OAUTH_TENANT"), "must be a tenant id or domain name")
    if provider != "custom":
        default_url, default_scope = OAUTH_PROVIDERS[provider]
        token_url = token_url or default_url.format(tenant=tenant)
        scope = scope or default_scope
    if not token_url:
        raise ConfigError(
            env.label("OAUTH_TOKEN_URL"),
            "is required for imap_auth=xoauth2 (or set oauth_provider = google or microsoft)",
        )
    _check_url(env.label("OAUTH_TOKEN_URL"), token_url, ("https", "http"))
    host = urlsplit(token_url).hostname or ""
    if urlsplit(token_url).scheme == "http" and not is_loopback(host):
        raise ConfigError(
            env.label("OAUTH_TOKEN_URL"),
            "must use https (plain http is allowed only to a loopback address)",
        )
    for name, value in (("OAUTH_CLIENT_ID", client_id), ("OAUTH_REFRESH_TOKEN", refresh_token)):
        if not value:
            raise ConfigError(env.label(name), "is required for imap_auth=xoauth2")
    assert client_id is not None and refresh_token is not None
    return OAuthSettings(token_url, client_id, client_secret, refresh_token, scope, ca_file)


def _shared(env: _Env) -> Settings:
    """The settings every inbox shares (``inboxes`` is filled in by the caller)."""
    alloy_url = env.url("ALLOY_URL", ("https", "http"), DEFAULT_ALLOY_URL) or DEFAULT_ALLOY_URL
    parts = urlsplit(alloy_url)
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise ConfigError(
            env.label("ALLOY_URL"),
            "must use https (plain http is allowed only to a loopback address)",
        )
    redis_url = env.url("REDIS_URL", ("redis", "rediss", "unix"))
    broker_url = env.url("BROKER_URL", ("redis", "rediss", "unix")) or redis_url

    staging_key = env.secret("STAGING_KEY")
    if staging_key is not None:
        try:
            Sealer(staging_key)
        except SealingError as exc:
            raise ConfigError(env.label("STAGING_KEY"), str(exc)) from None
    # requests per second to Alloy, shared by every worker; 0 turns the limit off
    alloy_rate = env.number("ALLOY_RATE", 25.0, minimum=0, maximum=100_000)
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
            env.label("VISIBILITY_TIMEOUT"),
            f"must be at least {floor} s (task time limit {task_time_limit} s + retry cap "
            f"{retry_cap:g} s + 30 s), got {visibility_timeout}",
        )
    metrics_port = env.integer("METRICS_PORT", 0, minimum=0, maximum=65535)
    return Settings(
        inboxes=(),
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
        alloy_commit_horizon=env.number("ALLOY_COMMIT_HORIZON", 60.0, minimum=0, maximum=3600),
        redis_url=redis_url,
        broker_url=broker_url,
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
        limits=_limits(env),
        staging_ttl=env.integer("STAGING_TTL", 7 * 86400, minimum=60, maximum=90 * 86400),
        staging_key=staging_key,
        max_attempts=env.integer("MAX_ATTEMPTS", 8, minimum=1, maximum=100),
        retry_base=env.number("RETRY_BASE", 2.0, minimum=0.01, maximum=3600),
        retry_cap=retry_cap,
        log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        log_format=env.choice("LOG_FORMAT", "text", ("text", "json")),
        # under the 29 minutes servers allow an IDLE (RFC 2177), and under most NAT timeouts
        idle_renew=env.number("IDLE_RENEW", 300.0, minimum=1, maximum=1740),
        metrics_port=metrics_port or None,
    )


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in (value or "").split(",") if v.strip())


def _limits(env: _Env) -> Limits:
    from mailingest.core.sniff import KNOWN_KINDS

    default = Limits()
    kinds = _list(env.text("ALLOWED_TYPES")) or tuple(sorted(default.allowed_kinds))
    unknown = [k for k in kinds if k not in KNOWN_KINDS]
    if unknown:
        raise ConfigError(
            env.label("ALLOWED_TYPES"),
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


def _sender_auth(env: _Env) -> tuple[AuthPolicy | None, bool]:
    """The inbox's sender authentication: (policy or None, whether it is on)."""
    mode = _list(env.text("SENDER_AUTH", "dmarc"))
    ids = _list(env.text("TRUSTED_AUTHSERV_ID"))
    domains = _list(env.text("SENDER_DOMAINS"))
    if mode == ("off",):
        return None, False
    bad = [m for m in mode if m not in ("dmarc", "dkim", "spf")]
    if bad or not mode:
        raise ConfigError(
            env.label("SENDER_AUTH"),
            f"must be 'off' or a list of dmarc, dkim, spf; got {env.text('SENDER_AUTH')!r}",
        )
    if not ids:
        return None, True  # required by the commands that read mail (Settings.require)
    try:
        return AuthPolicy(trusted_authserv_ids=ids, accept=mode, allowed_domains=domains), True
    except ValueError as exc:
        raise ConfigError(env.label("SENDER_DOMAINS"), str(exc)) from None
