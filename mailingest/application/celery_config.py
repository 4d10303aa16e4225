"""The Celery settings that follow from mailingest's settings (a pure function, tested alone)."""

from __future__ import annotations

from typing import Any

from kombu import Queue

from mailingest.application.services import REDIS_OPTIONS
from mailingest.config.settings import Settings

# The broker queues mailingest's tasks wait in (the sweep reads their age). Steps that
# mostly wait on the network (Alloy, the IMAP move) go to "io", which a thread-pool
# worker can serve many at a time; polling, parsing and the sweep stay on "celery"
# (prefork: one CPU-bound step per process). A worker started without -Q serves both.
CPU_QUEUE = "celery"
IO_QUEUE = "io"
QUEUES = (CPU_QUEUE, IO_QUEUE)
IO_TASKS = (
    "mailingest.describe_document",
    "mailingest.upload_document",
    "mailingest.finish_message",
    "mailingest.reply_to_sender",
)

# Sending a task (a step queuing the next one, beat's polls) rides out a broker outage of
# about a minute: kombu reconnects up to 12 times, 0.5 s apart at first, then 1 s more each
# time up to 5 s (about 50 s of waits, plus each reconnection's own few seconds).
PUBLISH_RETRY_POLICY = {
    "max_retries": 12,
    "interval_start": 0.5,
    "interval_step": 1.0,
    "interval_max": 5.0,
}


def celery_config(settings: Settings) -> dict[str, Any]:
    # A task never runs longer than the hard limit (the soft one raises inside it first,
    # and the step is retried); the broker's visibility timeout must exceed the hard
    # limit plus the longest retry countdown, or Redis delivers tasks twice.
    hard = settings.task_time_limit
    soft = hard - max(5, hard // 5)
    loop = min(5.0, *(inbox.poll_interval for inbox in settings.inboxes))
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        # a worker that lost its broker reconnects (2 s, 4 s, ... then every 30 s) for
        # about 45 minutes before it gives up and exits (Celery's defaults, said here)
        "broker_connection_retry": True,
        "broker_connection_max_retries": 100,
        # a task running when the connection is lost keeps running (its Redis commands
        # wait for Redis: services.connect_redis); its ack is lost with the connection,
        # so Redis hands it out again after the visibility timeout, and it finds its
        # work done. Said here, it also keeps Celery's warning about it out of the log.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        # RedBeat keeps the schedule in Redis under a lock: a second beat waits for
        # the first to die (its lock to expire) instead of polling every inbox twice;
        # mailingest's subclass rides out an outage of Redis instead of exiting
        "beat_scheduler": "mailingest.application.beat:Scheduler",
        "redbeat_redis_url": settings.redis_url,
        "redbeat_redis_options": dict(REDIS_OPTIONS),
        "redbeat_key_prefix": "mailingest:redbeat",
        "redbeat_lock_timeout": max(30, int(loop * 6)),
        "beat_max_loop_interval": loop,
        "task_default_queue": CPU_QUEUE,
        "task_queues": [Queue(name, routing_key=name) for name in QUEUES],
        "task_routes": {name: {"queue": IO_QUEUE, "routing_key": IO_QUEUE} for name in IO_TASKS},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_soft_time_limit": soft,
        "task_time_limit": hard,
        "task_serializer": "json",
        "accept_content": ["json"],
        # task events are what Flower shows; where no Flower listens they are only Redis
        # traffic (a PUBLISH per task state), so they are a setting, on where Flower runs
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "worker_hijack_root_logger": True,
        "beat_schedule": beat_schedule(settings),
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """A poll of each inbox every POLL_INTERVAL; where that is longer than a lease, a
    sweep every lease too, so a mail a dead worker held moves again within a minute."""
    schedule: dict[str, dict[str, Any]] = {}
    for inbox in settings.inboxes:
        schedule[f"poll-{inbox.name}"] = {
            "task": "mailingest.poll_inbox",
            "schedule": inbox.poll_interval,
            "args": (inbox.name,),
            "options": {"expires": inbox.poll_interval},
        }
        if inbox.poll_interval > settings.lease:
            schedule[f"sweep-{inbox.name}"] = {
                "task": "mailingest.sweep_inbox",
                "schedule": float(settings.lease),
                "args": (inbox.name,),
                # a sweep still runs when a deep queue delays it (that is when mails
                # stall); the ones that bunch up return at once (pipeline.sweep)
                "options": {"expires": float(settings.stale_after)},
            }
    return schedule
