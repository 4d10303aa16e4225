"""Staged bytes: the raw mail and each document, under a TTL, encrypted at rest when a
key is set. They pass between tasks by key and never travel through the broker."""

from __future__ import annotations

from mailingest.adapters import keys
from mailingest.adapters.ledger.base import Store


class Staging(Store):
    """The ledger's staged bytes."""

    def restage(self, mail_id: str, raw: bytes) -> None:
        self.redis.set(keys.raw(mail_id), self.sealer.seal(raw), ex=self.staging_ttl)

    def raw(self, mail_id: str) -> bytes | None:
        value = self.redis.get(keys.raw(mail_id))
        return self.sealer.open(value) if isinstance(value, bytes) else None

    def drop_raw(self, mail_id: str) -> None:
        self.redis.delete(keys.raw(mail_id))

    def restage_blob(self, mail_id: str, index: int, payload: bytes) -> None:
        self.redis.set(keys.blob(mail_id, index), self.sealer.seal(payload), ex=self.staging_ttl)

    def blob(self, mail_id: str, index: int) -> bytes | None:
        value = self.redis.get(keys.blob(mail_id, index))
        return self.sealer.open(value) if isinstance(value, bytes) else None

    def drop_staged(self, mail_id: str, count: int) -> None:
        """Forget the mail's and its documents' bytes (once it left the inbox)."""
        self.redis.delete(keys.raw(mail_id), *(keys.blob(mail_id, i) for i in range(count)))
