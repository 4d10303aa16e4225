"""Leases: who is working on what right now, kept alive by a heartbeat.

A lease is a Redis key (``SET key token NX PX lease``) that a running step or poll
holds. Its token names the holder (``<worker>:<random>``), so ``mailingest status``
can say who holds it. The process that holds it renews every lease it holds every
``lease / 3`` seconds from one background thread (:class:`Heartbeat`), one round trip
for all of them; a holder that dies (kill -9, a lost host) or freezes stops renewing,
and its lease lapses within ``MAILINGEST_LEASE`` seconds. The sweep then knows the
mail is not being worked on, without waiting for a task time limit.

Taking a lease also writes a note of it (``keys.lease_note``: the token, kept for
``NOTE_MS``), and giving it back removes the note, in the same script. A lease that is
gone while its note stays *lapsed*: its holder died or hung mid-step (or could not give
it back: Redis away at that moment). The sweep queues such a mail again once it has
been idle a lease, without waiting to see whether a task of it still waits in the
broker. A live holder whose lease expired (Redis away for longer than the heartbeat
can bridge) takes it again at its next renewal while its note is still its own.

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
from mailingest.core.decisions import Liveness, Step

log = logging.getLogger(__name__)

# KEYS: lease keys, then their notes; ARGV: lease ms, then one token per lease key.
# Renews each lease still held by its token; takes again one that expired while its
# note is still this holder's (the holder lived through a Redis outage); returns the
# 1-based positions of the ones lost.
RENEW = """
local n = #KEYS / 2
local lost = {}
for i = 1, n do
  local token = ARGV[i + 1]
  local held = redis.call('GET', KEYS[i])
  if held == token then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  elseif not held and redis.call('GET', KEYS[n + i]) == token then
    redis.call('SET', KEYS[i], token, 'PX', ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

# KEYS[1] lease key, KEYS[2] its note; ARGV[1] token, ARGV[2] lease ms, ARGV[3] note ms.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS: lease keys, then their notes: the note of each lease no longer held goes.
FORGET = """
local n = #KEYS / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('DEL', KEYS[n + i]) end
end
return 1
"""

# KEYS[1] lease key, KEYS[2] its note; ARGV[1] token. Deletes the lease and its note
# only while they are still ours.
RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# How long a note outlives its lease's taking: past the longest a step may run and the
# sweep's backstop, after which the sweep's other rules apply anyway.
NOTE_MS = 30 * 60 * 1000


def step_lease_keys(mail_id: str, documents: int) -> list[str]:
    """The keys of every lease a step of this mail can hold."""
    steps = [Step("ingest", mail_id), Step("finish", mail_id)]
    steps += [Step(task, mail_id, i) for i in range(documents) for task in ("describe", "upload")]
    return [keys.step_lock(step.lock_name) for step in steps]


def worker_name() -> str:
    """This process as ops know it: ``host:pid`` (Celery's node name is per worker, not
    per pool process)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder(token: bytes | str) -> str:
    """``host:pid`` of a lease's token (``host:pid:random``)."""
    return keys.as_text(token).rsplit(":", 1)[0]


@dataclass(frozen=True)
class MailLeases:
    """A mail's leases as the sweep reads them: who holds one (empty: nobody), and the
    keys of those that lapsed (their holder died or hung mid-step)."""

    holder: str
    lapsed: list[str]

    def liveness(self, queued_since: int | None) -> Liveness:
        """What the sweep and ``status`` decide by (decisions.stuck)."""
        return Liveness(
            leased=bool(self.holder), queued_since=queued_since, lapsed=bool(self.lapsed)
        )


NO_LEASES = MailLeases("", [])  # a mail none of whose leases is held or lapsed


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
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._forget = client.register_script(FORGET)
        self._heartbeat = Heartbeat(self) if heartbeat else None

    def acquire(self, key: str) -> Lease | None:
        """The lease on ``key``, or None when another holder has it."""
        token = f"{worker_name()}:{uuid.uuid4().hex[:12]}"
        note = keys.lease_note(key)
        if not self._acquire(keys=[key, note], args=[token, self.lease_ms, NOTE_MS]):
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
        self._release(keys=[lease.key, keys.lease_note(lease.key)], args=[lease.token])

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
        names = [h.key for h in held]
        lost = self._renew(
            keys=[*names, *(keys.lease_note(k) for k in names)],
            args=[self.lease_ms, *(h.token for h in held)],
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
        return [None if v is None else _holder(v) for v in self.redis.mget(names)]

    def mail_holders(self, mails: Sequence[tuple[str, int]]) -> dict[str, str]:
        """Of these (mail id, documents), the ones a step holds a lease on now, and who
        holds it (``host:pid``); one round trip."""
        return {
            mail_id: seen.holder for mail_id, seen in self.mail_leases(mails).items() if seen.holder
        }

    def mail_leases(self, mails: Sequence[tuple[str, int]]) -> dict[str, MailLeases]:
        """Of these (mail id, documents), the ones with a lease held or lapsed: who holds
        one, and which lapsed (taken, never given back, gone). One atomic round trip."""
        names = [step_lease_keys(mail_id, documents) for mail_id, documents in mails]
        flat = [key for group in names for key in group]
        if not flat:
            return {}
        both = self.redis.mget([*flat, *(keys.lease_note(k) for k in flat)])  # one moment
        values, notes = both[: len(flat)], both[len(flat) :]
        out: dict[str, MailLeases] = {}
        position = 0
        for (mail_id, _), group in zip(mails, names, strict=True):
            held = values[position : position + len(group)]
            noted = notes[position : position + len(group)]
            position += len(group)
            holder = next((_holder(v) for v in held if v is not None), "")
            lapsed = [k for k, v, n in zip(group, held, noted, strict=True) if v is None and n]
            if holder or lapsed:
                out[mail_id] = MailLeases(holder, lapsed)
        return out

    def forget(self, names: Sequence[str]) -> None:
        """Drop the notes of these leases where they lapsed (their mail was queued
        again); a lease taken again meanwhile keeps its note."""
        if names:
            self._forget(keys=[*names, *(keys.lease_note(k) for k in names)])

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
