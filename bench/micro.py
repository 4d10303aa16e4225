"""``python -m bench micro``: small timings of single components, in seconds, no servers
of the machine (the Alloy sandbox runs in this process on a free loopback port).

They used to be printed by tests; a timing asserts nothing (machines differ), so they live
here and the tests keep what they assert. Figures go to stdout, one line each:

* ``sandbox``: describes over one keep-alive connection to the Alloy sandbox (req/s);
* ``sniff``: ``sniff()`` on 25 MB inputs of several kinds (it reads a bounded head, so
  the time should not grow with the size);
* ``parsers``: redis-py's reply parsers side by side on a private redis-server: a 2 MB
  GET (a staged document) and a 30-field HGETALL (a ledger record), pure Python vs
  hiredis (why ``hiredis`` is a dependency).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import time
import zipfile
from collections.abc import Callable

import httpx
from mailingest_testbed.alloy_sandbox import SandboxServer

from mailingest.core.sniff import sniff

ENTITY = "P-x4vtIdFD20vv6jWshIYD"
AGENT = "john.doe@example.com"
DESCRIBE = {
    "name": "driver_license",
    "extension": "pdf",
    "type": "license",
    "note": "Uploaded from email customer sent",
    "note_author_agent_email": AGENT,
}
MB = 1024 * 1024


def sandbox_describes(n: int) -> str:
    """``n`` describes over one keep-alive connection (after one to warm it)."""
    with SandboxServer(agents=[AGENT]) as sandbox, httpx.Client(base_url=sandbox.url) as c:
        path = f"/entities/{ENTITY}/documents"
        c.post(path, json=DESCRIBE).raise_for_status()
        start = time.perf_counter()
        for _ in range(n):
            c.post(path, json=DESCRIBE)
        elapsed = time.perf_counter() - start
        stored = sandbox.state.stats()["documents"]
    if stored != n + 1:
        raise SystemExit(f"sandbox: {stored} documents stored, expected {n + 1}")
    return (
        f"sandbox: {n} describes over one keep-alive connection: "
        f"{n / elapsed:.0f} req/s ({elapsed * 1000 / n:.2f} ms/req)"
    )


def zip_container(tail: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", "<document/>")
    return buffer.getvalue() + tail


def sniff_25_mb(size_mb: int) -> str:
    """``sniff()`` of inputs of ``size_mb`` MB: random bytes, a PDF, text, a zip."""
    random_bytes = os.urandom(size_mb * MB)
    report = []
    for label, data in (
        ("random", random_bytes),
        ("pdf", b"%PDF-1.7\n" + random_bytes),
        ("text", b"a" * (size_mb * MB)),
        ("zip", zip_container(random_bytes)),
    ):
        start = time.perf_counter()
        result = sniff(data)
        elapsed = time.perf_counter() - start
        report.append(f"{label}={result.kind} {elapsed * 1e3:.3f} ms")
    return f"sniff on {size_mb} MB: {', '.join(report)}"


def reply_parsers(rounds: int = 5) -> str:
    """Best of ``rounds``: a 2 MB GET and a 30-field HGETALL with each reply parser."""
    import tempfile
    from pathlib import Path

    import redis
    from mailingest_testbed.servers import RedisServer
    from redis._parsers import _HiredisParser, _RESP2Parser

    with tempfile.TemporaryDirectory() as scratch:
        server = RedisServer(Path(scratch)).start()
        try:
            report = []
            for label, parser in (("python", _RESP2Parser), ("hiredis", _HiredisParser)):
                client = redis.Redis.from_url(server.url, parser_class=parser)
                client.set("blob", os.urandom(2_000_000))
                client.hset("record", mapping={f"field{i}": "x" * 12 for i in range(30)})
                timings = []
                for command, n in (
                    (functools.partial(client.get, "blob"), 50),
                    (functools.partial(client.hgetall, "record"), 2000),
                ):
                    best = min(_per_call(command, n) for _ in range(rounds))
                    timings.append(best * 1e6)
                client.close()
                report.append(
                    f"{label}: GET 2 MB {timings[0]:.0f} us, HGETALL 30 fields {timings[1]:.0f} us"
                )
            return "reply parsers: " + "; ".join(report)
        finally:
            server.stop()


def _per_call(command: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        command()
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench micro",
        description="Small timings of single components (a few seconds; nothing is written).",
    )
    parser.add_argument("--describes", type=int, default=2000, help="sandbox: requests")
    parser.add_argument("--sniff-mb", type=int, default=25, help="sniff: input size in MB")
    args = parser.parse_args(argv)
    print(sandbox_describes(args.describes), flush=True)
    print(sniff_25_mb(args.sniff_mb), flush=True)
    print(reply_parsers(), flush=True)
    return 0
