"""What the profiles say about each missed target, and what would close it.

Written by hand from the profiles of the committed run; the figures in the text
are read from the results, so a rerun shows its own. ``results.md`` shows a note
only when its target is missed (``_general`` always). Keyed by the verdict ids of
``report.verdicts``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .stack import MACHINE

Note = Callable[[dict[str, Any]], dict[str, str]]


def _first(runs: list[dict[str, Any]], system: str) -> dict[str, Any]:
    return next((r for r in runs if r["system"] == system and r.get("valid")), runs[0])


def _ms(run: dict[str, Any], component: str) -> float:
    n: float = run["n"]
    return float(run.get("cpu_seconds", {}).get(component, 0.0)) / n * 1000


def _ours_ms(run: dict[str, Any]) -> float:
    cpu = run.get("cpu_seconds", {})
    n: float = run["n"]
    return float(sum(v for k, v in cpu.items() if k != MACHINE)) / n * 1000


def _share(summary: dict[str, Any], role: str, key: str, *needles: str) -> float:
    """Share (%) of ``role``'s samples in the rows of table ``key`` matching a needle."""
    rows = summary.get(role, {}).get(key, [])
    return 100 * float(sum(v for k, v in rows if any(n in k for n in needles)))


def throughput(results: dict[str, Any]) -> dict[str, str]:
    t = results["throughput"]
    mine, bare = _first(t["runs"], "mailingest"), _first(t["runs"], "bare loop")
    summary = t.get("profiles", {}).get("mailingest", {}).get("summary", {})
    bare_summary = t.get("profiles", {}).get("bare loop", {}).get("summary", {})
    pool = "worker pool process"
    steps = summary.get(pool, {}).get("steps", {})
    cores = int(results.get("machine", {}).get("cores") or 2)
    idle = 100 * sum(v for k, v in steps.items() if k.startswith("idle"))
    calls = {
        name: _share(summary, pool, "callers", f"redis-py <- {name} ")
        for name in (
            "Ledger.record_new",
            "Ledger.plan_documents",
            "Ledger.raw",
            "Ledger.blob",
            "dispatch",
            "Ledger.mail",
            "Ledger.document",
            "single_flight",
        )
    }
    staged = sum(
        calls[k]
        for k in ("Ledger.record_new", "Ledger.plan_documents", "Ledger.raw", "Ledger.blob")
    )
    per_mail = mine["redis_commands"] / mine["n"]
    publish = mine["redis_commands_by_name"].get("publish", 0) / mine["n"]
    hset = mine["redis_commands_by_name"].get("hset", 0) / mine["n"]
    evalsha = mine["redis_commands_by_name"].get("evalsha", 0) / mine["n"]
    feedparser = _share(bare_summary, "bare loop", "libraries", "email (stdlib parser)")
    bare_busy = _ms(bare, "bare loop") / (bare["seconds"] / bare["n"] * 1000) * 100
    remote = results.get("remote")
    remote_text = (
        f" With Alloy answering each request after {remote['alloy_latency_ms']:g} ms, as a "
        f"remote API does, the same comparison gives **{remote['ratio']:.2f}** (the table above)."
        if remote
        else ""
    )
    why = (
        "On this machine everything is local, so there is little I/O for two worker processes "
        "to overlap: the bare loop is busy on CPU "
        f"{bare_busy:.0f} % of its wall time ({_ms(bare, 'bare loop'):.0f} ms of CPU per mail) on "
        f"one core, and leaves the second to Dovecot and the sandbox. mailingest spends "
        f"**{_ours_ms(mine):.0f} ms of CPU per mail** against the bare loop's "
        f"{_ours_ms(bare):.0f} ({_ours_ms(mine) / _ours_ms(bare):.1f}x; CPU table above). "
        f"With both of the machine's {cores} cores busy on nothing else, that would allow "
        f"{cores * 1000 / _ours_ms(mine):.0f} mails/s against the bare loop's "
        f"{t['bare loop']['mails_per_s']:.0f}; but the pool processes wait for their next task "
        f"{idle:.0f} % of the time, and it measures {t['mailingest']['mails_per_s']:.1f}. "
        "Where the "
        "difference goes (CPU table, and the py-spy profile of the pool processes below):\n\n"
        f"1. **Staged bytes through Redis.** Each mail's bytes go into Redis twice, the raw mail "
        "(`ledger.Ledger.record_new`, from `pipeline._fetch_new`) and every decoded document "
        "(`Ledger.plan_documents`, from `pipeline._ingest_locked`), come out twice "
        "(`Ledger.raw` in ingest, `Ledger.blob` in upload) and are appended to the AOF: "
        f"redis-server spends {_ms(mine, 'redis-server'):.0f} ms of CPU per mail, and the pool "
        f"processes spend {staged:.0f} % of their time in those four calls, mostly waiting for "
        "the single-threaded Redis to take or hand over megabytes (record_new "
        f"{calls['Ledger.record_new']:.1f} %, plan_documents {calls['Ledger.plan_documents']:.1f} "
        f"%, raw {calls['Ledger.raw']:.1f} %, blob {calls['Ledger.blob']:.1f} %).\n"
        "2. **Celery's cost per task.** A mail is about seven tasks (its share of a poll, "
        "ingest, describe and upload per document, finish). Each is received by the worker's "
        "main process, handed to a pool process over a pipe, acknowledged after it ran (late "
        f"acks) and announced as task events ({publish:.0f} PUBLISH per mail: "
        "`worker_send_task_events` and `task_send_sent_event` in `celeryconf.celery_config`): "
        f"the main process costs {_ms(mine, 'worker main process'):.0f} ms of CPU per mail, "
        f"queuing next steps (`tasks.dispatch`) {calls['dispatch']:.1f} % of pool time, and a "
        f"pool process waits for its next task {idle:.0f} % of the time "
        "(`billiard.connection.Connection._recv`).\n"
        f"3. **Ledger round trips.** {per_mail:.0f} Redis commands per mail: each step reads "
        f"its records (`Ledger.mail`, `Ledger.document`: "
        f"{calls['Ledger.mail'] + calls['Ledger.document']:.1f} % of pool time), takes its lock "
        f"(`pipeline.single_flight`, {calls['single_flight']:.1f} %), and records progress "
        f"({hset:.0f} HSET and {evalsha:.0f} Lua transitions per mail).\n\n"
        "Parsing is not the difference: `mailingest.core.base64_bodies` keeps the base64 bodies "
        "out of the "
        "stdlib's line-by-line parser, while the bare loop spends "
        f"{feedparser:.0f} % of its time in `email.feedparser`." + remote_text
    )
    close = (
        "In the order of what they would buy here (estimates from the shares above, not "
        "measured):\n\n"
        "- **Stage each byte once.** Keep the raw mail in Redis and let `upload` cut its "
        "document out of it (the hollow scan already decodes a base64 run straight from the "
        "mail's bytes), or keep the documents and drop the raw mail once ingest planned them. "
        "That halves what Redis stores, serves and writes to the AOF: about half of Redis' "
        f"{_ms(mine, 'redis-server'):.0f} ms per mail and of the {staged:.0f} % the pool "
        "processes wait on it.\n"
        "- **Fewer, cheaper tasks.** Describe and upload a document in one task (the attempt "
        "is recorded before the POST either way, so the adoption logic is unchanged), file the "
        "mail from the task that confirms its last document, and send task events only when "
        "Flower is used (a setting). That is 3 fewer hand-offs of about 7 per mail and most of "
        "the PUBLISHes: a third to a half of the main process' CPU and of the pool's wait for "
        "work.\n"
        "- **One round trip per step for the ledger**: read the mail, its documents and take "
        "the step lock in one pipeline or Lua call.\n\n"
        "Together these are most of the difference per mail, enough to put mailingest above "
        "the bare loop on two cores. Without any of them the comparison turns as soon as there "
        "is I/O to overlap (a remote Alloy: the informational figure above) or more cores for "
        "more worker processes, which the single-process bare loop cannot use."
    )
    return {"why": why, "close": close}


