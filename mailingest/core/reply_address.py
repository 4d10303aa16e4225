"""Signed reply addresses: a mail to ``docs+<external id>.<mac>@support.example`` is
filed on that external entity id, whatever its From.

The support team hands each customer an address of their own (plus addressing on the
inbox's address). ``<mac>`` is the first 10 characters of the base32 HMAC-SHA256 of
the external id under ``MAILINGEST_ADDRESS_KEY`` (50 bits: guessing one for another
customer's id takes about 10^15 tries), so a customer cannot file on someone else's
entity by editing the address. An address whose MAC does not match is ignored, and
says so; the sender directory then decides as for any mail. Sender authentication
still applies to every mail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EXTERNAL_ID", "Route", "address", "mac", "route"]

EXTERNAL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # fits a local part and an Alloy path
MAC_LENGTH = 10


def mac(key: bytes, external_id: str) -> str:
    digest = hmac.new(key, external_id.encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode().lower()[:MAC_LENGTH]


def address(base: str, key: bytes, external_id: str) -> str:
    """The signed address of ``external_id`` on the inbox address ``base``."""
    if not EXTERNAL_ID.match(external_id):
        raise ValueError(f"an external id is 1-64 letters, digits, '-' or '_', got {external_id!r}")
    local, _, domain = base.rpartition("@")
    return f"{local}+{external_id}.{mac(key, external_id)}@{domain}"


@dataclass(frozen=True)
class Route:
    """The external id a mail's signed address names (None: none, or none valid), and
    what was ignored on the way ("" when nothing was)."""

    external_id: str | None
    ignored: str = ""


def route(recipients: Sequence[str], base: str, key: bytes) -> Route:
    """The external id of the signed address among ``recipients`` (To, Cc,
    Delivered-To, X-Original-To) on the inbox address ``base``."""
    local_base, _, domain = base.lower().rpartition("@")
    prefix = local_base + "+"
    found: set[str] = set()
    ignored: list[str] = []
    for recipient in recipients:
        local, _, at = recipient.rpartition("@")
        if at.lower() != domain or not local.lower().startswith(prefix):
            continue
        tag = local[len(prefix) :]
        external_id, dot, given = tag.rpartition(".")
        if not dot or not EXTERNAL_ID.match(external_id):
            ignored.append(f"{recipient}: not <external id>.<mac>")
        elif not hmac.compare_digest(given.lower(), mac(key, external_id)):
            ignored.append(f"{recipient}: its MAC does not match")
        else:
            found.add(external_id)
    if len(found) > 1:
        ignored.append(f"signed addresses of several entities ({', '.join(sorted(found))})")
        return Route(None, "; ".join(ignored))
    return Route(next(iter(found), None), "; ".join(ignored))
