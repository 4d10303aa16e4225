"""``mailingest demo``: the whole flow on private servers, then a report.

It starts a private redis-server, an in-process IMAP server (pymap), and the
Alloy sandbox, each on a free loopback port; delivers a handful of realistic
customer mails by IMAP APPEND; runs a real Celery worker and beat with the same
code and settings as production; waits until every mail is decided; and prints
what reached which entity and what was quarantined. It checks its own outcome:
the exit status is 0 only when every document arrived intact at the
right entity and the stranger's mail is in quarantine.
"""

from __future__ import annotations

import email
import email.policy
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from mailingest.adapters import ledger as L
from mailingest.adapters.alloy import AlloyClient
from mailingest.adapters.imap import Mailbox
from mailingest.adapters.ledger import Ledger
from mailingest.application.services import connect_redis
from mailingest.config.secret import Secret
from mailingest.config.settings import DEFAULT_NOTE, load_settings
from mailingest.core.states import DECIDED, MAIL_STATES
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import (
    AGENT_EMAIL,
    AUTHSERV_ID,
    ExpectedDocument,
    Scenario,
    demo_scenario,
)
from mailingest_testbed.servers import (
    CeleryProcess,
    ConsoleProcess,
    ImapAccount,
    PymapServer,
    RedisServer,
    free_port,
)
from mailingest_testbed.servers.smtp import SmtpServer

ALLOY_TOKEN, ALLOY_SECRET = "demo-workflow-token", "demo-workflow-secret"


def local_environment(
    redis_url: str,
    imap: ImapAccount,
    alloy_url: str,
    senders_file: Path,
    *,
    alloy_token: str = ALLOY_TOKEN,
    alloy_secret: str = ALLOY_SECRET,
    **overrides: str,
) -> dict[str, str]:
    """The MAILINGEST_* settings for servers on this machine (the demo's, the tests')."""
    return {
        "MAILINGEST_REDIS_URL": redis_url,
        "MAILINGEST_IMAP_HOST": imap.host,
        "MAILINGEST_IMAP_PORT": str(imap.port),
        "MAILINGEST_IMAP_USER": imap.user,
        "MAILINGEST_IMAP_PASSWORD": imap.password,
        "MAILINGEST_IMAP_SECURITY": imap.security,
        "MAILINGEST_ALLOY_URL": alloy_url,
        "MAILINGEST_ALLOY_TOKEN": alloy_token,
        "MAILINGEST_ALLOY_SECRET": alloy_secret,
        "MAILINGEST_AGENT_EMAIL": AGENT_EMAIL,
        "MAILINGEST_TRUSTED_AUTHSERV_ID": AUTHSERV_ID,
        "MAILINGEST_SENDERS_FILE": str(senders_file),
        "MAILINGEST_POLL_INTERVAL": "2",
        "MAILINGEST_RETRY_BASE": "0.5",
        "MAILINGEST_RETRY_CAP": "5",
        "MAILINGEST_ALLOY_RATE": "200",  # the limiter runs, but the sandbox is local
        # the local sandbox commits a request at once or never: a lost answer is looked
        # for again after connect + read timeout + 1 s + 5 s, not after a minute
        "MAILINGEST_ALLOY_COMMIT_HORIZON": "1",
    } | {f"MAILINGEST_{k.upper()}": v for k, v in overrides.items()}


def deliver(env: Mapping[str, str], scenario: Scenario) -> None:
    inbox = load_settings(env).inboxes[0]
    with Mailbox(inbox) as box:
        for mail in scenario.mails:
            box.append(inbox.folder, mail.raw)


