"""One settings object, read from the environment once and validated at start-up.

Every variable is named ``MAILINGEST_*`` and described, with its type, default and range,
in :mod:`mailingest.config.table`; any of them may instead be given as
``MAILINGEST_*_FILE`` naming a file that holds the value (Docker/Kubernetes secrets).
Bad settings stop start-up with a :class:`ConfigError` that lists *every* problem, one
line each naming the variable (or the file's key) and what is wrong: one run shows all
there is to fix. A ``MAILINGEST_`` variable that is no setting is one of the problems
(with the nearest valid name): a misspelt optional setting would otherwise keep its
default without a word. Which values are *required* depends on the command:
``load_settings(require=("imap", "alloy", "redis"))``.

Secrets are held in :class:`~mailingest.config.secret.Secret`, whose ``repr``/``str``
never show them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailingest.adapters.encryption import Sealer, SealingError
from mailingest.config.secret import Secret
from mailingest.config.table import (
    BY_NAME,
    EMAIL,
    INBOX_KEYS,
    PREFIX,
    default,
    default_float,
    is_setting,
    nearest,
    unknown_variable,
    valid_names,
)
from mailingest.core.console_users import ConsoleUser, parse_users
from mailingest.core.errors import ConfigError
from mailingest.core.replies import KINDS as REPLY_KINDS
from mailingest.core.rules import Rule, RuleError, parse_rules
from mailingest.core.screening import Limits
from mailingest.core.sender_auth import AuthPolicy

DEFAULT_NOTE = str(default("NOTE"))
DEFAULT_ALLOY_URL = str(default("ALLOY_URL"))
_INBOX_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

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
class ReplySettings:
    """The replies an inbox sends its customers, and the SMTP server it sends them by."""

    kinds: frozenset[str]  # of mailingest.core.replies.KINDS
    host: str
    port: int
    security: str  # ssl, starttls or plain
    user: str | None
    password: Secret | None
    auth: str  # password or xoauth2 (the inbox's OAuth grant)
    ca_file: Path | None
    from_address: str
    from_name: str
    language: str
    templates: Path | None  # the operator's own, over the shipped ones
    limit: int  # replies of one kind to one address per window
    window: int  # seconds

    @property
    def domain(self) -> str:
        """The domain of our replies' Message-IDs (how a reply of ours is recognised)."""
        return self.from_address.rpartition("@")[2]


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
    # a part screening refuses: "skip" (file the others, record it) or "quarantine"
    on_refused_part: str = "skip"
    # a forwarded mail: "documents" (the attachments inside it), "eml" (whole), "both"
    forwarded: str = "documents"
    # agents whose forwarded mail is filed on the forwarded mail's own sender's entity
    forwarders: frozenset[str] = frozenset()
    # the address customers write to, on which signed reply addresses are made
    reply_address: str | None = None
    # which mail it takes and what follows (mailingest.core.rules); none: every mail
    rules: tuple[Rule, ...] = ()
    # the replies it sends customers; None: none
    replies: ReplySettings | None = None
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
    lease: int
    stale_after: int
    finish_grace: int
    failed_retry_after: int
    failed_auto_retries: int
    limits: Limits
    staging_ttl: int
    staging_key: Secret | None
    # the key of the signed reply addresses (core/reply_address.py); None: not used
    address_key: Secret | None
    max_attempts: int
    retry_base: float
    retry_cap: float
    log_level: str
    log_format: str = str(default("LOG_FORMAT"))
    idle_renew: float = default_float("IDLE_RENEW")  # between IDLE renewals of `watch`
    metrics_port: int | None = None
    task_events: bool = False  # Celery task events, for Flower
    config_file: Path | None = None
    # the operator console: its users (from the users file), or the header an
    # authenticating proxy sets, and the key of its sessions and CSRF tokens
    console_users: Mapping[str, ConsoleUser] = field(default_factory=dict)
    console_trusted_header: str | None = None
    console_secret: Secret | None = None

    @property
    def address_key_bytes(self) -> bytes | None:
        """The signed reply addresses' key, decoded (validated at start-up)."""
        if self.address_key is None:
            return None
        return base64.urlsafe_b64decode(self.address_key.reveal() + "==")

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
        """Raise ConfigError naming every missing setting of these groups."""
        missing = _missing(self, groups, skip=frozenset())
        if missing:
            raise ConfigError.of(missing)
        return self


