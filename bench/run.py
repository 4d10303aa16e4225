"""``python -m bench``: the benchmark of issue 6, in one run (see bench/README.md).

Phases (``--only`` picks some; the others keep their figures from the last
``results.json`` in the output directory):

* ``throughput``: mailingest (worker --concurrency 2 + beat, every reliability
  feature on, ``MAILINGEST_ALLOY_RATE`` as shipped unless ``--alloy-rate``) and the
  bare loop, alternately, on the same N mails, each run on fresh servers; then one
  profiled run of each (py-spy).
* ``ratelimit``: mailingest once more on those N mails with a rate limit that binds
  (``--limited-rate``, 25/s: the default until issue 12), informational: what a limit
  below the pipeline's pace costs, and what the limiter counted.
* ``remote``: the same comparison on 200 mails with Alloy answering each request
  after 50 ms (the sandbox's latency fault), informational.
* ``latency``: APPEND -> ``uploaded: true`` for mails APPENDed at a steady rate,
  with beat polling, and with ``mailingest watch`` (IMAP IDLE).
* ``rss``: peak RSS of the worker's pool processes for one mail with a 25 MB
  attachment, then each step under tracemalloc (``bench.memprofile``).
* ``idle``: one poll of an inbox account holding 50,000 processed mails.
* ``growth``: throughput and memory at each N of ``--sizes``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailingest_testbed.samples import AGENT_EMAIL

from mailingest.adapters import keys
from mailingest.adapters import ledger as L
from mailingest.adapters.rate_limit import read_pace
from mailingest.config.table import default_float

from . import report
from .crashes import Crashes
from .profiles import PySpy, keep, py_spy, summarize
from .stack import (
    ALLOY_SECRET,
    ALLOY_TOKEN,
    BINDING_ALLOY_RATE,
    INBOX,
    MACHINE,
    SHIPPED_ALLOY_RATE,
    CpuMeter,
    Mailingest,
    RssSampler,
    Servers,
    WatchProcess,
    child_env,
    commandstats,
    filed_times,
    harness_cpu,
    ledger_counts,
    machine,
    machine_cpu,
    mailingest_env,
    make_sandbox,
    own_cpu,
    poll_now,
    proc_status,
    rate_text,
    redis_memory,
    reset_peak,
    tree_cpu,
    upload_times,
    verify,
    wait_filed,
)
from .workload import Corpus, crlf, mail_owner, make_mail, senders_csv, write_small_mails

REPO = Path(__file__).resolve().parent.parent
PHASES = (
    "throughput",
    "ratelimit",
    "remote",
    "slowtail",
    "recovery",
    "latency",
    "rss",
    "idle",
    "growth",
)
# the recovery phase: which worker each kill -9 hits, in turn (bench/crashes.py)
CRASH_PLAN = ["worker", "io-worker", "io-worker", "worker", "io-worker", "io-worker"]
RECOVERY_LATENCY_MS = 1000.0  # Alloy answers slowly enough that steps are caught mid-flight
MB = 1e6


@dataclass
class Config:
    quick: bool
    seed: int
    throughput_n: int
    repeats: int
    sizes: list[int]
    bare_sizes: list[int]
    latency_mails: int
    latency_spacing: float
    poll_interval: float
    idle_poll_interval: float
    idle_mails: int
    idle_polls: int
    rss_attachment: int
    rss_repeats: int
    profile: bool
    remote_n: int
    remote_latency_ms: float
    alloy_rate: float = SHIPPED_ALLOY_RATE  # MAILINGEST_ALLOY_RATE of every run
    limited_rate: float = BINDING_ALLOY_RATE  # the one of the ratelimit phase


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


class Bench:
    def __init__(self, cfg: Config, workdir: Path, out: Path, results: dict[str, Any]) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.out = out
        self.results = results
        self.sandbox = make_sandbox()
        self.senders_file = workdir / "senders.csv"
        self.senders_file.write_text(senders_csv(cfg.seed), encoding="utf-8")
        self.corpus = Corpus(workdir / "corpus", cfg.seed)

    keep = False

    def servers(self, root: Path) -> Servers:
        return Servers(root, keep=self.keep)

    def close(self) -> None:
        self.sandbox.stop()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        report.write(self.results, self.out)

    # ------------------------------------------------------------------ corpus

    def ensure_corpus(self, n: int) -> None:
        have = len(self.corpus.specs)
        if have >= n:
            return
        need = int((n - have) * 1.5e6 * 1.3) + 5 * 2**30  # corpus, AOF, margin
        free = shutil.disk_usage(self.workdir).free
        if free < need:
            raise SystemExit(
                f"bench: {n} mails need about {need / 2**30:.0f} GiB free under "
                f"{self.workdir}, there are {free / 2**30:.0f} GiB (use --workdir or --sizes)"
            )
        log(f"generating workload mails {have}..{n - 1} (seed {self.cfg.seed})")
        seconds = self.corpus.ensure(n)
        log(f"  {n - have} mails written in {seconds:.0f}s")

    def workload(self, n: int) -> dict[str, Any]:
        return self.corpus.totals(n)

    # ------------------------------------------------------------------ runs

    def env(self, servers: Servers, **overrides: str) -> dict[str, str]:
        """mailingest's settings for a run: production's, the benchmark's rate limit."""
        overrides.setdefault("alloy_rate", rate_text(self.cfg.alloy_rate))
        return mailingest_env(servers, self.sandbox, self.senders_file, **overrides)

    def run_mailingest(
        self,
        n: int,
        label: str,
        *,
        profile: bool = False,
        alloy_latency_ms: float = 0.0,
        alloy_rate: float | None = None,
        faults: dict[str, Any] | None = None,
        crashes: Crashes | None = None,
    ) -> dict[str, Any]:
        self.ensure_corpus(n)
        specs = self.corpus.specs[:n]
        root = self.workdir / "runs" / label
        rate = self.cfg.alloy_rate if alloy_rate is None else alloy_rate
        log(f"{label}: mailingest on {n} mails{' (profiled with py-spy)' if profile else ''}")
        result: dict[str, Any] = {
            "system": "mailingest",
            "n": n,
            "label": label,
            "alloy_latency_ms": alloy_latency_ms,
            "alloy_rate": rate,
        }
        with self.servers(root) as servers:
            self.sandbox.reset()
            self.sandbox.set_faults(latency_ms=alloy_latency_ms, **(faults or {}))
            env = self.env(
                servers, poll_interval=str(self.cfg.poll_interval), alloy_rate=rate_text(rate)
            )
            client = servers.client()
            progress: list[tuple[float, int]] = []
            with Mailingest(env, root / "logs") as procs:
                # beat's polls are held off (they find the poll lock taken and skip) while
                # the mails are delivered and indexed; the clock starts with the first poll
                gate = client.lock(keys.poll_lock(INBOX), timeout=3600)
                gate.acquire()
                self.corpus.deliver(n, servers.inbox_maildir)
                result["index_seconds"] = servers.index_inbox(n)
                spy = None
                if profile:
                    spy = PySpy(self.out_profile(f"{label}.txt"), pid=procs.worker.pid).start()
                    time.sleep(1.0)  # py-spy attached
                redis_pid = servers.redis.pid or 0
                worker_pid = procs.worker.pid
                io_pid = procs.io_worker.pid if procs.io_worker else None
                beat_pid = procs.beat.pid if procs.beat else None
                cpu = CpuMeter(
                    {
                        "worker main process": lambda: own_cpu(worker_pid),
                        "worker pool processes": lambda: tree_cpu(worker_pid) - own_cpu(worker_pid),
                        "I/O worker (threads)": lambda: tree_cpu(io_pid),
                        "beat": lambda: tree_cpu(beat_pid),
                        "redis-server": lambda: own_cpu(redis_pid),
                        "dovecot": lambda: tree_cpu(servers.dovecot.pid),
                        "sandbox (harness process)": harness_cpu,
                        MACHINE: machine_cpu,
                    }
                )
                with RssSampler(lambda: procs.processes() | {"redis": redis_pid}) as sampler:
                    cpu.start()
                    started = time.time()
                    gate.release()
                    poll_now(env["MAILINGEST_REDIS_URL"])
                    if crashes is not None:
                        crashes.start(procs, client, started)

                    def tick(counts: dict[str, int]) -> None:
                        now = time.time()
                        if not progress or now - progress[-1][0] >= 1.0:
                            progress.append((now, counts[L.DONE] + counts[L.QUARANTINED]))

                    ok, counts = wait_filed(client, n, timeout=max(900.0, n * 1.5), tick=tick)
                    waited = time.time()
                    if crashes is not None:
                        crashes.join()
                    cpu.stop()
                # what the limiter and the 429 pause counted (status's view of the run)
                pace = read_pace(client, rate=rate, burst=max(1, int(rate * 2)))
                result["alloy_pace_last_minute"] = asdict(pace) | {
                    "sets_the_pace": rate > 0 and pace.sets_the_pace
                }
                if spy is not None:
                    spy.stop()
                hwm = {
                    role: proc_status(pid).get("VmHWM", 0)
                    for role, pid in procs.processes().items()
                }
                hwm["redis"] = proc_status(redis_pid).get("VmHWM", 0)
            times = filed_times(client)
            ended = max(times) / 1000 if times else waited
            uploads = upload_times(self.sandbox)
            folders = servers.folder_counts("INBOX", "Processed", "Quarantine")
            problems = [] if ok else [f"not every mail was decided and moved: {counts}"]
            problems += verify(specs, self.sandbox, folders)
            if crashes is not None:
                result["crashes"] = crashes.summary()
                problems += crashes.errors
            stats = commandstats(client)
            result |= {
                "started": started,
                "ended": ended,
                "seconds": ended - started,
                "ledger": ledger_counts(client),
                "folders": folders,
                "valid": not problems,
                "problems": problems,
                "peak_rss": {k: max(v, sampler.peak.get(k, 0)) for k, v in hwm.items()},
                "redis_memory": redis_memory(client),
                "redis_commands": sum(stats.values()),
                "redis_commands_by_name": dict(sorted(stats.items(), key=lambda kv: -kv[1])[:12]),
                "imap": servers.dovecot_sessions(),
                "sandbox": self.sandbox.state.stats()["requests"],
                "alloy_requests_per_s": sum(self.sandbox.state.stats()["requests"].values())
                / max(ended - started, 1e-9),
                "progress": [(round(t - started, 2), d) for t, d in progress],
                "cpu_seconds": cpu.used,
                # the first poll of the backlog -> the first document uploaded at Alloy
                "first_document_s": min(uploads.values()) - started if uploads else None,
            }
            client.close()
        return self._rates(result, n)

    def run_bare(
        self, n: int, label: str, *, profile: bool = False, alloy_latency_ms: float = 0.0
    ) -> dict[str, Any]:
        self.ensure_corpus(n)
        specs = self.corpus.specs[:n]
        root = self.workdir / "runs" / label
        log(f"{label}: bare loop on {n} mails{' (profiled with py-spy)' if profile else ''}")
        result: dict[str, Any] = {
            "system": "bare loop",
            "n": n,
            "label": label,
            "alloy_latency_ms": alloy_latency_ms,
        }
        with self.servers(root) as servers:  # Redis runs idle: the same machine state
            self.sandbox.reset()
            self.sandbox.set_faults(latency_ms=alloy_latency_ms)
            self.corpus.deliver(n, servers.inbox_maildir)
            result["index_seconds"] = servers.index_inbox(n)
            account = servers.dovecot.account
            out = root / "bare.json"
            argv = [
                sys.executable,
                "-m",
                "bench.bare_loop",
                "--imap-port",
                str(account.port),
                "--user",
                account.user,
                "--password",
                account.password,
                "--alloy-url",
                self.sandbox.url,
                "--token",
                ALLOY_TOKEN,
                "--secret",
                ALLOY_SECRET,
                "--senders",
                str(self.senders_file),
                "--agent",
                AGENT_EMAIL,
                "--out",
                str(out),
            ]
            if profile:
                argv = PySpy(self.out_profile(f"{label}.txt")).argv(argv)
            cpu = CpuMeter(
                {
                    "redis-server": lambda: own_cpu(servers.redis.pid),
                    "dovecot": lambda: tree_cpu(servers.dovecot.pid),
                    "sandbox (harness process)": harness_cpu,
                    MACHINE: machine_cpu,
                }
            ).start()
            with open(root / "bare.log", "wb") as logfile:
                done = subprocess.run(
                    argv,
                    cwd=REPO,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    timeout=max(900.0, n * 1.5),
                    check=False,
                )
            cpu.stop()
            problems = []
            bare: dict[str, Any] = {}
            if done.returncode != 0 or not out.exists():
                problems.append(
                    f"bare loop exited {done.returncode}: {(root / 'bare.log').read_text()[-800:]}"
                )
            else:
                bare = json.loads(out.read_text())
            folders = servers.folder_counts("INBOX", "Processed")
            problems += verify(specs, self.sandbox, folders)
            result |= {
                "started": bare.get("started", 0),
                "ended": bare.get("ended", 0),
                "seconds": bare.get("ended", 0) - bare.get("started", 0),
                "folders": folders,
                "valid": not problems,
                "problems": problems,
                "peak_rss": {"bare loop": bare.get("max_rss_bytes", 0)},
                "cpu_seconds": {"bare loop": round(bare.get("cpu_seconds", 0.0), 3)} | cpu.used,
                "imap": servers.dovecot_sessions(),
                "sandbox": self.sandbox.state.stats()["requests"],
            }
        return self._rates(result, n)

    def _rates(self, result: dict[str, Any], n: int) -> dict[str, Any]:
        totals = self.workload(n)
        seconds = result["seconds"] or float("nan")
        result["mails_per_s"] = n / seconds
        result["message_mb_per_s"] = totals["message_bytes"] / MB / seconds
        result["document_mb_per_s"] = totals["document_bytes"] / MB / seconds
        state = "valid" if result["valid"] else "INVALID: " + "; ".join(result["problems"][:3])
        log(
            f"  {result['label']}: {seconds:.1f}s, {result['mails_per_s']:.2f} mails/s, "
            f"{result['message_mb_per_s']:.1f} MB/s of mail ({state})"
        )
        return result

    def out_profile(self, name: str) -> Path:
        path = self.workdir / "profiles" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ phases

    def phase_throughput(self) -> None:
        cfg = self.cfg
        n = cfg.throughput_n
        started = time.monotonic()
        self.ensure_corpus(max([n, *cfg.sizes]) if "growth" in self.selected else n)
        runs: list[dict[str, Any]] = []
        for r in range(cfg.repeats):
            runs.append(self.run_bare(n, f"bare-{n}-r{r + 1}"))
            runs.append(self.run_mailingest(n, f"mailingest-{n}-r{r + 1}"))
        section: dict[str, Any] = {
            "n": n,
            "workload": self.workload(n),
            "runs": runs,
            "poll_interval": cfg.poll_interval,
            "alloy_rate": cfg.alloy_rate,
        }
        for system in ("mailingest", "bare loop"):
            valid = [r for r in runs if r["system"] == system and r["valid"]]
            section[system] = {
                "mails_per_s": median([r["mails_per_s"] for r in valid]),
                "message_mb_per_s": median([r["message_mb_per_s"] for r in valid]),
                "runs_valid": len(valid),
                "runs": len([r for r in runs if r["system"] == system]),
                "spread": [round(r["mails_per_s"], 3) for r in runs if r["system"] == system],
            }
        section["ratio"] = (
            section["mailingest"]["mails_per_s"] / section["bare loop"]["mails_per_s"]
        )
        if cfg.profile and py_spy():
            prof_m = self.run_mailingest(n, f"profile-mailingest-{n}", profile=True)
            prof_b = self.run_bare(n, f"profile-bare-{n}", profile=True)
            section["profiles"] = {
                "mailingest": {
                    "file": f"profile-mailingest-{n}.txt",
                    "run": _brief(prof_m),
                    "summary": summarize(self.out_profile(f"profile-mailingest-{n}.txt")),
                },
                "bare loop": {
                    "file": f"profile-bare-{n}.txt",
                    "run": _brief(prof_b),
                    "summary": summarize(self.out_profile(f"profile-bare-{n}.txt")),
                },
            }
            self._keep_profile(f"profile-mailingest-{n}.txt")
            self._keep_profile(f"profile-bare-{n}.txt")
        section["seconds"] = time.monotonic() - started
        self.results["throughput"] = section
        self._growth_cache = {r["label"]: r for r in runs}
        self.announce("throughput")

    def _keep_profile(self, name: str) -> None:
        """Raw py-spy stacks go next to the results, gzipped (a few hundred kB)."""
        src = self.out_profile(name)
        if src.exists():
            keep(src, self.out / "profiles" / name)

    def phase_ratelimit(self) -> None:
        """mailingest on the throughput phase's N mails with a rate limit that binds
        (informational): compared with the throughput phase's median, what a limit below
        the pipeline's pace costs; the limiter's own counters say it set the pace."""
        started = time.monotonic()
        n, rate = self.cfg.throughput_n, self.cfg.limited_rate
        self.ensure_corpus(n)
        run = self.run_mailingest(n, f"ratelimit-{rate_text(rate)}-{n}", alloy_rate=rate)
        throughput = self.results.get("throughput") or {}
        default = (throughput.get("mailingest") or {}).get("mails_per_s")
        bare = (throughput.get("bare loop") or {}).get("mails_per_s")
        same = throughput.get("n") == n
        self.results["ratelimit"] = {
            "n": n,
            "rate": rate,
            "default_rate": throughput.get("alloy_rate", self.cfg.alloy_rate),
            "run": run,
            "valid": run["valid"],
            "default_mails_per_s": default if same else None,
            "bare_mails_per_s": bare if same else None,
            "seconds": time.monotonic() - started,
        }
        self.announce("ratelimit")

    def phase_remote(self) -> None:
        """The same comparison with Alloy answering each request after a delay, as a
        remote API does (the sandbox's latency fault): the I/O the target's premise is about."""
        started = time.monotonic()
        n, delay = self.cfg.remote_n, self.cfg.remote_latency_ms
        self.ensure_corpus(n)
        try:
            bare = self.run_bare(n, f"remote-bare-{n}", alloy_latency_ms=delay)
            mine = self.run_mailingest(n, f"remote-mailingest-{n}", alloy_latency_ms=delay)
        finally:
            self.sandbox.set_faults(latency_ms=0.0)
        self.results["remote"] = {
            "n": n,
            "workload": self.workload(n),
            "alloy_latency_ms": delay,
            "runs": [bare, mine],
            "ratio": mine["mails_per_s"] / bare["mails_per_s"],
            "valid": bare["valid"] and mine["valid"],
            "seconds": time.monotonic() - started,
        }
        self.announce("remote")

    def phase_slowtail(self) -> None:
        """Alloy answers 5 % of its requests after 20 s (a slow tail, within the client's
        30 s read timeout): throughput against the same run without it, side by side."""
        started = time.monotonic()
        n = self.cfg.remote_n
        self.ensure_corpus(n)
        slow = {"slow_fraction": 0.05, "slow_ms": 20_000.0, "seed": 12}
        try:
            clean = self.run_mailingest(n, f"slowtail-clean-{n}")
            tail = self.run_mailingest(n, f"slowtail-slow-{n}", faults=slow)
        finally:
            self.sandbox.set_faults(latency_ms=0.0, slow_fraction=0.0)
        self.results["slowtail"] = {
            "n": n,
            "workload": self.workload(n),
            "faults": slow,
            "runs": [clean, tail],
            "ratio": tail["mails_per_s"] / clean["mails_per_s"],
            "valid": clean["valid"] and tail["valid"],
            "seconds": time.monotonic() - started,
        }
        self.announce("slowtail")

    def phase_recovery(self) -> None:
        """kill -9 of a worker mid-step and its restart, six times in one run (prefork and
        thread-pool workers in turn, bench/crashes.py), with mailingest's default lease:
        how long each mail the killed worker held sat still; every run checked for
        exact-once like the others."""
        started = time.monotonic()
        n = self.cfg.remote_n
        self.ensure_corpus(n)
        lease_ms = int(default_float("LEASE") * 1000)
        crashes = Crashes(CRASH_PLAN, lease_ms=lease_ms)
        # a PUT that got through before its worker died is answered 409 when sent again;
        # the product then downloads the token to compare bytes, as from Alloy itself
        self.sandbox.state.keep_bodies = True
        try:
            run = self.run_mailingest(
                n, f"recovery-{n}", alloy_latency_ms=RECOVERY_LATENCY_MS, crashes=crashes
            )
        finally:
            self.sandbox.set_faults(latency_ms=0.0)
            self.sandbox.state.keep_bodies = False
        summary = run["crashes"]
        times = summary["recovered_s"]
        self.results["recovery"] = {
            "n": n,
            "workload": self.workload(n),
            "alloy_latency_ms": RECOVERY_LATENCY_MS,
            "lease_s": lease_ms / 1000,
            "run": run,
            "held": summary["held"],
            "never": summary["never"],
            "p50_s": percentile(times, 0.5) if times else None,
            "p95_s": percentile(times, 0.95) if times else None,
            "max_s": max(times) if times else None,
            "valid": run["valid"] and bool(times),
            "seconds": time.monotonic() - started,
        }
        self.announce("recovery")

    def phase_latency(self) -> None:
        started = time.monotonic()
        section: dict[str, Any] = {
            "mails": self.cfg.latency_mails,
            "spacing_s": self.cfg.latency_spacing,
        }
        section["polling"] = self.run_latency("polling")
        if WatchProcess.available():
            section["idle"] = self.run_latency("idle")
        else:
            section["idle"] = {"available": False, "why": "`mailingest watch` does not exist"}
            log("latency with IDLE: not available (`python -m mailingest watch` is missing)")
        section["seconds"] = time.monotonic() - started
        self.results["latency"] = section
        self.announce("latency")

    def run_latency(self, mode: str) -> dict[str, Any]:
        cfg = self.cfg
        interval = cfg.poll_interval if mode == "polling" else cfg.idle_poll_interval
        root = self.workdir / "runs" / f"latency-{mode}"
        m = cfg.latency_mails
        log(
            f"latency, {mode}: {m} mails APPENDed every {cfg.latency_spacing}s, "
            f"beat every {interval:g}s" + (", mailingest watch running" if mode == "idle" else "")
        )
        tag = "lp" if mode == "polling" else "li"
        mails = [make_mail(cfg.seed, i, tag=tag) for i in range(m)]
        warm = [make_mail(cfg.seed, i, tag=f"w{tag}", attachment_sizes=[200_000]) for i in range(2)]
        with self.servers(root) as servers:
            self.sandbox.reset()
            env = self.env(servers, poll_interval=f"{interval:g}")
            client = servers.client()
            with Mailingest(env, root / "logs", watch=mode == "idle"):
                imap = servers.imap()
                for raw, _ in warm:  # every process has built its services before we time
                    imap.append("INBOX", crlf(raw))
                if mode == "polling":
                    poll_now(env["MAILINGEST_REDIS_URL"])
                ok, _ = wait_filed(client, len(warm), timeout=interval * 2 + 120)
                if not ok:
                    raise RuntimeError(f"latency {mode}: warm-up mails were not processed")
                appended: list[float] = []
                next_at = time.monotonic() + 0.5
                for raw, _spec in mails:
                    payload = crlf(raw)
                    time.sleep(max(0.0, next_at - time.monotonic()))
                    imap.append("INBOX", payload)
                    appended.append(time.time())
                    next_at += cfg.latency_spacing
                ok, counts = wait_filed(client, len(warm) + m, timeout=interval * 3 + m * 10 + 120)
                imap.logout()
            uploads = upload_times(self.sandbox)
            folders = servers.folder_counts("INBOX", "Processed", "Quarantine")
            problems = [] if ok else [f"not every mail was decided and moved: {counts}"]
            problems += verify([s for _, s in warm + mails], self.sandbox, folders)
            latencies = []
            for (_, spec), at in zip(mails, appended, strict=True):
                done = [uploads.get((d.name, d.extension)) for d in spec.docs]
                times = [t for t in done if t is not None]
                if len(times) == len(done):
                    latencies.append(max(times) - at)
            client.close()
        result = {
            "mode": mode,
            "poll_interval_s": interval,
            "latencies_s": [round(x, 4) for x in latencies],
            "p50_s": percentile(latencies, 0.5),
            "p95_s": percentile(latencies, 0.95),
            "max_s": max(latencies) if latencies else float("nan"),
            "valid": not problems and len(latencies) == m,
            "problems": problems,
        }
        log(
            f"  {mode}: p50 {result['p50_s']:.3f}s, p95 {result['p95_s']:.3f}s "
            f"over {len(latencies)} mails"
        )
        return result

    def phase_rss(self) -> None:
        started = time.monotonic()
        cfg = self.cfg
        runs = [self.run_rss(r) for r in range(cfg.rss_repeats)]
        section: dict[str, Any] = {"attachment_bytes": cfg.rss_attachment, "runs": runs}
        valid = [r for r in runs if r["valid"]]
        worst = max(valid, key=lambda r: r["ratio"]) if valid else None
        section["ratio"] = worst["ratio"] if worst else float("nan")
        section["message_bytes"] = runs[0]["message_bytes"]
        section["memprofile"] = self.run_memprofile()
        section["seconds"] = time.monotonic() - started
        self.results["rss"] = section
        self.announce("rss")

    def run_rss(self, r: int) -> dict[str, Any]:
        cfg = self.cfg
        root = self.workdir / "runs" / f"rss-{r + 1}"
        log(
            f"rss {r + 1}: one mail with a {cfg.rss_attachment / MB:.0f} MB attachment, "
            "fresh worker"
        )
        raw, spec = make_mail(
            cfg.seed, r, tag="big", attachment_sizes=[cfg.rss_attachment], kinds=[0]
        )
        warm = [
            make_mail(cfg.seed, i, tag=f"wbig{r}", attachment_sizes=[300_000]) for i in range(4)
        ]
        with self.servers(root) as servers:
            self.sandbox.reset()
            env = self.env(servers, poll_interval="3600")
            client = servers.client()
            with Mailingest(env, root / "logs", beat=False) as procs:
                imap = servers.imap()
                for w, _ in warm:
                    imap.append("INBOX", crlf(w))
                poll_now(env["MAILINGEST_REDIS_URL"])
                wait_filed(client, len(warm), timeout=120)
                time.sleep(1.0)
                pids = procs.processes()
                idle = {role: proc_status(pid).get("VmRSS", 0) for role, pid in pids.items()}
                reset = all(reset_peak(pid) for pid in pids.values())
                imap.append("INBOX", crlf(raw))
                imap.logout()
                with RssSampler(procs.processes, interval=0.01, keep_timeline=True) as sampler:
                    poll_now(env["MAILINGEST_REDIS_URL"])
                    ok, counts = wait_filed(client, len(warm) + 1, timeout=300)
                peak = {role: proc_status(pid).get("VmHWM", 0) for role, pid in pids.items()}
                if not reset:  # no clear_refs: the 10 ms samples are all we have
                    peak = dict(sampler.peak)
            folders = servers.folder_counts("INBOX", "Processed")
            problems = [] if ok else [f"not decided: {counts}"]
            problems += verify([s for _, s in warm] + [spec], self.sandbox, folders)
            client.close()
        pool = [role for role in pids if role.startswith("worker-pool")]
        deltas = {role: peak.get(role, 0) - idle.get(role, 0) for role in pids}
        worst = max(pool, key=lambda role: deltas[role])
        message = spec.vsize
        timeline = (
            [
                (round(t - sampler.timeline[0][0], 3), s)
                for t, s in sampler.timeline[:: max(1, len(sampler.timeline) // 400)]
            ]
            if sampler.timeline
            else []
        )
        result = {
            "message_bytes": message,
            "attachment_bytes": cfg.rss_attachment,
            "idle_rss": idle,
            "peak_rss": peak,
            "delta": deltas,
            "worst_process": worst,
            "ratio": deltas[worst] / message,
            "sum_of_pool_deltas_ratio": sum(max(0, deltas[p]) for p in pool) / message,
            "hwm_reset": reset,
            "valid": not problems,
            "problems": problems,
            "timeline": timeline,
        }
        log(
            f"  rss {r + 1}: idle {idle[worst] / MB:.0f} MB, peak {peak[worst] / MB:.0f} MB "
            f"({worst}), +{deltas[worst] / MB:.0f} MB = {result['ratio']:.2f}x the "
            f"{message / MB:.1f} MB message"
        )
        return result

    def run_memprofile(self) -> dict[str, Any]:
        cfg = self.cfg
        root = self.workdir / "runs" / "memprofile"
        log("memory profile: each step of the 25 MB mail under tracemalloc (bench.memprofile)")
        raw, spec = make_mail(
            cfg.seed, 99, tag="big", attachment_sizes=[cfg.rss_attachment], kinds=[0]
        )
        with self.servers(root) as servers:
            self.sandbox.reset()
            env = self.env(servers, poll_interval="3600")
            imap = servers.imap()
            imap.append("INBOX", crlf(raw))
            imap.logout()
            out = root / "memprofile.json"
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.memprofile",
                    "--out",
                    str(out),
                    "--floor",
                    str(spec.vsize),
                ],
                cwd=REPO,
                env=child_env(env),
                capture_output=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0 or not out.exists():
                return {"error": done.stderr.decode(errors="replace")[-2000:]}
            data = json.loads(out.read_text())
        data["message_bytes"] = spec.vsize
        for step in data["steps"]:
            log(
                f"  {step['step']:<10} {step['seconds']:6.2f}s  "
                f"RSS peak +{step['rss_peak_above_before'] / MB:6.1f} MB"
                f"  traced peak +{step['traced_peak_above_before'] / MB:6.1f} MB"
            )
        return dict(data)

    def phase_idle(self) -> None:
        started = time.monotonic()
        cfg = self.cfg
        count = cfg.idle_mails
        root = self.workdir / "runs" / "idle"
        log(f"idle cost: an account holding {count} processed mails")
        section: dict[str, Any] = {"mails": count, "polls": cfg.idle_polls}
        with self.servers(root) as servers:
            owner = mail_owner()
            t = time.monotonic()
            section["bytes_written"] = write_small_mails(
                servers.inbox_maildir, count, cfg.seed, owner
            )
            section["index_seconds"] = servers.index_inbox(count, timeout=1800)
            log(f"  {count} mails written and indexed in {time.monotonic() - t:.0f}s")
            imap = servers.imap()
            uidvalidity = int(imap.select_folder("INBOX")[b"UIDVALIDITY"])
            uids = sorted(imap.search(["ALL"]))
            imap.logout()
            client = servers.client()
            _seed_ledger(client, uidvalidity, uids, filed_to="INBOX")
            env = self.env(servers)
            section["inbox_below_watermark"] = self.measure_polls(
                env, servers, "INBOX holds the processed mails, all below the watermark"
            )
            t = time.monotonic()
            imap = servers.imap()
            if not imap.folder_exists("Processed"):
                imap.create_folder("Processed")
            imap.select_folder("INBOX")
            imap.move("1:*", "Processed")
            imap.logout()
            _seed_ledger(client, uidvalidity, uids, filed_to="Processed", records=False)
            log(f"  moved to Processed in {time.monotonic() - t:.0f}s")
            section["moved_to_processed"] = self.measure_polls(
                env, servers, "INBOX empty, the processed mails in Processed"
            )
            section["folders"] = servers.folder_counts("INBOX", "Processed")
            section["ledger"] = ledger_counts(client)
            client.close()
        section["seconds"] = time.monotonic() - started
        self.results["idle"] = section
        self.announce("idle")

    def measure_polls(self, env: dict[str, str], servers: Servers, what: str) -> dict[str, Any]:
        """Polls of a worker's services that already polled (the steady state: the IMAP
        connection is kept between tasks), then polls each with fresh services (the first
        poll of a worker process: connect and log in)."""
        from mailingest.application import pipeline
        from mailingest.application.services import build_context
        from mailingest.config.settings import load_settings

        from .imapcount import ImapCounter

        settings = load_settings(env)
        client = servers.client()

        def one(ctx: Any) -> dict[str, Any]:
            before = commandstats(client)
            with ImapCounter() as io:
                t = time.perf_counter()
                result = pipeline.poll(ctx, INBOX)
                wall = time.perf_counter() - t
            after = commandstats(client)
            calls = {
                k: after.get(k, 0) - before.get(k, 0)
                for k in after
                if k != "info" and after.get(k, 0) != before.get(k, 0)
            }
            return {
                "seconds": wall,
                "found": result.found,
                "imap_bytes_received": io.received,
                "imap_bytes_sent": io.sent,
                "imap_commands": io.commands,
                "body_fetches": io.body_fetches,
                "redis_commands": sum(calls.values()),
                "redis_commands_by_name": calls,
            }

        def dovecot_delta(before: dict[str, int]) -> dict[str, int]:
            time.sleep(0.3)  # Dovecot writes a session's logout line when it ends
            after = servers.dovecot_sessions()
            keys_ = ("sessions", "in", "out", "body_count", "body_bytes")
            return {k: after.get(k, 0) - before.get(k, 0) for k in keys_}

        polls: list[dict[str, Any]] = []
        cold: list[dict[str, Any]] = []
        try:
            sessions = servers.dovecot_sessions()
            ctx = build_context(settings)
            try:
                pipeline.poll(ctx, INBOX)  # warm-up: folders checked, connection open
                for _ in range(self.cfg.idle_polls):
                    polls.append(one(ctx))
            finally:
                ctx.close()
            warm_dovecot = dovecot_delta(sessions)  # the session of the warm-up and polls
            for _ in range(3):
                sessions = servers.dovecot_sessions()
                ctx = build_context(settings)
                try:
                    cold.append(one(ctx))
                finally:
                    ctx.close()
                cold[-1]["dovecot"] = dovecot_delta(sessions)
        finally:
            client.close()
        out = {
            "what": what,
            "polls": polls,
            "seconds_median": median([p["seconds"] for p in polls]),
            "seconds_max": max(p["seconds"] for p in polls),
            "imap_bytes_received_median": median([p["imap_bytes_received"] for p in polls]),
            "body_fetches_total": sum(p["body_fetches"] for p in polls + cold),
            "dovecot": warm_dovecot,
            "dovecot_body_count_total": warm_dovecot.get("body_count", 0)
            + sum(p["dovecot"].get("body_count", 0) for p in cold),
            "redis_commands_median": median([p["redis_commands"] for p in polls]),
            "cold_polls": cold,
            "cold_seconds_median": median([p["seconds"] for p in cold]),
            "cold_imap_bytes_received_median": median([p["imap_bytes_received"] for p in cold]),
            "cold_redis_commands_median": median([p["redis_commands"] for p in cold]),
        }
        log(
            f"  {what}: poll {out['seconds_median'] * 1000:.1f} ms (median of {len(polls)}; "
            f"{out['cold_seconds_median'] * 1000:.1f} ms with a new connection), "
            f"{out['imap_bytes_received_median']:.0f} bytes from IMAP, "
            f"{out['body_fetches_total']} body fetches, "
            f"{out['redis_commands_median']:.0f} Redis commands"
        )
        return out

    def phase_growth(self) -> None:
        started = time.monotonic()
        cfg = self.cfg
        self.ensure_corpus(max(cfg.sizes))
        cache = getattr(self, "_growth_cache", {})
        points = []
        for n in cfg.sizes:
            point: dict[str, Any] = {"n": n, "workload": self.workload(n)}
            reused = cache.get(f"mailingest-{n}-r1")
            point["mailingest"] = reused or self.run_mailingest(n, f"mailingest-{n}")
            point["mailingest_reused_from_throughput"] = reused is not None
            if n in cfg.bare_sizes:
                reused_bare = cache.get(f"bare-{n}-r1")
                point["bare loop"] = reused_bare or self.run_bare(n, f"bare-{n}")
            points.append(point)
            self.results["growth"] = {"sizes": cfg.sizes, "points": points}
            self.save()
        self.results["growth"] = {
            "sizes": cfg.sizes,
            "bare_sizes": cfg.bare_sizes,
            "points": points,
            "seconds": time.monotonic() - started,
        }
        self.announce("growth")

    # ------------------------------------------------------------------ output

    selected: tuple[str, ...] = PHASES

    def announce(self, phase: str) -> None:
        self.save()
        for v in report.verdicts(self.results):
            if v["phase"] == phase:
                print(
                    f"  >> {v['figure']}: {v['value_text']} (target {v['target']}): {v['verdict']}"
                )


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("seconds", "mails_per_s", "valid") if k in run}