def wait_until_decided(ledger: Ledger, expected: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = ledger.mails(MAIL_STATES)
        filed = [r for r in records if r.state in DECIDED and r.filed_to]
        if len(filed) >= expected:
            return True
        time.sleep(0.3)
    return False


def same_content(doc: ExpectedDocument, got: bytes) -> bool:
    """Byte for byte; a forwarded mail (.eml) by its headers and every part's bytes,
    since MIME line endings may be re-encoded on the way in."""
    if doc.extension != "eml":
        return got == doc.payload

    def parts(raw: bytes) -> list[tuple[str, str | None, bytes | None]]:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        out: list[tuple[str, str | None, bytes | None]] = [(str(message["Subject"]), None, None)]
        for part in message.walk():
            if part.is_multipart():
                continue
            data = part.get_payload(decode=True)
            if isinstance(data, bytes) and part.get_content_maintype() == "text":
                data = data.replace(b"\r\n", b"\n")  # text travels with either line ending
            out.append(
                (
                    part.get_content_type(),
                    part.get_filename(),
                    data if isinstance(data, bytes) else None,
                )
            )
        return out

    return parts(got) == parts(doc.payload)


def check_outcome(
    scenario: Scenario,
    alloy: AlloyClient,
    ledger: Ledger,
    *,
    agent_email: str = AGENT_EMAIL,
    note_text: str = DEFAULT_NOTE,
) -> list[str]:
    """What differs from the scenario's expectations (empty when all is well)."""
    problems: list[str] = []
    for entity in sorted(set(scenario.senders.values())):
        wanted = [d for d in scenario.expected_documents if d.entity == entity]
        got = alloy.list(entity)
        if len(got) != len(wanted):
            problems.append(f"{entity}: {len(got)} document(s) in Alloy, expected {len(wanted)}")
        for doc in wanted:
            match = [g for g in got if (g.name, g.extension) == (doc.name, doc.extension)]
            if len(match) != 1:
                problems.append(f"{entity}: {doc.name}.{doc.extension} found {len(match)} times")
                continue
            found = match[0]
            if found.type != doc.type:
                problems.append(
                    f"{doc.name}.{doc.extension}: type {found.type}, expected {doc.type}"
                )
            if not found.uploaded:
                problems.append(f"{doc.name}.{doc.extension}: not uploaded")
            note = found.notes[0] if found.notes else {}
            if note.get("note_author_agent_email") != agent_email:
                problems.append(f"{doc.name}.{doc.extension}: note author {note!r}")
            if note.get("note") != note_text:
                problems.append(f"{doc.name}.{doc.extension}: note {note.get('note')!r}")
            if not same_content(doc, alloy.download(entity, found.token)):
                problems.append(f"{doc.name}.{doc.extension}: content differs")
    quarantined = {r.sender: r for r in ledger.mails([L.QUARANTINED])}
    for mail in scenario.mails:
        if mail.quarantine_reason:
            record = quarantined.get(mail.sender)
            if record is None or mail.quarantine_reason not in record.reason:
                problems.append(f"{mail.sender}: not quarantined for {mail.quarantine_reason!r}")
    return problems


def report(
    scenario: Scenario, alloy: AlloyClient, ledger: Ledger, out: TextIO = sys.stdout
) -> None:
    owners = {entity: email for email, entity in scenario.senders.items()}
    print("\nWhat reached Alloy", file=out)
    print(
        f"  {'entity':24} {'sender':26} {'document':34} {'type':9} {'bytes':>6}  note author",
        file=out,
    )
    for entity in sorted(owners):
        for doc in alloy.list(entity):
            size = len(alloy.download(entity, doc.token)) if doc.uploaded else 0
            author = doc.notes[0].get("note_author_agent_email", "") if doc.notes else ""
            print(
                f"  {entity:24} {owners[entity]:26} {doc.name + '.' + doc.extension:34} "
                f"{doc.type:9} {size:>6}  {author}",
                file=out,
            )
    print("\nQuarantined", file=out)
    for record in ledger.mails([L.QUARANTINED]):
        print(f"  {record.sender:26} {record.subject[:30]!r:34} {record.reason}", file=out)
    counts = ledger.counts()
    print("\nLedger: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v), file=out)


def reply_environment(smtp: SmtpServer) -> dict[str, str]:
    """Replies to customers through the demo's own SMTP server."""
    return {
        "MAILINGEST_REPLIES": "received,refused,unknown",
        "MAILINGEST_SMTP_HOST": smtp.host,
        "MAILINGEST_SMTP_PORT": str(smtp.port),
        "MAILINGEST_SMTP_SECURITY": "plain",  # loopback
        "MAILINGEST_REPLY_FROM": "documents@support.example",
        "MAILINGEST_REPLY_FROM_NAME": "Example Support",
    }


def wait_until_replied(ledger: Ledger, timeout: float) -> bool:
    """Every filed mail's reply settled (sent, or not sent and why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        filed = [r for r in ledger.mails(MAIL_STATES) if r.state in DECIDED and r.filed_to]
        if filed and all(r.reply for r in filed):
            return True
        time.sleep(0.3)
    return False


def report_replies(smtp: SmtpServer, out: TextIO = sys.stdout) -> None:
    print("\nReplies to customers (as the SMTP server received them)", file=out)
    for received in smtp.received:
        message = received.message
        body = message.get_body(("plain",))
        text = body.get_content() if body is not None else ""
        print(f"  to {received.recipients[0]}: {message['Subject']}", file=out)
        for line in [ln for ln in text.splitlines() if ln.strip()][1:6]:
            print(f"      {line}", file=out)


def check_replies(scenario: Scenario, ledger: Ledger, smtp: SmtpServer) -> list[str]:
    """One reply per decided mail a customer can act on, to its sender; none twice."""
    problems = []
    to = sorted(r.recipients[0] for r in smtp.received)
    ids = [str(r.message["Message-ID"]) for r in smtp.received]
    if len(set(ids)) != len(ids):
        problems.append("a reply was sent twice")
    senders = {m.sender for m in scenario.mails}
    problems += [
        f"a reply to {address}, who sent nothing" for address in to if address not in senders
    ]
    if not to:
        problems.append("no reply was sent")
    return problems


def run_demo(
    *,
    keep_running: bool = False,
    flower: bool = False,
    console: bool = False,
    workdir: Path | None = None,
) -> int:
    # SIGTERM (docker stop, timeout) unwinds like Ctrl-C, so every server is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="mailingest-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    scenario = demo_scenario()
    senders_file = root / "senders.csv"
    senders_file.write_text(scenario.senders_csv(), encoding="utf-8")
    processes: list[CeleryProcess | ConsoleProcess] = []
    print(f"mailingest demo in {root}")
    with (
        RedisServer(root / "redis") as redis_server,
        PymapServer(root / "imap") as imap,
        SandboxServer(token=ALLOY_TOKEN, secret=ALLOY_SECRET, agents=[AGENT_EMAIL]) as sandbox,
        SmtpServer() as smtp,
    ):
        account = imap.account
        env = local_environment(redis_server.url, account, sandbox.url, senders_file)
        env |= reply_environment(smtp)
        if flower:  # Flower shows what the workers' task events tell it
            env["MAILINGEST_TASK_EVENTS"] = "on"
        print(f"  private Redis     {redis_server.url}")
        print(f"  IMAP server       {account.host}:{account.port} (pymap, user {account.user})")
        print(f"  Alloy sandbox     {sandbox.url}")
        print(f"  SMTP server       {smtp.host}:{smtp.port} (aiosmtpd: the replies to customers)")
        deliver(env, scenario)
        print(
            f"  delivered {len(scenario.mails)} mails from "
            f"{len({m.sender for m in scenario.mails})} senders to INBOX"
        )
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")} | env
        try:
            processes.append(
                CeleryProcess(
                    "worker", child_env, root / "worker.log", ["--concurrency", "2"], via_cli=True
                ).start()
            )
            processes.append(
                CeleryProcess(
                    "beat",
                    child_env,
                    root / "beat.log",
                    [],
                    via_cli=True,
                ).start()
            )
            if flower and _has_flower():
                port = free_port()
                login = f"demo:{secrets.token_urlsafe(12)}"  # a new one each run
                processes.append(
                    CeleryProcess(
                        "flower",
                        child_env | {"FLOWER_BASIC_AUTH": login},
                        root / "flower.log",
                        [f"--port={port}", "--address=127.0.0.1"],
                    ).start()
                )
                user, password = login.split(":", 1)
                print(f"  Flower            http://127.0.0.1:{port} (login {user} / {password})")
            if console and _has_console():
                processes.append(_start_console(child_env, root))
            print("  worker and beat running; waiting for every mail to be decided ...")
            redis_client = connect_redis(redis_server.url)
            ledger = Ledger(redis_client)
            decided = wait_until_decided(ledger, len(scenario.mails), timeout=180)
            replied = wait_until_replied(ledger, timeout=60)
            with AlloyClient(sandbox.url, Secret(ALLOY_TOKEN), Secret(ALLOY_SECRET)) as alloy:
                report(scenario, alloy, ledger)
                report_replies(smtp)
                problems = [] if decided else ["timed out waiting for the mails to be decided"]
                problems += [] if replied else ["timed out waiting for the replies"]
                problems += check_outcome(scenario, alloy, ledger)
                problems += check_replies(scenario, ledger, smtp)
            if keep_running:
                print("\nServers keep running; Ctrl-C to stop. Environment for other shells:")
                for key, value in env.items():
                    print(f"  export {key}={value}")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
        finally:
            for process in reversed(processes):
                process.stop()
    if problems:
        print("\nDemo FAILED:")
        for problem in problems:
            print(f"  - {problem}")
        print(f"  logs: {root}")
        return 1
    n_docs = len(scenario.expected_documents)
    n_quarantined = sum(1 for m in scenario.mails if m.quarantine_reason)
    print(
        f"\nAll {n_docs} demo documents reached the right entity with the right content; "
        f"{n_quarantined} mails quarantined."
    )
    if own_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _start_console(env: dict[str, str], root: Path) -> ConsoleProcess:
    """The operator console with a login made for this run (an operator), printed."""
    from mailingest.core.console_users import user_line

    password = secrets.token_urlsafe(12)
    users = root / "console-users"
    users.write_text(user_line("demo", "operator", password) + "\n", encoding="utf-8")
    users.chmod(0o600)
    process = ConsoleProcess(
        env
        | {
            "MAILINGEST_CONSOLE_USERS": str(users),
            "MAILINGEST_CONSOLE_SECRET": secrets.token_urlsafe(32),
        },
        root / "console.log",
    ).start()
    print(f"  Console           {process.url} (login demo / {password})")
    return process


def _has_console() -> bool:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("  (the console is not installed: pip install 'mailingest[console]')")
        return False
    return True


def _has_flower() -> bool:
    try:
        import flower  # noqa: F401
    except ImportError:
        print("  (Flower is not installed: pip install 'mailingest[flower]')")
        return False
    return True