# -- what is missing -------------------------------------------------------------

_IS_MISSING = "is required but not set"
Key = tuple[str, str]  # (inbox origin, setting name): which value had a problem


def _missing(settings: Settings, groups: Iterable[str], skip: frozenset[Key]) -> list[Problem]:
    """The settings these groups of commands need that are not set, except those whose
    value was already reported as malformed (``skip``)."""
    needed: list[tuple[Key, str, object, str]] = []
    for group in groups:
        if group == "redis":
            needed.append((("", "REDIS_URL"), PREFIX + "REDIS_URL", settings.redis_url, ""))
        elif group == "imap":
            for inbox in settings.inboxes:
                names = ["IMAP_HOST", "IMAP_USER"]
                names += ["IMAP_PASSWORD"] if inbox.auth == "password" else []
                values: dict[str, object] = {
                    "IMAP_HOST": inbox.host,
                    "IMAP_USER": inbox.user,
                    "IMAP_PASSWORD": inbox.password,
                }
                needed += [
                    ((inbox.origin, name), inbox.setting(name), values[name], "") for name in names
                ]
                needed.append(
                    (
                        (inbox.origin, "TRUSTED_AUTHSERV_ID"),
                        inbox.setting("TRUSTED_AUTHSERV_ID"),
                        inbox.sender_auth is not None or not inbox.sender_auth_on,
                        "is required while sender authentication is on: the authserv-id "
                        "your receiving server writes in Authentication-Results "
                        "(or set MAILINGEST_SENDER_AUTH=off)",
                    )
                )
        elif group == "console":
            needed.append(
                (("", "CONSOLE_SECRET"), PREFIX + "CONSOLE_SECRET", settings.console_secret, "")
            )
            needed.append(
                (
                    ("", "CONSOLE_USERS"),
                    PREFIX + "CONSOLE_USERS",
                    settings.console_users or settings.console_trusted_header,
                    "is required (or MAILINGEST_CONSOLE_TRUSTED_HEADER behind an "
                    "authenticating proxy): the console lets no one in anonymously",
                )
            )
        elif group == "alloy":
            for name, value in (
                ("ALLOY_TOKEN", settings.alloy_token),
                ("ALLOY_SECRET", settings.alloy_secret),
            ):
                needed.append((("", name), PREFIX + name, value, ""))
            needed += [
                (
                    (inbox.origin, "AGENT_EMAIL"),
                    inbox.setting("AGENT_EMAIL"),
                    inbox.agent_email,
                    "",
                )
                for inbox in settings.inboxes
            ]
        else:  # pragma: no cover - programming error
            raise ValueError(group)
    return [
        (label, problem or _IS_MISSING)
        for key, label, value, problem in needed
        if not value and key not in skip
    ]


# -- reading ---------------------------------------------------------------

# An account's identity: from the environment it would make every inbox of a file the same.
_ONE_INBOX_ONLY = ("INBOX_NAME", "IMAP_USER", "IMAP_PASSWORD", "OAUTH_REFRESH_TOKEN")

Layer = dict[str, tuple[str, str]]  # variable -> (value, how an error names it)
Problem = tuple[str, str]  # (how the setting is named, what is wrong)


class Problems:
    """Every problem found while reading, each once, in the order found."""

    def __init__(self) -> None:
        self.found: list[Problem] = []
        self.failed: set[Key] = set()  # values reported here: not also "required"

    def add(self, label: str, problem: str, key: Key = ("", "")) -> None:
        if (label, problem) not in self.found:
            self.found.append((label, problem))
        self.failed.add(key)

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError.of(self.found)


def _overlay(below: Layer, above: Layer) -> Layer:
    """``above`` wins; a value given directly or as ``*_FILE`` replaces both forms below."""
    out = dict(below)
    for var in above:
        for form in (var, var + "_FILE", var.removesuffix("_FILE")):
            out.pop(form, None)
    out.update(above)
    return out


