"""Servers and processes of one benchmark run, and what is measured on them.

Every server is private and on a free loopback port (``mailingest_testbed.servers``):
a fresh redis-server (AOF on, ``appendfsync everysec``, as docker-compose runs
it) and a fresh Dovecot per run, so each run starts from the same state; the
Alloy sandbox lives in the harness process for the whole benchmark and is reset
between runs. mailingest runs as in production: ``python -m celery -A mailingest
worker --concurrency 2`` and beat (``CeleryProcess``), ``python -m mailingest
watch`` for IDLE.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from imapclient import IMAPClient
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.servers import CeleryProcess, DovecotServer, RedisServer

from mailingest.adapters import keys
from mailingest.adapters import ledger as L
from mailingest.config.table import default_float
from mailingest.core.states import MAIL_STATES

from .workload import DocSpec, MailSpec, expected_index

INBOX = "default"
ALLOY_TOKEN, ALLOY_SECRET = "bench-token", "bench-secret-value"
# 32 bytes, URL-safe base64: staged bytes are sealed (AES-256-GCM) as the README advises
STAGING_KEY = "YmVuY2gtc3RhZ2luZy1rZXktMzItYnl0ZXMtbG9uZyE="
PAGE = os.sysconf("SC_PAGE_SIZE")
# MAILINGEST_ALLOY_RATE as mailingest ships it (0: off): what every run uses unless told
SHIPPED_ALLOY_RATE = default_float("ALLOY_RATE")
# the limit of the phase that shows a binding one: the shipped default until issue 12
BINDING_ALLOY_RATE = 25.0


def rate_text(rate: float) -> str:
    """A rate as MAILINGEST_ALLOY_RATE is written: 25, 0, 12.5."""
    return f"{rate:g}"


# --------------------------------------------------------------------------- servers


class Servers:
    """A fresh redis-server and Dovecot under ``root``; everything removed by ``stop()``."""

    def __init__(self, root: Path, *, persist: bool = True, keep: bool = False) -> None:
        self.root = Path(root)
        self.keep = keep  # leave logs and data behind (--keep-workdir)
        self.redis = RedisServer(self.root / "redis", persist=persist)
        self.dovecot = DovecotServer(self.root / "imap")

    def start(self) -> Servers:
        shutil.rmtree(self.root, ignore_errors=True)  # a kept run of an earlier benchmark
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.dovecot.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.dovecot.stop()
        with contextlib.suppress(Exception):
            self.redis.stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Servers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def inbox_maildir(self) -> Path:
        return self.dovecot.mail_root / self.dovecot.account.user

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def imap(self) -> IMAPClient:
        account = self.dovecot.account
        client = IMAPClient(account.host, port=account.port, ssl=False, timeout=120)
        client.login(account.user, account.password)
        return client

    def folder_counts(self, *folders: str) -> dict[str, int]:
        client = self.imap()
        try:
            counts = {}
            for folder in folders:
                if client.folder_exists(folder):
                    counts[folder] = int(client.select_folder(folder, readonly=True)[b"EXISTS"])
                else:
                    counts[folder] = 0
            return counts
        finally:
            client.logout()

    def index_inbox(self, expected: int, timeout: float = 300) -> float:
        """Have Dovecot index the INBOX (new/ -> cur/, UIDs); seconds it took."""
        started = time.monotonic()
        client = self.imap()
        try:
            while True:
                exists = int(client.select_folder("INBOX")[b"EXISTS"])
                if exists >= expected:
                    break
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"Dovecot indexed {exists} of {expected} mails")
                client.unselect_folder()
                time.sleep(0.2)
            client.search(["ALL"])
        finally:
            client.logout()
        return time.monotonic() - started

    def dovecot_sessions(self) -> dict[str, int]:
        """Totals of Dovecot's logout lines (in=, out=, body_count=, ...) in its log."""
        totals: Counter[str] = Counter()
        sessions = 0
        with contextlib.suppress(OSError):
            for line in self.dovecot.log_path.read_text(errors="replace").splitlines():
                if "Logged out" not in line and "Disconnected" not in line:
                    continue
                fields = dict(re.findall(r"\b(\w+)=(\d+)", line))
                if "in" in fields and "out" in fields:
                    sessions += 1
                    for k, v in fields.items():
                        totals[k] += int(v)
        return dict(totals) | {"sessions": sessions}


def make_sandbox() -> SandboxServer:
    from mailingest_testbed.samples import AGENT_EMAIL

    return SandboxServer(
        token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL], keep_bodies=False
    ).start()


def mailingest_env(
    servers: Servers, sandbox: SandboxServer, senders_file: Path, **overrides: str
) -> dict[str, str]:
    """Production defaults except where a local benchmark needs otherwise (each stated)."""
    settings = {
        "poll_interval": "2",
        # as shipped (local_environment, for tests and the demo, sets its own)
        "alloy_rate": rate_text(SHIPPED_ALLOY_RATE),
        "staging_key": STAGING_KEY,
        "retry_base": "2",  # production defaults (local_environment shortens them)
        "retry_cap": "300",
    } | overrides
    return local_environment(
        servers.redis.url,
        servers.dovecot.account,
        sandbox.url,
        senders_file,
        alloy_token=ALLOY_TOKEN,
        alloy_secret=ALLOY_SECRET,
        **settings,
    )


