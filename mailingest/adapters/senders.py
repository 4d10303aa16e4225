"""Sender -> Alloy entity: which customer sent this mail?

Alloy cannot look an entity up by e-mail address, so the mapping is ours.
Resolvers are tried in order and the first answer wins:

1. :class:`CsvDirectory`  the file named by ``MAILINGEST_SENDERS_FILE`` (``email,entity_token``)
2. :class:`RedisDirectory` a directory in Redis that ``mailingest senders`` edits
3. :class:`HttpLookup`    ``GET <MAILINGEST_CRM_URL>?email=`` answering ``{"entity_token": ...}``

An entity token (``P-``/``B-`` + 20 letters/digits) or the customer's own
external id is accepted; Alloy treats both alike in entity paths.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import httpx
import redis

from mailingest.adapters.keys import SENDERS, as_text
from mailingest.core.errors import ConfigError, ResolverError

log = logging.getLogger(__name__)
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+$")
# an entity token (P-/B- and 20 letters or digits) or a customer's external id, as
# directories have always held them: no space, no / ? #, never dots alone (it goes
# into Alloy's URL path: "." or ".." would name another path)
_ENTITY = re.compile(r"(?!\.+$)[^\s/?#]{1,128}")


def normalise_email(address: str) -> str:
    """Lower-cased and stripped; ``None``-safe callers check :func:`is_email` first."""
    return address.strip().strip("<>").strip().lower()


def is_email(address: str) -> bool:
    return bool(_ADDRESS.match(address))


def check_entity(entity: str) -> str:
    """An entity token or external id, usable in an Alloy path; raise ValueError otherwise."""
    entity = entity.strip()
    # nor an invisible character: a control character, a bidi override (U+202E)
    hidden = any(unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs", "Cn") for c in entity)
    if hidden or not _ENTITY.fullmatch(entity):
        raise ValueError(f"not an entity token or external id: {entity!r}")
    return entity


class Resolver(Protocol):
    name: str

    def resolve(self, email: str) -> str | None: ...


def parse_directory(text: str, source: str) -> dict[str, str]:
    """Parse ``email,entity_token`` CSV text; raise ValueError naming the line."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:2]] != ["email", "entity_token"]:
        raise ValueError(f"{source}: the first line must be the header 'email,entity_token'")
    mapping: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise ValueError(f"{source}:{line}: expected 'email,entity_token'")
        email = normalise_email(row[0])
        if not is_email(email):
            raise ValueError(f"{source}:{line}: not an e-mail address: {row[0]!r}")
        try:
            mapping[email] = check_entity(row[1])
        except ValueError as exc:
            raise ValueError(f"{source}:{line}: {exc}") from None
    return mapping


class CsvDirectory:
    """The senders file; re-read when it changes on disk."""

    name = "csv"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._mapping: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            text = self.path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            if self._stamp is None:
                raise ConfigError(
                    "MAILINGEST_SENDERS_FILE", f"cannot read {self.path}: {exc.strerror}"
                ) from None
            return  # keep the last good copy while the file is being replaced
        try:
            self._mapping = parse_directory(text, str(self.path))
        except ValueError as exc:
            if self._stamp is None:
                raise ConfigError("MAILINGEST_SENDERS_FILE", str(exc)) from None
            return
        self._stamp = stamp

    def resolve(self, email: str) -> str | None:
        self._load()
        return self._mapping.get(email)

    def __len__(self) -> int:
        return len(self._mapping)


class RedisDirectory:
    """A hash in Redis, edited with ``mailingest senders add|import``."""

    name = "redis"

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def resolve(self, email: str) -> str | None:
        try:
            value = self.redis.hget(SENDERS, email)
        except redis.RedisError as exc:
            raise ResolverError(
                f"sender directory in Redis unavailable: {type(exc).__name__}"
            ) from None
        if value is None:
            return None
        try:  # written by an older version, or by hand: checked as it is read
            return check_entity(as_text(value))
        except ValueError:
            log.warning("sender directory in Redis: the entry of a sender is not an entity")
            return None

    def add(self, email: str, entity: str) -> None:
        email = normalise_email(email)
        if not is_email(email):
            raise ValueError(f"not an e-mail address: {email!r}")
        self.redis.hset(SENDERS, email, check_entity(entity))

    def remove(self, email: str) -> bool:
        return bool(self.redis.hdel(SENDERS, normalise_email(email)))

    def update(self, mapping: dict[str, str]) -> int:
        if mapping:
            self.redis.hset(SENDERS, mapping=cast(Any, mapping))
        return len(mapping)

    def items(self) -> list[tuple[str, str]]:
        raw = self.redis.hgetall(SENDERS)
        return sorted((as_text(k), as_text(v)) for k, v in raw.items())


class HttpLookup:
    """The customer's CRM: ``GET url?email=`` -> ``{"entity_token": ...}``; 404: unknown."""

    name = "crm"

    def __init__(self, url: str, client: httpx.Client | None = None, timeout: float = 10.0) -> None:
        self.url = url
        self.http = client or httpx.Client(timeout=timeout)

    def resolve(self, email: str) -> str | None:
        try:
            response = self.http.get(self.url, params={"email": email})
        except httpx.HTTPError as exc:
            raise ResolverError(f"CRM lookup failed: {type(exc).__name__}") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ResolverError(f"CRM lookup answered {response.status_code}")
        try:
            token = response.json().get("entity_token")
        except (ValueError, AttributeError):
            raise ResolverError("CRM lookup answered something that is not a JSON object") from None
        if not token:
            return None
        try:
            return check_entity(str(token))
        except ValueError as exc:
            raise ResolverError(f"CRM lookup: {exc}") from None


class SenderResolver:
    """Tries each resolver in order; returns ``(entity, resolver name)`` or ``None``."""

    def __init__(self, resolvers: Sequence[Resolver]) -> None:
        self.resolvers = tuple(resolvers)

    def resolve(self, sender: str | None) -> tuple[str, str] | None:
        if not sender:
            return None
        email = normalise_email(sender)
        for resolver in self.resolvers:
            entity = resolver.resolve(email)
            if entity:
                return entity, resolver.name
        return None

    @property
    def names(self) -> Iterable[str]:
        return (r.name for r in self.resolvers)