class _Env:
    """Reads MAILINGEST_* values from layered sources, following NAME_FILE indirection,
    and parses each as :mod:`mailingest.config.table` says. A malformed value is added
    to ``problems`` and read as its default, so that reading goes on to find the rest."""

    def __init__(self, values: Layer, problems: Problems, origin: str = "") -> None:
        self.values = values
        self.problems = problems
        self.origin = origin  # the file table an inbox comes from, to name what it lacks

    def label(self, name: str) -> str:
        """How an error names setting ``name``: the variable, or the file and key it came from."""
        var = PREFIX + name
        for form in (var, var + "_FILE"):
            if form in self.values:
                return self.values[form][1]
        return f"{self.origin}.{name.lower()}" if self.origin else var

    def fail(self, name: str, problem: str, label: str | None = None) -> None:
        self.problems.add(label or self.label(name), problem, (self.origin, name))

    def failed(self, *names: str) -> bool:
        return any((self.origin, name) in self.problems.failed for name in names)

    def _get(self, var: str) -> str | None:
        entry = self.values.get(var)
        return entry[0] if entry else None

    def raw(self, name: str, *, strip: bool = True) -> str | None:
        """The text given for ``name``, None when unset (or unreadable: reported)."""
        var = PREFIX + name
        direct = self._get(var)
        path = self._get(var + "_FILE")
        if direct not in (None, "") and path not in (None, ""):
            self.fail(
                name, f"is set both directly and via {var}_FILE; set one", self.values[var][1]
            )
            return None
        if path:
            where = self.values[var + "_FILE"][1]
            try:
                return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                self.fail(name, f"cannot read {path}: {exc.strerror}", where)
            except UnicodeDecodeError:
                self.fail(name, f"{path} is not UTF-8 text", where)
            return None
        if direct is None or direct.strip() == "":
            return None
        return direct.strip() if strip else direct

    def text(self, name: str) -> str | None:
        value = self.raw(name)
        fallback = BY_NAME[name].default
        return str(fallback) if value is None and fallback is not None else value

    def secret(self, name: str) -> Secret | None:
        value = self.raw(name, strip=False)  # a password may begin or end with a space
        return None if value is None else Secret(value)

    def number(
        self, name: str, fallback: float | None = None, *, minimum: float | None = None
    ) -> float:
        """A number in the table's range (``minimum`` when it depends on another setting);
        ``fallback`` is the default when the table's depends on other settings."""
        setting = BY_NAME[name]
        given = setting.default if fallback is None else fallback
        assert isinstance(given, int | float), name
        low = setting.minimum if minimum is None else minimum
        assert low is not None and setting.maximum is not None, name
        value = self.raw(name)
        if value is None:
            return given
        integer = setting.kind == "integer"
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            kind = "an integer" if integer else "a number"
            self.fail(name, f"must be {kind}, got {value!r}")
            return given
        if not (low <= number <= setting.maximum):
            self.fail(name, f"must be between {low:g} and {setting.maximum:g}, got {value}")
            return given
        return number

    def integer(self, name: str, fallback: int | None = None, *, minimum: int | None = None) -> int:
        return int(self.number(name, fallback, minimum=minimum))

    def choice(self, name: str) -> str:
        setting = BY_NAME[name]
        value = (self.raw(name) or str(setting.default)).lower()
        if value not in setting.choices:
            self.fail(name, f"must be one of {', '.join(setting.choices)}, got {value!r}")
            return str(setting.default)
        return value

    def email(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and not EMAIL.fullmatch(value):
            self.fail(name, f"must be an e-mail address, got {value!r}")
            return None
        return value.lower() if value else None

    def path(self, name: str) -> Path | None:
        value = self.raw(name)
        if value is None:
            return None
        if not Path(value).is_file():
            self.fail(name, f"{value} is not a readable file")
            return None
        return Path(value)

    def folder(self, name: str) -> str:
        value = self.text(name) or str(BY_NAME[name].default)
        if any(ch in value for ch in "\r\n\0"):
            self.fail(name, "must not contain line breaks or NUL")
            return str(BY_NAME[name].default)
        return value

    def url(self, name: str) -> str | None:
        value = self.text(name)
        problem = _url_problem(value, BY_NAME[name].schemes) if value else None
        if problem:
            self.fail(name, problem)
            fallback = BY_NAME[name].default
            return None if fallback is None else str(fallback)
        return value

    def list(self, name: str) -> tuple[str, ...]:
        return _list(self.text(name))


def _environment_layer(environ: Mapping[str, str], problems: Problems) -> Layer:
    """The prefixed variables, each a setting, or reported with the setting it resembles."""
    layer: Layer = {}
    for var, value in environ.items():
        if not var.startswith(PREFIX):
            continue
        problem = unknown_variable(var, value)
        if problem:
            problems.add(var, problem)
        elif var != PREFIX + "CONFIG" and value.strip() != "":
            layer[var] = (value, var)
    return layer


def _file_layer(
    table: Mapping[str, object], where: str, base_dir: Path, problems: Problems
) -> Layer:
    """A TOML table as variables: ``poll_interval = 30`` is ``MAILINGEST_POLL_INTERVAL``.

    Relative paths (``*_file`` keys) are taken from the file's directory.
    """
    layer: Layer = {}
    for key, value in table.items():
        label = f"{where}.{key}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            problems.add(label, "is not a mailingest setting (keys are lower case)")
            continue
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, int | float | str):
            text = str(value)
        elif isinstance(value, list) and all(
            isinstance(v, int | float | str) and not isinstance(v, bool) for v in value
        ):
            text = ",".join(str(v) for v in value)
        else:
            problems.add(
                label, f"must be a string, number, boolean or list, got {type(value).__name__}"
            )
            continue
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