def child_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | env


class WatchProcess:
    """``python -m mailingest watch`` in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        probe = subprocess.run(
            [sys.executable, "-m", "mailingest", "watch", "--help"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        return probe.returncode == 0

    def start(self, timeout: float = 60) -> WatchProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailingest", "watch"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailingest watch exited: {self.log_path.read_text()[-2000:]}")
            if b"with IDLE" in self.log_path.read_bytes():
                return self
            time.sleep(0.1)
        raise RuntimeError("mailingest watch did not start watching in time")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


class Mailingest:
    """Worker (+ beat, + watch) for one run; ``stop()`` ends each process it started."""

    def __init__(
        self,
        env: dict[str, str],
        logs: Path,
        *,
        beat: bool = True,
        watch: bool = False,
        concurrency: int = 2,
        io_threads: int = 16,
    ) -> None:
        self.env = child_env(env)
        self.logs = logs
        # as docker-compose.yml runs it: prefork on "celery" (poll, parse, sweep), a
        # thread pool on "io" (describe, upload, move); io_threads=0: one worker for both
        queues = ["--queues", "celery"] if io_threads else []
        self.worker = CeleryProcess(
            "worker",
            self.env,
            logs / "worker.log",
            ["--concurrency", str(concurrency), *queues],
            ready_timeout=120,
        )
        self.io_worker = (
            CeleryProcess(
                "worker",
                self.env,
                logs / "worker-io.log",
                ["--pool", "threads", "--concurrency", str(io_threads), "--queues", "io"],
                ready_timeout=120,
            )
            if io_threads
            else None
        )
        self.beat = CeleryProcess("beat", self.env, logs / "beat.log") if beat else None
        self.watch = WatchProcess(self.env, logs / "watch.log") if watch else None

    def start(self) -> Mailingest:
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self.worker.start()
            if self.io_worker is not None:
                self.io_worker.start()
            if self.beat is not None:
                self.beat.start()
            if self.watch is not None:
                self.watch.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        if self.beat is not None:
            self.beat.stop()
        if self.io_worker is not None:
            self.io_worker.stop()
        self.worker.stop()

    def __enter__(self) -> Mailingest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def processes(self) -> dict[str, int]:
        """role -> pid: the worker's main process and each pool process."""
        main = self.worker.pid
        if main is None:
            return {}
        out = {"worker-main": main}
        for n, pid in enumerate(children(main)):
            out[f"worker-pool-{n + 1}"] = pid
        if self.io_worker is not None and self.io_worker.pid is not None:
            out["io-worker"] = self.io_worker.pid
        return out


def poll_now(broker_url: str, inbox: str = INBOX) -> None:
    """What ``mailingest poll-now`` does: a poll task on the broker."""
    from celery import Celery

    client = Celery(broker=broker_url)
    try:
        client.send_task("mailingest.poll_inbox", args=[inbox])
    finally:
        client.close()


# --------------------------------------------------------------------------- ledger


def ledger_counts(client: redis.Redis) -> dict[str, int]:
    pipe = client.pipeline(transaction=False)
    for state in MAIL_STATES:
        pipe.scard(keys.state(state))
    pipe.scard(keys.UNFILED)
    values = [int(v) for v in pipe.execute()]
    return dict(zip([*MAIL_STATES, "unfiled"], values, strict=True))


def wait_filed(
    client: redis.Redis,
    expected: int,
    *,
    timeout: float,
    stall: float = 180,
    tick: Callable[[dict[str, int]], None] | None = None,
) -> tuple[bool, dict[str, int]]:
    """Until ``expected`` mails are decided and moved (or no progress for ``stall`` s)."""
    deadline = time.monotonic() + timeout
    last, last_change = None, time.monotonic()
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = ledger_counts(client)
        decided = counts[L.DONE] + counts[L.QUARANTINED]
        if decided >= expected and counts["unfiled"] == 0:
            return True, counts
        progress = (decided, counts["unfiled"], counts[L.DOCUMENTS_PENDING], counts[L.QUEUED])
        if progress != last:
            last, last_change = progress, time.monotonic()
        elif time.monotonic() - last_change > stall:
            return False, counts
        if tick is not None:
            tick(counts)
        time.sleep(0.2)
    return False, counts


def filed_times(client: redis.Redis) -> list[int]:
    """``updated_at`` (ms) of every decided mail: the moment it was filed."""
    ids = [
        m.decode() if isinstance(m, bytes) else str(m)
        for state in (L.DONE, L.QUARANTINED)
        for m in client.smembers(keys.state(state))
    ]
    pipe = client.pipeline(transaction=False)
    for mail_id in ids:
        pipe.hget(keys.mail(mail_id), "updated_at")
    return [int(v) for v in pipe.execute() if v]


