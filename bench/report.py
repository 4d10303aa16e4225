"""results.json -> the verdicts, ``results.md`` and ``results.png``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .notes import NOTES
from .stack import MACHINE, SHIPPED_ALLOY_RATE

MB = 1e6
# peak redis-server RSS of the N = 500 throughput runs when issue 12 was filed (commit
# 3286aec's bench/results.json: 1,195,245,568 and 1,221,103,616 bytes; median)
REDIS_RSS_BEFORE_ISSUE_12 = (1_195_245_568 + 1_221_103_616) / 2


def _ok(value: float, good: bool, valid: bool = True) -> str:
    if not valid:
        return "INVALID"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "PASS" if good else "MISS"


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 6 with its figure and verdict, from what has been measured."""
    out: list[dict[str, Any]] = []

    def add(
        vid: str, phase: str, figure: str, value: Any, text: str, target: str, verdict: str
    ) -> None:
        out.append(
            {
                "id": vid,
                "phase": phase,
                "figure": figure,
                "value": value,
                "value_text": text,
                "target": target,
                "verdict": verdict,
            }
        )

    t = results.get("throughput")
    if t:
        valid = t["mailingest"]["runs_valid"] == t["mailingest"]["runs"] and (
            t["bare loop"]["runs_valid"] == t["bare loop"]["runs"]
        )
        add(
            "throughput_ratio",
            "throughput",
            f"throughput mailingest / bare loop (N = {t['n']}{_rate_note(t.get('alloy_rate'))})",
            t["ratio"],
            f"{t['ratio']:.2f} ({t['mailingest']['mails_per_s']:.2f} / "
            f"{t['bare loop']['mails_per_s']:.2f} mails/s)",
            ">= 1.3 (issue 12)",
            _ok(t["ratio"], t["ratio"] >= 1.3, valid),
        )
        mine = [r for r in t.get("runs", []) if r["system"] == "mailingest" and r["valid"]]
        if mine:
            per_mail = median([r["redis_commands"] / r["n"] for r in mine])
            add(
                "redis_commands_per_mail",
                "throughput",
                f"Redis commands per mail (N = {t['n']}; INFO commandstats, Lua's own "
                "commands and the broker's included)",
                per_mail,
                f"{per_mail:.0f}",
                "<= 80",
                _ok(per_mail, per_mail <= 80),
            )
            cpu_ms = median([_mailingest_cpu(r) / r["n"] * 1000 for r in mine])
            add(
                "cpu_per_mail",
                "throughput",
                f"CPU per mail, mailingest's processes (workers and beat; N = {t['n']})",
                cpu_ms,
                f"{cpu_ms:.0f} ms",
                "<= 45 ms",
                _ok(cpu_ms, cpu_ms <= 45),
            )
            redis_rss = [r["peak_rss"]["redis"] for r in mine if r.get("peak_rss", {}).get("redis")]
            if redis_rss and t["n"] == 500:
                ratio = median(redis_rss) / REDIS_RSS_BEFORE_ISSUE_12
                add(
                    "redis_rss",
                    "throughput",
                    "peak redis-server RSS at N = 500 against the figure issue 12 started from "
                    f"({REDIS_RSS_BEFORE_ISSUE_12 / MB:,.0f} MB, the median of commit 3286aec's "
                    "two runs)",
                    ratio,
                    f"{ratio:.2f}x ({median(redis_rss) / MB:,.0f} MB)",
                    "<= 0.5x (issue 12)",
                    _ok(ratio, ratio <= 0.5),
                )
            first = [r["first_document_s"] for r in mine if r.get("first_document_s") is not None]
            if first:
                add(
                    "first_document",
                    "throughput",
                    f"first poll of a {t['n']}-mail backlog -> first document at Alloy",
                    median(first),
                    f"{median(first):.2f} s",
                    "<= 2 s",
                    _ok(median(first), median(first) <= 2.0),
                )
    limited = results.get("ratelimit")
    if limited:
        run = limited["run"]
        default, bare = limited.get("default_mails_per_s"), limited.get("bare_mails_per_s")
        text = f"{run['mails_per_s']:.2f} mails/s"
        if default:
            text += (
                f" = {run['mails_per_s'] / default:.2f} of the default's {default:.2f}"
                f"{_rate_note(limited.get('default_rate'), ' (', ')')}"
            )
        if bare:
            text += f", {run['mails_per_s'] / bare:.2f} of the bare loop's"
        text += (
            f"; Alloy got {run.get('alloy_requests_per_s', float('nan')):.1f} requests/s of "
            f"{limited['rate']:g} allowed"
        )
        pace = run.get("alloy_pace_last_minute")
        if pace and pace.get("requests"):
            text += (
                f"; the run's last minute: {pace['delayed']:,} of {pace['requests']:,} "
                "requests waited for a token"
                + (", the limiter set the pace" if pace.get("sets_the_pace") else "")
            )
        add(
            "ratelimit_throughput",
            "ratelimit",
            f"throughput with MAILINGEST_ALLOY_RATE={limited['rate']:g} (limiter binding; "
            f"N = {limited['n']}; informational)",
            run["mails_per_s"],
            text,
            "informational",
            "info" if limited["valid"] else "INVALID",
        )
    remote = results.get("remote")
    if remote:
        mine, bare = remote["runs"][1], remote["runs"][0]
        add(
            "remote_ratio",
            "remote",
            f"throughput mailingest / bare loop with {remote['alloy_latency_ms']:g} ms per Alloy "
            f"request (N = {remote['n']})",
            remote["ratio"],
            f"{remote['ratio']:.2f} "
            f"({mine['mails_per_s']:.2f} / {bare['mails_per_s']:.2f} mails/s)",
            ">= 2.5 (issue 12)",
            _ok(remote["ratio"], remote["ratio"] >= 2.5, remote["valid"]),
        )
    slow = results.get("slowtail")
    if slow:
        clean, tail = slow["runs"]
        add(
            "slowtail_ratio",
            "slowtail",
            f"throughput with 5 % of Alloy requests answered after 20 s / without (N = "
            f"{slow['n']})",
            slow["ratio"],
            f"{slow['ratio']:.2f} ({tail['mails_per_s']:.2f} / {clean['mails_per_s']:.2f} mails/s)",
            ">= 0.5",
            _ok(slow["ratio"], slow["ratio"] >= 0.5, slow["valid"]),
        )
    rec = results.get("recovery")
    if rec and rec.get("p95_s") is not None:
        kills = [k for k in rec["run"]["crashes"]["kills"] if not k["skipped"]]
        add(
            "recovery_p95",
            "recovery",
            f"worker kill -9 mid-step ({len(kills)} kills, then restarted; default lease "
            f"{rec['lease_s']:g} s; N = {rec['n']}): its mails moving again, p95",
            rec["p95_s"],
            f"{rec['p95_s']:.1f} s (p50 {rec['p50_s']:.1f} s, max {rec['max_s']:.1f} s; "
            f"{rec['held']} mails held at the kills, {rec['never']} never moved; "
            "every document once, no uploaded: false left"
            f"{'' if rec['run']['valid'] else ' NOT SO: ' + '; '.join(rec['run']['problems'])})",
            "<= 60 s (issue 12)",
            _ok(rec["p95_s"], rec["p95_s"] <= 60 and not rec["never"], rec["valid"]),
        )
    lat = results.get("latency")
    if lat:
        poll = lat["polling"]
        limit = poll["poll_interval_s"] / 2 + 1
        add(
            "latency_poll_p50",
            "latency",
            f"latency with polling (every {poll['poll_interval_s']:g} s), p50",
            poll["p50_s"],
            f"{poll['p50_s']:.2f} s (p95 {poll['p95_s']:.2f} s)",
            f"<= {limit:g} s (interval / 2 + 1 s)",
            _ok(poll["p50_s"], poll["p50_s"] <= limit, poll["valid"]),
        )
        idle = lat.get("idle", {})
        if idle.get("available", True) and "p50_s" in idle:
            add(
                "latency_idle_p50",
                "latency",
                "latency with IDLE, p50",
                idle["p50_s"],
                f"{idle['p50_s']:.2f} s",
                "<= 1 s",
                _ok(idle["p50_s"], idle["p50_s"] <= 1.0, idle["valid"]),
            )
            add(
                "latency_idle_p95",
                "latency",
                "latency with IDLE, p95",
                idle["p95_s"],
                f"{idle['p95_s']:.2f} s",
                "<= 3 s",
                _ok(idle["p95_s"], idle["p95_s"] <= 3.0, idle["valid"]),
            )
        else:
            for vid, figure, target in (
                ("latency_idle_p50", "latency with IDLE, p50", "<= 1 s"),
                ("latency_idle_p95", "latency with IDLE, p95", "<= 3 s"),
            ):
                add(vid, "latency", figure, None, "not available", target, "n/a")
    rss = results.get("rss")
    if rss:
        valid = all(r["valid"] for r in rss["runs"])
        add(
            "rss_ratio",
            "rss",
            f"peak worker RSS above idle, {rss['attachment_bytes'] / MB:.0f} MB attachment "
            f"({rss['message_bytes'] / MB:.1f} MB message)",
            rss["ratio"],
            f"{rss['ratio']:.2f}x the message size",
            "<= 4x",
            _ok(rss["ratio"], rss["ratio"] <= 4, valid),
        )
    idle = results.get("idle")
    if idle:
        for key, label in (
            ("moved_to_processed", "mails moved to Processed"),
            ("inbox_below_watermark", "mails kept in INBOX below the watermark"),
        ):
            v = idle.get(key)
            if not v:
                continue
            ms = v["seconds_median"] * 1000
            add(
                f"idle_{key}_ms",
                "idle",
                f"idle poll, {idle['mails']:,} processed {label}: wall time",
                ms,
                f"{ms:.1f} ms (max {v['seconds_max'] * 1000:.1f} ms; "
                f"{v['imap_bytes_received_median']:.0f} B from IMAP, "
                f"{v['redis_commands_median']:.0f} Redis commands"
                + (
                    f"; {v['cold_seconds_median'] * 1000:.0f} ms on a new connection)"
                    if v.get("cold_polls")
                    else ")"
                ),
                "<= 100 ms",
                _ok(ms, ms <= 100),
            )
            bodies = v["body_fetches_total"] + v["dovecot_body_count_total"]
            add(
                f"idle_{key}_bodies",
                "idle",
                f"idle poll, {label}: message bodies fetched",
                bodies,
                f"{v['body_fetches_total']} FETCH BODY commands, Dovecot counted "
                f"{v['dovecot_body_count_total']} body fetches",
                "none",
                _ok(bodies, bodies == 0),
            )
    g = results.get("growth")
    if g and g.get("points"):
        points = sorted(g["points"], key=lambda p: p["n"])
        first, last = points[0], points[-1]
        if len(points) >= 2:
            a, b = first["mailingest"], last["mailingest"]
            ratio = b["mails_per_s"] / a["mails_per_s"]
            add(
                "growth_ratio",
                "growth",
                f"throughput at N = {last['n']:,} vs N = {first['n']:,}",
                ratio,
                f"{b['mails_per_s']:.2f} vs {a['mails_per_s']:.2f} mails/s "
                f"({(ratio - 1) * 100:+.1f} %)",
                ">= 0.90 (within 10 %, issue 12)",
                _ok(ratio, ratio >= 0.90, a["valid"] and b["valid"]),
            )
    return out