def _url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.hostname or parts.scheme == "unix"):
        return f"must be a {'/'.join(schemes)} URL, got {_redact_url(value)!r}"
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        return f"has an invalid port in {_redact_url(value)!r}"
    return None


def _redact_url(url: str) -> str:
    """The URL without a password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


redact_url = _redact_url


def load_settings(
    environ: Mapping[str, str] | None = None, *, require: Iterable[str] = ()
) -> Settings:
    """Build and validate the settings; raise ConfigError listing every problem.

    Without ``MAILINGEST_CONFIG`` the environment describes one inbox. With it, the
    TOML file's top-level keys are settings for everything (``redis_url = ...``) and
    each ``[[inboxes]]`` table one inbox; the environment overrides the file.
    ``require`` names the groups of settings the command needs (see
    :meth:`Settings.require`): what they lack is reported with the rest.
    """
    environ = os.environ if environ is None else environ
    problems = Problems()
    env_layer = _environment_layer(environ, problems)
    config_text = (environ.get(PREFIX + "CONFIG") or "").strip()
    top: Layer = {}
    tables: list[tuple[str, Layer]] = []
    rules: dict[str, tuple[Rule, ...]] = {}
    config_path: Path | None = None
    if config_text:
        try:
            config_path, data = _read_config(config_text)
        except ConfigError as exc:
            problems.add(exc.variable, exc.problem)
            # without the file's inboxes, what else is wrong or missing cannot be told
            raise ConfigError.of(problems.found) from None
        top, tables, rules = _file_layers(config_path, data, problems)
        if len(tables) > 1:
            for key in _ONE_INBOX_ONLY:
                for form in (PREFIX + key, PREFIX + key + "_FILE"):
                    if form in env_layer:
                        problems.add(
                            form,
                            f"cannot apply to every inbox of {config_path.name}; "
                            "set it per inbox there",
                        )

    env = _Env(_overlay(top, env_layer), problems)
    settings = _shared(env)
    inbox_list: list[InboxSettings] = []
    for label, layer in tables or [("", {})]:
        inbox_env = _Env(_overlay(_overlay(top, layer), env_layer), problems, label)
        inbox_list.append(replace(_inbox(inbox_env, label), rules=rules.get(label, ())))
    _check_inboxes(inbox_list, settings.staging_key, env)
    settings = replace(settings, inboxes=tuple(inbox_list), config_file=config_path)
    problems.found += _missing(settings, require, frozenset(problems.failed))
    problems.raise_any()
    return settings


def _file_layers(
    path: Path, data: dict[str, object], problems: Problems
) -> tuple[Layer, list[tuple[str, Layer]], dict[str, tuple[Rule, ...]]]:
    """The file's top level, each ``[[inboxes]]`` table with how errors name it, and
    the rules of each (``[[inboxes.rules]]``, by that name)."""
    where, base_dir = path.name, path.resolve().parent
    inboxes = data.pop("inboxes", [])
    if "rules" in data:
        data.pop("rules")
        problems.add(f"{where}: rules", "belong to an inbox: [[inboxes.rules]]")
    all_rules: dict[str, tuple[Rule, ...]] = {}
    if not isinstance(inboxes, list) or not all(isinstance(t, dict) for t in inboxes):
        problems.add(f"{where}: inboxes", "must be a list of tables ([[inboxes]])")
        inboxes = []
    top = _file_layer(data, where, base_dir, problems)
    for var, (_, label) in top.items():
        name = var.removeprefix(PREFIX)
        if not is_setting(name, in_file=True):
            guess = nearest(name, valid_names(in_file=True))
            problems.add(
                label,
                "is not a mailingest setting"
                + (f"; did you mean {guess.lower()}?" if guess else ""),
            )
    tables: list[tuple[str, Layer]] = []
    for number, declared in enumerate(inboxes, 1):
        table = dict(declared)
        name = table.pop("name", None)
        label = f"{where}: inboxes[{name if isinstance(name, str) else number}]"
        if "rules" in table:
            try:
                all_rules[label] = parse_rules(table.pop("rules"), f"{label}.rules")
            except RuleError as exc:
                problems.add(exc.where, exc.problem)
        layer = _file_layer(table, label, base_dir, problems)
        _refuse_shared_keys(layer, problems)
        if name is not None:
            layer[PREFIX + "INBOX_NAME"] = (str(name), f"{label}.name")
        tables.append((label, layer))
    return top, tables, all_rules


def _refuse_shared_keys(layer: Layer, problems: Problems) -> None:
    """An inbox table holds per-inbox settings only: a shared one is for every inbox."""
    for var, (_, label) in layer.items():
        name = var.removeprefix(PREFIX)
        if name in INBOX_KEYS or name.removesuffix("_FILE") in INBOX_KEYS:
            continue
        if is_setting(name, in_file=True):
            problems.add(label, "is not a per-inbox setting (set it at the top of the file)")
            continue
        guess = nearest(name, valid_names(per_inbox=True, in_file=True))
        hint = f"; did you mean {guess.lower()}?" if guess else " (or unknown)"
        problems.add(label, "is not a per-inbox setting" + hint)


def _check_inboxes(inboxes: list[InboxSettings], staging_key: Secret | None, env: _Env) -> None:
    seen: dict[str, InboxSettings] = {}
    places: dict[tuple[object, ...], InboxSettings] = {}
    for inbox in inboxes:
        if inbox.name in seen:
            env.problems.add(inbox.setting("INBOX_NAME"), f"{inbox.name!r} names two inboxes")
        seen[inbox.name] = inbox
        place = (inbox.host, inbox.port, (inbox.user or "").lower(), inbox.folder)
        if inbox.host and inbox.user and place in places:
            env.problems.add(
                inbox.setting("IMAP_FOLDER"),
                f"inboxes {places[place].name!r} and {inbox.name!r} read the same folder",
            )
        places[place] = inbox
        if inbox.auth == "xoauth2" and staging_key is None and not env.failed("STAGING_KEY"):
            env.fail(
                "STAGING_KEY",
                f"is required for inbox {inbox.name!r} (imap_auth=xoauth2): refreshed OAuth "
                "tokens are kept in Redis encrypted with it",
            )


def _inbox(env: _Env, origin: str) -> InboxSettings:
    """One inbox's settings (its own keys, else the shared defaults)."""
    name = env.text("INBOX_NAME") or "default"
    if not _INBOX_NAME.match(name):
        env.fail("INBOX_NAME", "must be 1-64 letters, digits, '-' or '_'")
    security = env.choice("IMAP_SECURITY")
    default_port = {"ssl": 993, "starttls": 143, "plain": 143}[security]
    senders_path = env.path("SENDERS_FILE")
    if senders_path is not None:
        from mailingest.adapters.senders import (
            parse_directory,  # validated now, not at the first mail
        )

        try:
            parse_directory(senders_path.read_text(encoding="utf-8-sig"), str(senders_path))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            env.fail("SENDERS_FILE", str(exc))
    sender_auth, sender_auth_on = _sender_auth(env)
    inbox = InboxSettings(
        name=name,
        host=env.text("IMAP_HOST"),
        port=env.integer("IMAP_PORT", default_port),
        user=env.text("IMAP_USER"),
        password=env.secret("IMAP_PASSWORD"),
        security=security,
        folder=env.folder("IMAP_FOLDER"),
        processed_folder=env.folder("PROCESSED_FOLDER"),
        quarantine_folder=env.folder("QUARANTINE_FOLDER"),
        agent_email=env.email("AGENT_EMAIL"),
        note=env.text("NOTE") or DEFAULT_NOTE,
        poll_interval=env.number("POLL_INTERVAL"),
        ca_file=env.path("IMAP_CA_FILE"),
        auth=env.choice("IMAP_AUTH"),
        oauth=_oauth(env),
        senders_file=senders_path,
        crm_url=env.url("CRM_URL"),
        sender_auth=sender_auth,
        sender_auth_on=sender_auth_on,
        on_refused_part=env.choice("ON_REFUSED_PART"),
        forwarded=env.choice("FORWARDED"),
        forwarders=_forwarders(env),
        reply_address=env.email("REPLY_ADDRESS"),
        replies=_replies(env),
        origin=origin,
    )
    if inbox.replies is not None and inbox.replies.auth == "xoauth2" and inbox.auth != "xoauth2":
        env.fail("SMTP_AUTH", "xoauth2 uses the inbox's OAuth grant: set imap_auth = xoauth2")
    folders = ("IMAP_FOLDER", "PROCESSED_FOLDER", "QUARANTINE_FOLDER")
    distinct = {inbox.folder, inbox.processed_folder, inbox.quarantine_folder}
    if len(distinct) != 3 and not env.failed(*folders):
        env.fail(
            "PROCESSED_FOLDER",
            "the inbox, processed and quarantine folders must be three different folders",
        )
    return inbox


