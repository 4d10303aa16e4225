"""The fault-injection suite: a few hundred mails through real servers and real worker
processes while things break, then the invariants.

While the mail is processed: workers are killed with SIGKILL at random moments and
restarted (at least 10 times), Redis is restarted once cleanly and killed once with
SIGKILL (AOF, as docker-compose.yml configures it), the sandbox answers 20% 500s, 10%
429s (half with Retry-After), 5% slow answers past the client timeout, a few dropped
connections, 3% final 400 refusals (describes and uploads), 3% requests committed 3 s
late (after the client timed out), all with Alloy's clock 45 s behind ours; the IMAP
server does not advertise MOVE (COPY + UID EXPUNGE), its sessions are kicked and it is
restarted once; two beats and two workers run at once; 10 mails are delivered twice
with their Message-ID and 10 without any Message-ID (the second delivery with a relay's
extra ``Received:`` line).

Then, for every distinct mail (the copies of one mail share its documents): each
document exactly once at its entity, uploaded and byte-identical, when a copy of the
mail ended ``done``; otherwise at most once, and ``uploaded: false`` only where the
ledger records that Alloy refused that document's upload. For every delivery (found by
its ``X-Fault-Delivery`` header): in exactly one of Processed, Quarantine or, ``failed``
with a reason, the inbox (a second copy in the destination, a crash between COPY and
EXPUNGE, is allowed and counted); quarantined only when it was expected or Alloy
refused one of its documents; the ledger names the folder it is in.

Run alone with ``pytest -m faults -s`` (it prints the table of faults and
outcomes, and writes it to ``build/reliability-latest.md``).
"""

from __future__ import annotations

import email
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from email.utils import format_datetime, localtime
from pathlib import Path

import pytest
from imapclient import IMAPClient
from mailingest_testbed.alloy_sandbox import Faults, SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.samples import (
    AGENT_EMAIL,
    ExpectedDocument,
    SampleMail,
    Scenario,
    bulk_scenario,
)
from mailingest_testbed.servers import (
    CeleryProcess,
    DovecotServer,
    ImapAccount,
    RedisServer,
)
from mailingest_testbed.servers.smtp import Faults as SmtpFaults
from mailingest_testbed.servers.smtp import SmtpServer

from mailingest.adapters import ledger as L
from mailingest.adapters.ledger import Ledger
from mailingest.application.services import connect_redis
from mailingest.core import replies as replies_core
from mailingest.core.decisions import last_activity

from .conftest import ALLOY_SECRET, ALLOY_TOKEN
from .helpers import deliver, dovecot_without

pytestmark = [pytest.mark.servers, pytest.mark.faults]

MAILS = int(os.environ.get("MAILINGEST_FAULT_MAILS", "240"))
DUPLICATED = 10  # mails delivered twice with their Message-ID; as many again without one
SETTLE_WITHIN = 400  # s from the first server start: the whole run stays under 8 min
AUTO_RETRIES = 10  # a failed mail is retried 10 s later, up to this many times
KILLS = int(os.environ.get("MAILINGEST_FAULT_KILLS", "12"))
READ_TIMEOUT = 1  # the workers' Alloy read timeout, s
COMMIT_HORIZON = 4  # how late Alloy may commit (the in-doubt window: 1 + 4 + 5 s)
LATE_COMMIT_MS = 3000
CLOCK_OFFSET_MS = -45_000
SANDBOX_FAULTS = Faults(
    error_500=0.20,
    rate_429=0.10,
    retry_after_fraction=0.5,
    retry_after_seconds=1,
    slow_fraction=0.05,
    slow_ms=1500,  # past the client's 1 s read timeout; the request itself is applied
    drop_fraction=0.01,
    refuse_fraction=0.03,  # a final 400: describe 400/4002, upload 400/4001, not applied
    late_commit_fraction=0.03,  # applied 3 s after it arrived, the client gave up at 1 s
    late_commit_ms=LATE_COMMIT_MS,
    clock_offset_ms=CLOCK_OFFSET_MS,  # Alloy's clock 45 s behind the workers'
    seed=20261129,
)
# the replies to customers' SMTP server: 10% of MAIL commands answered 451 (retried), 3%
# of messages refused 554 at DATA (the reply recorded failed), 20% answered 0.5 s late
# after the message was kept (a worker killed then leaves it unconfirmed); down 8 s once
SMTP_FAULTS = SmtpFaults(temporary=0.10, permanent=0.03, slow=0.20, slow_s=0.5, seed=5)
SMTP_DOWN_S = 8.0
FOLDERS = ("INBOX", "Processed", "Quarantine")
DELIVERY_HEADER = "X-Fault-Delivery"
# how pipeline.describe/upload word a refusal in the mail's reason
REFUSAL = re.compile(r"document \d+ \((?P<doc>.+?)\): Alloy (?P<op>describe|upload) answered 400/")


