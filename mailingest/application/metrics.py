"""Prometheus metrics, served by the worker at ``http://<worker>:<MAILINGEST_METRICS_PORT>/metrics``.

A Celery worker is several processes (prefork): the tasks count in the pool
processes and the main process serves the sum. That is prometheus_client's
multiprocess mode: every process writes its values to files in one directory,
named by ``PROMETHEUS_MULTIPROC_DIR``, which must be set before prometheus_client
is imported. :func:`prepare_multiprocess` does that when the worker starts
(Celery's ``celeryd_init``), before any metric exists; :func:`serve` starts the
HTTP server in the worker's main process. Without a port nothing is written or served, and the
counters are plain in-process ones (``poll-once``, tests).

Each mail is counted once per decision: the counters follow the ledger's
compare-and-set transitions, so a task that runs twice does not count twice.
Quarantine reasons are counted by kind (:func:`reason_kind`), never by their text,
which may name a sender. Two gauges are read from the ledger at scrape time:
the backlog and the age of the oldest mail not yet decided, per inbox.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from mailingest.core.decisions import Backlog
from mailingest.core.reasons import reason_kind
from mailingest.core.states import MailState

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Every metric's name, as the dashboard and the alert rules in deploy/ use them.
METRICS = (
    "mailingest_mails_seen_total",
    "mailingest_mails_processed_total",
    "mailingest_mails_quarantined_total",
    "mailingest_mails_failed_total",
    "mailingest_documents_described_total",
    "mailingest_documents_uploaded_total",
    "mailingest_upload_bytes_total",
    "mailingest_alloy_request_seconds",
    "mailingest_alloy_responses_total",
    "mailingest_alloy_held_total",
    "mailingest_alloy_held_seconds_total",
    "mailingest_alloy_deferred_total",
    "mailingest_imap_poll_seconds",
    "mailingest_oldest_unprocessed_seconds",
    "mailingest_backlog_mails",
)


def prepare_multiprocess() -> None:
    """Give this worker's process tree a private directory for its metric files.

    Call in the worker's main process before the first metric is touched (the
    metrics, and prometheus_client itself, are created on first use). The directory
    is this worker's own (two workers on one host must not add up each other's
    files) and is removed when the process that made it exits.
    """
    if os.environ.get(MULTIPROC_ENV):
        return
    path = tempfile.mkdtemp(prefix="mailingest-metrics-")
    os.environ[MULTIPROC_ENV] = path
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a forked pool process
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    # The celery command may have imported prometheus_client already (Flower's celery
    # subcommand does, when Flower is installed), and it chooses how to keep values
    # when imported: choose again, before the first metric is made.
    import sys

    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]


@functools.cache
def _m() -> SimpleNamespace:
    """The metrics, made on first use: prometheus_client reads PROMETHEUS_MULTIPROC_DIR
    when it is imported, so it is imported here, not at the top of the module."""
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        seen=Counter("mailingest_mails_seen", "Mails found in an inbox and recorded", ["inbox"]),
        processed=Counter(
            "mailingest_mails_processed", "Mails whose every document Alloy confirmed", ["inbox"]
        ),
        quarantined=Counter(
            "mailingest_mails_quarantined",
            "Mails set aside for a person, by kind of reason",
            ["inbox", "reason"],
        ),
        ignored=Counter(
            "mailingest_mails_ignored",
            "Mails no rule of their inbox takes, left in the inbox untouched",
            ["inbox"],
        ),
        replies=Counter(
            "mailingest_replies",
            "Replies to customers by kind and outcome (sent, suppressed, failed, "
            "unconfirmed); why a suppressed one was not sent (a robot, a list, an "
            "unauthenticated sender, the rate limit, ...)",
            ["inbox", "kind", "outcome", "why"],
        ),
        parts_refused=Counter(
            "mailingest_parts_refused",
            "Parts refused by screening in mails whose other documents were filed, by kind",
            ["inbox", "reason"],
        ),
        failed=Counter(
            "mailingest_mails_failed",
            "Mails that ran out of tries (retried automatically later)",
            ["inbox"],
        ),
        described=Counter("mailingest_documents_described", "Documents described to Alloy"),
        uploaded=Counter(
            "mailingest_documents_uploaded", "Documents Alloy confirmed with uploaded: true"
        ),
        upload_bytes=Counter("mailingest_upload_bytes", "Bytes of documents uploaded to Alloy"),
        alloy_seconds=Histogram(
            "mailingest_alloy_request_seconds",
            "Time for Alloy to answer a request",
            ["method", "endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        ),
        alloy_responses=Counter(
            "mailingest_alloy_responses",
            "Alloy's answers by HTTP status (0: no answer: timeout or connection error)",
            ["method", "endpoint", "status"],
        ),
        held=Counter(
            "mailingest_alloy_held",
            "Alloy requests held back before they were sent, by cause: rate_limit (waited "
            "for a token of MAILINGEST_ALLOY_RATE), pause (a worker got a 429)",
            ["cause"],
        ),
        held_seconds=Counter(
            "mailingest_alloy_held_seconds",
            "Seconds Alloy requests were held back before they were sent, by cause",
            ["cause"],
        ),
        deferred=Counter(
            "mailingest_alloy_deferred",
            "Alloy requests not sent because the hold would have been longer than 5 s "
            "(their step is retried after it), by cause",
            ["cause"],
        ),
        poll_seconds=Histogram(
            "mailingest_imap_poll_seconds",
            "Time for one poll of an inbox (fetch new mail, record it, sweep)",
            ["inbox"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        ),
    )


HOLD_CAUSES = ("rate_limit", "pause")


def declare(inboxes: Iterable[str]) -> None:
    """Show each inbox's counters from the start, at zero (a rate needs a first sample)."""
    for inbox in inboxes:
        for counter in (_m().seen, _m().processed, _m().failed):
            counter.labels(inbox)
    for cause in HOLD_CAUSES:
        for counter in (_m().held, _m().held_seconds, _m().deferred):
            counter.labels(cause)