MAILINGEST_PROCESSES = (
    "worker main process",
    "worker pool processes",
    "I/O worker (threads)",
    "beat",
)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _mailingest_cpu(run: dict[str, Any]) -> float:
    """CPU seconds of mailingest's own processes in a run (not Redis, Dovecot, Alloy)."""
    cpu = run.get("cpu_seconds", {})
    return float(sum(cpu.get(name, 0.0) for name in MAILINGEST_PROCESSES))


def _rate_note(rate: float | None, before: str = "; ", after: str = "") -> str:
    """``MAILINGEST_ALLOY_RATE=0, the default: off`` between ``before`` and ``after``
    (empty when the run did not record it)."""
    if rate is None:
        return ""
    shipped = ", the default" if rate == SHIPPED_ALLOY_RATE else ""
    text = f"MAILINGEST_ALLOY_RATE={rate:g}{shipped}" + (": off" if rate == 0 else "")
    return before + text + after


def settings_note(cfg: Any) -> dict[str, str]:
    rate = cfg.alloy_rate
    return {
        "worker": "python -m celery -A mailingest worker --concurrency 2 --pool prefork "
        "(mailingest_testbed.servers.CeleryProcess), plus beat (RedBeat)",
        "poll interval": f"MAILINGEST_POLL_INTERVAL={cfg.poll_interval:g} s (throughput, growth, "
        f"polling latency); {cfg.idle_poll_interval:g} s with IDLE",
        "rate limit": (
            f"MAILINGEST_ALLOY_RATE={rate:g}"
            + (
                " (the default: no token bucket; a 429 would pause every worker)"
                if rate == 0
                else " (the Redis token bucket runs on every request)"
            )
            + f"; the ratelimit phase: {cfg.limited_rate:g}/s, a limit that binds"
        ),
        "staged bytes": "MAILINGEST_STAGING_KEY set: staged mail and document bytes sealed with "
        "AES-256-GCM, as the README advises",
        "Redis": "a private redis-server 7 per run with appendonly yes, appendfsync everysec "
        "(as docker-compose.yml runs it)",
        "everything else": "mailingest's defaults: late acks, prefetch 1, POLL_LIMIT 500, "
        "FETCH_BATCH 50 / FETCH_BYTES 64 MiB, limits 40 MiB message / 25 MiB attachment, "
        "DMARC check on, LOG_LEVEL info",
        "sandbox": "mailingest_testbed.alloy_sandbox in the harness process, keep_bodies=False "
        "(size and "
        "SHA-256 of each upload kept, for the correctness check), reset between runs",
        "bare loop": "bench/bare_loop.py, one process: imapclient FETCH BODY.PEEK[] per mail, "
        "email (policy.default), httpx POST + PUT per attachment, MOVE per mail",
    }


