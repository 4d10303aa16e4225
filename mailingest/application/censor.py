"""What Celery shows of its configuration (Flower's worker page, ``celery inspect conf``)
says no secret: every URL's password is masked, whatever the setting is called.

Celery masks settings whose name says they are secret (``*_PASSWORD``, ``*_KEY``, ...)
and the broker and result URLs, but not the others: RedBeat's ``redbeat_redis_url``
showed a Redis password in Flower. :func:`install` wraps the filter Celery's
``Settings.table(censored=True)`` applies, so a URL with a password in any setting shows
as ``redis://:********@host:6379/0`` (``tests/test_flower.py`` reads Flower's pages with a
password set and finds none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any

import celery.app.utils as celery_utils
from kombu.utils.url import maybe_sanitize_url

MARK = "_mailingest_censors_urls"


def install() -> None:
    original: Callable[..., dict[str, Any]] = celery_utils.filter_hidden_settings
    if getattr(original, MARK, False):
        return

    @wraps(original)
    def filter_hidden_settings(conf: Mapping[str, Any]) -> dict[str, Any]:
        return {key: _masked(value) for key, value in original(conf).items()}

    setattr(filter_hidden_settings, MARK, True)
    celery_utils.filter_hidden_settings = filter_hidden_settings


def _masked(value: object) -> object:
    if isinstance(value, str) and "://" in value:
        return maybe_sanitize_url(value, mask="*" * 8)
    if isinstance(value, Mapping):
        return {k: _masked(v) for k, v in value.items()}
    return value