# -- what is delivered ------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One APPEND: ``number`` (its X-Fault-Delivery), the scenario mail it carries."""

    number: int
    raw: bytes
    content: int  # index of the mail in the scenario: the copies of one mail share it
    mail: SampleMail
    kind: str  # "single", "same Message-ID", "no Message-ID"
    copy: int  # 0: the first delivery, 1: the relay's second one


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _without_message_id(raw: bytes) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and dropping:
            continue  # a folded continuation of the Message-ID header
        dropping = line.lower().startswith(b"message-id:")
        if not dropping:
            kept.append(line)
    assert len(kept) < len(lines), "the mail had no Message-ID"
    return b"\r\n".join(kept) + sep + body


def plan_deliveries(scenario: Scenario, seed: int = 11) -> list[Delivery]:
    """Every scenario mail once, and 2 x DUPLICATED of them twice: the second delivery
    carries a relay's extra ``Received:`` line, some right after the first (both in
    flight at once), some long after (the first already filed). Each raw gets its own
    ``X-Fault-Delivery`` header, padded so that every delivery has a distinct size (the
    ledger records the size: that is how a record is matched to its delivery)."""
    rng = random.Random(seed)
    known = [i for i, m in enumerate(scenario.mails) if not m.quarantine_reason]
    twice = rng.sample(known, 2 * DUPLICATED)
    kinds = {i: "same Message-ID" for i in twice[:DUPLICATED]}
    kinds |= {i: "no Message-ID" for i in twice[DUPLICATED:]}
    order: list[tuple[int, int]] = [(i, 0) for i in range(len(scenario.mails))]
    for i in twice:
        first = order.index((i, 0))
        later = first + 1 + rng.choice([0, 1, 3, 10, 40, 90, 150])
        order.insert(min(later, len(order)), (i, 1))
    deliveries: list[Delivery] = []
    sizes: set[int] = set()
    relay_date = format_datetime(localtime())
    for number, (i, copy) in enumerate(order, start=1):
        mail = scenario.mails[i]
        body = _crlf(mail.raw)
        if kinds.get(i) == "no Message-ID":
            body = _without_message_id(body)
        if copy:
            body = (
                f"Received: from mx2.relay.example by mx.support.example; {relay_date}\r\n"
            ).encode() + body
        pad = 0
        while True:
            value = f"{number}" + (f" {'x' * pad}" if pad else "")
            raw = f"{DELIVERY_HEADER}: {value}\r\n".encode() + body
            if len(raw) not in sizes:
                break
            pad += 1
        sizes.add(len(raw))
        deliveries.append(Delivery(number, raw, i, mail, kinds.get(i, "single"), copy))
    return deliveries


@dataclass(frozen=True)
class Held:
    """One message the IMAP server holds."""

    folder: str
    uid: int
    size: int
    deleted: bool


