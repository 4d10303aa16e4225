"""The fault-injection suite: a few hundred mails through real servers and real worker
processes while things break, then the invariants.

While the mail is processed: workers are killed with SIGKILL at random moments and
restarted (at least 10 times), Redis is restarted once (AOF, as docker-compose.yml
configures it), the sandbox answers 20% 500s, 10% 429s (half with Retry-After), 5%
slow answers past the client timeout and a few dropped connections, the IMAP
sessions are kicked and the IMAP server restarted once, and two beats and two
workers run at once. Then: every document exactly once at its entity, uploaded and
byte-identical; no stray `uploaded: false` document; every mail in Processed,
Quarantine, or `failed` with a reason; none lost, none in two places.

Run alone with ``pytest -m faults -s`` (it prints the table of faults and
outcomes, and writes it to ``build/reliability-latest.md``).
"""

from __future__ import annotations

import email
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from imapclient import IMAPClient

from mailingest import ledger as L
from mailingest.demo import local_environment
from mailingest.embedded import CeleryProcess, DovecotServer, RedisServer, ServerNotAvailable
from mailingest.ledger import Ledger
from mailingest.runtime import connect_redis
from mailingest.samples import AGENT_EMAIL, bulk_scenario
from mailingest.sandbox import Faults, SandboxServer

from .conftest import ALLOY_SECRET, ALLOY_TOKEN, require_or_skip
from .helpers import deliver

pytestmark = [pytest.mark.servers, pytest.mark.faults]

MAILS = int(os.environ.get("MAILINGEST_FAULT_MAILS", "240"))
AUTO_RETRIES = 10  # a failed mail is retried 10 s later, up to this many times
KILLS = int(os.environ.get("MAILINGEST_FAULT_KILLS", "12"))
SANDBOX_FAULTS = Faults(
    error_500=0.20,
    rate_429=0.10,
    retry_after_fraction=0.5,
    retry_after_seconds=1,
    slow_fraction=0.05,
    slow_ms=1500,  # past the client's 1 s read timeout; the request itself is applied
    drop_fraction=0.01,
    seed=20261129,
)


