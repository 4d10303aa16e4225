"""The people who may use the operator console, and their passwords (pure logic).

``MAILINGEST_CONSOLE_USERS`` names a file of ``name:role:hash`` lines (``#`` starts a
comment): a role is ``viewer`` (reads) or ``operator`` (also acts), the hash is
``scrypt$<n>$<r>$<p>$<salt>$<key>`` (base64), made by ``mailingest console-user``.
scrypt is in the standard library and costs memory as well as time, so a stolen file
is slow to guess from; passwords are compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

ROLES = ("viewer", "operator")
# scrypt's cost: 2^14 x 8 x 128 bytes = 16 MB and about 50 ms per check on this machine
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_HASH = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


@dataclass(frozen=True)
class ConsoleUser:
    name: str
    role: str
    password_hash: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The stored form of ``password``: ``scrypt$n$r$p$salt$key``."""
    if not password:
        raise ValueError("an empty password")
    salt = salt if salt is not None else os.urandom(16)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(key)])


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` was made from (constant time)."""
    match = _HASH.fullmatch(stored)
    if match is None:
        return False
    n, r, p = (int(match[i]) for i in (1, 2, 3))
    salt, key = base64.b64decode(match[4]), base64.b64decode(match[5])
    try:
        found = _scrypt(password, salt, n, r, p)
    except ValueError:  # a cost scrypt refuses: no password matches it
        return False
    return hmac.compare_digest(found, key)


def user_line(name: str, role: str, password: str) -> str:
    """One line of the users file; ValueError says what is wrong with the name or role."""
    _check(name, role, "")
    return f"{name}:{role}:{hash_password(password)}"


def parse_users(text: str, where: str = "users file") -> Mapping[str, ConsoleUser]:
    """The users of a file's text; ValueError names the first wrong line."""
    users: dict[str, ConsoleUser] = {}
    for number, written in enumerate(text.splitlines(), 1):
        line = written.strip()
        if not line or line.startswith("#"):
            continue
        at = f"{where} line {number}"
        parts = line.split(":")
        if len(parts) != 3:
            raise ValueError(f"{at}: must be name:role:hash (made by `mailingest console-user`)")
        name, role, stored = parts
        _check(name, role, at + ": ")
        if _HASH.fullmatch(stored) is None:
            raise ValueError(f"{at}: the hash is not one `mailingest console-user` makes")
        if name in users:
            raise ValueError(f"{at}: {name!r} is named twice")
        users[name] = ConsoleUser(name, role, stored)
    return users


def _check(name: str, role: str, at: str) -> None:
    if not NAME.fullmatch(name):
        raise ValueError(f"{at}a name is 1-64 letters, digits or ._@+- (got {name!r})")
    if role not in ROLES:
        raise ValueError(f"{at}a role is one of {', '.join(ROLES)} (got {role!r})")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