def rss(results: dict[str, Any]) -> dict[str, str]:
    r = results["rss"]
    steps = r.get("memprofile", {}).get("steps", [])
    worst = max(steps, key=lambda s: s["rss_peak_above_before"]) if steps else None
    where = (
        f"The step that peaks is `{worst['step']}` "
        f"(+{worst['rss_peak_above_before'] / 1e6:.0f} MB in the tracemalloc run); the table "
        "above lists the allocations alive at that peak, each a copy of the message or of its "
        "document."
        if worst
        else ""
    )
    return {
        "why": "A pool process holds several copies of the mail at once. " + where,
        "close": "Hold one copy of the message per step: decode each document from a "
        "memoryview of the mail's bytes, seal and open staged bytes in place, and let go of the "
        "raw mail before the next copy is made.",
    }


def growth(results: dict[str, Any]) -> dict[str, str]:
    pts = sorted(results["growth"]["points"], key=lambda p: p["n"])
    a, b = pts[0], pts[-1]
    ma, mb = a["mailingest"], b["mailingest"]
    dov_a, dov_b = _ms(ma, "dovecot"), _ms(mb, "dovecot")
    own_a, own_b = _ours_ms(ma) - dov_a, _ours_ms(mb) - dov_b
    total_a, total_b = _ours_ms(ma), _ours_ms(mb)
    drop = (1 - mb["mails_per_s"] / ma["mails_per_s"]) * 100
    bare_text = ""
    if a.get("bare loop") and b.get("bare loop"):
        ba, bb = a["bare loop"], b["bare loop"]
        bare_text = (
            f" The bare loop, one FETCH and one MOVE per mail on a connection that keeps the "
            f"INBOX selected, loses {(1 - bb['mails_per_s'] / ba['mails_per_s']) * 100:.0f} % "
            f"over the same range (Dovecot {_ms(ba, 'dovecot'):.1f} -> "
            f"{_ms(bb, 'dovecot'):.1f} ms per mail), so the harm is the server's; mailingest's "
            f"pattern makes it worse ({dov_b:.1f} against {_ms(bb, 'dovecot'):.1f} ms of "
            f"Dovecot CPU per mail at N = {b['n']:,}, against {dov_a:.1f} and "
            f"{_ms(ba, 'dovecot'):.1f} at N = {a['n']:,}): for every mail, `pipeline.finish` "
            "selects the INBOX again (`inbox.Mailbox.select`) and looks the UID up "
            "(`Mailbox.exists`, a UID SEARCH) before the MOVE."
        )
    why = (
        f"Throughput drops {drop:.0f} % from N = {a['n']:,} to {b['n']:,}, but not because "
        f"mailingest's own work per mail grows: its processes (worker, beat, Redis, sandbox) "
        f"use {own_a:.0f} and {own_b:.0f} ms of CPU per mail "
        f"({(own_b / own_a - 1) * 100:+.0f} %). What grows is Dovecot's: "
        f"{dov_a:.1f} -> {dov_b:.1f} ms per mail. The whole backlog sits in one INBOX and "
        "every MOVE changes it; Dovecot's work per command grows with the number of mails in "
        "the folder (a changed maildir is read again on the next command). On two cores "
        f"that are busy anyway, the total CPU per mail going from {total_a:.0f} to "
        f"{total_b:.0f} ms ({(total_b / total_a - 1) * 100:+.0f} %) is the drop." + bare_text
    )
    close = (
        "- Done since this figure was first measured, and in the run above: `finish` keeps the "
        "folder selected on the worker's connection and reads the moved UID from MOVE's "
        "COPYUID instead of a SELECT and a UID SEARCH before each move. Dovecot's cost per "
        "mail still grows, because each of the I/O worker's 16 threads holds a session on the "
        "same INBOX and every session is told of every other's expunges.\n"
        "- Move decided mails in batches: one `UID MOVE` of a UID set for the mails decided "
        "together, from one mover per inbox, one folder sync per batch instead of per mail.\n"
        "- That leaves the server's own growth, which the bare loop shows as well; a backlog "
        "of 10,000 unprocessed mails in one folder is the benchmark's extreme, and a steady "
        "inbox is drained long before it holds that many."
    )
    return {"why": why, "close": close}