def _replies(env: _Env) -> ReplySettings | None:
    """The inbox's replies (every key is read, so each wrong one is reported)."""
    kinds = [k.lower() for k in env.list("REPLIES")]
    wrong = [k for k in kinds if k not in REPLY_KINDS]
    if wrong:
        env.fail("REPLIES", f"must be any of {', '.join(REPLY_KINDS)}, got {', '.join(wrong)}")
    security = env.choice("SMTP_SECURITY")
    port = env.integer("SMTP_PORT", {"ssl": 465, "starttls": 587, "plain": 25}[security])
    host, from_address = env.text("SMTP_HOST"), env.email("REPLY_FROM")
    user, password, auth = (
        env.text("SMTP_USER"),
        env.secret("SMTP_PASSWORD"),
        env.choice("SMTP_AUTH"),
    )
    ca_file = env.path("SMTP_CA_FILE")
    templates_text = env.text("REPLY_TEMPLATES")
    templates = Path(templates_text) if templates_text else None
    if templates is not None and not templates.is_dir():
        env.fail("REPLY_TEMPLATES", f"{templates} is not a folder")
    language = env.text("REPLY_LANGUAGE") or str(BY_NAME["REPLY_LANGUAGE"].default)
    limit, window = env.integer("REPLY_LIMIT"), env.integer("REPLY_WINDOW")
    name = env.text("REPLY_FROM_NAME") or str(BY_NAME["REPLY_FROM_NAME"].default)
    if not kinds or wrong:
        return None
    if not host:
        env.fail("SMTP_HOST", "is required when MAILINGEST_REPLIES is set")
    if not from_address and not env.failed("REPLY_FROM"):
        env.fail("REPLY_FROM", "is required when MAILINGEST_REPLIES is set")
    if password is not None and not user:
        env.fail("SMTP_USER", "is required with MAILINGEST_SMTP_PASSWORD")
    if not host or not from_address:
        return None
    replies = ReplySettings(
        kinds=frozenset(kinds),
        host=host,
        port=port,
        security=security,
        user=user,
        password=password,
        auth=auth,
        ca_file=ca_file,
        from_address=from_address,
        from_name=name,
        language=language,
        templates=templates,
        limit=limit,
        window=window,
    )
    from mailingest.adapters.reply_templates import TemplateError, check_templates

    try:  # a template that cannot render is found now, not at the first reply
        check_templates(replies)
    except TemplateError as exc:
        env.fail("REPLY_TEMPLATES", str(exc))
    return replies