def commandstats(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def redis_memory(client: redis.Redis) -> dict[str, int]:
    info = client.info("memory")
    return {
        "used_memory_peak": int(info["used_memory_peak"]),
        "used_memory": int(info["used_memory"]),
    }


# --------------------------------------------------------------------------- processes


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [
                    int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                ]
    return sorted(set(out))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes ({} when it is gone)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and every descendant, living or reaped."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command: state(3) ... utime(14) stime(15) cutime(16) cstime(17)
    own = sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS
    return own + sum(tree_cpu(child) for child in children(pid))


def own_cpu(pid: int | None) -> float:
    """CPU seconds of one process alone (its threads), not its children."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds each component used between ``start()`` and ``stop()``."""

    def __init__(self, components: dict[str, Callable[[], float]]) -> None:
        self.components = components
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self.before = {name: fn() for name, fn in self.components.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.used = {
            name: round(fn() - self.before[name], 3) for name, fn in self.components.items()
        }
        return self.used


def machine_cpu() -> float:
    """CPU seconds the whole machine spent busy (every process, ours or not), /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


MACHINE = "machine, all processes"


def harness_cpu() -> float:
    """This process (the harness, i.e. the sandbox's threads)."""
    times = os.times()
    return times.user + times.system


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux: ``clear_refs`` 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class RssSampler:
    """Samples VmRSS of the given processes every ``interval`` s in a thread."""

    pids: Callable[[], dict[str, int]]
    interval: float = 0.5
    peak: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    keep_timeline: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = {}
            for role, pid in self.pids().items():
                rss = proc_status(pid).get("VmRSS")
                if rss is not None:
                    sample[role] = rss
                    self.peak[role] = max(self.peak.get(role, 0), rss)
            if self.keep_timeline:
                self.timeline.append((time.time(), sample))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# --------------------------------------------------------------------------- checks


def verify(
    specs: Iterable[MailSpec],
    sandbox: SandboxServer,
    folders: dict[str, int],
    *,
    processed: str = "Processed",
) -> list[str]:
    """What is wrong with a run: every document at Alloy exactly once with its bytes,
    every mail moved. Empty when the run is valid."""
    specs = list(specs)
    expected: dict[tuple[str, str, str], DocSpec] = expected_index(specs)
    uploads = sandbox.state.uploads()
    seen: Counter[tuple[str, str, str]] = Counter()
    problems: list[str] = []
    for u in uploads:
        key = (u["entity"], u["name"], u["extension"])
        seen[key] += 1
        doc = expected.get(key)
        if doc is None:
            problems.append(f"unexpected document {u['name']}.{u['extension']} at {u['entity']}")
        elif (u["size"], u["sha256"], u["type"]) != (doc.size, doc.sha256, doc.type):
            problems.append(
                f"{doc.name}.{doc.extension}: size/sha256/type "
                f"{u['size']}/{u['sha256'][:12]}/{u['type']}, expected "
                f"{doc.size}/{doc.sha256[:12]}/{doc.type}"
            )
    for key, doc in expected.items():
        if seen[key] != 1:
            problems.append(f"{doc.name}.{doc.extension}: uploaded {seen[key]} times")
    stats = sandbox.state.stats()
    if stats["documents"] != stats["uploaded"]:
        problems.append(f"{stats['documents'] - stats['uploaded']} descriptions never uploaded")
    if folders.get("INBOX", 0) != 0:
        problems.append(f"{folders['INBOX']} mails left in INBOX")
    if folders.get(processed, 0) != len(specs):
        problems.append(f"{folders.get(processed, 0)} mails in {processed}, expected {len(specs)}")
    if len(problems) > 12:
        problems = [*problems[:12], f"... and {len(problems) - 12} more"]
    return problems


def upload_times(sandbox: SandboxServer) -> dict[tuple[str, str], float]:
    """(name, extension) -> when the sandbox recorded its upload (time.time())."""
    return {(u["name"], u["extension"]): u["uploaded_at"] for u in sandbox.state.uploads()}


def machine() -> dict[str, Any]:
    """Cores, CPU model, RAM, software versions."""
    import platform

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024

    def version(argv: list[str], pattern: str) -> str:
        try:
            out = subprocess.run(
                argv, check=False, capture_output=True, text=True, timeout=20
            ).stdout
        except OSError:
            return "?"
        match = re.search(pattern, out)
        return match.group(1) if match else out.strip()[:40]

    from importlib.metadata import version as package_version

    dovecot = shutil.which("dovecot") or "/usr/sbin/dovecot"
    repo = Path(__file__).resolve().parent.parent

    # a copy of a commit (git archive) made to benchmark it while the tree changes
    marker = repo / ".bench-snapshot"
    snapshot = marker.read_text().strip() if marker.exists() else ""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], check=False, cwd=repo, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except OSError:
            return "?"

    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dovecot": version([dovecot, "--version"], r"^(\S+)"),
        "redis": version(["redis-server", "--version"], r"v=(\S+)"),
        "commit": snapshot or git("rev-parse", "--short", "HEAD"),
        "uncommitted_in_mailingest": (
            [] if snapshot else git("status", "--short", "--", "mailingest").splitlines()
        ),
    } | {name: package_version(name) for name in ("celery", "imapclient", "httpx", "mail-parser")}
