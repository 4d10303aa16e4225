"""Sender -> entity: the CSV file, the Redis directory, the CRM hook, in that order."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from mailingest.adapters.senders import (
    CsvDirectory,
    HttpLookup,
    RedisDirectory,
    SenderResolver,
    normalise_email,
    parse_directory,
)
from mailingest.core.errors import ConfigError, ResolverError

ALICE = "P-aaaaaaaaaaaaaaaaaaaa"


def test_parse_directory_normalises_and_names_bad_lines() -> None:
    text = (
        "email,entity_token\n  Alice@Example.COM , P-aaaaaaaaaaaaaaaaaaaa \n\nbob@x.org,crm-4711\n"
    )
    assert parse_directory(text, "f.csv") == {"alice@example.com": ALICE, "bob@x.org": "crm-4711"}
    with pytest.raises(ValueError, match=r"f.csv:3: not an e-mail address"):
        parse_directory("email,entity_token\na@b.c,P-1\nnot-an-address,P-2\n", "f.csv")
    with pytest.raises(ValueError, match="header"):
        parse_directory("mail,entity\n", "f.csv")
    with pytest.raises(ValueError, match=r"f.csv:2: not an entity"):
        parse_directory("email,entity_token\na@b.c,has space\n", "f.csv")


def test_normalise_email() -> None:
    assert normalise_email("  <Bob.Okafor@Example.ORG> ") == "bob.okafor@example.org"


def test_csv_directory_rereads_a_changed_file_and_rejects_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "senders.csv"
    path.write_text(f"email,entity_token\nalice@example.com,{ALICE}\n", encoding="utf-8")
    directory = CsvDirectory(path)
    assert directory.resolve("alice@example.com") == ALICE
    path.write_text("email,entity_token\nalice@example.com,P-bbbbbbbbbbbbbbbbbbbbbb\n")
    assert directory.resolve("alice@example.com") == "P-bbbbbbbbbbbbbbbbbbbbbb"
    path.write_text("garbage\n")  # a broken edit keeps the last good copy
    assert directory.resolve("alice@example.com") == "P-bbbbbbbbbbbbbbbbbbbbbb"
    with pytest.raises(ConfigError, match="MAILINGEST_SENDERS_FILE"):
        CsvDirectory(path)


@pytest.mark.servers
def test_redis_directory_and_resolution_order(tmp_path: Path, redis_client: redis.Redis) -> None:
    path = tmp_path / "senders.csv"
    path.write_text(f"email,entity_token\nalice@example.com,{ALICE}\n", encoding="utf-8")
    directory = RedisDirectory(redis_client)
    directory.add("Alice@Example.com", "P-fromredisfromredis00")  # the file wins
    directory.add("bob@example.org", "crm-42")
    resolver = SenderResolver([CsvDirectory(path), directory])
    assert resolver.resolve("ALICE@example.com") == (ALICE, "csv")
    assert resolver.resolve("bob@example.org") == ("crm-42", "redis")
    assert resolver.resolve("nobody@example.org") is None
    assert resolver.resolve(None) is None
    assert directory.items() == [
        ("alice@example.com", "P-fromredisfromredis00"),
        ("bob@example.org", "crm-42"),
    ]
    assert directory.remove("BOB@example.org") and not directory.remove("bob@example.org")


@pytest.fixture
def crm() -> Iterator[tuple[str, dict]]:
    """A small CRM lookup service over real HTTP."""
    state: dict = {"status": 200, "calls": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["calls"] += 1
            email = parse_qs(urlsplit(self.path).query).get("email", [""])[0]
            if state["status"] != 200:
                self.send_response(state["status"])
                self.end_headers()
                return
            if email != "carol@example.net":
                self.send_response(404)
                self.end_headers()
                return
            body = json.dumps({"entity_token": "P-crmcrmcrmcrmcrmcrm00"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/lookup", state
    server.shutdown()
    server.server_close()


@pytest.mark.servers
def test_crm_lookup(crm: tuple[str, dict]) -> None:
    url, state = crm
    lookup = HttpLookup(url)
    assert lookup.resolve("carol@example.net") == "P-crmcrmcrmcrmcrmcrm00"
    assert lookup.resolve("dave@example.net") is None
    state["status"] = 503  # an outage is retried, never read as "unknown sender"
    with pytest.raises(ResolverError, match="503"):
        lookup.resolve("carol@example.net")