def _seed_ledger(
    client: Any, uidvalidity: int, uids: list[int], *, filed_to: str, records: bool = True
) -> None:
    """The ledger of an inbox whose every mail was processed: ``done``, filed, documents
    uploaded, the watermark at the last UID, written in the ledger's own format."""
    from mailingest.core.records import MailRef

    now = L.now_ms() - 86_400_000
    pipe = client.pipeline(transaction=False)
    for k, uid in enumerate(uids):
        mail_id = MailRef(INBOX, "INBOX", uidvalidity, uid).id
        if records:
            pipe.hset(
                keys.mail(mail_id),
                mapping={
                    "state": L.DONE,
                    "size": 3000,
                    "created_at": now,
                    "updated_at": now,
                    "message_id": f"bench-old-{uid}@mail.example",
                    "sender": "customer00@example.com",
                    "entity": "P-benchbenchbenchbench",
                    "subject": f"Documents old {uid}",
                    "documents": 1,
                    "filed_to": filed_to,
                },
            )
            pipe.sadd(keys.state(L.DONE), mail_id)
            pipe.sadd(keys.done(mail_id), 0)
            pipe.hset(
                keys.document(mail_id, 0),
                mapping={
                    "state": L.UPLOADED,
                    "name": "a",
                    "extension": "pdf",
                    "type": "other",
                    "token": f"D-bench{uid:015d}",
                    "size": 2000,
                },
            )
        else:
            pipe.hset(keys.mail(mail_id), "filed_to", filed_to)
        if k % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    client.set(keys.watermark(INBOX, "INBOX", uidvalidity), max(uids))


