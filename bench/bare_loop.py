"""The bare loop: the least a script can do to move mail attachments into Alloy.

One process, one IMAP connection, one HTTP client, no ledger, no broker, no
safety: for each mail in the INBOX, fetch it (``BODY.PEEK[]``), parse it with the
stdlib, POST a description and PUT the bytes of each attachment to Alloy, then
MOVE the mail to the processed folder. A crash loses its place; a retried run
uploads everything again; a hostile mail is uploaded as is. It is the yardstick
mailingest's throughput is compared with, on the same workload and sandbox.

    python -m bench.bare_loop --imap-port P --user U --password W --alloy-url URL \
        --token T --secret S --senders senders.csv --agent kyc@example --out result.json

Timing starts after the imports, before the IMAP login, and ends when the last
mail is moved. The result (JSON) holds the start and end (``time.time()``), the
counts, and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import csv
import email
import email.policy
import json
import re
import resource
import sys
import time
from email.utils import parseaddr
from pathlib import Path

import httpx
from imapclient import IMAPClient

NOTE = "Uploaded from email customer sent"
TYPES = (
    ("passport", re.compile(r"passport", re.I)),
    ("license", re.compile(r"licen[cs]e|driver", re.I)),
    ("utility", re.compile(r"utility|bill|statement", re.I)),
    ("contract", re.compile(r"contract|agreement", re.I)),
)


def doc_type(name: str) -> str:
    for kind, pattern in TYPES:
        if pattern.search(name):
            return kind
    return "other"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(args: argparse.Namespace) -> dict[str, object]:
    with open(args.senders, encoding="utf-8") as f:
        directory = {row["email"].lower(): row["entity_token"] for row in csv.DictReader(f)}
    started = time.time()
    cpu_before = _cpu()
    mails = documents = uploaded_bytes = 0
    imap = IMAPClient(args.imap_host, port=args.imap_port, ssl=False, timeout=60)
    imap.login(args.user, args.password)
    if not imap.folder_exists(args.processed):
        imap.create_folder(args.processed)
    imap.select_folder("INBOX")
    http = httpx.Client(
        base_url=args.alloy_url.rstrip("/") + "/",
        auth=(args.token, args.secret),
        timeout=60,
    )
    for uid in imap.search(["ALL"]):
        raw = imap.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
        message = email.message_from_bytes(raw, policy=email.policy.default)
        entity = directory[parseaddr(str(message["From"]))[1].lower()]
        for part in message.iter_attachments():
            data = part.get_content()
            name, _, extension = (part.get_filename() or "document.bin").rpartition(".")
            described = http.post(
                f"entities/{entity}/documents",
                json={
                    "name": name,
                    "extension": extension.lower(),
                    "type": doc_type(name),
                    "note": NOTE,
                    "note_author_agent_email": args.agent,
                },
            )
            described.raise_for_status()
            token = described.json()["document_token"]
            put = http.put(
                f"entities/{entity}/documents/{token}",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            put.raise_for_status()
            documents += 1
            uploaded_bytes += len(data)
        imap.move([uid], args.processed)
        mails += 1
    ended = time.time()
    cpu_after = _cpu()
    imap.logout()
    http.close()
    return {
        "started": started,
        "ended": ended,
        "mails": mails,
        "documents": documents,
        "uploaded_bytes": uploaded_bytes,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cpu_seconds": cpu_after - cpu_before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_loop", description=__doc__)
    parser.add_argument("--imap-host", default="127.0.0.1")
    parser.add_argument("--imap-port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--processed", default="Processed")
    parser.add_argument("--alloy-url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--senders", required=True, help="CSV with header email,entity_token")
    parser.add_argument("--agent", required=True, help="note_author_agent_email")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
