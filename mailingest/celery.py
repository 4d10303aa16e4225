"""The Celery application: ``celery -A mailingest worker|beat`` finds ``app`` here.

Settings are read and validated when this module is imported; a bad setting
stops the process with one line naming it (no traceback).
"""

from __future__ import annotations

import sys

from celery import Celery

from .errors import ConfigError
from .settings import Settings, load_settings


def celery_config(settings: Settings) -> dict:
    # A task never runs longer than the hard limit (the soft one raises inside it first,
    # and the step is retried); the broker's visibility timeout must exceed the hard
    # limit plus the longest retry countdown, or Redis delivers tasks twice.
    hard = settings.task_time_limit
    soft = hard - max(5, hard // 5)
    visibility = hard + settings.retry_cap + 600
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": visibility},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_soft_time_limit": soft,
        "task_time_limit": hard,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": True,
        "beat_schedule": {
            f"poll-{inbox.name}": {
                "task": "mailingest.poll_inbox",
                "schedule": inbox.poll_interval,
                "args": (inbox.name,),
                "options": {"expires": inbox.poll_interval},
            }
            for inbox in settings.inboxes
        },
    }


def _load() -> Settings:
    try:
        return load_settings().require("redis", "imap", "alloy")
    except ConfigError as exc:
        sys.exit(f"mailingest: configuration error: {exc}")


settings = _load()
app = Celery("mailingest", include=["mailingest.tasks"])
app.conf.update(celery_config(settings))
