"""Profiles for the results: py-spy samples of the worker and the bare loop, summarised.

``py-spy record --idle --format raw`` writes one line per distinct stack:
``[process A;[process B;]]frame;frame;... count``, outermost frame first, each
frame ``function (file:line)``. :func:`summarize` turns that into the shares
a reader needs: per process, how many samples were spent in which pipeline
step (``mailingest/application/pipeline.py``) and which functions are on the stack most
(inclusive) and at the top of it (self), with ``--idle`` so that waiting on a
socket counts as the wall time it is.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_PROCESS = re.compile(r'^process (?P<pid>\d+):"(?P<cmd>.*)"$', re.S)

# the pipeline's steps, by the function in mailingest/application/pipeline.py that runs them
STEPS = {
    "poll": "poll",
    "ingest": "ingest",
    "describe": "describe",
    "upload": "upload",
    "finish": "finish",
}


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class PySpy:
    """``py-spy record`` of a running process (and its children) or of a command."""

    def __init__(self, out: Path, *, pid: int | None = None, rate: int = 100) -> None:
        self.out = out
        self.pid = pid
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, command: list[str] | None = None) -> list[str]:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        argv = [binary, "record", "--idle", "--format", "raw", "-r", str(self.rate)]
        argv += ["--nonblocking", "-o", str(self.out)]
        if command is not None:
            return [*argv, "--", *command]
        return [*argv, "--subprocesses", "--pid", str(self.pid)]

    def start(self) -> PySpy:
        log = open(self.out.with_suffix(".log"), "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def read_raw(path: Path) -> str:
    """A raw py-spy file, gzipped or not."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", errors="replace") as f:
            return f.read()
    return path.read_text(errors="replace")


def keep(src: Path, dest: Path) -> Path:
    """``src`` gzipped to ``dest`` + ``.gz``, the worker's long command line shortened."""
    text = re.sub(
        r'process (\d+):"[^"]*celery -A mailingest worker[^"]*"',
        r'process \1:"python -m celery -A mailingest worker"',
        src.read_text(errors="replace"),
    )
    out = dest.with_name(dest.name + ".gz")
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", compresslevel=9) as f:
        f.write(text)
    return out


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _frames(line: str) -> tuple[str, list[tuple[str, str]], int] | None:
    """(process cmdline, [(function, file)], count) of one raw line."""
    head, _, count = line.rpartition(" ")
    if not count.isdigit():
        return None
    process = ""
    frames: list[tuple[str, str]] = []
    for part in head.split(";"):
        m = _PROCESS.match(part)
        if m:
            process = m.group("cmd")
            continue
        f = _FRAME.match(part)
        if f:
            frames.append((f.group("func"), _short(f.group("file"))))
        else:
            frames.append((part, ""))
    return process, frames, int(count)


def _role(cmd: str) -> str:
    if "bench.bare_loop" in cmd:
        return "bare loop"
    if "celery" in cmd and "worker" in cmd:
        return "worker"
    return cmd[:40] or "process"