def workload_note(corpus: Any, cfg: Any) -> dict[str, Any]:
    return {
        "seed": cfg.seed,
        "attachments_per_mail": "1-3 (uniform)",
        "attachment_sizes": "log-uniform between 50,000 and 2,000,000 bytes",
        "kinds": "PDF 50 %, JPEG 30 %, PNG 20 % (real magic numbers, random content)",
        "senders": "20 customers in the sender CSV; DMARC pass from the trusted authserv-id",
        "generated": len(corpus.specs),
        "totals": {
            str(n): corpus.totals(n)
            for n in sorted({*cfg.sizes, cfg.throughput_n})
            if n <= len(corpus.specs)
        },
    }


# --------------------------------------------------------------------------- markdown


def _workloads(results: dict[str, Any], note: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """N -> the workload's totals, from every section that ran on the first N mails."""
    out = {int(n): t for n, t in note.get("totals", {}).items()}
    if results.get("throughput"):
        out[results["throughput"]["n"]] = results["throughput"]["workload"]
    for point in (results.get("growth") or {}).get("points", []):
        out[point["n"]] = point["workload"]
    remote = results.get("remote")
    if remote and remote.get("workload"):
        out[remote["n"]] = remote["workload"]
    return dict(sorted(out.items()))


def _ours(cpu: dict[str, float]) -> float:
    """CPU seconds of the benchmark's own processes (the machine-wide total left out)."""
    return sum(v for k, v in cpu.items() if k != MACHINE)


def _path(frame: str) -> str:
    """``/any/checkout/mailingest/x.py:1`` -> ``mailingest/x.py:1``."""
    return re.sub(r"^/\S*?/(mailingest|bench)/", r"\1/", frame)


def _mb(value: float) -> str:
    return f"{value / MB:,.1f} MB"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _profile_lines(summary: dict[str, Any], roles: list[str], top: int = 10) -> list[str]:
    lines: list[str] = []
    for role in roles:
        s = summary.get(role)
        if not s:
            continue
        steps = ", ".join(f"{k} {v * 100:.0f} %" for k, v in s["steps"].items() if v >= 0.005)
        by_step = (
            f" Share of samples by pipeline step: {steps}." if set(s["steps"]) != {"other"} else ""
        )
        lines += [
            f"*{role}* ({s['samples']:,} samples at 100 Hz over {s['processes']} "
            f"process(es)).{by_step}",
            "",
        ]
        tables = [
            (
                "busy samples by where they land (innermost frame that is not socket/ssl plumbing)",
                s.get("libraries", []),
            ),
            (
                "library <- the innermost mailingest function that called it (busy samples)",
                s.get("callers", []),
            ),
            ("own functions on the stack (inclusive)", s["inclusive"]),
            ("top frames, self", s["self"]),
        ]
        for title, rows in tables:
            if rows:
                lines.append(
                    _table(
                        [title, "share of samples"],
                        [[f"`{k}`", f"{v * 100:.1f} %"] for k, v in rows[:top] if v >= 0.005],
                    )
                )
                lines.append("")
    return lines


def _cpu_lines(runs: list[dict[str, Any]], cores: int) -> list[str]:
    """CPU seconds per mail of each component, first valid run of each system."""
    rows = []
    for system in ("mailingest", "bare loop"):
        run = next((r for r in runs if r["system"] == system and r.get("cpu_seconds")), None)
        if run is None:
            continue
        cpu = dict(run["cpu_seconds"])
        machine = cpu.pop(MACHINE, None)
        total = sum(cpu.values())
        for name, secs in sorted(cpu.items(), key=lambda kv: -kv[1]):
            rows.append([system, name, f"{secs:.1f}", f"{secs / run['n'] * 1000:.1f}"])
        available = run["seconds"] * cores
        rows.append(
            [
                system,
                f"**total** ({total / available * 100:.0f} % of the {available:.1f} CPU-s "
                f"{cores} cores offer in {run['seconds']:.1f} s)",
                f"**{total:.1f}**",
                f"**{total / run['n'] * 1000:.1f}**",
            ]
        )
        if machine is not None:
            others = max(0.0, machine - total)
            rows.append(
                [
                    system,
                    f"other processes on the machine, not the benchmark's "
                    f"(machine {machine / available * 100:.0f} % busy)",
                    f"{others:.1f}",
                    "-",
                ]
            )
    if not rows:
        return []
    return [
        "CPU used during the timed window, by component (user + system, from /proc; "
        "Dovecot's and the worker's child processes included):",
        "",
        _table(["system", "component", "CPU seconds", "CPU ms per mail"], rows),
        "",
    ]


def _pool_busy(run: dict[str, Any], processes: int = 2) -> float:
    """The share of the wall time the worker's pool processes spent on the CPU."""
    cpu = run.get("cpu_seconds", {}).get("worker pool processes", 0.0)
    return float(cpu) / max(1e-9, float(run["seconds"]) * processes)


def _ratelimit_lines(results: dict[str, Any]) -> list[str]:
    limited = results.get("ratelimit")
    if not limited:
        return []
    run = limited["run"]
    lines = [
        f"**With a rate limit that binds** (`MAILINGEST_ALLOY_RATE={limited['rate']:g}`, the "
        f"default until issue 12; one run of the same {limited['n']} mails, "
        f"{'valid' if run['valid'] else 'INVALID'}): **{run['mails_per_s']:.2f}** mails/s"
    ]
    default = limited.get("default_mails_per_s")
    if default:
        lines[0] += (
            f", {run['mails_per_s'] / default:.2f} of the {default:.2f} above"
            f"{_rate_note(limited.get('default_rate'), ' (', ')')}"
        )
    lines[0] += (
        f". Alloy got {run.get('alloy_requests_per_s', float('nan')):.1f} requests/s of the "
        f"{limited['rate']:g} allowed; the worker's pool processes were on the CPU "
        f"{_pool_busy(run) * 100:.0f} % of the time"
    )
    firsts = [
        r for r in (results.get("throughput") or {}).get("runs", []) if r["system"] == "mailingest"
    ]
    if firsts:
        lines[0] += f" ({_pool_busy(firsts[0]) * 100:.0f} % without the limit)"
    pace = run.get("alloy_pace_last_minute") or {}
    if pace.get("requests"):
        lines[0] += (
            f". The limiter's own counters (as `mailingest status` reads them) for the run's "
            f"last minute: {pace['delayed']:,} of {pace['requests']:,} requests waited for a "
            f"token, {pace['waited_ms'] / 1000:,.0f} s in all"
            + (": it set the pace" if pace.get("sets_the_pace") else "")
        )
    return [lines[0] + ".", ""]


def _note(vid: str, verdict_by_id: dict[str, dict[str, Any]], results: dict[str, Any]) -> list[str]:
    v = verdict_by_id.get(vid)
    if v is None or v["verdict"] not in ("MISS", "INVALID", "n/a"):
        return []
    if v["verdict"] == "n/a":
        return [f"**n/a**: {v['figure']} was {v['value_text']}.", ""]
    write = NOTES.get(vid)
    if write is None:
        return [f"**{v['verdict']}**: no analysis written for this figure yet.", ""]
    try:
        note = write(results)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as exc:
        return [f"**{v['verdict']}**: (the analysis could not be written: {exc!r})", ""]
    lines = [f"**{v['verdict']}: why.** {note['why']}", ""]
    close = note.get("close", "")
    if close.startswith("- "):  # a list: it needs a line of its own
        lines += ["**What would close it:**", "", close, ""]
    elif close:
        lines += [f"**What would close it.** {close}", ""]
    return lines


def markdown(results: dict[str, Any], console: dict[str, Any] | None = None) -> str:
    vs = verdicts(results)
    by_id = {v["id"]: v for v in vs}
    m = results.get("machine", {})
    runs = results.get("runs", [])
    last = runs[-1] if runs else {}
    lines = [
        "# mailingest benchmark results",
        "",
        "Written by `python -m bench` (see [README.md](README.md) for what each figure measures "
        "and how). Raw figures: [results.json](results.json); plot: [results.png](results.png).",
        "",
    ]
    if last.get("quick"):
        lines += [
            "> **Quick run** (`--quick`): small N, one run each. Not the committed figures.",
            "",
        ]
    lines += ["## Summary", ""]
    lines.append(
        _table(
            ["figure", "value", "target", "verdict"],
            [[v["figure"], v["value_text"], v["target"], f"**{v['verdict']}**"] for v in vs],
        )
    )
    lines += ["", "## Machine and run", ""]
    lines.append(
        _table(
            ["", ""],
            [
                ["cores", m.get("cores")],
                ["CPU", m.get("cpu")],
                ["RAM", f"{m.get('ram_bytes', 0) / 2**30:.1f} GiB"],
                ["kernel", m.get("kernel")],
                ["Python", m.get("python")],
                ["Dovecot", m.get("dovecot")],
                ["Redis", m.get("redis")],
                [
                    "mailingest",
                    f"commit {m.get('commit')}"
                    + (
                        ", uncommitted changes in "
                        + ", ".join(x.split()[-1] for x in m["uncommitted_in_mailingest"])
                        if m.get("uncommitted_in_mailingest")
                        else ""
                    ),
                ],
                [
                    "Celery / imapclient / httpx / mail-parser",
                    " / ".join(
                        str(m.get(k)) for k in ("celery", "imapclient", "httpx", "mail-parser")
                    ),
                ],
            ]
            + [
                [
                    f"run {i + 1}",
                    f"`{r['command']}` on {r['date']}, {r.get('seconds', 0) / 60:.1f} min, "
                    f"phases: {', '.join(r['phases'])}",
                ]
                for i, r in enumerate(runs[-4:])
            ],
        )
    )
    if "settings" in results:
        lines += ["", "Settings of every mailingest run:", ""]
        lines += [f"- **{k}**: {v}" for k, v in results["settings"].items()]
    w = results.get("workload")
    if w:
        lines += ["", "## Workload", ""]
        lines += [
            f"Deterministic (seed {w['seed']}; `bench/workload.py`): {w['attachments_per_mail']} "
            f"attachments per mail, sizes {w['attachment_sizes']}, {w['kinds']}; {w['senders']}. "
            "Every run gets the first N mails of the same sequence, delivered fresh to an empty "
            "INBOX of a fresh Dovecot (hard links into the maildir, indexed before the clock "
            "starts).",
            "",
        ]
        lines.append(
            _table(
                [
                    "N",
                    "documents",
                    "message bytes (as IMAP counts them)",
                    "document bytes",
                    "mean message",
                ],
                [
                    [
                        f"{int(t['mails']):,}",
                        f"{int(t['documents']):,}",
                        _mb(t["message_bytes"]),
                        _mb(t["document_bytes"]),
                        _mb(t["mean_message_bytes"]),
                    ]
                    for t in _workloads(results, w).values()
                ],
            )
        )
    lines += ["", "## 1. Throughput: mailingest vs the bare loop", ""]
    t = results.get("throughput")
    if t:
        lines += [
            f"Same {t['n']} mails, same sandbox, fresh servers per run, alternating. Throughput = "
            "mails / wall time from the first poll (mailingest) or the start of the script (bare "
            "loop) to the moment the last mail was moved out of the INBOX. Every run is checked: "
            "each document at Alloy exactly once with its bytes (SHA-256), every mail in "
            "Processed.",
            "",
        ]
        rows = []
        for r in t["runs"]:
            rss = max([v for k, v in r.get("peak_rss", {}).items() if k != "redis"] or [0])
            rows.append(
                [
                    r["system"],
                    r["label"],
                    f"{r['seconds']:.1f}",
                    f"{r['mails_per_s']:.2f}",
                    f"{r['message_mb_per_s']:.1f}",
                    _mb(rss),
                    _mb(r.get("peak_rss", {}).get("redis", 0))
                    if "redis" in r.get("peak_rss", {})
                    else "-",
                    "valid" if r["valid"] else "INVALID: " + "; ".join(r["problems"][:2]),
                ]
            )
        lines.append(
            _table(
                [
                    "system",
                    "run",
                    "seconds",
                    "mails/s",
                    "MB/s of mail",
                    "peak RSS (bare loop; mailingest: largest worker process)",
                    "redis-server peak RSS",
                    "check",
                ],
                rows,
            )
        )
        lines += [
            "",
            f"Median: mailingest **{t['mailingest']['mails_per_s']:.2f}** mails/s, bare loop "
            f"**{t['bare loop']['mails_per_s']:.2f}** mails/s; ratio **{t['ratio']:.2f}**. "
            f"Spread between repeats: mailingest {t['mailingest']['spread']}, "
            f"bare loop {t['bare loop']['spread']} mails/s.",
            "",
        ]
        mi = [r for r in t["runs"] if r["system"] == "mailingest"]
        if mi:
            r = mi[0]
            lines += [
                f"Cost per mail in mailingest (run {r['label']}): "
                f"{r['redis_commands'] / r['n']:.0f} Redis commands, "
                f"{r['imap'].get('out', 0) / max(1, t['workload']['message_bytes']):.2f} "
                "bytes sent by Dovecot per byte of mail (each mail fetched once), "
                f"{r['sandbox'].get('POST /v1/entities/{entity}/documents', 0) / r['n']:.2f} "
                "describes per mail. "
                "Most frequent Redis commands: "
                + ", ".join(
                    f"{k} {v / r['n']:.1f}"
                    for k, v in list(r["redis_commands_by_name"].items())[:8]
                )
                + " per mail.",
                "",
            ]
        lines += _note("redis_commands_per_mail", by_id, results)
        lines += _cpu_lines(t["runs"], int(m.get("cores") or 1))
        lines += _note("cpu_per_mail", by_id, results)
        lines += _ratelimit_lines(results)
        remote = results.get("remote")
        if remote:
            rows = [
                [
                    r["system"],
                    f"{r['seconds']:.1f}",
                    f"{r['mails_per_s']:.2f}",
                    f"{_ours(r['cpu_seconds']) / r['n'] * 1000:.1f}",
                    "valid" if r["valid"] else "INVALID: " + "; ".join(r["problems"][:2]),
                ]
                for r in remote["runs"]
            ]
            lines += [
                f"**With a remote Alloy** (informational, no target): the same comparison on the "
                f"first {remote['n']} mails with the sandbox answering every request after "
                f"{remote['alloy_latency_ms']:g} ms (its latency fault), as an API across the "
                "internet does; everything else unchanged. Ratio mailingest / bare loop: "
                f"**{remote['ratio']:.2f}**.",
                "",
                _table(["system", "seconds", "mails/s", "CPU ms per mail", "check"], rows),
                "",
            ]
        slow = results.get("slowtail")
        if slow:
            clean, tail = slow["runs"]
            lines += [
                f"**With a slow tail** (the first {slow['n']} mails, side by side): "
                f"{100 * slow['faults']['slow_fraction']:g} % of Alloy's answers after "
                f"{slow['faults']['slow_ms'] / 1000:g} s (within the client's 30 s read "
                f"timeout): {tail['mails_per_s']:.2f} mails/s against {clean['mails_per_s']:.2f} "
                f"without, **{slow['ratio']:.2f}** of it; both runs "
                + ("valid." if slow["valid"] else "NOT all valid."),
                "",
            ]
            lines += _note("slowtail_ratio", by_id, results)
        lines += _note("throughput_ratio", by_id, results)
        p = t.get("profiles")
        if p:
            lines += ["### Profiles (py-spy, 100 Hz, idle samples included, separate runs)", ""]
            lines += [
                "mailingest profiled run: "
                f"{p['mailingest']['run'].get('mails_per_s', 0):.2f} mails/s; bare loop "
                f"profiled run: {p['bare loop']['run'].get('mails_per_s', 0):.2f} mails/s. "
                "Raw stacks: `bench/profiles/` (gzipped, `flamegraph.pl`-compatible).",
                "",
            ]
            lines += _profile_lines(p["mailingest"]["summary"], ["worker pool process"])
            lines += _profile_lines(p["bare loop"]["summary"], ["bare loop"])
    else:
        lines += ["(not measured)"]
    lines += ["", "## 2. Latency: IMAP APPEND to `uploaded: true`", ""]
    lat = results.get("latency")
    if lat:
        lines += [
            f"{lat['mails']} mails (same size distribution) APPENDed one every "
            f"{lat['spacing_s']} s while the system runs; latency = the sandbox's clock at "
            "the upload of the mail's last document "
            "minus the harness's clock when the APPEND returned (one machine, one clock; "
            "resolution well under 1 ms). Two warm-up mails first.",
            "",
        ]
        rows = []
        for mode in ("polling", "idle"):
            r = lat.get(mode, {})
            if "p50_s" not in r:
                rows.append([mode, "-", "-", "-", "-", r.get("why", "not measured")])
                continue
            how = (
                f"beat every {r['poll_interval_s']:g} s"
                if mode == "polling"
                else f"`mailingest watch` (IDLE), beat every {r['poll_interval_s']:g} s"
            )
            rows.append(
                [
                    mode,
                    how,
                    f"{r['p50_s']:.2f} s",
                    f"{r['p95_s']:.2f} s",
                    f"{r['max_s']:.2f} s",
                    "valid" if r["valid"] else "INVALID: " + "; ".join(r["problems"][:2]),
                ]
            )
        lines.append(_table(["mode", "how", "p50", "p95", "max", "check"], rows))
        lines.append("")
        for vid in ("latency_poll_p50", "latency_idle_p50", "latency_idle_p95"):
            lines += _note(vid, by_id, results)
    else:
        lines += ["(not measured)"]
    lines += ["", "## 3. Peak RSS of a worker process for one large attachment", ""]
    rss = results.get("rss")
    if rss:
        lines += [
            f"One mail with one {rss['attachment_bytes'] / MB:.0f} MB PDF "
            f"({rss['message_bytes'] / MB:.1f} MB as IMAP counts it, base64), to a fresh "
            "worker (--concurrency 2) after four 0.3 MB warm-up mails. Idle = VmRSS after "
            "the warm-up; peak = VmHWM after resetting it (clear_refs) at that "
            "moment; every process of the worker. The default limits (25 MiB attachment, 40 MiB "
            "message) accept this mail unchanged.",
            "",
        ]
        rows = []
        for i, r in enumerate(rss["runs"]):
            for role in sorted(r["idle_rss"]):
                rows.append(
                    [
                        i + 1,
                        role,
                        _mb(r["idle_rss"][role]),
                        _mb(r["peak_rss"].get(role, 0)),
                        _mb(r["delta"][role]),
                        f"{r['delta'][role] / r['message_bytes']:.2f}x",
                    ]
                )
        lines.append(
            _table(
                ["run", "process", "idle RSS", "peak RSS", "peak - idle", "/ message size"], rows
            )
        )
        lines += [
            "",
            f"Worst pool process: **{rss['ratio']:.2f}x** the message size above its idle RSS.",
            "",
        ]
        lines += _note("rss_ratio", by_id, results)
        mp = rss.get("memprofile", {})
        if mp.get("steps"):
            lines += [
                "Each step of the same mail in one process under tracemalloc "
                "(`bench/memprofile.py`; "
                "tracemalloc slows it down, the memory is what counts):",
                "",
            ]
            lines.append(
                _table(
                    [
                        "step",
                        "seconds",
                        "RSS peak above RSS before",
                        "/ message",
                        "Python allocations at peak",
                    ],
                    [
                        [
                            s["step"],
                            f"{s['seconds']:.2f}",
                            _mb(s["rss_peak_above_before"]),
                            f"{s['rss_peak_above_before'] / mp['message_bytes']:.2f}x",
                            _mb(s["traced_peak_above_before"]),
                        ]
                        for s in mp["steps"]
                    ],
                )
            )
            lines.append("")
            worst = max(mp["steps"], key=lambda s: s["traced_peak_above_before"])
            if worst.get("top_sites"):
                lines += [f"Largest live allocations at the peak of `{worst['step']}`:", ""]
                lines.append(
                    _table(
                        ["bytes", "allocated at (outermost ... innermost)"],
                        [
                            [
                                _mb(site["bytes"]),
                                "<br>".join(f"`{_path(c)}`" for c in site["chain"][-6:]),
                            ]
                            for site in worst["top_sites"][:6]
                            if site["bytes"] >= mp["message_bytes"] / 100
                        ],
                    )
                )
                lines.append("")
    else:
        lines += ["(not measured)"]
    lines += ["", "## 4. Idle cost: one poll of an account holding processed mails", ""]
    idle = results.get("idle")
    if idle:
        lines += [
            f"{idle['mails']:,} small mails written into the maildir and indexed, the "
            f"ledger holding {idle['mails']:,} `done` records (written in the ledger's "
            "format) and the watermark at "
            "the last UID. One poll = `mailingest.application.pipeline.poll` called in-process "
            "with the "
            "services a worker builds (`services.build_context`), after a warm-up poll; "
            f"{idle['polls']} polls each. A worker keeps its IMAP connection between tasks, so a "
            "poll is SELECT + UID SEARCH on an open connection; the first poll of a worker "
            "process also connects and logs in (3 such polls, each with fresh services: "
            "*new connection* columns). IMAP bytes are counted on the client's socket; Dovecot's "
            "own logout line (`body_count`) confirms no body was fetched; Redis commands are the "
            "`INFO commandstats` delta.",
            "",
        ]
        rows = []
        for key in ("moved_to_processed", "inbox_below_watermark"):
            v = idle.get(key)
            if not v:
                continue
            cmds = v["polls"][0]["imap_commands"]
            cold = v.get("cold_polls") or []
            rows.append(
                [
                    v["what"],
                    f"{v['seconds_median'] * 1000:.1f} ms",
                    f"{v['seconds_max'] * 1000:.1f} ms",
                    f"{v['imap_bytes_received_median']:,.0f} B",
                    f"{v['cold_seconds_median'] * 1000:.1f} ms" if cold else "-",
                    f"{v['cold_imap_bytes_received_median']:,.0f} B" if cold else "-",
                    f"{v['body_fetches_total']} (Dovecot: {v['dovecot_body_count_total']})",
                    f"{v['redis_commands_median']:.0f}",
                    "<br>".join(f"`{c}`" for c in cmds),
                    "<br>".join(f"`{c}`" for c in cold[0]["imap_commands"]) if cold else "-",
                ]
            )
        lines.append(
            _table(
                [
                    "variant",
                    "wall (median)",
                    "wall (max)",
                    "bytes from IMAP",
                    "wall, new connection",
                    "bytes, new connection",
                    "body fetches (all polls)",
                    "Redis commands",
                    "IMAP commands of one poll",
                    "IMAP commands, new connection",
                ],
                rows,
            )
        )
        lines.append("")
        for key in ("moved_to_processed", "inbox_below_watermark"):
            lines += _note(f"idle_{key}_ms", by_id, results) + _note(
                f"idle_{key}_bodies", by_id, results
            )
    else:
        lines += ["(not measured)"]
    lines += [
        "",
        "## 5. Growth: N = "
        + ", ".join(f"{n:,}" for n in (results.get("growth") or {}).get("sizes", [])),
        "",
    ]
    g = results.get("growth")
    if g and g.get("points"):
        lines += [
            "One run per N and system (N = the throughput phase's N reuses its first run). "
            "Peak RSS "
            "is VmHWM at the end of the run (worker main process and each pool process) and Redis' "
            "`used_memory_peak`. CPU per mail is the timed window's CPU from /proc divided by N.",
            "",
        ]
        rows = []
        for pt in sorted(g["points"], key=lambda p: p["n"]):
            mi = pt["mailingest"]
            pool = max([v for k, v in mi["peak_rss"].items() if k.startswith("worker-pool")] or [0])
            bare = pt.get("bare loop")
            cpu = dict(mi.get("cpu_seconds", {}))
            ours = sum(v for k, v in cpu.items() if k not in (MACHINE, "dovecot"))
            dovecot = cpu.get("dovecot", 0.0)
            bare_dovecot = (bare or {}).get("cpu_seconds", {}).get("dovecot", 0.0)
            rows.append(
                [
                    f"{pt['n']:,}",
                    f"{mi['seconds']:.0f}",
                    f"{mi['mails_per_s']:.2f}",
                    f"{mi['message_mb_per_s']:.1f}",
                    f"{ours / pt['n'] * 1000:.1f}",
                    f"{dovecot / pt['n'] * 1000:.1f} / "
                    + (f"{bare_dovecot / pt['n'] * 1000:.1f}" if bare else "-"),
                    _mb(pool),
                    _mb(mi["peak_rss"].get("worker-main", 0)),
                    _mb(mi["redis_memory"]["used_memory_peak"]),
                    f"{bare['mails_per_s']:.2f}" if bare else "-",
                    _mb(bare["peak_rss"]["bare loop"]) if bare else "-",
                    "valid" if mi["valid"] and (not bare or bare["valid"]) else "INVALID",
                ]
            )
        lines.append(
            _table(
                [
                    "N",
                    "mailingest s",
                    "mails/s",
                    "MB/s",
                    "mailingest CPU ms/mail (worker, beat, Redis, sandbox)",
                    "Dovecot CPU ms/mail (mailingest / bare loop run)",
                    "pool process peak RSS",
                    "main process peak",
                    "Redis used_memory_peak",
                    "bare loop mails/s",
                    "bare loop peak RSS",
                    "check",
                ],
                rows,
            )
        )
        lines.append("")
        lines += _note("growth_ratio", by_id, results)
    else:
        lines += ["(not measured)"]
    lines += _recovery_lines(results, by_id)
    if console:  # python -m bench console (bench/console.json)
        from .console import markdown as console_markdown

        lines += ["", *console_markdown(console)]
    general = NOTES.get("_general")
    text = general(results)["why"] if general else ""
    if text:
        lines += ["", "## Notes", "", text, ""]
    lines += ["", "![latency and throughput](results.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    ax = axes[0]
    lat = results.get("latency") or {}
    modes = [(m, lat.get(m, {})) for m in ("polling", "idle")]
    labels, p50, p95 = [], [], []
    for mode, r in modes:
        if "p50_s" in r:
            labels.append(f"{mode}\n(beat {r['poll_interval_s']:g} s)")
            p50.append(r["p50_s"])
            p95.append(r["p95_s"])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p95, 0.4, label="p95")
    for x, (mode, r) in zip(xs, [(m, r) for m, r in modes if "p50_s" in r], strict=True):
        if mode == "polling":
            limit = r["poll_interval_s"] / 2 + 1
            ax.hlines(limit, x - 0.4, x, colors="C0", linestyles="dashed")
        else:
            ax.hlines(1.0, x - 0.4, x, colors="C0", linestyles="dashed")
            ax.hlines(3.0, x, x + 0.4, colors="C1", linestyles="dashed")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("APPEND -> uploaded: true (s); dashed: target")
    ax.set_title("Latency")
    if labels:
        ax.legend(loc="upper center")
    g = results.get("growth") or {}
    points = sorted(g.get("points", []), key=lambda p: p["n"])
    ax = axes[1]
    if points:
        ns = [p["n"] for p in points]
        ax.plot(ns, [p["mailingest"]["mails_per_s"] for p in points], "o-", label="mailingest")
        bare = [(p["n"], p["bare loop"]["mails_per_s"]) for p in points if p.get("bare loop")]
        if bare:
            ax.plot(*zip(*bare, strict=True), "s--", label="bare loop")
    _against_n(ax, [p["n"] for p in points], "mails / s", "Throughput against N")
    ax = axes[2]
    if points:
        ns = [p["n"] for p in points]
        pool = [
            max(
                [v for k, v in p["mailingest"]["peak_rss"].items() if k.startswith("worker-pool")]
                or [0]
            )
            / MB
            for p in points
        ]
        ax.plot(ns, pool, "o-", label="worker pool process (VmHWM)")
        ax.plot(
            ns,
            [p["mailingest"]["redis_memory"]["used_memory_peak"] / MB for p in points],
            "^-",
            label="Redis used_memory_peak",
        )
        bare = [
            (p["n"], p["bare loop"]["peak_rss"]["bare loop"] / MB)
            for p in points
            if p.get("bare loop")
        ]
        if bare:
            ax.plot(*zip(*bare, strict=True), "s--", label="bare loop")
    _against_n(ax, [p["n"] for p in points], "peak memory (MB)", "Memory against N", legend=8)
    _recovery(axes[3], results.get("recovery"))
    m = results.get("machine", {})
    fig.suptitle(f"mailingest benchmark — {m.get('cores')} cores, {m.get('cpu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _recovery_lines(results: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> list[str]:
    rec = results.get("recovery")
    lines = ["", "## 6. Recovery: a worker killed mid-step", ""]
    if not rec:
        return [*lines, "(not measured)"]
    run = rec["run"]
    lines += [
        f"{rec['n']} mails; Alloy answers every request after {rec['alloy_latency_ms']:g} ms, "
        "so steps are caught mid-flight. One after the other, a few seconds apart, the "
        "prefork worker (poll, parse) or the thread-pool I/O worker (describe, upload, move) "
        "is sent SIGKILL with its whole process group once it holds a lease on a mail, and "
        "is started again at once, as the compose file's restart policy does "
        "(`bench/crashes.py`). A mail the killed worker held a lease on moves again at the "
        "first sample (every 0.25 s) in which its state, its last activity or one of its "
        "documents' states differs from what it was at the kill. mailingest's defaults "
        f"(lease {rec['lease_s']:g} s); the run is checked for exact-once like every other.",
        "",
    ]
    rows = [
        [
            str(k + 1),
            kill["role"],
            "-" if kill["skipped"] else f"{kill['at']:.1f} s",
            str(kill["held"]),
            f"{max(kill['recovered_s']):.1f} s" if kill["recovered_s"] else "-",
            str(kill["never"]),
            f"{kill['restart_s']:.1f} s" if kill["restart_s"] else "-",
        ]
        for k, kill in enumerate(run["crashes"]["kills"])
    ]
    lines += [
        _table(
            [
                "kill",
                "worker",
                "at",
                "mails it held",
                "slowest to move again",
                "never moved",
                "kill -> restarted worker ready",
            ],
            rows,
        ),
        "",
        f"Every mail held at a kill: p50 **{rec['p50_s']:.1f} s**, p95 **{rec['p95_s']:.1f} s**, "
        f"max {rec['max_s']:.1f} s ({rec['held']} mails). The run: {run['seconds']:.0f} s, "
        + (
            "valid (every document at Alloy once with its bytes, none left `uploaded: false`, "
            "every mail in Processed)."
            if run["valid"]
            else "INVALID: " + "; ".join(run["problems"][:4])
        ),
        "",
    ]
    lines += _note("recovery_p95", by_id, results)
    return lines


def _recovery(ax: Any, rec: dict[str, Any] | None) -> None:
    """The recovery run: mails filed over time, each kill -9, and how long each mail the
    killed worker held sat still (right axis; dashed: the 60 s target)."""
    ax.set_title("Recovery after kill -9 of a worker")
    ax.set_xlabel("seconds since the first poll")
    if not rec:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    run = rec["run"]
    progress = run.get("progress") or []
    if progress:
        ax.plot([t for t, _ in progress], [d for _, d in progress], "-", color="C0")
    ax.set_ylabel("mails filed", color="C0")
    right = ax.twinx()
    labelled: set[str] = set()
    for kill in run["crashes"]["kills"]:
        if kill["skipped"]:
            continue
        color = "C3" if kill["role"] == "worker" else "C1"
        ax.axvline(kill["at"], color=color, linestyle=":", linewidth=1)
        right.plot(
            [kill["at"]] * len(kill["recovered_s"]),
            kill["recovered_s"],
            "o",
            color=color,
            alpha=0.6,
            label=None if kill["role"] in labelled else f"{kill['role']} killed",
        )
        labelled.add(kill["role"])
    right.axhline(60, color="grey", linestyle="--", linewidth=1)
    right.set_ylim(0, max(70, (rec.get("max_s") or 0) * 1.1))
    right.set_ylabel("its mails: kill -> moving again (s)")
    handles, labels = right.get_legend_handles_labels()
    if handles:
        right.legend(handles, labels, loc="lower right", fontsize=8)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    console_json = out / "console.json"
    console = json.loads(console_json.read_text()) if console_json.exists() else None
    (out / "results.md").write_text(markdown(results, console))
    plot(results, out / "results.png")


def _against_n(ax: Any, ns: list[int], ylabel: str, title: str, *, legend: int = 10) -> None:
    """A panel plotted against N: log scale with the measured N as ticks, from zero up."""
    if ns:
        ax.set_xscale("log")
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=legend)
    ax.set_xlabel("N (mails)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