def _forwarders(env: _Env) -> frozenset[str]:
    addresses = [a.lower() for a in env.list("FORWARDERS")]
    wrong = [a for a in addresses if not EMAIL.fullmatch(a)]
    if wrong:
        env.fail("FORWARDERS", f"must be e-mail addresses, got {', '.join(map(repr, wrong))}")
    return frozenset(addresses)


def _oauth(env: _Env) -> OAuthSettings | None:
    """The refresh-token grant of an ``imap_auth = xoauth2`` inbox (every key is read)."""
    auth = env.choice("IMAP_AUTH")
    provider = env.choice("OAUTH_PROVIDER")
    tenant = env.text("OAUTH_TENANT") or str(default("OAUTH_TENANT"))
    token_url = env.text("OAUTH_TOKEN_URL")
    client_id = env.text("OAUTH_CLIENT_ID")
    client_secret = env.secret("OAUTH_CLIENT_SECRET")
    refresh_token = env.secret("OAUTH_REFRESH_TOKEN")
    scope = env.text("OAUTH_SCOPE")
    ca_file = env.path("OAUTH_CA_FILE")
    if auth != "xoauth2":
        return None
    ok = True
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,100}", tenant):
        env.fail("OAUTH_TENANT", "must be a tenant id or domain name")
        ok = False
    if provider != "custom":
        default_url, default_scope = OAUTH_PROVIDERS[provider]
        token_url = token_url or default_url.format(tenant=tenant)
        scope = scope or default_scope
    problem = None
    if not token_url:
        problem = "is required for imap_auth=xoauth2 (or set oauth_provider = google or microsoft)"
    elif _url_problem(token_url, BY_NAME["OAUTH_TOKEN_URL"].schemes):
        problem = _url_problem(token_url, BY_NAME["OAUTH_TOKEN_URL"].schemes)
    elif urlsplit(token_url).scheme == "http" and not is_loopback(
        urlsplit(token_url).hostname or ""
    ):
        problem = "must use https (plain http is allowed only to a loopback address)"
    if problem:
        env.fail("OAUTH_TOKEN_URL", problem)
    for name, value in (("OAUTH_CLIENT_ID", client_id), ("OAUTH_REFRESH_TOKEN", refresh_token)):
        if not value and not env.failed(name):
            env.fail(name, "is required for imap_auth=xoauth2")
    if not (ok and token_url and client_id and refresh_token) or problem:
        return None
    return OAuthSettings(token_url, client_id, client_secret, refresh_token, scope, ca_file)


