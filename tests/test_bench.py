"""The benchmark harness stays runnable: its command line, and a workload mailingest accepts.

The benchmark itself is not part of the test run (`python -m bench`, minutes to
tens of minutes); this only keeps it from rotting between runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mailingest_testbed.samples import AUTHSERV_ID

from bench.workload import crlf, make_mail
from mailingest.core.screening import Limits, screen
from mailingest.core.sender_auth import AuthPolicy

ROOT = Path(__file__).resolve().parent.parent


def test_the_bench_command_answers_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--sizes" in proc.stdout


def test_the_workload_is_deterministic_and_accepted_as_sent() -> None:
    raw, spec = make_mail(7, 3)
    assert make_mail(7, 3)[0] == raw  # the same mails for every system and every run
    assert 1 <= len(spec.docs) <= 3
    result = screen(crlf(raw), Limits(), AuthPolicy(trusted_authserv_ids=(AUTHSERV_ID,)))
    assert result.refusal is None, result.refusal
    assert sorted((d.spec.name, d.spec.extension) for d in result.documents) == sorted(
        (d.name, d.extension) for d in spec.docs
    )
    assert [len(d.payload) for d in result.documents] == [d.size for d in spec.docs]


@pytest.mark.servers
def test_the_console_benchmark_runs(tmp_path: Path) -> None:
    """`python -m bench console` on a small ledger: its section, every page answered."""
    pytest.importorskip("starlette")
    out = tmp_path / "console.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "console",
            "--records",
            "300",
            "--repeat",
            "3",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("## 7. The console with 300 mails")
    result = json.loads(out.read_text())
    assert len(result["pages"]) == 9 and all(p["median_ms"] > 0 for p in result["pages"].values())


def test_the_micro_benchmarks_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "micro", "--describes", "20", "--sniff-mb", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    sandbox, sniffed, parsers = proc.stdout.splitlines()
    assert sandbox.startswith("sandbox: 20 describes") and "req/s" in sandbox
    assert sniffed.startswith("sniff on 1 MB: random=unknown") and "pdf=pdf" in sniffed
    assert parsers.startswith("reply parsers: python: GET 2 MB ") and "; hiredis: " in parsers


def test_the_benchmark_runs_as_shipped_and_reports_a_binding_limit_beside_it() -> None:
    from bench import report
    from bench.run import PHASES, parse
    from mailingest.config.table import default_float

    _, cfg = parse([])
    assert cfg.alloy_rate == default_float("ALLOY_RATE") == 0  # the throughput runs: off
    assert cfg.limited_rate == 25 and "ratelimit" in PHASES
    run = {
        "mails_per_s": 6.1,
        "valid": True,
        "seconds": 82.0,
        "alloy_requests_per_s": 24.9,
        "cpu_seconds": {"worker pool processes": 52.5},
        "alloy_pace_last_minute": {
            "requests": 1500,
            "delayed": 1400,
            "waited_ms": 180_000,
            "sets_the_pace": True,
        },
    }
    speeds = {"mails_per_s": 16.4, "runs_valid": 1, "runs": 1}
    results = {
        "throughput": {"n": 500, "alloy_rate": 0.0, "ratio": 1.0, "runs": []}
        | {"mailingest": speeds, "bare loop": speeds},
        "ratelimit": {
            "n": 500,
            "rate": 25.0,
            "default_rate": 0.0,
            "run": run,
            "valid": True,
            "default_mails_per_s": 16.4,
            "bare_mails_per_s": 16.4,
        },
    }
    rows = {v["id"]: v for v in report.verdicts(results)}
    assert rows["throughput_ratio"]["figure"] == (
        "throughput mailingest / bare loop (N = 500; MAILINGEST_ALLOY_RATE=0, the default: off)"
    )
    limited = rows["ratelimit_throughput"]
    assert limited["figure"].startswith("throughput with MAILINGEST_ALLOY_RATE=25 (limiter binding")
    assert limited["verdict"] == "info"
    assert limited["value_text"].startswith(
        "6.10 mails/s = 0.37 of the default's 16.40 (MAILINGEST_ALLOY_RATE=0, the default: off)"
    )
    assert "Alloy got 24.9 requests/s of 25 allowed" in limited["value_text"]
    assert "1,400 of 1,500 requests waited for a token" in limited["value_text"]
    (paragraph, _) = report._ratelimit_lines(results)
    assert "on the CPU 32 % of the time" in paragraph and "it set the pace" in paragraph