def general(results: dict[str, Any]) -> dict[str, str]:
    parts = []
    t = results.get("throughput")
    if t:
        spread = [t["mailingest"]["spread"], t["bare loop"]["spread"]]
        others = []
        for r in t["runs"]:
            cpu = r.get("cpu_seconds", {})
            if MACHINE in cpu:
                ours = sum(v for k, v in cpu.items() if k != MACHINE)
                others.append(max(0.0, cpu[MACHINE] - ours) / r["seconds"])
        parts.append(
            "**Noise.** The machine was shared while the benchmark ran: other processes used "
            + (f"{min(others):.2f}-{max(others):.2f} cores" if others else "some CPU")
            + " during the throughput runs (CPU tables). Throughput at the throughput phase's N "
            f"is the median of the repeats (mailingest {spread[0]}, bare loop {spread[1]} "
            "mails/s); every other figure is one run, the latency figures 40 mails each."
        )
    g = results.get("growth")
    if g and g.get("points"):
        pts = sorted(g["points"], key=lambda p: p["n"])
        pool = [
            max(v for k, v in p["mailingest"]["peak_rss"].items() if k.startswith("worker-pool"))
            for p in pts
        ]
        redis_peak = [p["mailingest"]["redis_memory"]["used_memory_peak"] for p in pts]
        parts.append(
            "**Memory stays flat with N.** From N = "
            f"{pts[0]['n']:,} to {pts[-1]['n']:,} the busiest pool process peaks at "
            f"{min(pool) / 1e6:.0f}-{max(pool) / 1e6:.0f} MB: the one that polls holds one "
            "FETCH of up to 50 mails / 64 MiB (`FETCH_BATCH`, `FETCH_BYTES`) a few times over "
            "while it stages it (the poll step of section 3 peaks at about three times the "
            "fetched bytes). Redis peaks at "
            f"{min(redis_peak) / 1e6:,.0f}-{max(redis_peak) / 1e6:,.0f} MB: the staged bytes of "
            "at most `POLL_LIMIT` (500) mails in flight."
        )
    m = results.get("machine", {})
    if "its tree" in str(m.get("commit", "")):
        parts.append(
            "**How this run was made.** mailingest's working tree was being edited during the "
            f"benchmark, so it ran on a copy of commit {str(m['commit']).split()[0]} "
            "(`git archive`) with `bench/` and the sandbox's `keep_bodies` mode added: what a "
            "clean checkout of the commit adding `bench/` holds. `python -m bench` in such a "
            "checkout runs the same thing (the `--out` in the command line points back here)."
        )
    return {"why": "\n\n".join(parts)}


