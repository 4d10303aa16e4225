"""Leases: who is working on what right now, kept alive by a heartbeat.

A lease is a Redis key (``SET key token NX PX lease``) that a running step or poll
holds. Its token names the holder (``<worker>:<random>``), so ``mailingest status``
can say who holds it. The process that holds it renews every lease it holds every
``lease / 3`` seconds from one background thread (:class:`Heartbeat`), one round trip
for all of them; a holder that dies (kill -9, a lost host) or freezes stops renewing,
and its lease lapses within ``MAILINGEST_LEASE`` seconds. The sweep then knows the
mail is not being worked on, without waiting for a task time limit.

A lease is not a fence: a frozen holder may wake after its lease lapsed and go on.
What must not happen twice (a describe POST, a MOVE) is fenced in the ledger itself.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from mailingest.adapters import keys
from mailingest.core.decisions import Step

log = logging.getLogger(__name__)

# KEYS: lease keys; ARGV: lease ms, then one token per key. Renews each key still held
# by its token; returns the 1-based positions of the ones lost.
RENEW = """
local lost = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

# KEYS[1] lease key; ARGV[1] token. Deletes it only while it is still ours.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def step_lease_keys(mail_id: str, documents: int) -> list[str]:
    """The keys of every lease a step of this mail can hold."""
    steps = [Step("ingest", mail_id), Step("finish", mail_id)]
    steps += [Step(task, mail_id, i) for i in range(documents) for task in ("describe", "upload")]
    return [keys.step_lock(step.lock_name) for step in steps]


def worker_name() -> str:
    """This process as ops know it: ``host:pid`` (Celery's node name is per worker, not
    per pool process)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Lease:
    key: str
    token: str
    lost: bool = False  # the heartbeat found it taken or gone
    taken: float = 0.0  # time.monotonic() when it was taken


class Leases:
    """Take, renew and give back leases; read who holds one."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        lease_ms: int,
        heartbeat: bool = True,
        max_hold_ms: int | None = None,
    ) -> None:
        self.redis = client
        self.lease_ms = lease_ms
        # no step runs longer than the task time limit; a lease held longer than this
        # is a hung holder (a thread pool enforces no time limit): it is let lapse
        self.max_hold_ms = max_hold_ms
        self._held: dict[str, Lease] = {}
        self._guard = threading.Lock()
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._heartbeat = Heartbeat(self) if heartbeat else None

    def acquire(self, key: str) -> Lease | None:
        """The lease on ``key``, or None when another holder has it."""
        token = f"{worker_name()}:{uuid.uuid4().hex[:12]}"
        if not self.redis.set(key, token, nx=True, px=self.lease_ms):
            return None
        lease = Lease(key, token, taken=time.monotonic())
        with self._guard:
            self._held[key] = lease
        if self._heartbeat is not None:
            self._heartbeat.ensure_running()
        return lease

    def release(self, lease: Lease) -> None:
        with self._guard:
            if self._held.get(lease.key) is lease:  # not a newer lease on the same key
                del self._held[lease.key]
        self._release(keys=[lease.key], args=[lease.token])

    def renew(self) -> int:
        """Renew every lease this process holds (one round trip); return how many."""
        with self._guard:
            held = list(self._held.values())
            if self.max_hold_ms is not None:
                limit = time.monotonic() - self.max_hold_ms / 1000
                for lease in [h for h in held if h.taken < limit]:
                    del self._held[lease.key]
                    lease.lost = True
                    log.error(
                        "lease %s held for more than %d s: no longer renewed (a hung step?)",
                        lease.key,
                        self.max_hold_ms // 1000,
                    )
                held = [h for h in held if not h.lost]
        if not held:
            return 0
        lost = self._renew(
            keys=[h.key for h in held], args=[self.lease_ms, *(h.token for h in held)]
        )
        for position in lost:
            lease = held[int(position) - 1]
            with self._guard:
                if self._held.get(lease.key) is not lease:
                    continue  # released meanwhile (and perhaps taken again): not lost
                del self._held[lease.key]
            lease.lost = True
            log.warning("lease %s lapsed while held (a pause longer than the lease?)", lease.key)
        return len(held)

    def holders(self, names: Sequence[str]) -> list[str | None]:
        """Who holds each of these leases (``host:pid``), or None (one round trip)."""
        if not names:
            return []
        values = self.redis.mget(names)
        return [None if v is None else keys.as_text(v).rsplit(":", 1)[0] for v in values]

    def mail_holders(self, mails: Sequence[tuple[str, int]]) -> dict[str, str]:
        """Of these (mail id, documents), the ones a step holds a lease on now, and who
        holds it (``host:pid``); one round trip."""
        names = [step_lease_keys(mail_id, documents) for mail_id, documents in mails]
        holders = iter(self.holders([key for group in names for key in group]))
        held: dict[str, str] = {}
        for (mail_id, _), group in zip(mails, names, strict=True):
            found = [holder for holder in (next(holders) for _ in group) if holder]
            if found:
                held[mail_id] = found[0]
        return held

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()


class Heartbeat:
    """One daemon thread per process renewing its leases every lease / 3 seconds.

    Started on the first lease taken (after a fork: a worker builds its context in the
    child), so a process that takes none runs none. A renewal that fails (Redis away for
    a moment) is retried at the next beat; the lease lapses only if that lasts longer
    than two beats."""

    def __init__(self, leases: Leases) -> None:
        self.leases = leases
        self.interval = leases.lease_ms / 3000
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pid = 0

    def ensure_running(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mailingest-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.leases.renew()
            except redis.RedisError as exc:
                log.warning("heartbeat: could not renew leases: %s", type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