# --------------------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="mailingest's benchmark (issue 6): throughput vs a bare loop, latency, "
        "peak RSS, idle cost, growth. See bench/README.md.",
    )
    p.add_argument("--quick", action="store_true", help="a small smoke run (a few minutes)")
    p.add_argument(
        "--only", default=",".join(PHASES), help=f"phases, comma-separated: {', '.join(PHASES)}"
    )
    p.add_argument("--sizes", help="growth: N values (default 500,2000,10000; quick 40,160)")
    p.add_argument("--throughput-n", type=int, help="N of the throughput comparison (default 500)")
    p.add_argument(
        "--bare-sizes", help="growth: N values the bare loop also runs (default: all of --sizes)"
    )
    p.add_argument(
        "--repeats", type=int, help="runs of each system in the throughput phase (default 2)"
    )
    p.add_argument("--latency-mails", type=int, help="mails per latency mode (default 40)")
    p.add_argument("--latency-spacing", type=float, default=0.75, help="seconds between APPENDs")
    p.add_argument("--poll-interval", type=float, default=2.0, help="beat's poll interval (s)")
    p.add_argument(
        "--idle-poll-interval", type=float, default=60.0, help="beat's interval with IDLE"
    )
    p.add_argument(
        "--idle-mails", type=int, help="processed mails of the idle-cost test (default 50000)"
    )
    p.add_argument("--rss-attachment", type=int, default=25_000_000, help="bytes (default 25 MB)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled runs")
    p.add_argument("--remote-n", type=int, help="N of the remote-Alloy comparison (default 200)")
    p.add_argument(
        "--remote-latency-ms",
        type=float,
        default=50.0,
        help="delay of every Alloy request in the remote comparison (default 50 ms)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="only rewrite results.md and results.png from the results.json in --out",
    )
    p.add_argument(
        "--alloy-rate",
        type=float,
        default=SHIPPED_ALLOY_RATE,
        help="MAILINGEST_ALLOY_RATE of every run but the ratelimit phase's (default: as "
        f"shipped, {rate_text(SHIPPED_ALLOY_RATE)}; 10000 runs the limiter without it binding)",
    )
    p.add_argument(
        "--limited-rate",
        type=float,
        default=BINDING_ALLOY_RATE,
        help="MAILINGEST_ALLOY_RATE of the ratelimit phase, a limit that binds "
        f"(default {rate_text(BINDING_ALLOY_RATE)}: the default until issue 12)",
    )
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new one in /tmp)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument(
        "--out",
        type=Path,
        help="results directory (default bench/, quick: /tmp/mailingest-bench-quick)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    sizes = _ints(args.sizes) if args.sizes else ([40, 160] if quick else [500, 2000, 10000])
    cfg = Config(
        quick=quick,
        seed=args.seed,
        throughput_n=args.throughput_n or (40 if quick else 500),
        repeats=args.repeats or (1 if quick else 2),
        sizes=sizes,
        bare_sizes=_ints(args.bare_sizes) if args.bare_sizes else list(sizes),
        latency_mails=args.latency_mails or (10 if quick else 40),
        latency_spacing=args.latency_spacing,
        poll_interval=args.poll_interval,
        idle_poll_interval=args.idle_poll_interval,
        idle_mails=args.idle_mails or (5000 if quick else 50_000),
        idle_polls=5,
        rss_attachment=args.rss_attachment,
        rss_repeats=1 if quick else 2,
        profile=not args.no_profile,
        remote_n=args.remote_n or (20 if quick else 200),
        remote_latency_ms=args.remote_latency_ms,
        alloy_rate=args.alloy_rate,
        limited_rate=args.limited_rate,
    )
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = set(only) - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    if cfg.limited_rate <= 0:
        p.error("--limited-rate must be above 0 (the ratelimit phase measures a limit that binds)")
    args.only = only
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    if args.report:
        out = args.out or REPO / "bench"
        saved = json.loads((out / "results.json").read_text())
        throughput = saved.get("throughput") or {}
        for system, entry in throughput.get("profiles", {}).items():
            kind = "mailingest" if system == "mailingest" else "bare"
            name = entry.get("file", f"profile-{kind}-{throughput['n']}.txt")
            for raw in (out / "profiles" / f"{name}.gz", out / "profiles" / name):
                if raw.exists():  # the summary as profiles.py makes it now
                    entry["summary"] = summarize(raw)
                    break
        (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
        report.write(saved, out)
        print(f"rewrote {out / 'results.md'} and {out / 'results.png'}")
        return 0
    # SIGTERM unwinds like Ctrl-C: every server, worker and temp dir is cleaned up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = args.out or (Path("/tmp/mailingest-bench-quick") if cfg.quick else REPO / "bench")
    own_workdir = args.workdir is None
    workdir = (
        Path(tempfile.mkdtemp(prefix="mailingest-bench-", dir="/tmp"))
        if own_workdir
        else args.workdir.resolve()
    )
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    previous = out / "results.json"
    partial = set(args.only) != set(PHASES)
    if partial and previous.exists():
        results = json.loads(previous.read_text())  # keep the phases not rerun
    command = "python -m bench" + (
        ""
        if argv is None and len(sys.argv) <= 1
        else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    began = time.monotonic()
    run_meta: dict[str, Any] = {
        "command": command.strip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": cfg.quick,
        "config": cfg.__dict__,
        "phases": list(args.only),
    }
    results.setdefault("runs", []).append(run_meta)
    results["machine"] = machine()
    results["settings"] = report.settings_note(cfg)
    log(f"mailingest benchmark in {workdir}; results to {out}")
    bench: Bench | None = None
    try:
        bench = Bench(cfg, workdir, out, results)
        bench.selected = tuple(args.only)
        bench.keep = args.keep_workdir
        for phase in PHASES:
            if phase in args.only:
                getattr(bench, f"phase_{phase}")()
                results.setdefault("phase_runs", {})[phase] = run_meta["date"]
        run_meta["seconds"] = time.monotonic() - began
        if bench.corpus.specs:
            note = report.workload_note(bench.corpus, cfg)
            earlier = results.get("workload", {})
            note["totals"] = earlier.get("totals", {}) | note["totals"]
            note["generated"] = max(note["generated"], earlier.get("generated", 0))
            results["workload"] = note
        bench.save()
        log(f"done in {run_meta['seconds'] / 60:.1f} min: {out / 'results.md'}")
        for v in report.verdicts(results):
            print(f"  {v['verdict']:4}  {v['figure']}: {v['value_text']} (target {v['target']})")
    finally:
        if bench is not None:
            bench.close()
        if own_workdir and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep_workdir:
            log(f"workdir kept: {workdir}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
