"""Where a worker's memory goes for one large mail: each pipeline step in this process,
under tracemalloc, with the allocation sites alive at each step's peak.

Run by the benchmark as a subprocess with the MAILINGEST_* environment of a
private stack whose INBOX holds the large mail::

    python -m bench.memprofile --out memprofile.json

It polls the inbox with :func:`mailingest.application.pipeline.poll` and runs every step that
follows (``run_step``) one after the other, as a worker process would run them
as tasks. Per step it records the peak RSS above the RSS before the step
(``VmHWM`` after ``clear_refs``), the peak of Python allocations (tracemalloc),
and a snapshot taken when traced memory was near its peak: the top allocation
sites with the mailingest (and library) frames that led to each.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from .stack import proc_status, reset_peak


class PeakSnapshot:
    """Takes a tracemalloc snapshot whenever traced memory above ``floor`` grows past the
    last snapshot's by 30 % (each snapshot costs time: only the large allocations matter)."""

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.best = 0
        self.snapshot: tracemalloc.Snapshot | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            current, _ = tracemalloc.get_traced_memory()
            if current > self.floor and current > self.best * 1.3:
                self.best = current
                self.snapshot = tracemalloc.take_snapshot()
            self._stop.wait(0.002)

    def __enter__(self) -> PeakSnapshot:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _chain(trace: tracemalloc.Traceback) -> list[str]:
    """The interesting frames, innermost last: ours, and the libraries we call."""
    keep = (
        "mailingest/",
        "mailparser",
        "email/",
        "redis/",
        "imapclient",
        "imaplib",
        "httpx",
        "httpcore",
        "cryptography",
        "base64",
        "ssl",
        "socket",
    )
    out = []
    for frame in trace:  # oldest call first (Python >= 3.7)
        name = frame.filename
        for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
            if marker in name:
                name = name.split(marker, 1)[1]
                break
        if any(k in name for k in keep):
            out.append(f"{name}:{frame.lineno} {_function(frame.filename, frame.lineno)}")
    return out[-8:]


_functions: dict[tuple[str, int], str] = {}


def _function(filename: str, lineno: int) -> str:
    """The name of the function holding ``filename:lineno`` (tracemalloc keeps only lines)."""
    key = (filename, lineno)
    if key not in _functions:
        name = ""
        try:
            with open(filename, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()[:lineno]
            for line in reversed(lines):
                stripped = line.lstrip()
                if stripped.startswith(("def ", "async def ")):
                    name = stripped.split("def ", 1)[1].split("(", 1)[0]
                    break
        except OSError:
            pass
        _functions[key] = f"({name})" if name else ""
    return _functions[key]


def top_sites(snapshot: tracemalloc.Snapshot, limit: int = 6) -> list[dict[str, Any]]:
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    ]
    snapshot = snapshot.filter_traces(ignore)
    out = []
    for stat in snapshot.statistics("traceback")[:limit]:
        out.append({"bytes": stat.size, "blocks": stat.count, "chain": _chain(stat.traceback)})
    return out


def run(floor: int) -> dict[str, Any]:
    from mailingest.application import pipeline
    from mailingest.application.services import build_context
    from mailingest.config.settings import load_settings
    from mailingest.core.decisions import Step

    settings = load_settings().require("redis", "imap", "alloy")
    ctx = build_context(settings)
    inbox = settings.inboxes[0].name
    tracemalloc.start(30)
    results = []
    queue: list[Step] = []

    def measured(label: str, fn: Any) -> Any:
        before = proc_status_self()
        reset_peak_self()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        started = time.perf_counter()
        with PeakSnapshot(base + floor) as watcher:
            value = fn()
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        after = proc_status_self()
        results.append(
            {
                "step": label,
                "seconds": round(elapsed, 3),
                "rss_before": before.get("VmRSS", 0),
                "rss_peak": after.get("VmHWM", 0),
                "rss_peak_above_before": after.get("VmHWM", 0) - before.get("VmRSS", 0),
                "traced_peak_above_before": peak - base,
                "top_sites": top_sites(watcher.snapshot) if watcher.snapshot else [],
            }
        )
        return value

    polled = measured("poll", lambda: pipeline.poll(ctx, inbox))
    queue.extend(polled.steps)
    while queue:
        step = queue.pop(0)
        label = step.task if step.index is None else f"{step.task} {step.index}"
        queue.extend(measured(label, lambda step=step: pipeline.run_step(ctx, step)))
    ctx.close()
    return {"steps": results}


def proc_status_self() -> dict[str, int]:
    import os

    return proc_status(os.getpid())


def reset_peak_self() -> None:
    import os

    reset_peak(os.getpid())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memprofile")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--floor", type=int, default=1_000_000, help="bytes of growth before snapshots start"
    )
    args = parser.parse_args(argv)
    Path(args.out).write_text(json.dumps(run(args.floor), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
