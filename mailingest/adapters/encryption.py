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

from mailingest.config.secret import Secret

MAGIC = b"MIS1"
TAG_BYTES = 16  # the GCM tag after the ciphertext


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

    def seal(self, data: bytes) -> bytes | bytearray:
        nonce = os.urandom(12)
        if not hasattr(self._aead, "encrypt_into"):  # cryptography < 44
            return MAGIC + nonce + self._aead.encrypt(nonce, data, MAGIC)
        # written in place: a staged 34 MB mail is not copied to put the prefix first
        out = bytearray(len(MAGIC) + len(nonce) + len(data) + TAG_BYTES)
        out[:16] = MAGIC + nonce
        self._aead.encrypt_into(nonce, data, MAGIC, memoryview(out)[16:])
        return out

    def open(self, value: bytes) -> bytes:
        if not value.startswith(MAGIC):
            return value  # staged before a key was configured
        view = memoryview(value)  # no copies of the body to split off the prefix
        try:
            return self._aead.decrypt(view[4:16], view[16:], MAGIC)
        except InvalidTag:
            raise SealingError("a staged value does not open with MAILINGEST_STAGING_KEY") from None


class Plain:
    """No key configured: values are stored as they are."""

    def seal(self, data: bytes) -> bytes | bytearray:
        return data

    def open(self, value: bytes) -> bytes:
        return value