def held_deliveries(account: ImapAccount) -> dict[int, list[Held]]:
    """X-Fault-Delivery number -> every message carrying it, in every folder."""
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=30)
    client.login(account.user, account.password)
    where: dict[int, list[Held]] = {}
    for folder in FOLDERS:
        if not client.folder_exists(folder):
            continue
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        if not uids:
            continue
        fields = [f"BODY.PEEK[HEADER.FIELDS ({DELIVERY_HEADER.upper()})]", "RFC822.SIZE", "FLAGS"]
        for uid, item in client.fetch(uids, fields).items():
            header = next(v for k, v in item.items() if k.startswith(b"BODY[HEADER.FIELDS"))
            value = email.message_from_bytes(header)[DELIVERY_HEADER]
            number = int(str(value).split()[0]) if value else 0  # 0: a mail nobody sent
            where.setdefault(number, []).append(
                Held(folder, uid, int(item[b"RFC822.SIZE"]), b"\\Deleted" in item[b"FLAGS"])
            )
    client.logout()
    return where


# -- what breaks ------------------------------------------------------------------------


class Chaos:
    """Breaks things on a schedule while the mail is processed; counts what it did."""

    def __init__(
        self,
        workers: list[CeleryProcess],
        beats: list[CeleryProcess],
        redis_server: RedisServer,
        imap: DovecotServer,
        smtp: SmtpServer,
        seed: int = 7,
    ) -> None:
        self.workers, self.beats = workers, beats
        self.redis, self.imap, self.smtp = redis_server, imap, smtp
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

    def _kill_mid_send(self) -> None:
        """Both workers killed while the SMTP server holds back its answer to a reply it
        has kept: that reply must end unconfirmed, never sent again."""
        if self.smtp.wait_answering_late(30):
            for worker in self.workers:
                worker.kill()
            self.counts["workers killed while a reply was on its way (SIGKILL)"] += 1
            for worker in self.workers:
                worker.start()

    def _event(self, event: str) -> None:
        if event == "redis restart":
            self.redis.restart()  # SHUTDOWN: the AOF is complete
            self.counts["Redis restarted (clean)"] += 1
        elif event == "redis kill":
            self.redis.kill()  # SIGKILL mid-write, then the same port, data dir and AOF
            self.redis.start()
            self.counts["Redis killed (SIGKILL) and started again"] += 1
        elif event == "kick":
            self.imap.kick()
            self.counts["IMAP sessions kicked"] += 1
        elif event == "smtp down":
            self.smtp.restart(down_s=SMTP_DOWN_S)  # connections refused meanwhile
            self.counts[f"SMTP server down for {SMTP_DOWN_S:.0f} s"] += 1
        else:
            self.imap.restart()  # the same generated config: still without MOVE
            self.counts["IMAP server restarted"] += 1

    def _run(self) -> None:
        try:
            events = {
                2: "smtp down",
                3: "redis restart",
                6: "kick",
                7: "redis kill",
                9: "imap restart",
            }
            kills = 0
            while kills < KILLS and not self.stop.is_set():
                if not self._sleep(self.rng.uniform(2.0, 5.0)):
                    return
                victim = self.rng.choice(self.workers)
                if kills == 8:  # a reply is on its way: every worker dies before its answer
                    self._kill_mid_send()
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
                if kills in events:
                    self._event(events.pop(kills))
                victim.start()
                self._supervise()
                if kills == 4:  # a pool process dies alone: reject_on_worker_lost redelivers
                    self._kill_one_pool_process()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


