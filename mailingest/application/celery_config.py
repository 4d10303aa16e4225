"""The Celery settings that follow from mailingest's settings (a pure function, tested alone)."""

from __future__ import annotations

from typing import Any

from kombu import Queue

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
)


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
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        # RedBeat keeps the schedule in Redis under a lock: a second beat waits for
        # the first to die (its lock to expire) instead of polling every inbox twice
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "redbeat_redis_url": settings.redis_url,
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
