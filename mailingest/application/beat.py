"""``mailingest beat``'s scheduler: RedBeat's, riding out an outage of Redis.

RedBeat keeps the schedule in Redis under a lock, so that a second beat waits instead of
polling every inbox twice. Stock, a beat exits on the first Redis error of a tick (the
lock's extension raises ``ConnectionError``), and a beat waiting for the lock exits too;
no inbox is polled until a supervisor restarts them. This scheduler, ``mailingest.
application.beat:Scheduler`` in ``celery_config``, keeps them running:

* a tick that meets an outage of Redis or the broker (a refused or dropped connection, a
  timeout, a Redis loading its data after a restart, a replica not yet promoted) sends
  nothing and returns a backoff delay (1 s doubling to :data:`BACKOFF_CAP`, with jitter)
  instead of raising. The log says in one line that the outage began (and why) and in one
  line that it ended (and how long it lasted);
* when Redis answers again, the static schedule is written again (a Redis that lost its
  data would otherwise hold no entries, and beat would send nothing), then the lock is
  extended as usual;
* a lock that expired meanwhile (an outage longer than ``redbeat_lock_timeout``) or that
  Redis lost is taken again only if no other beat took it: one beat sends, the other
  waits, as before the outage;
* the lock is taken by the ticks, without blocking (RedBeat takes it in ``beat_init`` and
  blocks there, where an outage ends the process); a beat without it sends nothing and
  tries again every ``max_interval``;
* an error that is not an outage (a refused password, a bug) still ends the process: a
  restart then stops at start-up with one line (``mailingest beat`` checks Redis first).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.beat import Scheduler as CeleryScheduler
from celery.beat import SchedulingError
from celery.signals import beat_init
from kombu.exceptions import OperationalError
from redbeat.schedulers import (
    LUA_EXTEND_TO_SCRIPT,
    RedBeatScheduler,
    acquire_distributed_beat_lock,
    get_redis,
)
from redis.exceptions import LockError

from mailingest.application.outage import Backoff, Outage
from mailingest.application.services import Unavailable, is_outage, problem
from mailingest.config.settings import redact_url

log = logging.getLogger(__name__)
celery_beat_log = logging.getLogger("celery.beat")  # RedBeat's and Celery's beat lines

BACKOFF_FIRST, BACKOFF_CAP = 1.0, 5.0


class Scheduler(RedBeatScheduler):  # type: ignore[misc]  # RedBeat ships no type information
    """RedBeat's scheduler whose ticks ride out an outage of Redis (see the module)."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        # beat sends polls and sweeps only, which send no task events either (tasks.py):
        # no "sent" event of theirs in Flower, where every few seconds they buried the
        # mail tasks
        app.conf.task_send_sent_event = False
        # RedBeat writes the static schedule here: Redis must answer at start-up
        super().__init__(app, **kwargs)
        self.backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        url = str(app.redbeat_conf.redis_url)
        self.redis_url = url
        self.outage = Outage(
            f"beat: Redis at {redact_url(url)}",
            log,
            retrying=f"no poll is sent; trying again every {BACKOFF_CAP:g} s at most",
        )
        self.waiting = False  # another beat holds the lock (logged once)

    # -- the tick -------------------------------------------------------------------
    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            return self._tick(min, **kwargs)
        except LockError:  # our lock expired, or Redis lost it: never send without it
            log.warning(
                "beat: lost the lock %s (it expired while Redis was unreachable, or Redis "
                "lost it); no poll is sent until this beat holds it again",
                self.lock_key,
            )
            self.lock = None
            return 0.0  # take it again at once, unless another beat took it meanwhile
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.outage.failed(self._problem(exc))
            return self.backoff.delay()

    def _problem(self, exc: BaseException) -> str:
        """The error, without a password: Redis's, or the broker's if sending failed."""
        if isinstance(exc, OperationalError):  # kombu's: a task could not be sent
            broker = str(self.app.conf.broker_url or "")
            scrubbed = Unavailable("Redis (Celery broker)", broker, problem(exc)).problem
            return f"sending to the broker at {redact_url(broker)}: {scrubbed}"
        return Unavailable("Redis", self.redis_url, problem(exc)).problem

    def _tick(self, min: Any, **kwargs: Any) -> float:
        if self.outage.away:
            get_redis(self.app).ping()
            self.setup_schedule()  # the static entries, if Redis lost them
            self.outage.answered()
            self.backoff.reset()
        if self.lock_key and self.lock is None and not self._take_lock():
            return float(self.max_interval)
        return float(super().tick(min=min, **kwargs))

    def _take_lock(self) -> bool:
        """Take the lock if no other beat holds it (RedBeat's lock, without blocking)."""
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        # RedBeat's extension sets the timeout instead of adding to it
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not lock.acquire(blocking=False):
            if not self.waiting:
                log.info(
                    "beat: another beat holds the lock %s; this one sends nothing and takes "
                    "over within %s s if that one stops",
                    self.lock_key,
                    self.lock_timeout,
                )
            self.waiting = True
            return False
        self.waiting = False
        celery_beat_log.info("beat: Acquired lock")  # RedBeat's words
        self.lock = lock
        return True

    def maybe_due(self, entry: Any, **kwargs: Any) -> Any:
        """RedBeat's, except that an outage while sending ends the tick as an outage
        (one line) instead of a traceback per entry."""
        is_due, next_time_to_run = entry.is_due()
        if is_due:
            celery_beat_log.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
            try:
                self.apply_async(entry, **kwargs)
            except Exception as exc:  # noqa: BLE001 - as RedBeat: logged, the next entry goes on
                wrapped = isinstance(exc, SchedulingError)  # Celery wraps what sending raised
                cause = (exc.__cause__ or exc.__context__) if wrapped else exc
                if cause is not None and is_outage(cause):
                    raise cause from None
                celery_beat_log.exception("Scheduler: Message Error: %s", exc)
        return next_time_to_run

    def close(self) -> None:
        """Release the lock if Redis answers; if not, it expires by itself."""
        lock, self.lock = self.lock, None
        if lock is not None:
            try:
                if lock.owned():
                    celery_beat_log.info("beat: Releasing lock")
                    lock.release()
            except Exception as exc:
                if not (is_outage(exc) or isinstance(exc, LockError)):
                    raise
                log.warning(
                    "beat: the lock %s was not released (%s); it expires within %s s",
                    self.lock_key,
                    self._problem(exc),
                    self.lock_timeout,
                )
        CeleryScheduler.close(self)  # not RedBeat's: it would release the lock again


# RedBeat takes the lock in beat_init and blocks there until it has it: an outage while a
# second beat waits there ends that beat. This scheduler takes it in its ticks instead.
beat_init.disconnect(acquire_distributed_beat_lock)


@beat_init.connect
def _lock_other_schedulers(sender: Any = None, **kwargs: Any) -> None:
    """RedBeat's own scheduler (if configured instead) still takes the lock its way."""
    if not isinstance(sender.scheduler, Scheduler):
        acquire_distributed_beat_lock(sender=sender, **kwargs)