def _reply_outcome(reply: str) -> str:
    """What a record's ``reply`` says, in a word or three."""
    said = reply.split(": ", 1)[1] if ": " in reply else reply
    for start, outcome in (
        ("sent", "sent"),
        ("unconfirmed", "unconfirmed (a worker died while it was on its way)"),
        ("failed", "failed (the server refused it for good)"),
        ("not sent again", "not sent again (another delivery's)"),
    ):
        if said.startswith(start):
            return outcome
    return f"not sent ({replies_core.why_kind(said)})"


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

    def __init__(self, imap: DovecotServer, deliveries: list[Delivery], per_batch: int = 8) -> None:
        self.imap, self.deliveries, self.per_batch = imap, deliveries, per_batch
        self.errors: list[BaseException] = []
        self.retried = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _append(self, delivery: Delivery) -> None:
        for _ in range(60):
            try:
                deliver(self.imap, [delivery.raw])
                return
            except Exception:  # noqa: BLE001 - the IMAP server is being kicked/restarted
                self.retried += 1
                time.sleep(0.5)
                try:  # an APPEND whose answer was lost may have landed: never deliver twice
                    if delivery.number in held_deliveries(self.imap.account):
                        return
                except Exception:  # noqa: BLE001
                    continue
        raise RuntimeError(f"could not deliver {delivery.number}")

    def _run(self) -> None:
        try:
            for start in range(0, len(self.deliveries), self.per_batch):
                for delivery in self.deliveries[start : start + self.per_batch]:
                    self._append(delivery)
                time.sleep(1.5)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


# -- the run ----------------------------------------------------------------------------


