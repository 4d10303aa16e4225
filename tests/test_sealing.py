"""Staged bytes sealed at rest: round trip, tamper detection, values staged without a key."""

from __future__ import annotations

import base64
import os

import pytest

from mailingest.adapters.encryption import MAGIC, Sealer, SealingError
from mailingest.config.settings import Secret

KEY = Secret(base64.urlsafe_b64encode(bytes(range(32))).decode())


class WithoutEncryptInto:
    """An AEAD as cryptography < 44 offers it (no encrypt_into)."""

    def __init__(self, aead: object) -> None:
        self.aead = aead

    def encrypt(self, *args: object) -> bytes:
        return self.aead.encrypt(*args)  # type: ignore[attr-defined, no-any-return]

    def decrypt(self, *args: object) -> bytes:
        return self.aead.decrypt(*args)  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("old_library", [False, True])
def test_sealed_values_open_to_the_same_bytes_and_hide_them(old_library: bool) -> None:
    sealer = Sealer(KEY)
    if old_library:
        sealer._aead = WithoutEncryptInto(sealer._aead)  # type: ignore[assignment]
    data = os.urandom(100_000)
    sealed = bytes(sealer.seal(data))
    assert sealed.startswith(MAGIC) and len(sealed) == len(data) + 4 + 12 + 16
    assert data[:64] not in sealed
    assert sealer.open(sealed) == data
    assert sealer.open(bytes(sealer.seal(b""))) == b""


def test_a_changed_byte_or_another_key_does_not_open() -> None:
    sealer = Sealer(KEY)
    sealed = bytearray(sealer.seal(b"passport bytes"))
    sealed[-1] ^= 1
    with pytest.raises(SealingError):
        sealer.open(bytes(sealed))
    other = Sealer(Secret(base64.urlsafe_b64encode(os.urandom(32)).decode()))
    with pytest.raises(SealingError):
        other.open(bytes(sealer.seal(b"passport bytes")))


def test_a_value_staged_before_the_key_was_set_still_opens() -> None:
    assert Sealer(KEY).open(b"%PDF-1.7 staged in clear") == b"%PDF-1.7 staged in clear"