def message_ids(account_host: str, port: int, user: str, password: str) -> dict[str, list[str]]:
    """Message-ID -> the folders it is in."""
    client = IMAPClient(account_host, port=port, ssl=False, timeout=30)
    client.login(user, password)
    where: dict[str, list[str]] = {}
    for folder in ("INBOX", "Processed", "Quarantine"):
        if not client.folder_exists(folder):
            continue
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        for _uid, item in client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).items():
            header = item[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"]
            mid = email.message_from_bytes(header)["Message-ID"].strip().strip("<>")
            where.setdefault(mid, []).append(folder)
    client.logout()
    return where


class Chaos:
    """Breaks things on a schedule while the mail is processed; counts what it did."""

    def __init__(
        self,
        workers: list[CeleryProcess],
        beats: list[CeleryProcess],
        redis_server: RedisServer,
        imap: DovecotServer,
        seed: int = 7,
    ) -> None:
        self.workers, self.beats = workers, beats
        self.redis, self.imap = redis_server, imap
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(120)

    def _sleep(self, seconds: float) -> bool:
        return not self.stop.wait(seconds)

    def _supervise(self) -> None:
        """What docker's restart policy does: a beat or worker that exited is started again."""
        for process in self.workers + self.beats:
            if not process.running():
                process.stop()
                process.start()
                self.counts[f"{process.kind} restarted after exiting"] += 1

    def _kill_one_pool_process(self) -> None:
        for _ in range(50):
            children = [c for w in self.workers if w.running() and w.pid for c in _children(w.pid)]
            if children:
                os.kill(self.rng.choice(children), signal.SIGKILL)
                self.counts["worker pool process killed alone (SIGKILL)"] += 1
                return
            time.sleep(0.1)

    def _run(self) -> None:
        try:
            events = ["redis", "kick", "imap"]
            kills = 0
            while kills < KILLS and not self.stop.is_set():
                if not self._sleep(self.rng.uniform(2.0, 5.0)):
                    return
                victim = self.rng.choice(self.workers)
                victim.kill()  # SIGKILL to the worker and its pool, mid-task
                kills += 1
                self.counts["worker killed (SIGKILL)"] += 1
                if kills == 5:  # the beat holding the RedBeat lock dies; the other takes over
                    for beat in self.beats:
                        if beat.running() and "Acquired lock" in _tail(beat):
                            beat.kill()
                            beat.start()
                            self.counts["active beat killed (SIGKILL) and restarted"] += 1
                            break
                if events and kills in (3, 6, 9):
                    event = events.pop(0)
                    if event == "redis":
                        self.redis.restart()
                        self.counts["Redis restarted"] += 1
                    elif event == "kick":
                        self.imap.kick()
                        self.counts["IMAP sessions kicked"] += 1
                    else:
                        self.imap.restart()
                        self.counts["IMAP server restarted"] += 1
                victim.start()
                self._supervise()
                if kills == 4:  # a pool process dies alone: reject_on_worker_lost redelivers
                    self._kill_one_pool_process()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


def _message_id(raw: bytes) -> str:
    return str(email.message_from_bytes(raw)["Message-ID"]).strip().strip("<>")


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (the worker's pool), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _tail(process: CeleryProcess) -> str:
    try:
        return process.log_path.read_text(errors="replace")[-20000:]
    except OSError:
        return ""


class Deliverer:
    """Customers keep writing while things break: mail arrives in small batches."""

    def __init__(self, imap: DovecotServer, raws: list[bytes], per_batch: int = 8) -> None:
        self.imap, self.raws, self.per_batch = imap, raws, per_batch
        self.errors: list[BaseException] = []
        self.retried = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _append(self, raw: bytes) -> None:
        mid = email.message_from_bytes(raw)["Message-ID"].strip("<>")
        for _ in range(60):
            try:
                deliver(self.imap, [raw])
                return
            except Exception:  # noqa: BLE001 - the IMAP server is being kicked/restarted
                self.retried += 1
                time.sleep(0.5)
                try:  # an APPEND whose answer was lost may have landed: never deliver twice
                    account = self.imap.account
                    if mid in message_ids(
                        account.host, account.port, account.user, account.password
                    ):
                        return
                except Exception:  # noqa: BLE001
                    continue
        raise RuntimeError(f"could not deliver {mid}")

    def _run(self) -> None:
        try:
            for start in range(0, len(self.raws), self.per_batch):
                for raw in self.raws[start : start + self.per_batch]:
                    self._append(raw)
                time.sleep(1.5)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


def test_nothing_lost_nothing_twice_under_faults(tmp_path: Path) -> None:
    started = time.monotonic()
    try:
        imap = DovecotServer(tmp_path / "imap").start()
    except ServerNotAvailable as exc:
        require_or_skip(f"the fault suite restarts IMAP and needs Dovecot: {exc}")
    redis_server = RedisServer(tmp_path / "redis", persist=True).start()
    sandbox = SandboxServer(
        token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL], faults=SANDBOX_FAULTS
    ).start()
    scenario = bulk_scenario(MAILS, seed=99)
    senders_file = tmp_path / "senders.csv"
    senders_file.write_text(scenario.senders_csv(), encoding="utf-8")
    account = imap.account
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
    env |= local_environment(
        redis_server.url,
        account,
        sandbox.url,
        senders_file,
        alloy_token=ALLOY_TOKEN,
        alloy_secret=ALLOY_SECRET,
        poll_interval="1",
        alloy_read_timeout="1",
        retry_base="0.2",
        retry_cap="3",
        max_attempts="12",
        task_time_limit="20",
        visibility_timeout="60",
        stale_after="30",
        finish_grace="5",
        failed_retry_after="10",
        failed_auto_retries=str(AUTO_RETRIES),
        fetch_batch="20",
        log_level="warning",
    )
    deliverer = Deliverer(imap, [m.raw for m in scenario.mails])
    workers = [
        CeleryProcess("worker", env, tmp_path / f"worker{i}.log", ["--concurrency", "2"])
        for i in range(2)
    ]
    beats = [CeleryProcess("beat", env, tmp_path / f"beat{i}.log") for i in range(2)]
    chaos = Chaos(workers, beats, redis_server, imap)
    ledger_client = connect_redis(redis_server.url)
    ledger = Ledger(ledger_client)
    outcome: dict[str, int] = {}
    try:
        for process in workers + beats:
            process.start()
        deliverer.thread.start()
        chaos.start()
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                records = ledger.mails(L.MAIL_STATES)
            except Exception:  # noqa: BLE001 - Redis is being restarted
                continue
            # a failed mail still has automatic retries left: not settled yet
            settled = [
                r
                for r in records
                if (r.state in L.DECIDED and r.filed_to)
                or (r.state == L.FAILED and r.auto_replays >= AUTO_RETRIES)
            ]
            if (
                len(settled) >= len(scenario.mails)
                and not chaos.thread.is_alive()
                and not deliverer.thread.is_alive()
            ):
                break
            if not chaos.thread.is_alive():
                chaos._supervise()
        chaos.join()
        processing = time.monotonic() - started
        outcome = dict(Counter(r.state for r in ledger.mails(L.MAIL_STATES)))
    finally:
        for process in workers + beats:
            process.stop(timeout=10)
        ledger_client.close()
    stats = sandbox.state.stats()
    sandbox.set_faults(error_500=0, rate_429=0, slow_fraction=0, drop_fraction=0)

    # -- invariants ---------------------------------------------------------------
    problems: list[str] = []
    assert chaos.errors == [], chaos.errors
    assert deliverer.errors == [], deliverer.errors
    chaos.counts["APPENDs retried while IMAP was down"] = deliverer.retried
    # every document of a mail that is done exists exactly once; of a mail that ended
    # failed (retries exhausted, visible with its reason) at most once
    ledger_client = connect_redis(redis_server.url)
    failed_ids = {r.message_id for r in Ledger(ledger_client).mails([L.FAILED])}
    ledger_client.close()
    for entity in set(scenario.senders.values()):
        docs = sandbox.state.list(entity)
        stray = [d for d in docs if not d["uploaded"]]
        if stray:
            problems.append(f"{entity}: {len(stray)} stray uploaded:false document(s)")
        found = 0
        for mail in scenario.mails:
            may_be_missing = _message_id(mail.raw) in failed_ids
            for doc in (d for d in mail.documents if d.entity == entity):
                match = [
                    d for d in docs if (d["name"], d["extension"]) == (doc.name, doc.extension)
                ]
                found += len(match)
                if len(match) > 1 or (len(match) == 0 and not may_be_missing):
                    problems.append(f"{doc.name}.{doc.extension}: {len(match)} at Alloy")
                elif (
                    match
                    and sandbox.state.download(entity, match[0]["document_token"]) != doc.payload
                ):
                    problems.append(f"{doc.name}.{doc.extension}: bytes differ")
        if len(docs) != found:
            problems.append(f"{entity}: {len(docs) - found} document(s) nobody sent")
    where = message_ids(account.host, account.port, account.user, account.password)
    ledger_client = connect_redis(redis_server.url)
    records = {r.message_id: r for r in Ledger(ledger_client).mails(L.MAIL_STATES)}
    ledger_client.close()
    for mail in scenario.mails:
        mid = _message_id(mail.raw)
        folders = where.get(mid, [])
        record = records.get(mid)
        if len(folders) != 1:
            problems.append(f"{mid}: in {folders or 'no folder'}")
        elif folders == ["INBOX"] and not (record and record.state == L.FAILED and record.reason):
            problems.append(f"{mid}: still in INBOX without a failed reason")
        elif folders == ["Processed"] and mail.quarantine_reason:
            problems.append(f"{mid}: processed, expected quarantine")
        elif folders == ["Quarantine"] and not mail.quarantine_reason:
            problems.append(f"{mid}: quarantined: {record.reason if record else '?'}")
        if (
            len(folders) == 1
            and folders[0] != "INBOX"
            and (record is None or record.filed_to != folders[0])
        ):  # the ledger says where the mail is
            problems.append(f"{mid}: in {folders[0]}, ledger says {record and record.filed_to!r}")

    polls_sent = [
        beat.log_path.read_text().count("Sending due task poll-default") for beat in beats
    ]
    report = _report(chaos.counts, stats, outcome, scenario, processing, problems, polls_sent)
    print("\n" + report)
    build = Path(__file__).resolve().parent.parent / "build"
    build.mkdir(exist_ok=True)
    (build / "reliability-latest.md").write_text(report, encoding="utf-8")
    imap.stop()
    redis_server.stop()
    sandbox.stop()
    assert chaos.counts["worker killed (SIGKILL)"] >= 10
    assert chaos.counts["worker pool process killed alone (SIGKILL)"] == 1
    assert chaos.counts["active beat killed (SIGKILL) and restarted"] == 1
    # one beat at a time: no more polls than one scheduler sends (1 s interval)
    assert sum(polls_sent) <= processing * 1.2 + 10, polls_sent
    assert chaos.counts["Redis restarted"] == 1 and chaos.counts["IMAP server restarted"] == 1
    assert problems == [], "\n".join(problems[:40])


def _report(
    counts: Counter[str],
    stats: dict,
    outcome: dict[str, int],
    scenario,  # noqa: ANN001
    seconds: float,
    problems: list[str],
    polls_sent: list[int],
) -> str:
    faults = stats["faults"]
    lines = [
        "| fault injected | count |",
        "|---|---|",
        *(f"| {name} | {n} |" for name, n in sorted(counts.items())),
        f"| Alloy answered 500 | {faults.get('error_500', 0)} |",
        f"| Alloy answered 429 (with Retry-After) | {faults.get('rate_429', 0)} "
        f"({faults.get('retry_after', 0)}) |",
        f"| Alloy answered slower than the client timeout | {faults.get('slow', 0)} |",
        f"| Alloy dropped the connection | {faults.get('drop', 0)} |",
        f"| Alloy requests in all | {stats['requests_total']} |",
        "| two workers (2 processes each) and two beats at once | yes |",
        f"| polls sent by beat 1 / beat 2 (RedBeat: one holds the lock) "
        f"| {' / '.join(map(str, polls_sent))} |",
        "",
        "| outcome | count |",
        "|---|---|",
        f"| mails delivered | {len(scenario.mails)} |",
        *(f"| mails {state} | {n} |" for state, n in sorted(outcome.items())),
        f"| documents expected | {len(scenario.expected_documents)} |",
        f"| documents at Alloy, uploaded | {stats['uploaded']} |",
        f"| documents at Alloy, all | {stats['documents']} |",
        f"| invariant violations | {len(problems)} |",
        f"| wall time, servers up to all settled | {seconds:.0f} s |",
    ]
    return "\n".join(lines) + "\n"