def inbox_of(mail_id: str) -> str:
    return mail_id.split("/", 1)[0]


def mail_seen(inbox: str) -> None:
    _m().seen.labels(inbox).inc()


def mail_decided(mail_id: str, state: str, reason: str) -> None:
    """The ledger moved a mail to a final state (called once per transition)."""
    inbox = inbox_of(mail_id)
    if state == MailState.DONE:
        _m().processed.labels(inbox).inc()
    elif state == MailState.QUARANTINED:
        _m().quarantined.labels(inbox, reason_kind(reason)).inc()
    elif state == MailState.FAILED:
        _m().failed.labels(inbox).inc()
    elif state == MailState.IGNORED:
        _m().ignored.labels(inbox).inc()


def reply_outcome(inbox: str, kind: str, outcome: str, why: str = "") -> None:
    """A reply to a customer was sent, suppressed (not sent: ``why``, a kind), failed
    or left unconfirmed."""
    _m().replies.labels(inbox, kind, outcome, why).inc()


def part_refused(mail_id: str, reason: str) -> None:
    """Screening refused one part of a mail whose other documents go on."""
    _m().parts_refused.labels(inbox_of(mail_id), reason_kind(reason)).inc()


def document_described() -> None:
    _m().described.inc()


def document_uploaded(size: int) -> None:
    _m().uploaded.inc()
    _m().upload_bytes.inc(size)


def alloy_answered(method: str, endpoint: str, status: int, seconds: float) -> None:
    _m().alloy_seconds.labels(method, endpoint).observe(seconds)
    _m().alloy_responses.labels(method, endpoint, str(status)).inc()


def alloy_held(cause: str, seconds: float) -> None:
    """A request waited ``seconds`` before it was sent (``cause``: see HOLD_CAUSES)."""
    _m().held.labels(cause).inc()
    _m().held_seconds.labels(cause).inc(seconds)


def alloy_deferred(cause: str) -> None:
    """A request was not sent: its hold would have been too long; its step is retried."""
    _m().deferred.labels(cause).inc()


@contextmanager
def poll_timer(inbox: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        _m().poll_seconds.labels(inbox).observe(time.perf_counter() - started)


class BacklogCollector:
    """Per inbox, at scrape time: mails not yet decided and the age of the oldest one
    (decisions.backlog: the same backlog `mailingest status` shows)."""

    def __init__(self, inboxes: Iterable[str], backlogs: Callable[[], Mapping[str, Backlog]]):
        self.inboxes = tuple(inboxes)
        self.backlogs = backlogs  # each inbox's backlog, read from the ledger

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        backlog = GaugeMetricFamily(
            "mailingest_backlog_mails", "Mails recorded but not yet decided", labels=["inbox"]
        )
        oldest = GaugeMetricFamily(
            "mailingest_oldest_unprocessed_seconds",
            "Age of the oldest mail recorded but not yet decided (0: none)",
            labels=["inbox"],
        )
        try:
            backlogs = self.backlogs()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even if Redis does not
            log.warning("metrics: cannot read the backlog (%s)", type(exc).__name__)
            return
        for inbox in self.inboxes:
            mine = backlogs.get(inbox, Backlog(0, None))
            backlog.add_metric([inbox], mine.mails)
            oldest.add_metric([inbox], (mine.oldest_ms or 0) / 1000)
        yield backlog
        yield oldest


def serve(port: int, collector: BacklogCollector, host: str = "0.0.0.0") -> Any:
    """Serve every process's metrics and the backlog gauges (in the worker's main process)."""
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    registry = REGISTRY  # one process: its own metrics
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(collector)
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics served on %s:%d/metrics", host, port)
    return registry
