"""The README's first command keeps working: `mailingest demo` end to end."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require_or_skip

pytestmark = pytest.mark.servers


@pytest.mark.slow
def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        require_or_skip("redis-server is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailingest",
            "demo",
            "--console",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert (
        "All 5 demo documents reached the right entity with the right content; 2 mails quarantined."
        in out
    )
    for name in (
        "driver_license.pdf",
        "passport_scan.jpg",
        "utility_bill_march.pdf",
        "signed_contract.pdf",
        "Führerschein Rückseite.jpg",
    ):
        assert name in out
    assert "unknown sender mallory@unknown.example" in out
    assert "sender not authenticated: dmarc=fail" in out
    # the console answered its health check and printed a login made for this run
    assert re.search(r"Console +http://127\.0\.0\.1:\d+ \(login demo / \S{16}\)", out), out
    users = (tmp_path / "demo" / "console-users").read_text()
    assert users.startswith("demo:operator:scrypt$")
    # the worker and beat ran through the `mailingest worker|beat` wrappers
    worker_log = (tmp_path / "demo" / "worker.log").read_text()
    assert "mailingest.describe_document" in worker_log and "ready." in worker_log
    assert (
        "Scheduler: Sending due task poll-default" in (tmp_path / "demo" / "beat.log").read_text()
    )
