"""The ``mailingest`` command.

    mailingest worker [celery options]   run a Celery worker (same as celery -A mailingest worker)
    mailingest beat [celery options]     run the scheduler that polls each inbox
    mailingest poll-once [--json]        one complete cycle in this process, no broker needed
    mailingest poll-now [--inbox NAME]   ask the running workers to poll at once
    mailingest sandbox [--port 8080]     serve the Alloy document API emulator
    mailingest senders add|remove|list|import   edit the sender directory in Redis
    mailingest status [--json]           ledger counts, the Alloy rate limit, mails needing a person
    mailingest replay MAIL_ID...         send a quarantined or failed mail through again
    mailingest check-config [--connect]  validate the settings; --connect tries every service
    mailingest seed [--count N]          deliver sample mails to an inbox (demo setups)
    mailingest watch [--inbox NAME]      IMAP IDLE on each inbox: new mail is polled at once
    mailingest demo                      the whole flow on private servers, then a report

Configuration comes from MAILINGEST_* environment variables, or a TOML file named by
MAILINGEST_CONFIG that the environment overrides (see the README).
Bad settings stop the command with one line naming each, all of them at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from mailingest import __version__
from mailingest.config.settings import InboxSettings, Settings, load_settings, redact_url
from mailingest.core.errors import ConfigError, MailingestError

if TYPE_CHECKING:
    from mailingest.adapters.rate_limit import Pace
    from mailingest.application.services import Context

log = logging.getLogger("mailingest")


def _settings(*groups: str) -> Settings:
    return load_settings(require=groups)


def setup_logging(level: str = "info", log_format: str = "text") -> None:
    from mailingest.application.logs import setup

    setup(level, log_format)


# -- commands --------------------------------------------------------------------


CELERY_ABOUT = {
    "worker": "Run a Celery worker: it polls the inboxes when beat (or poll-now, or watch) "
    "asks, ingests each mail and files its documents in Alloy.",
    "beat": "Run the scheduler that asks the workers to poll each inbox every "
    "MAILINGEST_POLL_INTERVAL seconds (one beat per deployment; a second one waits).",
}


def celery_help(command: str) -> str:
    """``mailingest worker|beat --help``: what the command does, then Celery's options.

    Rendered here from Celery's own click command, with a bare Celery app, instead of
    by ``celery -A mailingest``: that imports the app, which reads and validates the
    settings, and help must work before there are any.
    """
    import click
    from celery import Celery
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery as celery_group

    app = Celery(set_as_current=False)
    obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
    parent = click.Context(celery_group, info_name="mailingest", obj=obj)
    celery_command = celery_group.commands[command]
    context = celery_command.make_context(command, [], parent=parent, resilient_parsing=True)
    formatter = context.make_formatter()
    celery_command.format_options(context, formatter)
    level = " (default --loglevel INFO)" if command == "worker" else ""
    about = [
        CELERY_ABOUT[command],
        f"The same as `celery -A mailingest {command}`{level}; it needs the complete "
        "configuration (MAILINGEST_* variables or MAILINGEST_CONFIG, see the README). "
        "Every option below is Celery's and is passed on as given.",
    ]
    paragraphs = "".join(textwrap.fill(text, 79) + "\n\n" for text in about)
    return f"usage: mailingest {command} [CELERY OPTIONS]\n\n{paragraphs}{formatter.getvalue()}"


def cmd_celery(args: argparse.Namespace, extra: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in extra):
        print(celery_help(args.command), end="")
        return 0
    settings = _settings("redis", "imap", "alloy")
    check_redis_at_start(settings, wait=args.command == "worker")
    argv = [sys.executable, "-m", "celery", "-A", "mailingest", args.command]
    if args.command == "worker" and not any(a.startswith(("-l", "--loglevel")) for a in extra):
        argv += ["--loglevel", "INFO"]
    os.execv(sys.executable, argv + extra)
    return 0  # pragma: no cover


def check_redis_at_start(settings: Settings, *, wait: bool) -> None:
    """Before a worker or beat starts: Redis (and the broker, if another) must answer.

    Once running, both ride out an outage; at start-up a configuration error stops them
    with one line (a refused password, a wrong database), as does, for beat, a Redis that
    does not answer at all (a wrong address, or down). A worker (``wait``) instead waits
    for a Redis that is not up yet, as Celery does (``broker_connection_retry_on_startup``:
    Compose and Kubernetes may start it first).
    """
    from mailingest.application.services import Services, is_outage

    with Services(settings) as services:
        try:
            services.redis.ping()
            if settings.broker_url != settings.redis_url:
                with services.broker.connection_for_write() as connection:
                    connection.ensure_connection(max_retries=1)
        except Exception as exc:
            if wait and is_outage(exc):
                return
            raise  # one line, naming the service and its address (Services.__exit__)


def cmd_poll_once(args: argparse.Namespace) -> int:
    from mailingest.application.poll_once import poll_once
    from mailingest.application.services import build_context

    settings = _settings("redis", "imap", "alloy")
    setup_logging("warning" if args.json else settings.log_level, settings.log_format)
    ctx = build_context(settings)
    try:
        with ctx.services.naming_failures():
            ctx.services.reach_alloy()  # take no mail while Alloy cannot be reached
            summary = poll_once(ctx, args.inbox or None)
    finally:
        ctx.close()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(
            f"found {summary.found}, processed {summary.processed}, quarantined "
            f"{summary.quarantined}, failed {summary.failed}, pending {summary.pending}, "
            f"documents uploaded {summary.documents_uploaded}"
        )
        for mail in summary.mails:
            if mail.reason:
                print(f"  {mail.mail_id}: {mail.state}: {mail.reason}")
    return 0 if summary.ok else 1


def _testbed(command: str, module: str) -> Any:
    """A module of the test bed, or one line saying what to install."""
    try:
        return importlib.import_module(f"mailingest_testbed.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("mailingest_testbed", "pymap"):
            raise MailingestError(
                f"`mailingest {command}` needs the test bed, which is not installed here: "
                "pip install ./testbed (in a clone of the repository), or run ./dev demo"
            ) from None
        raise


def cmd_sandbox(args: argparse.Namespace) -> int:
    if not hasattr(args, "token"):  # the test bed was missing when the parser was built
        _testbed("sandbox", "alloy_sandbox")
    run_from_args = _testbed("sandbox", "alloy_sandbox").run_from_args

    status: int = run_from_args(args)
    return status


def _redis() -> redis.Redis:
    from mailingest.application.services import Services

    return Services(_settings("redis")).redis


def cmd_senders(args: argparse.Namespace) -> int:
    from mailingest.application.services import Services

    with Services(_settings("redis")) as services:
        return _senders(args, services.redis)


def _senders(args: argparse.Namespace, client: redis.Redis) -> int:
    from mailingest.adapters.senders import RedisDirectory, parse_directory

    directory = RedisDirectory(client)
    if args.action == "add":
        try:
            directory.add(args.email, args.entity)
        except ValueError as exc:
            raise SystemExit(f"mailingest: {exc}") from None
        print(f"{args.email.strip().lower()} -> {args.entity}")
    elif args.action == "remove":
        if not directory.remove(args.email):
            print(f"{args.email}: not in the directory", file=sys.stderr)
            return 1
    elif args.action == "import":
        try:
            mapping = parse_directory(Path(args.file).read_text(encoding="utf-8-sig"), args.file)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"mailingest: {exc}") from None
        print(f"imported {directory.update(mapping)} sender(s)")
    else:
        for email, entity in directory.items():
            print(f"{email},{entity}")
    return 0


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def rate_limit_lines(rate: float, burst: int, pace: Pace) -> list[str]:
    """What `status` says of the Alloy rate limit and the pause after a 429: whether the
    limiter, not the pipeline, sets the pace."""
    if rate <= 0:
        line = "Alloy rate limit: off (MAILINGEST_ALLOY_RATE=0; Alloy's 429s pause every worker)"
    else:
        line = f"Alloy rate limit: {rate:g}/s shared (bursts of {burst})"
        if pace.delayed or pace.deferred:
            line += (
                f"; it delayed {pace.delayed:,} of {_count(pace.requests, 'request')} "
                f"({pace.waited_ms / 1000:,.1f} s waited)"
            )
            if pace.deferred:
                line += f" and put off {pace.deferred:,} for later (a wait over 5 s)"
            line += " in the last minute"
        elif pace.requests:
            line += f"; it delayed none of {_count(pace.requests, 'request')} in the last minute"
        else:
            line += "; no request in the last minute"
        if pace.waiting:
            line += f"; {_count(pace.waiting, 'request')} waiting for a token now"
        elif pace.bucket_empty:
            line += "; the bucket is empty now"
        if pace.sets_the_pace:
            line += ": it sets the pace"
        elif pace.requests:
            line += ": the pipeline, not the limit, sets the pace"
    lines = [line]
    if pace.answered_429 or pace.pause_ms:
        line = f"Alloy answered 429 to {_count(pace.answered_429, 'request')} in the last minute"
        if pace.pause_ms:
            line += f"; every worker holds its requests {pace.pause_ms / 1000:.1f} s more"
        lines.append(line)
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    from mailingest.adapters.ledger import Ledger
    from mailingest.adapters.ledger.leases import NO_LEASES, Leases
    from mailingest.adapters.rate_limit import read_pace
    from mailingest.application.pipeline import sweep_policy
    from mailingest.application.services import Services
    from mailingest.core import decisions
    from mailingest.core.records import MailRecord
    from mailingest.core.states import IN_FLIGHT, MailState

    settings = _settings("redis")
    client = _redis()
    ledger = Ledger(client)
    counts = ledger.counts()
    pace = read_pace(client, rate=settings.alloy_rate, burst=settings.alloy_burst)
    now = ledger.now()  # the ledger's clock: the one its timestamps were taken by
    attention = ledger.mails((MailState.QUARANTINED, MailState.FAILED))
    # filed with parts refused (on_refused_part = "skip"): the newest, still so
    partial = [r for r in ledger.recent_partly_filed() if r.refused_parts]
    pending = ledger.mails(IN_FLIGHT)
    # what the sweep knows, read the same way: who holds a lease, how old the queue is
    policy = sweep_policy(settings)
    seen = Leases(client, lease_ms=policy.lease_ms, heartbeat=False).mail_leases(
        [(r.id, r.documents) for r in pending]
    )
    holders = {mail_id: leases.holder for mail_id, leases in seen.items() if leases.holder}
    since = Services(settings).broker_queue.oldest_sent_ms() if pending else None
    stalled = [
        r
        for r in pending
        if decisions.stuck(r, now, policy=policy, live=seen.get(r.id, NO_LEASES).liveness(since))
    ]
    # a step running for more than two leases (a slow Alloy): alive, not stalled
    working = [
        r
        for r in pending
        if r.id in holders and now - decisions.last_activity(r) > 2 * policy.lease_ms
    ]
    polls: dict[str, dict[str, object]] = {}
    for inbox in settings.inboxes:
        mine = decisions.backlog(pending, inbox.name, now)
        oldest = mine.oldest_ms
        polls[inbox.name] = dict(ledger.poll_status(inbox.name)) | {
            "backlog": mine.mails,
            "oldest_pending_s": None if oldest is None else round(oldest / 1000),
        }

    def row(r: MailRecord) -> dict[str, object]:
        return {
            "mail_id": r.id,
            "state": r.state,
            "sender": r.sender,
            "entity_source": r.entity_source,
            "rules": r.rules,
            "reply": r.reply,
            "reason": r.reason,
            "filed_to": r.filed_to,
            "updated_at": r.updated_at,
        } | ({"lease_held_by": holders[r.id]} if r.id in holders else {})

    if args.json:
        print(
            json.dumps(
                {
                    "counts": counts,
                    "polls": polls,
                    "attention": [row(r) for r in attention],
                    "refused_parts": [
                        row(r) | {"refused_parts": r.refused_parts.split("; ")} for r in partial
                    ],
                    "replies": ledger.reply_outcomes(),
                    "stalled": [row(r) for r in stalled],
                    "in_progress": [row(r) for r in working],
                    "alloy_rate_limit": {
                        "rate": settings.alloy_rate or None,
                        "burst": settings.alloy_burst if settings.alloy_rate else None,
                        "last_minute": {
                            "requests": pace.requests,
                            "delayed": pace.delayed,
                            "waited_s": pace.waited_ms / 1000,
                            "deferred": pace.deferred,
                            "answered_429": pace.answered_429,
                        },
                        "bucket_empty": pace.bucket_empty,
                        "sets_the_pace": settings.alloy_rate > 0 and pace.sets_the_pace,
                        "pause_s": pace.pause_ms / 1000,
                    },
                },
                indent=2,
            )
        )
        return 0
    print("  ".join(f"{state} {n}" for state, n in counts.items()))
    outcomes = ledger.reply_outcomes()
    if outcomes:
        print(reply_line(outcomes))
    for line in rate_limit_lines(settings.alloy_rate, settings.alloy_burst, pace):
        print(line)
    for name, poll in polls.items():
        backlog = f"; backlog {poll['backlog']}"
        if poll["oldest_pending_s"] is not None:
            backlog += f", oldest pending {poll['oldest_pending_s']}s"
        if "at" not in poll:
            print(f"inbox {name}: never polled{backlog}")
            continue
        ago = (now - int(str(poll.get("ok_at") or 0))) / 1000
        last_ok = f"last good poll {ago:.0f}s ago" if poll.get("ok_at") else "no good poll yet"
        error = f"; last error: {poll['error']}" if poll.get("error") else ""
        print(f"inbox {name}: {last_ok}{backlog}{error}")
    for record in attention:
        print(f"{record.state:12} {record.id}  {record.sender or '-'}  {record.reason}")
    for record in partial:
        filed = "filed" if record.filed_to else "being filed"
        print(
            f"{'parts refused':12} {record.id}  {record.sender or '-'}  {record.state}, "
            f"{filed}; refused: {record.refused_parts}"
        )
    for record in working:
        idle = (now - decisions.last_activity(record)) / 1000
        print(
            f"{'in progress':12} {record.id}  {record.state} for {idle:.0f}s "
            f"(lease held by worker {holders[record.id]})"
        )
    for record in stalled:
        idle = (now - decisions.last_activity(record)) / 1000
        print(
            f"{'stalled':12} {record.id}  {record.state} for {idle:.0f}s, no lease held "
            "(the next sweep queues it again)"
        )
    return 0


def reply_line(outcomes: dict[str, int]) -> str:
    """``replies: received sent 3, refused sent 1; why not sent: list 1, robot 1``."""
    done = sorted((k, n) for k, n in outcomes.items() if not k.startswith("why:"))
    why = sorted((k[4:], n) for k, n in outcomes.items() if k.startswith("why:"))
    line = "replies: " + ", ".join(f"{k.replace(':', ' ')} {n}" for k, n in done)
    return line + ("; why not sent: " + ", ".join(f"{k} {n}" for k, n in why) if why else "")


def cmd_replay(args: argparse.Namespace) -> int:
    from mailingest.application.services import build_context

    ctx = build_context(_settings("redis", "imap", "alloy"))
    try:
        with ctx.services.naming_failures():
            return _replay(ctx, args)
    finally:
        ctx.close()


def _replay(ctx: Context, args: argparse.Namespace) -> int:
    from mailingest.adapters import ledger as L
    from mailingest.application import actions
    from mailingest.application.poll_once import run_steps

    ids = list(args.mail_id) or (ctx.ledger.mail_ids(L.FAILED) if args.failed else [])
    if not ids:
        raise SystemExit("mailingest: name a mail id (see `mailingest status`) or pass --failed")
    ctx.services.reach_alloy()  # send no mail through while Alloy cannot be reached
    status = 0
    for mail_id in ids:
        outcome = actions.replay(ctx, mail_id, lambda steps: run_steps(ctx, steps))
        if not outcome.ok:
            print(f"{mail_id}: {outcome.text}", file=sys.stderr)
            status = 1
            continue
        record = ctx.ledger.mail(mail_id)
        print(f"{mail_id}: {record.state if record else '?'}")
    return status


def cmd_poll_now(args: argparse.Namespace) -> int:
    """Ask the running workers to poll now (a task on the broker, like beat's)."""
    from mailingest.application.services import Services

    settings = _settings("redis")
    names = args.inbox or [inbox.name for inbox in settings.inboxes]
    for name in names:
        settings.inbox(name)  # ConfigError for an unknown inbox
    with Services(settings) as services:
        for name in names:
            services.broker.send_task("mailingest.poll_inbox", args=[name])
            print(f"poll of inbox {name} queued")
    return 0


def cmd_address(args: argparse.Namespace) -> int:
    """Print a customer's signed reply address: mail to it is filed on that entity."""
    from mailingest.core.reply_address import address

    settings = _settings()
    inbox = settings.inbox(args.inbox) if args.inbox else settings.inboxes[0]
    key = settings.address_key_bytes
    if key is None or not inbox.reply_address:
        missing = "MAILINGEST_ADDRESS_KEY" if key is None else inbox.setting("REPLY_ADDRESS")
        raise SystemExit(f"mailingest: signed addresses need {missing}")
    try:
        print(address(inbox.reply_address, key, args.external_id))
    except ValueError as exc:
        raise SystemExit(f"mailingest: {exc}") from None
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Serve the operator console (the `console` extra: Starlette and uvicorn)."""
    try:
        import uvicorn

        from mailingest.console.serve import build
    except ImportError as exc:
        raise SystemExit(
            f"mailingest: the console needs its extra ({exc.name} is missing): "
            "pip install 'mailingest[console]'"
        ) from None
    settings = _settings("redis", "imap", "alloy", "console")
    setup_logging(settings.log_level, settings.log_format)
    check_redis_at_start(settings, wait=False)
    app = build(settings, reindex=args.reindex)
    log.info("console: serving on http://%s:%d", args.host, args.port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        # behind a TLS proxy: its X-Forwarded-Proto and -For are believed only when
        # FORWARDED_ALLOW_IPS names it (else a client could forge its address)
        proxy_headers="FORWARDED_ALLOW_IPS" in os.environ,
        server_header=False,
    )
    return 0


def cmd_console_user(args: argparse.Namespace) -> int:
    """A users-file line for one person, the password read from standard input (a
    prompt on a terminal, never an argument: it would stay in the shell's history)."""
    import getpass

    from mailingest.core.console_users import user_line

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise SystemExit("mailingest: the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        raise SystemExit("mailingest: a console password has at least 12 characters")
    try:
        print(user_line(args.name, args.role, password))
    except ValueError as exc:
        raise SystemExit(f"mailingest: {exc}") from None
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """What the inbox would do with one mail file; nothing is sent."""
    from dataclasses import asdict

    from mailingest.application.explain import explain, render
    from mailingest.application.services import build_resolver

    settings = _settings("redis")
    inbox = settings.inbox(args.inbox) if args.inbox else settings.inboxes[0]
    try:
        raw = Path(args.mail).read_bytes()
    except OSError as exc:
        raise SystemExit(f"mailingest: cannot read {args.mail}: {exc.strerror}") from None
    client = _redis()
    try:
        result = explain(settings, inbox, build_resolver(inbox, client), raw)
    finally:
        client.close()
    print(json.dumps(asdict(result), indent=2) if args.json else render(result))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the settings (and the config file); with --connect, try every service."""
    from mailingest.application import check_config as checks

    settings = _settings("redis", "imap", "alloy")
    results = checks.describe(settings)
    if args.connect:
        from mailingest.application.services import Services

        with Services(settings) as services:
            results = checks.connect(services)
    if args.json:
        print(json.dumps([check.to_dict() for check in results], indent=2))
    else:
        for check in results:
            print(f"{'ok' if check.ok else 'FAIL':5} {check.name}: {check.detail}")
    return 0 if all(check.ok for check in results) else 1


def cmd_watch(args: argparse.Namespace) -> int:
    """Hold IMAP IDLE on each inbox; ask the workers to poll as soon as mail arrives."""
    import signal

    from mailingest.adapters.imap import Mailbox
    from mailingest.adapters.ledger import Ledger
    from mailingest.application.services import Services
    from mailingest.application.watch import Watch

    settings = _settings("redis", "imap")
    setup_logging(settings.log_level, settings.log_format)
    names = args.inbox or [inbox.name for inbox in settings.inboxes]
    inboxes = [settings.inbox(name) for name in names]
    with Services(settings) as services:
        # where the polls are queued: stop now if it does not answer (a wrong address or
        # password, or down); once running, an outage of it is ridden out (PollSender)
        services.reach_broker()
        for inbox in inboxes:
            services.tokens(inbox.name)  # built now: a bad OAuth setting stops start-up

        def open_mailbox(inbox: InboxSettings) -> Mailbox:
            return services.mailbox(inbox.name)

        def send(name: str) -> None:  # from the one PollSender thread
            services.broker.send_task("mailingest.poll_inbox", args=[name])

        def describe(exc: BaseException) -> str:
            failure = services.failure(exc)  # the address masked, the password scrubbed
            return failure.problem if failure else type(exc).__name__

        watch = Watch(
            inboxes,
            open_mailbox,
            send,
            renew=settings.idle_renew,
            broker=f"the broker (Redis) at {redact_url(settings.broker_url or '')}",
            describe=describe,
            report=Ledger(services.redis).record_idle,  # the console shows it
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: watch.stopping.set())
        with watch:
            watch.stopping.wait()
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    """Deliver sample mails to an inbox and their senders to the directory (demo setups)."""
    import random
    import time

    from mailingest.application.services import Services

    samples = _testbed("seed", "samples")
    bulk_scenario, demo_scenario = samples.bulk_scenario, samples.demo_scenario
    from mailingest.adapters.senders import RedisDirectory

    settings = _settings("redis", "imap")
    inbox = settings.inbox(args.inbox) if args.inbox else settings.inboxes[0]
    if args.count:
        scenario = bulk_scenario(args.count, seed=7 if args.seed is None else args.seed)
    else:
        scenario = demo_scenario(args.seed if args.seed is not None else random.randrange(2**31))
    deadline = time.monotonic() + args.wait
    while True:  # with --wait, the servers may still be starting (docker compose)
        try:
            with Services(settings) as services:
                RedisDirectory(services.redis).update(scenario.senders)
                with services.mailbox(inbox.name) as box:
                    for mail in scenario.mails:
                        box.append(inbox.folder, mail.raw)
            break
        except MailingestError as exc:
            if time.monotonic() >= deadline:
                raise
            print(f"waiting: {exc}", file=sys.stderr)
            time.sleep(2)
    print(
        f"appended {len(scenario.mails)} mail(s) to inbox {inbox.name} ({inbox.folder}); "
        f"{len(scenario.senders)} sender(s) in the directory"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo = _testbed("demo", "demo").run_demo
    status: int = run_demo(
        keep_running=args.keep_running,
        flower=args.flower,
        console=args.console,
        workdir=args.workdir,
    )
    return status


def _redis_failure(exc: redis.RedisError) -> MailingestError:
    """The one line for a Redis error that left a command as it is: the settings are
    read again (they were read before, or Redis would not have been used) for its address."""
    from mailingest.application.services import Services

    try:
        failure = Services(_settings("redis")).failure(exc)
    except MailingestError:
        failure = None
    return failure or MailingestError(f"Redis unavailable ({type(exc).__name__}: {exc})")


# -- parser ------------------------------------------------------------------------


def _command(sub: Any, name: str, *, help: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with the line the command list shows for it."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + ".", **kw
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailingest",
        description="Ingest identity documents customers e-mail to a support inbox into Alloy.",
        epilog="Configuration: MAILINGEST_* environment variables, or a TOML file named by "
        "MAILINGEST_CONFIG (see README.md).",
    )
    parser.add_argument("--version", action="version", version=f"mailingest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _command(sub, "worker", help="run a Celery worker (extra options go to celery)", add_help=False)
    _command(
        sub,
        "beat",
        help="run the scheduler that polls each inbox (extra options go to celery)",
        add_help=False,
    )

    p = _command(
        sub, "poll-once", help="one complete cycle in this process: fetch, ingest, upload, move"
    )
    p.add_argument("--inbox", action="append", help="only this inbox (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = _command(sub, "poll-now", help="ask the running workers to poll at once")
    p.add_argument("--inbox", action="append", help="only this inbox (repeatable; default: all)")

    p = _command(
        sub,
        "explain",
        help="what the inbox would do with one mail file (documents, refusals, entity); "
        "sends nothing",
    )
    p.add_argument("mail", help="the mail, as a file (.eml: the raw message)")
    p.add_argument("--inbox", help="as this inbox would (default: the first)")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = _command(
        sub,
        "address",
        help="print a customer's signed reply address (mail to it is filed on that entity)",
    )
    p.add_argument("external_id", help="the customer's external entity id in Alloy")
    p.add_argument("--inbox", help="the inbox whose address it is (default: the first)")

    p = _command(
        sub,
        "console-user",
        help="print a line of the console's users file (MAILINGEST_CONSOLE_USERS) for NAME; "
        "the password is read from standard input",
    )
    p.add_argument("name", help="the person's login name")
    p.add_argument(
        "--role",
        choices=("viewer", "operator"),
        default="viewer",
        help="viewer reads, operator also acts (default: viewer)",
    )

    p = _command(sub, "sandbox", help="serve the Alloy document API emulator (test bed)")
    try:
        from mailingest_testbed.alloy_sandbox import add_arguments
    except ModuleNotFoundError:  # `mailingest sandbox` says what to install
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    else:
        add_arguments(p)

    p = _command(sub, "senders", help="edit the sender directory kept in Redis")
    actions = p.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="what to do with the directory"
    )
    a = _command(actions, "add", help="map an e-mail address to an entity token or external id")
    a.add_argument("email", help="the sender's address (compared in lower case)")
    a.add_argument("entity", help="the Alloy entity token (P-...) or the entity's external id")
    a = _command(actions, "remove", help="remove an e-mail address")
    a.add_argument("email", help="the sender's address to remove")
    _command(actions, "list", help="print the directory as CSV")
    a = _command(
        actions, "import", help="add every row of a CSV file with header email,entity_token"
    )
    a.add_argument("file", help="the CSV file (header email,entity_token; UTF-8)")

    p = _command(
        sub,
        "status",
        help="ledger counts, the Alloy rate limit (does it set the pace?), "
        "quarantined and failed mails with reasons, and mails filed with parts refused",
    )
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = _command(sub, "replay", help="send quarantined, failed or partly filed mails through again")
    p.add_argument("mail_id", nargs="*", help="mail ids as shown by `mailingest status`")
    p.add_argument("--failed", action="store_true", help="replay every failed mail")

    p = _command(
        sub,
        "console",
        help="serve the operator console in the browser (users: MAILINGEST_CONSOLE_USERS or "
        "MAILINGEST_CONSOLE_TRUSTED_HEADER; the `console` extra)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument(
        "--reindex",
        action="store_true",
        help="build the ledger's index and search keys again before serving (after keys "
        "of it were lost); the first start of a version does it by itself",
    )

    p = _command(sub, "watch", help="hold IMAP IDLE on each inbox and have new mail polled at once")
    p.add_argument("--inbox", action="append", help="watch only this inbox (repeatable)")

    p = _command(
        sub, "seed", help="deliver sample customer mails to an inbox and add their senders (demos)"
    )
    p.add_argument("--inbox", help="the inbox to deliver to (default: the first)")
    p.add_argument("--count", type=int, help="this many generated mails instead of the demo's")
    p.add_argument("--seed", type=int, help="random seed of the generated mails")
    p.add_argument(
        "--wait", type=float, default=0.0, help="retry this many seconds while servers start"
    )

    p = _command(
        sub,
        "check-config",
        help="validate the settings; with --connect also log in to Redis, each inbox and Alloy",
    )
    p.add_argument(
        "--connect",
        action="store_true",
        help="try each service as a worker would (changes nothing)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = _command(sub, "demo", help="run the whole flow on private servers and print what happened")
    p.add_argument("--keep-running", action="store_true", help="keep the servers up until Ctrl-C")
    p.add_argument(
        "--flower", action="store_true", help="also start Flower (if installed) on a free port"
    )
    p.add_argument(
        "--console",
        action="store_true",
        help="also start the operator console on a free port, with a login made for the run",
    )
    p.add_argument(
        "--workdir", type=Path, help="keep the demo's files here instead of a temp folder"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    runner: Callable[[], int]
    if argv and argv[0] in ("worker", "beat"):
        args, extra = parser.parse_args(argv[:1]), argv[1:]
        runner = partial(cmd_celery, args, extra)
    else:
        args = parser.parse_args(argv)
        commands: dict[str, Callable[[argparse.Namespace], int]] = {
            "poll-once": cmd_poll_once,
            "poll-now": cmd_poll_now,
            "address": cmd_address,
            "console": cmd_console,
            "console-user": cmd_console_user,
            "explain": cmd_explain,
            "sandbox": cmd_sandbox,
            "senders": cmd_senders,
            "status": cmd_status,
            "replay": cmd_replay,
            "demo": cmd_demo,
            "check-config": cmd_check_config,
            "seed": cmd_seed,
            "watch": cmd_watch,
        }
        runner = partial(commands[args.command], args)
    try:
        return runner()
    except ConfigError as exc:
        for line in exc.lines():  # every problem at once, one line each
            print(f"mailingest: configuration error: {line}", file=sys.stderr)
        return 2
    except MailingestError as exc:
        print(f"mailingest: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:  # from Redis used outside a Services block (status)
        print(f"mailingest: {_redis_failure(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