def _console(env: _Env) -> dict[str, Any]:
    """The console's settings: its users file read and checked now, not at a login."""
    users: Mapping[str, ConsoleUser] = {}
    path = env.path("CONSOLE_USERS")
    if path is not None:
        try:
            users = parse_users(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            env.fail("CONSOLE_USERS", str(exc))
    header = env.text("CONSOLE_TRUSTED_HEADER")
    if header is not None and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", header):
        env.fail("CONSOLE_TRUSTED_HEADER", f"must be a header name, got {header!r}")
    secret = env.secret("CONSOLE_SECRET")
    if secret is not None and len(secret.reveal()) < 32:
        env.fail("CONSOLE_SECRET", "must be at least 32 characters")
    return {"console_users": users, "console_trusted_header": header, "console_secret": secret}


def _shared(env: _Env) -> Settings:
    """The settings every inbox shares (``inboxes`` is filled in by the caller)."""
    alloy_url = env.url("ALLOY_URL") or DEFAULT_ALLOY_URL
    parts = urlsplit(alloy_url)
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        env.fail("ALLOY_URL", "must use https (plain http is allowed only to a loopback address)")
    redis_url = env.url("REDIS_URL")
    broker_url = env.url("BROKER_URL") or redis_url

    address_key = env.secret("ADDRESS_KEY")
    if address_key is not None:
        try:
            key = base64.urlsafe_b64decode(address_key.reveal() + "==")
        except (ValueError, binascii.Error):
            key = b""
        if len(key) < 32:
            env.fail("ADDRESS_KEY", "must be at least 32 bytes in URL-safe base64")
    console = _console(env)
    staging_key = env.secret("STAGING_KEY")
    if staging_key is not None:
        try:
            Sealer(staging_key)
        except SealingError as exc:
            env.fail("STAGING_KEY", str(exc))
    # requests per second to Alloy, shared by every worker; 0 turns the limit off
    alloy_rate = env.number("ALLOY_RATE")
    task_time_limit = env.integer("TASK_TIME_LIMIT")
    retry_cap = env.number("RETRY_CAP")
    # Redis hands an unacknowledged task to another worker after the visibility timeout:
    # it must outlast the longest task plus the longest retry countdown it may wait out,
    # or tasks run twice while the first run is still going.
    floor = int(task_time_limit + retry_cap + 30)
    visibility_timeout = env.integer("VISIBILITY_TIMEOUT", max(3600, floor))
    if visibility_timeout < floor and not env.failed(
        "TASK_TIME_LIMIT", "RETRY_CAP", "VISIBILITY_TIMEOUT"
    ):
        env.fail(
            "VISIBILITY_TIMEOUT",
            f"must be at least {floor} s (task time limit {task_time_limit} s + retry cap "
            f"{retry_cap:g} s + 30 s), got {visibility_timeout}",
        )
    stale_floor = None if env.failed("TASK_TIME_LIMIT") else task_time_limit
    metrics_port = env.integer("METRICS_PORT")
    return Settings(
        inboxes=(),
        alloy_url=alloy_url.rstrip("/"),
        alloy_token=env.secret("ALLOY_TOKEN"),
        alloy_secret=env.secret("ALLOY_SECRET"),
        alloy_ca_file=env.path("ALLOY_CA_FILE"),
        alloy_rate=alloy_rate,
        alloy_burst=env.integer("ALLOY_BURST", max(1, int(alloy_rate * 2))),
        alloy_connect_timeout=env.number("ALLOY_CONNECT_TIMEOUT"),
        alloy_read_timeout=env.number("ALLOY_READ_TIMEOUT"),
        alloy_commit_horizon=env.number("ALLOY_COMMIT_HORIZON"),
        redis_url=redis_url,
        broker_url=broker_url,
        imap_timeout=env.number("IMAP_TIMEOUT"),
        fetch_batch=env.integer("FETCH_BATCH"),
        fetch_bytes=env.integer("FETCH_BYTES"),
        poll_limit=env.integer("POLL_LIMIT"),
        task_time_limit=task_time_limit,
        visibility_timeout=visibility_timeout,
        lease=env.integer("LEASE"),
        stale_after=env.integer("STALE_AFTER", 2 * task_time_limit, minimum=stale_floor),
        finish_grace=env.integer("FINISH_GRACE"),
        failed_retry_after=env.integer("FAILED_RETRY_AFTER"),
        failed_auto_retries=env.integer("FAILED_AUTO_RETRIES"),
        limits=_limits(env),
        staging_ttl=env.integer("STAGING_TTL"),
        staging_key=staging_key,
        address_key=address_key,
        **console,
        max_attempts=env.integer("MAX_ATTEMPTS"),
        retry_base=env.number("RETRY_BASE"),
        retry_cap=retry_cap,
        log_level=env.choice("LOG_LEVEL"),
        log_format=env.choice("LOG_FORMAT"),
        idle_renew=env.number("IDLE_RENEW"),
        metrics_port=metrics_port or None,
        task_events=env.choice("TASK_EVENTS") == "on",
    )


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in (value or "").split(",") if v.strip())


