"""The Celery application: ``celery -A mailingest worker|beat`` finds ``app`` here.

Settings are read and validated when this module is imported; a bad setting
stops the process with one line naming each (no traceback).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    before_task_publish,
    celeryd_init,
    worker_init,
)

from mailingest.adapters.broker_queue import SENT_HEADER
from mailingest.application import broker_fix, censor
from mailingest.application.celery_config import celery_config
from mailingest.config.settings import Settings, load_settings
from mailingest.core.errors import ConfigError


def _load() -> Settings:
    try:
        return load_settings(require=("redis", "imap", "alloy"))
    except ConfigError as exc:
        sys.exit("\n".join(f"mailingest: configuration error: {line}" for line in exc.lines()))


settings = _load()
for _name in settings.sender_auth_off:
    print(
        f"mailingest: WARNING: inbox {_name}: sender authentication is off: senders are not "
        "authenticated; anyone who forges a customer's From: address can file documents on "
        "that customer",
        file=sys.stderr,
    )
app = Celery("mailingest", include=["mailingest.application.tasks"])
app.conf.update(celery_config(settings))
broker_fix.install()  # a busy worker survives a Redis restart (see the module)
censor.install()  # no URL's password on Flower's worker page (see the module)


def _not_the_cancel_warning(record: logging.LogRecord) -> bool:
    """On every lost broker connection Celery 5 warns, in seven lines, that Celery 6 will
    cancel the running tasks by default; mailingest keeps them running on purpose
    (``worker_cancel_long_running_tasks_on_connection_loss`` in celery_config), so the log
    keeps its one line for the loss. (A filter on the logger Celery sends warnings to: it
    sets its own warning filters to "always" after any of ours.)"""
    return "worker_cancel_long_running_tasks_on_connection_loss" not in record.getMessage()


logging.getLogger("py.warnings").addFilter(_not_the_cancel_warning)


@before_task_publish.connect
def _stamp_sent(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Every task carries when it was sent: the sweep reads the oldest waiting one's
    (adapters.broker_queue). Hosts' clocks are assumed NTP-close (well within a lease)."""
    if headers is not None:
        headers.setdefault(SENT_HEADER, int(time.time() * 1000))


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    """Correlation fields on every record; JSON lines with MAILINGEST_LOG_FORMAT=json."""
    from mailingest.application.logs import install

    install(logger.handlers, settings.log_format)


@celeryd_init.connect
def _metrics_directory(**_: Any) -> None:
    """A worker with MAILINGEST_METRICS_PORT counts in all its processes: files first."""
    if settings.metrics_port:
        from mailingest.application import metrics

        metrics.prepare_multiprocess()


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """Serve /metrics from the worker's main process, which sees every pool process."""
    if not settings.metrics_port:
        return
    from mailingest.adapters.ledger import Ledger
    from mailingest.application import metrics
    from mailingest.application.services import connect_redis
    from mailingest.core.decisions import Backlog, backlog
    from mailingest.core.states import IN_FLIGHT

    assert settings.redis_url is not None
    ledger = Ledger(connect_redis(settings.redis_url))
    inboxes = [inbox.name for inbox in settings.inboxes]

    def backlogs() -> dict[str, Backlog]:
        now = ledger.now()  # the ledger's clock, as the records' timestamps
        records = ledger.mails(IN_FLIGHT)
        return {inbox: backlog(records, inbox, now) for inbox in inboxes}

    collector = metrics.BacklogCollector(inboxes, backlogs)
    metrics.serve(settings.metrics_port, collector)
