"""IMAP commands per filed mail (issue 12): the whole pipeline in this process against a
private Dovecot, every command counted as it leaves imaplib (``imapcount.py``).

    .venv/bin/python -m bench.imap_moves --mails 200                 # commands per mail
    .venv/bin/python -m bench.imap_moves --mails 200 --preload 10000 # the same, with 10,000
                                                                     # older mails in INBOX

``--preload`` APPENDs that many small mails to INBOX first and puts the watermark above
them, so the poll never takes them: the run files the same ``--mails`` mails, but in a
mailbox that many mails larger (what a SELECT costs grows with it; a NOOP, a UID FETCH
of one mail and a UID MOVE should not). The steps run as ``mailingest poll-once`` runs
them (``pipeline.poll`` and ``run_steps``), one worker, one kept IMAP connection.

Printed: the commands of the whole run and of the moves (``finish``) per filed mail, by
command, and the median wall time of one ``finish``. To measure another version of the
code, put its tree first on the path: ``PYTHONPATH=/path/to/old python bench/imap_moves.py``
(the file imports nothing that is new; it names the mailingest it ran).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from mailingest_testbed.samples import bulk_scenario

import mailingest
from bench.imapcount import ImapCounter
from bench.stack import Servers, mailingest_env, make_sandbox
from mailingest.adapters import ledger as L
from mailingest.application import pipeline
from mailingest.application.poll_once import poll_once
from mailingest.application.services import Context, build_context
from mailingest.config.settings import load_settings
from mailingest.core.decisions import Step


def verb(command: str) -> str:
    words = command.split()
    return " ".join(words[:2]) if words[0] == "UID" else words[0]


def preload(servers: Servers, count: int) -> None:
    """``count`` small mails in INBOX, 500 per MULTIAPPEND."""
    client = servers.imap()
    try:
        for start in range(0, count, 500):
            batch = [
                b"Subject: older %d\r\nMessage-ID: <older-%d@bench>\r\n\r\nolder mail\r\n" % (i, i)
                for i in range(start, min(count, start + 500))
            ]
            client.multiappend("INBOX", batch)
    finally:
        client.logout()


def above_the_preload(ctx: Context, servers: Servers) -> None:
    """The watermark at the highest UID now in INBOX: the poll takes only what comes next."""
    client = servers.imap()
    try:
        validity = int(client.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"])
        uids = client.search(["ALL"])
    finally:
        client.logout()
    if uids:
        inbox = ctx.settings.inboxes[0]
        ctx.ledger.advance_watermark(inbox.name, inbox.folder, validity, max(uids))


def run(mails: int, older: int, workdir: Path) -> dict[str, object]:
    scenario = bulk_scenario(mails - 1, seed=12)  # mails - 1 customers' mails, a stranger's
    senders = workdir / "senders.csv"
    senders.write_text(scenario.senders_csv(), encoding="utf-8")
    with Servers(workdir / "servers") as servers:
        sandbox = make_sandbox()
        ctx = build_context(load_settings(mailingest_env(servers, sandbox, senders)))
        try:
            preload(servers, older)
            above_the_preload(ctx, servers)
            client = servers.imap()
            for mail in scenario.mails:
                client.append("INBOX", mail.raw)
            client.logout()

            counter = ImapCounter()
            moves: list[list[str]] = []
            seconds: list[float] = []
            finish = pipeline.STEPS["finish"]

            def counted(ctx: Context, mail_id: str) -> list[Step]:
                start, began = len(counter.commands), time.perf_counter()
                steps: list[Step] = pipeline.finish(ctx, mail_id)
                seconds.append(time.perf_counter() - began)
                moves.append(counter.commands[start:])
                return steps

            pipeline.STEPS["finish"] = counted
            began = time.perf_counter()
            try:
                with counter:
                    for _ in range(100):
                        poll_once(ctx)
                        records = ctx.ledger.mails(L.MAIL_STATES)
                        if sum(1 for r in records if r.filed_to) >= mails:
                            break
            finally:
                pipeline.STEPS["finish"] = finish
            elapsed = time.perf_counter() - began
            records = ctx.ledger.mails(L.MAIL_STATES)
            filed = sum(1 for r in records if r.filed_to in ("Processed", "Quarantine"))
            left = servers.folder_counts("INBOX")["INBOX"] - older
        finally:
            ctx.close()
            sandbox.stop()
    every = Counter(verb(c) for c in counter.commands)
    in_moves = Counter(verb(c) for m in moves for c in m)
    return {
        "mailingest": str(Path(mailingest.__file__).parent),
        "mails": mails,
        "older mails in INBOX": older,
        "filed": filed,
        "left in INBOX": left,
        "seconds": round(elapsed, 1),
        "commands per filed mail": round(len(counter.commands) / max(filed, 1), 2),
        "by command, per filed mail": {
            k: round(v / max(filed, 1), 2) for k, v in every.most_common()
        },
        "finish: commands per filed mail": round(sum(in_moves.values()) / max(filed, 1), 2),
        "finish: by command, per filed mail": {
            k: round(v / max(filed, 1), 2) for k, v in in_moves.most_common()
        },
        "finish: median ms": round(statistics.median(seconds) * 1000, 2) if seconds else None,
        "finish: total s": round(sum(seconds), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.imap_moves", description=__doc__)
    parser.add_argument("--mails", type=int, default=200)
    parser.add_argument("--preload", type=int, default=0, help="older mails kept in INBOX")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mailingest-moves-") as tmp:
        result = run(args.mails, args.preload, Path(tmp))
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0 if result["filed"] == args.mails and result["left in INBOX"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
