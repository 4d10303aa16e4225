"""The benchmark harness stays runnable: its command line, and a workload mailingest accepts.

The benchmark itself is not part of the test run (`python -m bench`, minutes to
tens of minutes); this only keeps it from rotting between runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
