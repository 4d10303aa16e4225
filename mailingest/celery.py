"""The Celery application: ``celery -A mailingest worker|beat`` finds ``app`` here.

Settings are read and validated when this module is imported; a bad setting
stops the process with one line naming it (no traceback).
"""

from __future__ import annotations

import sys

from celery import Celery

from .celeryconf import celery_config
from .errors import ConfigError
from .settings import Settings, load_settings


def _load() -> Settings:
    try:
        return load_settings().require("redis", "imap", "alloy")
    except ConfigError as exc:
        sys.exit(f"mailingest: configuration error: {exc}")


settings = _load()
for _name in settings.sender_auth_off:
    print(
        f"mailingest: WARNING: inbox {_name}: sender authentication is off: senders are not "
        "authenticated; anyone who forges a customer's From: address can file documents on "
        "that customer",
        file=sys.stderr,
    )
app = Celery("mailingest", include=["mailingest.tasks"])
app.conf.update(celery_config(settings))
