"""Logging: text for people, JSON for log pipelines (``MAILINGEST_LOG_FORMAT=json``).

Every record carries the correlation fields of the work it belongs to, so one mail
can be followed across processes and hosts: ``inbox``, ``mail_id``, ``uid``,
``message_id`` once the mail is parsed, ``document`` (the index) and
``document_token`` once Alloy gave one, plus the Celery ``task_id`` and
``task_name``. The pipeline sets them with :func:`correlated` / :func:`correlate`;
:class:`CorrelationFilter` puts them on each record. None of them is sensitive:
no sender address, subject, body, bytes, password or token of ours.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("inbox", "mail_id", "uid", "message_id", "document", "document_token")

_context: ContextVar[Mapping[str, object]] = ContextVar(
    "mailingest_log_context", default=MappingProxyType({})
)


@contextmanager
def correlated(**fields: object) -> Iterator[None]:
    """Records logged inside the block carry these fields (and those set by correlate)."""
    token = _context.set({**_context.get(), **_clean(fields)})
    try:
        yield
    finally:
        _context.reset(token)


def correlate(**fields: object) -> None:
    """Add fields learnt on the way (a Message-ID, a document token) to the current block."""
    _context.set({**_context.get(), **_clean(fields)})


def _clean(fields: dict[str, object]) -> dict[str, object]:
    unknown = set(fields) - set(FIELDS)
    if unknown:  # pragma: no cover - programming error
        raise ValueError(f"not a correlation field: {', '.join(sorted(unknown))}")
    return {k: v for k, v in fields.items() if v not in (None, "")}


class CorrelationFilter(logging.Filter):
    """Puts the correlation fields, and the Celery task if any, on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            setattr(record, name, value)
        task = _current_task()
        if task is not None and not hasattr(record, "task_id"):
            record.task_id = task.request.id
            record.task_name = task.name
        return True


def _current_task() -> Any:
    if "celery" not in sys.modules:
        return None
    from celery import current_task

    return current_task if current_task and current_task.request.id else None


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def install(handlers: list[logging.Handler], log_format: str) -> None:
    """Give these handlers the correlation filter, and the JSON format if asked for."""
    for handler in handlers:
        if not any(isinstance(f, CorrelationFilter) for f in handler.filters):
            handler.addFilter(CorrelationFilter())
        if log_format == "json":
            handler.setFormatter(json_formatter())


def setup(level: str = "info", log_format: str = "text") -> None:
    """Logging for the commands that are not Celery processes (poll-once, replay, ...)."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT, stream=sys.stderr)
    install(logging.getLogger().handlers, log_format)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