@pytest.mark.timeout(480)  # a mail that never settles keeps it to the deadline: ~7 min
def test_nothing_lost_nothing_twice_under_faults(tmp_path: Path) -> None:
    started = time.monotonic()
    imap = dovecot_without(tmp_path / "imap", "MOVE")  # skips (or fails in CI) without it
    redis_server = RedisServer(tmp_path / "redis", persist=True).start()
    sandbox = SandboxServer(
        token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL], faults=SANDBOX_FAULTS
    ).start()
    smtp = SmtpServer().start()
    smtp.set_faults(SMTP_FAULTS)
    scenario = bulk_scenario(MAILS, seed=99)
    deliveries = plan_deliveries(scenario)
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
        alloy_read_timeout=str(READ_TIMEOUT),
        alloy_commit_horizon=str(COMMIT_HORIZON),
        retry_base="0.2",
        retry_cap="3",
        max_attempts="12",
        task_time_limit="20",
        visibility_timeout="60",
        lease="5",  # a killed worker's mails move again 5 s (its lease) + a sweep later
        stale_after="30",
        finish_grace="5",
        failed_retry_after="10",
        failed_auto_retries=str(AUTO_RETRIES),
        fetch_batch="20",
        log_level="info",  # the steps' lines, to explain a violation from the worker logs
        # every reply kind, through the faulty SMTP server; a limit no customer reaches
        replies="received,refused,unknown",
        smtp_host=smtp.host,
        smtp_port=str(smtp.port),
        smtp_security="plain",
        reply_from="documents@support.example",
        reply_limit="1000",
    )
    assert env["MAILINGEST_ALLOY_COMMIT_HORIZON"] == str(COMMIT_HORIZON)
    assert LATE_COMMIT_MS / 1000 < READ_TIMEOUT + COMMIT_HORIZON + 5  # the window covers it
    deliverer = Deliverer(imap, deliveries)
    workers = [
        CeleryProcess("worker", env, tmp_path / f"worker{i}.log", ["--concurrency", "2"])
        for i in range(2)
    ]
    beats = [CeleryProcess("beat", env, tmp_path / f"beat{i}.log") for i in range(2)]
    chaos = Chaos(workers, beats, redis_server, imap, smtp)
    ledger_client = connect_redis(redis_server.url)
    ledger = Ledger(ledger_client)
    outcome: dict[str, int] = {}
    longest_still: list = [0, "", ""]  # ms, mail id, state
    try:
        for process in workers + beats:
            process.start()
        deliverer.thread.start()
        chaos.start()
        deadline = started + SETTLE_WITHIN
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                records = ledger.mails(L.MAIL_STATES)
                now = ledger.now()
            except Exception:  # noqa: BLE001 - Redis is being restarted
                continue
            # how long a mail in flight sat still: no progress, no planned retry
            for r in records:
                if r.state in L.IN_FLIGHT:
                    still = now - last_activity(r)
                    if still > longest_still[0]:
                        longest_still[:] = [still, r.id, r.state]
            # a failed mail still has automatic retries left: not settled yet
            settled = [
                r
                for r in records
                if (r.state in L.DECIDED and r.filed_to)
                or (r.state == L.FAILED and r.auto_replays >= AUTO_RETRIES)
            ]
            try:
                replies_due = ledger.replies_due("default")
            except Exception:  # noqa: BLE001 - Redis is being restarted
                continue
            if (
                len(settled) >= len(deliveries)
                and not replies_due
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
    sandbox.set_faults(
        error_500=0,
        rate_429=0,
        slow_fraction=0,
        drop_fraction=0,
        refuse_fraction=0,
        late_commit_fraction=0,
    )

    # -- invariants ---------------------------------------------------------------
    assert chaos.errors == [], chaos.errors
    assert deliverer.errors == [], deliverer.errors
    chaos.counts["APPENDs retried while IMAP was down"] = deliverer.retried
    ledger_client = connect_redis(redis_server.url)
    try:
        check = Checker(scenario, deliveries, sandbox, Ledger(ledger_client), account)
        check.all()
        check.replies(smtp)
    finally:
        ledger_client.close()
    problems = check.problems

    polls_sent = [
        beat.log_path.read_text().count("Sending due task poll-default") for beat in beats
    ]
    report = _report(
        chaos.counts, stats, outcome, scenario, deliveries, check, processing, polls_sent
    )
    report += (
        f"\n\nLongest time a mail in flight sat still (no progress, no planned retry): "
        f"{longest_still[0] / 1000:.1f} s ({longest_still[1]} in {longest_still[2]}); "
        "MAILINGEST_LEASE 5 s, the sweep every poll (1 s)."
    )
    print("\n" + report)
    if problems:
        print("\n".join(["violations:", *problems]))
        print(f"logs: {tmp_path}")
    build = Path(__file__).resolve().parent.parent / "build"
    build.mkdir(exist_ok=True)
    (build / "reliability-latest.md").write_text(report, encoding="utf-8")
    imap.stop()
    redis_server.stop()
    sandbox.stop()
    smtp.stop()
    assert chaos.counts["worker killed (SIGKILL)"] >= 10
    assert chaos.counts["worker pool process killed alone (SIGKILL)"] == 1
    assert chaos.counts["active beat killed (SIGKILL) and restarted"] == 1
    # one beat at a time: no more polls than one scheduler sends (1 s interval)
    assert sum(polls_sent) <= processing * 1.2 + 10, polls_sent
    assert chaos.counts["Redis restarted (clean)"] == 1
    assert chaos.counts["Redis killed (SIGKILL) and started again"] == 1
    assert chaos.counts["IMAP server restarted"] == 1
    assert stats["faults"]["refused"] > 0 and stats["faults"]["late_commit"] > 0
    assert problems == [], "\n".join(problems[:40])


# -- the invariants ---------------------------------------------------------------------


class Checker:
    """The invariants, per delivery and per distinct mail; ``problems`` lists violations
    and the counters say what legitimately happened."""

    def __init__(
        self,
        scenario: Scenario,
        deliveries: list[Delivery],
        sandbox: SandboxServer,
        ledger: Ledger,
        account: ImapAccount,
    ) -> None:
        self.scenario, self.deliveries, self.sandbox = scenario, deliveries, sandbox
        self.ledger, self.account = ledger, account
        self.problems: list[str] = []
        # what legitimately happened, each shown in the report even when 0
        self.counts: Counter[str] = Counter(
            {
                "deliveries quarantined, Alloy refused the describe": 0,
                "deliveries quarantined, Alloy refused the upload": 0,
                "documents at Alloy without bytes, upload refused": 0,
                "extra copies in the destination (crash after COPY)": 0,
            }
        )
        self.records: dict[int, L.MailRecord] = {}  # delivery number -> its ledger record

    def all(self) -> None:
        self._no_move()
        self._records()
        self._folders()
        self._documents()

    def replies(self, smtp: SmtpServer) -> None:
        """Each reply at most once (its Message-ID derives from the mail and the kind,
        so every delivery and replay of one mail would send the same one); every
        settled record's reply settled too; no reply the server took is recorded as
        neither sent nor unconfirmed; and none to anyone but the mail's sender."""
        received = smtp.received
        ids = Counter(str(r.message["Message-ID"]) for r in received)
        for message_id, n in ids.items():
            if n > 1:
                self.problems.append(f"reply {message_id} sent {n} times")
        self.counts["replies the SMTP server took"] = len(received)
        records = [r for r in self.ledger.mails(L.MAIL_STATES) if r.filed_to]
        outcomes = Counter(_reply_outcome(r.reply) for r in records if r.reply)
        for outcome, n in sorted(outcomes.items()):
            self.counts[f"replies: {outcome}"] = n
        for record in records:
            if not record.reply:
                self.problems.append(f"{record.id} ({record.state}) filed, its reply unsettled")
        senders = {m.sender for m in self.scenario.mails}
        for r in received:
            if r.recipients != [r.recipients[0]] or r.recipients[0] not in senders:
                self.problems.append(f"reply {r.message['Message-ID']} to {r.recipients}")
        for name, n in smtp.counts.items():
            self.counts[f"SMTP {name}"] = n

    def _no_move(self) -> None:
        """The server still does not advertise MOVE (its restart kept the config)."""
        account = self.account
        client = IMAPClient(account.host, port=account.port, ssl=False, timeout=30)
        client.login(account.user, account.password)
        capabilities = client.capabilities()
        client.logout()
        if b"MOVE" in capabilities or b"UIDPLUS" not in capabilities:
            self.problems.append(f"IMAP capabilities changed: {capabilities!r}")

    def _records(self) -> None:
        """Each delivery's ledger record, matched by size (distinct per delivery)."""
        by_size = {len(d.raw): d for d in self.deliveries}
        found: dict[int, list[L.MailRecord]] = {}
        for record in self.ledger.mails(L.MAIL_STATES):
            delivery = by_size.get(record.size)
            if delivery is None:
                self.problems.append(f"{record.id}: a ledger record of no delivery: {record}")
                continue
            if record.state != L.REPLAYED:
                found.setdefault(delivery.number, []).append(record)
        for delivery in self.deliveries:
            records = found.get(delivery.number, [])
            if len(records) == 1:
                self.records[delivery.number] = records[0]
            else:
                self.problems.append(
                    f"delivery {delivery.number}: {len(records)} ledger records "
                    f"{[(r.id, r.state) for r in records]}"
                )

    def _folders(self) -> None:
        """No delivery lost: each in exactly one folder, where the ledger says it is."""
        held = held_deliveries(self.account)
        sent = {d.number for d in self.deliveries}
        for number, copies in held.items():
            if number not in sent:
                self.problems.append(f"a mail nobody delivered: {copies}")
        for delivery in self.deliveries:
            n, mail = delivery.number, delivery.mail
            copies = held.get(n, [])
            record = self.records.get(n)
            what = f"delivery {n} ({mail.subject}, {delivery.kind})"
            if record is not None:
                what += f" [{record.id} {record.state} filed_to={record.filed_to!r}]"
            folders = sorted({c.folder for c in copies})
            if len(folders) != 1:
                self.problems.append(f"{what}: in {folders or 'no folder (lost)'}: {copies}")
                continue
            (folder,) = folders
            if any(c.size != len(delivery.raw) for c in copies):
                self.problems.append(f"{what}: size changed: {copies}")
            if any(c.deleted for c in copies):
                self.problems.append(f"{what}: flagged \\Deleted in {folder}")
            if len(copies) > 1:
                if folder == "INBOX" or len(copies) > 2:
                    self.problems.append(f"{what}: {len(copies)} copies in {folder}")
                else:  # COPY, then a crash before the EXPUNGE: allowed, counted
                    self.counts["extra copies in the destination (crash after COPY)"] += 1
            if record is None:
                continue
            refusal = REFUSAL.search(record.reason)
            if folder == "INBOX":
                if not (record.state == L.FAILED and record.reason and not record.filed_to):
                    self.problems.append(
                        f"{what}: still in INBOX without a failed reason; {self._detail(record)}"
                    )
                continue
            if record.filed_to != folder:
                self.problems.append(f"{what}: in {folder}, ledger says {record.filed_to!r}")
            if folder == "Processed":
                if record.state != L.DONE or mail.quarantine_reason:
                    self.problems.append(f"{what}: processed: {record.reason!r}")
            elif mail.quarantine_reason:
                if record.state != L.QUARANTINED or mail.quarantine_reason not in record.reason:
                    self.problems.append(f"{what}: quarantined: {record.reason!r}")
            elif record.state != L.QUARANTINED or refusal is None:
                self.problems.append(f"{what}: quarantined: {record.reason!r}")
            else:
                self.counts[f"deliveries quarantined, Alloy refused the {refusal['op']}"] += 1

    def _documents(self) -> None:
        """Per distinct mail: every document once, uploaded, our bytes; when no copy of
        the mail is done, at most once, and without bytes only after a refused upload."""
        copies: dict[int, list[Delivery]] = {}
        for delivery in self.deliveries:
            copies.setdefault(delivery.content, []).append(delivery)
        expected: dict[str, set[tuple[str, str]]] = {
            entity: set() for entity in set(self.scenario.senders.values())
        }
        listed = {entity: self.sandbox.state.list(entity) for entity in expected}
        for content, mail in enumerate(self.scenario.mails):
            records = [self.records[d.number] for d in copies[content] if d.number in self.records]
            done = any(r.state == L.DONE for r in records)
            for doc in mail.documents:
                key = (doc.name, doc.extension)
                expected[doc.entity].add(key)
                match = [d for d in listed[doc.entity] if (d["name"], d["extension"]) == key]
                what = f"{doc.name}.{doc.extension} (mail {mail.subject!r}, {doc.entity})"
                if len(match) > 1:
                    self.problems.append(
                        f"{what}: {len(match)} at Alloy {match}; {self._ledger(records, doc)}"
                    )
                elif not match:
                    if done:
                        self.problems.append(
                            f"{what}: missing at Alloy; {self._ledger(records, doc)}"
                        )
                elif not match[0]["uploaded"]:
                    # a quarantined copy's reason names this document's refused upload
                    refused = any(
                        m["op"] == "upload" and m["doc"] == f"{doc.name}.{doc.extension}"
                        for r in records
                        if r.state == L.QUARANTINED
                        for m in REFUSAL.finditer(r.reason)
                    )
                    if refused and not done:
                        self.counts["documents at Alloy without bytes, upload refused"] += 1
                    else:
                        self.problems.append(
                            f"{what}: uploaded:false at Alloy {match[0]}; "
                            f"{self._ledger(records, doc)}"
                        )
                elif (
                    self.sandbox.state.download(doc.entity, match[0]["document_token"])
                    != doc.payload
                ):
                    self.problems.append(f"{what}: bytes differ")
        for entity, docs in listed.items():
            stray = [d for d in docs if (d["name"], d["extension"]) not in expected[entity]]
            if stray:
                self.problems.append(f"{entity}: {len(stray)} document(s) nobody sent: {stray}")

    def _detail(self, record: L.MailRecord) -> str:
        """The record's documents and their slots, for a report."""
        out = [f"requeues={record.requeues} auto_replays={record.auto_replays}"]
        for planned in self.ledger.documents(record.id, record.documents):
            slot = self.ledger.slot(record.entity, planned.fingerprint)
            out.append(
                f"doc[{planned.index}] {planned.name}.{planned.extension} {planned.state} "
                f"slot: token={slot.token!r} uploaded={slot.uploaded} refused={slot.refused!r} "
                f"attempt={slot.attempt!r}"
            )
        return "; ".join(out)

    def _ledger(self, records: list[L.MailRecord], doc: ExpectedDocument) -> str:
        """What the ledger holds for ``doc`` in each copy of its mail: for a report."""
        name = f"{doc.name}.{doc.extension}"
        out = []
        for record in records:
            line = f"{record.id} {record.state} filed_to={record.filed_to!r} {record.reason!r}"
            for planned in self.ledger.documents(record.id, record.documents):
                if f"{planned.name}.{planned.extension}" == name:
                    slot = self.ledger.slot(record.entity, planned.fingerprint)
                    line += f" doc[{planned.index}] {planned.state} {planned.token} slot={slot}"
            out.append(line)
        return "ledger: " + (" | ".join(out) or "no record")


def _report(
    counts: Counter[str],
    stats: dict,
    outcome: dict[str, int],
    scenario: Scenario,
    deliveries: list[Delivery],
    check: Checker,
    seconds: float,
    polls_sent: list[int],
) -> str:
    faults = stats["faults"]
    kinds = Counter(d.kind for d in deliveries if d.copy)
    lines = [
        "| fault injected | count |",
        "|---|---|",
        *(f"| {name} | {n} |" for name, n in sorted(counts.items())),
        f"| Alloy answered 500 | {faults.get('error_500', 0)} |",
        f"| Alloy answered 429 (with Retry-After) | {faults.get('rate_429', 0)} "
        f"({faults.get('retry_after', 0)}) |",
        f"| Alloy answered slower than the client timeout | {faults.get('slow', 0)} |",
        f"| Alloy dropped the connection | {faults.get('drop', 0)} |",
        f"| Alloy refused for good (describe 400/4002, upload 400/4001) "
        f"| {faults.get('refused', 0)} |",
        f"| Alloy committed a describe or upload {LATE_COMMIT_MS / 1000:.0f} s late "
        f"(client timeout {READ_TIMEOUT} s) | {faults.get('late_commit', 0)} |",
        f"| Alloy's clock off by | {CLOCK_OFFSET_MS / 1000:+.0f} s |",
        f"| Alloy requests in all | {stats['requests_total']} |",
        f"| mails delivered twice, same Message-ID (second with a relay's Received:) "
        f"| {kinds['same Message-ID']} |",
        f"| mails delivered twice, without Message-ID | {kinds['no Message-ID']} |",
        "| IMAP server without MOVE (COPY + UID EXPUNGE), also after its restart | yes |",
        "| two workers (2 processes each) and two beats at once | yes |",
        f"| polls sent by beat 1 / beat 2 (RedBeat: one holds the lock) "
        f"| {' / '.join(map(str, polls_sent))} |",
        "",
        "| outcome | count |",
        "|---|---|",
        f"| deliveries (distinct mails) | {len(deliveries)} ({len(scenario.mails)}) |",
        *(f"| deliveries {state} | {n} |" for state, n in sorted(outcome.items())),
        *(f"| {name} | {n} |" for name, n in sorted(check.counts.items())),
        f"| documents planned (distinct) | {len(scenario.expected_documents)} |",
        f"| documents at Alloy, uploaded | {stats['uploaded']} |",
        f"| documents at Alloy, all | {stats['documents']} |",
        f"| invariant violations | {len(check.problems)} |",
        f"| wall time, servers up to all settled | {seconds:.0f} s |",
    ]
    return "\n".join(lines) + "\n"
