"""Optional encryption of staged bytes at rest in Redis (``MAILINGEST_STAGING_KEY``).

AES-256-GCM with a random 96-bit nonce per value; the key is 32 bytes, given as
URL-safe base64 (``mailingest`` prints one with ``python -c "import base64, os;
print(base64.urlsafe_b64encode(os.urandom(32)).decode())"``). A sealed value is
``b"MIS1" + nonce + ciphertext``: a value written without a key stays readable
(its prefix tells), so the key can be turned on without draining the queue.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .settings import Secret

MAGIC = b"MIS1"


class SealingError(ValueError):
    """A bad key, or a value that does not open with it."""


class Sealer:
    def __init__(self, key: Secret) -> None:
        try:
            raw = base64.urlsafe_b64decode(key.reveal().encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise SealingError("must be 32 bytes in URL-safe base64") from None
        if len(raw) != 32:
            raise SealingError(f"must be 32 bytes in URL-safe base64, got {len(raw)} bytes")
        self._aead = AESGCM(raw)

    def seal(self, data: bytes) -> bytes:
        nonce = os.urandom(12)
        return MAGIC + nonce + self._aead.encrypt(nonce, data, MAGIC)

    def open(self, value: bytes) -> bytes:
        if not value.startswith(MAGIC):
            return value  # staged before a key was configured
        nonce, body = value[4:16], value[16:]
        try:
            return self._aead.decrypt(nonce, body, MAGIC)
        except InvalidTag:
            raise SealingError("a staged value does not open with MAILINGEST_STAGING_KEY") from None


class Plain:
    """No key configured: values are stored as they are."""

    def seal(self, data: bytes) -> bytes:
        return data

    def open(self, value: bytes) -> bytes:
        return value