def _limits(env: _Env) -> Limits:
    from mailingest.core.sniff import KNOWN_KINDS

    kinds = env.list("ALLOWED_TYPES")
    unknown = [k for k in kinds if k not in KNOWN_KINDS]
    if unknown:
        env.fail(
            "ALLOWED_TYPES",
            f"names unknown type(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_KINDS))}",
        )
        kinds = _list(str(default("ALLOWED_TYPES")))
    return Limits(
        max_message_bytes=env.integer("MAX_MESSAGE_BYTES"),
        max_parts=env.integer("MAX_PARTS"),
        max_depth=env.integer("MAX_DEPTH"),
        max_attachment_bytes=env.integer("MAX_ATTACHMENT_BYTES"),
        max_documents=env.integer("MAX_DOCUMENTS"),
        allowed_kinds=frozenset(kinds or _list(str(default("ALLOWED_TYPES")))),
        inline_image_floor=env.integer("INLINE_IMAGE_FLOOR"),
    )


def _sender_auth(env: _Env) -> tuple[AuthPolicy | None, bool]:
    """The inbox's sender authentication: (policy or None, whether it is on)."""
    mode = env.list("SENDER_AUTH")
    ids = env.list("TRUSTED_AUTHSERV_ID")
    domains = env.list("SENDER_DOMAINS")
    if mode == ("off",):
        return None, False
    bad = [m for m in mode if m not in ("dmarc", "dkim", "spf")]
    if bad or not mode:
        env.fail(
            "SENDER_AUTH",
            f"must be 'off' or a list of dmarc, dkim, spf; got {env.text('SENDER_AUTH')!r}",
        )
        return None, False  # reported: not also "authserv-id required"
    if not ids:
        return None, True  # required by the commands that read mail (Settings.require)
    try:
        return AuthPolicy(trusted_authserv_ids=ids, accept=mode, allowed_domains=domains), True
    except ValueError as exc:
        env.fail("SENDER_DOMAINS", str(exc))
        return None, False