# where each of the most frequent Redis commands comes from (mailingest's code and kombu's)
_REDIS_SOURCES = {
    "hset": "ledger record writes, and kombu's unacked hash (one per task)",
    "hgetall": "ledger reads of a mail, document or slot record",
    "evalsha": "ledger scripts: transitions, the POST fence, claims, leases",
    "hget": "single ledger fields (the reason, the poll hash), kombu's unacked lookups",
    "get": "staged bytes and the rate limiter",
    "del": "dropping staged bytes and leases",
    "set": "staging bytes and taking leases",
    "multi": "kombu: one transaction per task delivered (unacked bookkeeping)",
    "exec": "kombu: the end of each of those transactions",
    "zadd": "kombu's unacked index; the in-doubt sets",
    "zrem": "kombu's acks",
    "lpush": "kombu: one per task sent",
    "brpop": "kombu: workers waiting for tasks",
    "publish": "task events (off unless MAILINGEST_TASK_EVENTS)",
    "pexpire": "leases renewed by the heartbeat",
    "expire": "staged bytes' TTL",
    "hdel": "kombu's acks",
    "smembers": "ledger state sets",
    "sadd": "ledger state sets",
    "srem": "ledger state sets",
}


def redis_commands(results: dict[str, Any]) -> dict[str, str]:
    t = results["throughput"]
    run = _first(t["runs"], "mailingest")
    n = run["n"]
    total = run["redis_commands"] / n
    top = [(name, count / n) for name, count in run["redis_commands_by_name"].items()]
    listed = sum(per for _, per in top)
    rows = "; ".join(
        f"{name} {per:.1f} ({100 * per / total:.0f} %: {_REDIS_SOURCES.get(name, 'other')})"
        for name, per in top[:8]
    )
    why = (
        f"{total:.0f} commands per mail, {listed:.0f} of them in the {len(top)} most frequent "
        f"kinds: {rows}. Each step reads its mail's and its document's records and its slot "
        "(HGETALL each), writes through a script (EVALSHA, which counts its own HSETs too), "
        "and takes and drops a lease; the chained describe, upload and finish of issue 12 "
        "saved the broker's share for two of every three tasks but not the ledger's reads, "
        "which every step repeats."
    )
    close = (
        "- One script per step that reads what the step needs and returns it (mail, "
        "document, slot in one EVALSHA) instead of three HGETALLs and a HGET: about 40 fewer "
        "commands per mail.\n"
        "- Keep a chained task's reads: a describe chained into its upload and finish "
        "rereads the records it has just written.\n"
        "- Stage each mail's bytes once (the raw mail, documents cut out of it at upload) "
        "instead of the raw mail and each document: fewer SET, GET, DEL and EXPIRE."
    )
    return {"why": why, "close": close}


