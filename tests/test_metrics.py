"""Metrics: quarantine reasons by kind, the backlog gauges, one directory per worker."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailingest.application.metrics import BacklogCollector
from mailingest.core.decisions import Backlog
from mailingest.core.reasons import reason_kind
from mailingest.core.screening import screen

from .corpus import AUTH, CASES, LIMITS


@pytest.mark.parametrize("case", [c for c in CASES if c.refusal], ids=lambda c: c.name)
def test_every_refusal_of_the_corpus_has_a_kind(case) -> None:  # type: ignore[no-untyped-def]
    refusal = screen(case.raw, LIMITS, AUTH).refusal
    assert refusal is not None
    assert reason_kind(refusal) != "other", refusal


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("unknown sender bob@x.example: no entity in the sender directory", "unknown_sender"),
        ("no single sender address in From:", "no_sender"),
        ("message too large: 50000000 bytes (limit 41943040)", "message_too_large"),
        (
            "document 0 (passport.pdf): Alloy describe answered 400/4002: bad type",
            "alloy_rejected",
        ),
        (
            "document 1 (bill.pdf): Alloy already holds other bytes for D-x",
            "alloy_conflict",
        ),
        ("something nobody foresaw", "other"),
    ],
)
def test_pipeline_reasons_by_kind(reason: str, kind: str) -> None:
    assert reason_kind(reason) == kind


def test_backlog_gauges_per_inbox_and_silence_when_redis_is_down() -> None:
    collector = BacklogCollector(["eu", "us"], lambda: {"eu": Backlog(2, 90_000)})
    families = {f.name: f for f in collector.collect()}
    backlog = {s.labels["inbox"]: s.value for s in families["mailingest_backlog_mails"].samples}
    oldest = {
        s.labels["inbox"]: s.value
        for s in families["mailingest_oldest_unprocessed_seconds"].samples
    }
    assert backlog == {"eu": 2, "us": 0}
    assert oldest == {"eu": 90, "us": 0}

    def down() -> dict[str, Backlog]:
        raise ConnectionError("redis down")

    assert list(BacklogCollector(["eu"], down).collect()) == []


def test_a_worker_counts_in_files_even_after_flower_imported_prometheus_first() -> None:
    """The celery command loads Flower's plugin, which imports prometheus_client before
    the worker starts: the metrics must still go to this worker's own directory."""
    code = """
import os, prometheus_client  # as Flower's celery plugin does, before anything else
from mailingest.application import metrics
metrics.prepare_multiprocess()
path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
metrics.mail_seen("eu")
print(sorted(os.listdir(path)))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={}
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("['counter_")
