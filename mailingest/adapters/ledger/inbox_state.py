"""Per inbox: the poll's single flight, the watermark of each folder and epoch, the last
poll's outcome, and the UIDs that cannot be fetched."""

from __future__ import annotations

from typing import Any

import redis
import redis.lock

from mailingest.adapters import keys
from mailingest.adapters.ledger.base import Store, decode


class InboxState(Store):
    """Per-inbox state of the ledger."""

    def poll_lock(self, inbox: str, *, timeout: float) -> redis.lock.Lock:
        """Single flight for one inbox's poll; expires by itself if its holder dies."""
        lock: redis.lock.Lock = self.redis.lock(keys.poll_lock(inbox), timeout=timeout)
        return lock

    def ask_repoll(self, inbox: str, *, ttl: float) -> None:
        """A poll was asked for while another ran: the running one polls once more."""
        self.redis.set(keys.repoll(inbox), 1, px=int(ttl * 1000))

    def take_repoll(self, inbox: str) -> bool:
        return bool(self.redis.delete(keys.repoll(inbox)))

    def watermark(self, inbox: str, folder: str, uidvalidity: int) -> int:
        value = self.redis.get(keys.watermark(inbox, folder, uidvalidity))
        return int(value) if value else 0

    def advance_watermark(self, inbox: str, folder: str, uidvalidity: int, uid: int) -> None:
        key = keys.watermark(inbox, folder, uidvalidity)
        current = self.redis.get(key)
        if current is None or int(current) < uid:
            self.redis.set(key, uid)

    def record_poll(self, inbox: str, *, found: int, error: str = "") -> None:
        fields: dict[Any, Any] = {"at": self.now(), "found": found, "error": error}
        if not error:
            fields["ok_at"] = fields["at"]
        self.redis.hset(keys.poll_status(inbox), mapping=fields)

    def record_sweep(self, inbox: str) -> None:
        self.redis.hset(keys.poll_status(inbox), "swept_at", self.now())

    def record_idle(self, inbox: str, doing: str) -> None:
        """What ``mailingest watch`` is doing with the inbox (watching, reconnecting: ...)."""
        self.redis.hset(keys.poll_status(inbox), mapping={"idle": doing, "idle_at": self.now()})

    def swept_at(self, inbox: str) -> int:
        """When the inbox was last swept (ms on the ledger's clock; 0: never)."""
        return int(self.redis.hget(keys.poll_status(inbox), "swept_at") or 0)

    def poll_status(self, inbox: str) -> dict[str, str]:
        return decode(self.redis.hgetall(keys.poll_status(inbox)))

    def unfetchable(self, inbox: str, uidvalidity: int, uid: int) -> int:
        """Count one more poll that found ``uid`` but got no body for it."""
        key = keys.unfetchable(inbox, uidvalidity, uid)
        count = int(self.redis.incr(key))
        self.redis.expire(key, 7 * 86400)
        return count