def cpu(results: dict[str, Any]) -> dict[str, str]:
    t = results["throughput"]
    run = _first(t["runs"], "mailingest")
    parts = {
        "the prefork pool (poll, parse, screen, stage)": _ms(run, "worker pool processes"),
        "the I/O worker's threads (describe, upload, move)": _ms(run, "I/O worker (threads)"),
        "the worker's main process": _ms(run, "worker main process"),
        "beat": _ms(run, "beat"),
    }
    total = sum(parts.values())
    why = (
        f"{total:.0f} ms of CPU per mail in mailingest's processes: "
        + ", ".join(f"{name} {ms:.1f} ms ({100 * ms / total:.0f} %)" for name, ms in parts.items())
        + f". Redis spends another {_ms(run, 'redis-server'):.1f} ms per mail answering them. "
        "The pool's share is parsing and screening each mail (mail-parser, the sniffing of "
        "every part, DMARC), sealing the staged bytes with AES-GCM and the Redis round trips "
        "of its steps; the I/O worker's is the ledger's round trips, the HTTP requests and "
        "the sealed bytes opened again for the upload."
    )
    close = (
        "Fewer Redis round trips per step (see the Redis commands above: each costs the "
        "client about as much as the server), and staging each byte once, so it is sealed "
        "and opened once."
    )
    return {"why": why, "close": close}


def slowtail(results: dict[str, Any]) -> dict[str, str]:
    slow = results["slowtail"]
    clean, tail = slow["runs"]
    n = slow["n"]
    threads = 16  # the I/O worker's pool, as the compose file runs it
    requests = sum(tail.get("sandbox", {}).values())
    delayed = requests * slow["faults"]["slow_fraction"]
    seconds = slow["faults"]["slow_ms"] / 1000
    floor = delayed * seconds / threads
    why = (
        f"{requests:,} Alloy requests for {n} mails, about {delayed:.0f} of them answered "
        f"after {seconds:g} s: {delayed * seconds:,.0f} thread-seconds of waiting, which "
        f"the I/O worker's {threads} threads need at least {floor:.0f} s to sit through, "
        f"against {clean['seconds']:.0f} s for the whole clean run; the slow run took "
        f"{tail['seconds']:.0f} s. The threads, not the CPU, set the pace "
        f"({tail['mails_per_s']:.2f} against {clean['mails_per_s']:.2f} mails/s), and with "
        f"N = {n} the last slow answers alone keep a run going 20 s after the rest is done."
    )
    close = (
        "- Size the I/O pool for the tail, not the mean: to keep half the throughput, "
        "threads >= the slow thread-seconds of a run / the clean run's seconds (here "
        f"about {delayed * seconds / max(clean['seconds'], 1e-9):.0f}), or a "
        "gevent/eventlet pool where a waiting request costs a greenlet, not a thread.\n"
        "- A longer run (N in the thousands) for this figure, so that the last slow answers "
        "do not weigh as much as they do in a 200-mail run."
    )
    return {"why": why, "close": close}


def recovery(results: dict[str, Any]) -> dict[str, str]:
    rec = results["recovery"]
    why = (
        f"p95 {rec['p95_s']:.1f} s with a lease of {rec['lease_s']:g} s: a killed step's "
        "lease lapses after one lease, and the sweep waits for two leases of silence "
        "before it queues the mail again."
    )
    close = "A shorter `MAILINGEST_LEASE` (at least 3 s): more heartbeat writes to Redis."
    return {"why": why, "close": close}


NOTES: dict[str, Note] = {
    "redis_commands_per_mail": redis_commands,
    "cpu_per_mail": cpu,
    "slowtail_ratio": slowtail,
    "recovery_p95": recovery,
    "throughput_ratio": throughput,
    "rss_ratio": rss,
    "growth_ratio": growth,
    "_general": general,
}