def summarize(raw: Path, top: int = 12) -> dict[str, Any]:
    """Per process kind: samples, pipeline-step shares, top inclusive and self frames."""
    if not raw.exists():
        return {"error": f"no profile at {raw}"}
    text = read_raw(raw)
    # a record may span lines when a command line holds newlines: join on counts
    records: list[str] = []
    pending = ""
    for line in text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if re.search(r" \d+$", line):
            records.append(pending)
            pending = ""
    by_role: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "samples": 0,
            "steps": Counter(),
            "inclusive": Counter(),
            "self": Counter(),
            "libraries": Counter(),
            "callers": Counter(),
            "processes": set(),
        }
    )
    for record in records:
        parsed = _frames(record)
        if parsed is None:
            continue
        process, frames, count = parsed
        pids = re.findall(r"process (\d+):", record)
        role_name = _role(process)
        if not process and any(f == "bench/bare_loop.py" for _, f in frames):
            role_name = "bare loop"  # recorded as the command py-spy ran: no process header
        # a pool process has the worker's command line: the innermost pid tells them apart
        if role_name == "worker" and len(pids) >= 2:
            role_name = "worker pool process"
        elif role_name == "worker":
            role_name = "worker main process"
        role = by_role[role_name]
        role["samples"] += count
        role["processes"].add(pids[-1] if pids else "?")
        step = "other"
        if any(f == "mailingest/application/pipeline.py" and fn in STEPS for fn, f in frames):
            step = next(
                STEPS[fn]
                for fn, f in frames
                if f == "mailingest/application/pipeline.py" and fn in STEPS
            )
        elif any(f.startswith("mailingest/") for _, f in frames):
            step = "mailingest, outside the steps"
        elif role_name != "bare loop" and _waiting(frames):
            step = "idle: waiting for a task / an event"
        role["steps"][step] += count
        if not step.startswith("idle"):
            role["libraries"][_library(frames)] += count
        ours = [(fn, f) for fn, f in frames if f.startswith("mailingest/")]
        if ours:
            # which library call of which mailingest function the sample is in
            fn, f = ours[-1]
            role["callers"][f"{_library(frames, stop_at_ours=True)} <- {fn} ({f})"] += count
        seen = set()
        for fn, f in frames:
            key = f"{fn} ({f})" if f else fn
            if key not in seen and (f.startswith("mailingest/") or f.startswith("bench/")):
                role["inclusive"][key] += count
                seen.add(key)
        if frames:
            fn, f = frames[-1]
            role["self"][f"{fn} ({f})" if f else fn] += count
    out: dict[str, Any] = {}
    for name, role in by_role.items():
        total = role["samples"] or 1
        out[name] = {
            "samples": role["samples"],
            "processes": len(role["processes"]),
            "steps": {k: round(v / total, 4) for k, v in role["steps"].most_common()},
            "inclusive": [(k, round(v / total, 4)) for k, v in role["inclusive"].most_common(top)],
            "libraries": [(k, round(v / total, 4)) for k, v in role["libraries"].most_common(top)],
            "callers": [(k, round(v / total, 4)) for k, v in role["callers"].most_common(60)],
            "self": [(k, round(v / total, 4)) for k, v in role["self"].most_common(top)],
        }
    return out


def _waiting(frames: list[tuple[str, str]]) -> bool:
    names = " ".join(fn for fn, _ in frames[-4:])
    return bool(
        re.search(
            r"\b(poll|select|epoll|_recv|recv|read|wait|sleep|_wait_for_tstate_lock)\b", names
        )
    ) and not any(f.startswith("mailingest/") for _, f in frames)


# where a busy sample's time goes: the innermost frame that is not plumbing
_PLUMBING = (
    "socket.py",
    "ssl.py",
    "selectors.py",
    "threading.py",
    "<frozen",
    "typing.py",
    "contextlib.py",
    "logging/",
    "re/",
    "abc.py",
    "functools.py",
    "enum.py",
    "dataclasses.py",
    "codecs.py",
    "encodings/",
    "copy.py",
    "weakref.py",
    "_weakrefset.py",
)
_LIBRARIES = (
    ("mailparser/", "mail-parser"),
    ("email/", "email (stdlib parser)"),
    ("imaplib.py", "imaplib / imapclient"),
    ("imapclient/", "imaplib / imapclient"),
    ("redis/", "redis-py"),
    ("httpx/", "httpx / httpcore"),
    ("httpcore/", "httpx / httpcore"),
    ("h11/", "httpx / httpcore"),
    ("kombu/", "kombu (broker client)"),
    ("billiard/", "billiard (pool IPC)"),
    ("celery/", "celery"),
    ("vine/", "celery"),
    ("cryptography/", "cryptography (AES-GCM)"),
    ("json/", "json"),
    ("base64.py", "base64"),
    ("hashlib", "hashlib"),
    ("prometheus_client/", "prometheus-client"),
    ("pythonjsonlogger/", "logging"),
)


def _library(frames: list[tuple[str, str]], *, stop_at_ours: bool = False) -> str:
    for _fn, f in reversed(frames):
        if not f or f.startswith(_PLUMBING):
            continue
        if f.startswith(("mailingest/", "bench/")):
            return "own code" if stop_at_ours else f
        for prefix, name in _LIBRARIES:
            if f.startswith(prefix):
                return name
        return f.split("/", 1)[0]
    return "other"
