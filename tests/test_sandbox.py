"""Tests of the Alloy document-API emulator, over real HTTP with httpx."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest
from mailingest_testbed.alloy_sandbox import (
    DOCUMENT_TYPES,
    AlloyLikeError,
    Faults,
    FaultsError,
    SandboxServer,
    SandboxState,
    add_arguments,
    faults_from_args,
    is_entity_token,
    new_entity_token,
)

from .helpers import wait_until

ENTITY = "P-x4vtIdFD20vv6jWshIYD"
OTHER = "B-kn8sXlOgcEwTuUi5HVEU"
DOC_RE = re.compile(r"^D-[A-Za-z0-9]{20}$")
OCTET = {"Content-Type": "application/octet-stream"}
BODY = {
    "name": "driver_license",
    "extension": "pdf",
    "type": "license",
    "note": "Uploaded from email customer sent",
    "note_author_agent_email": "john.doe@example.com",
}


_SSL = ssl.create_default_context()  # built once: httpx would build one per client (~40 ms)


def hx(url: str, **kw: Any) -> httpx.Client:
    kw.setdefault("timeout", 5)
    return httpx.Client(base_url=url, verify=_SSL, **kw)


def docs_path(entity: str = ENTITY) -> str:
    return f"/entities/{entity}/documents"


def assert_error(r: httpx.Response, status: int, minor: int, path: Any = ...) -> dict[str, Any]:
    """The exact Alloy error shape."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"status_code", "error", "timestamp"}
    assert body["status_code"] == status
    assert isinstance(body["timestamp"], int) and body["timestamp"] > 1_500_000_000_000
    err = body["error"]
    assert set(err) == {"minor_code", "type", "message", "details", "error_token"}
    assert err["minor_code"] == minor
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["message"], str) and err["message"]
    assert uuid.UUID(err["error_token"]).version == 4
    if path is not ...:
        assert err["details"] is not None
        assert set(err["details"]) == {"message", "path"}
        assert err["details"]["path"] == path
    return err


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer() as sb:
        yield sb


@pytest.fixture
def client(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with hx(sandbox.url) as c:
        yield c


def describe(client: httpx.Client, entity: str = ENTITY, **over: Any) -> dict[str, Any]:
    r = client.post(docs_path(entity), json={**BODY, **over})
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- happy path


@pytest.mark.servers
def test_describe_returns_document_object(client: httpx.Client) -> None:
    before = int(time.time() * 1000)
    doc = describe(client)
    after = int(time.time() * 1000)
    assert set(doc) == {
        "document_token",
        "type",
        "name",
        "extension",
        "uploaded",
        "timestamp",
        "approved",
        "approval_agent_email",
        "approval_timestamp",
        "notes",
    }
    assert DOC_RE.match(doc["document_token"])
    assert (doc["type"], doc["name"], doc["extension"]) == ("license", "driver_license", "pdf")
    assert doc["uploaded"] is False
    assert isinstance(doc["timestamp"], int) and before <= doc["timestamp"] <= after
    assert doc["approved"] is None
    assert doc["approval_agent_email"] is None and doc["approval_timestamp"] is None
    assert doc["notes"] == [
        {
            "note": BODY["note"],
            "note_author_agent_email": BODY["note_author_agent_email"],
            "created_at": doc["timestamp"],
            "updated_at": doc["timestamp"],
        }
    ]
    bare = describe(client, note=None, note_author_agent_email=None)
    assert bare["notes"] == []
    assert bare["document_token"] != doc["document_token"]
    r = client.post(docs_path(), json={"name": "x", "extension": "jpg", "type": "passport"})
    assert r.status_code == 200 and r.json()["notes"] == []


@pytest.mark.servers
def test_upload_marks_uploaded_and_keeps_object(client: httpx.Client) -> None:
    doc = describe(client)
    r = client.put(f"{docs_path()}/{doc['document_token']}", content=b"%PDF-1.4", headers=OCTET)
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["uploaded"] is True
    assert {**up, "uploaded": False} == doc


@pytest.mark.servers
@pytest.mark.parametrize("payload", [bytes(range(256)), os.urandom(1024 * 1024), b""])
def test_download_returns_exact_bytes(client: httpx.Client, payload: bytes) -> None:
    tok = describe(client)["document_token"]
    assert client.put(f"{docs_path()}/{tok}", content=payload, headers=OCTET).status_code == 200
    r = client.get(f"{docs_path()}/{tok}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == payload


@pytest.mark.servers
def test_chunked_upload(client: httpx.Client) -> None:
    tok = describe(client)["document_token"]
    parts = [os.urandom(1000), os.urandom(70_000), b"end"]
    r = client.put(f"{docs_path()}/{tok}", content=iter(parts), headers=OCTET)
    assert r.status_code == 200, r.text
    assert client.get(f"{docs_path()}/{tok}").content == b"".join(parts)


@pytest.mark.servers
def test_list_returns_entity_documents_only(client: httpx.Client) -> None:
    assert client.get(docs_path()).json() == []
    a = describe(client, name="a")
    b = describe(client, OTHER, name="b")
    c = describe(client, name="c", type="utility")
    client.put(f"{docs_path()}/{a['document_token']}", content=b"x", headers=OCTET)
    listed = client.get(docs_path()).json()
    assert isinstance(listed, list)
    assert [d["document_token"] for d in listed] == [a["document_token"], c["document_token"]]
    assert listed[0]["uploaded"] is True and listed[1]["uploaded"] is False
    assert listed[1] == c
    assert [d["document_token"] for d in client.get(docs_path(OTHER)).json()] == [
        b["document_token"]
    ]


@pytest.mark.servers
def test_external_entity_ids_are_accepted(client: httpx.Client) -> None:
    doc = describe(client, "customer-42@crm")
    listed = client.get(docs_path("customer-42@crm")).json()
    assert [d["document_token"] for d in listed] == [doc["document_token"]]


# --------------------------------------------------------------------------- errors


@pytest.mark.servers
@pytest.mark.parametrize("field", ["name", "extension", "type"])
def test_missing_required_field(client: httpx.Client, field: str) -> None:
    body = {k: v for k, v in BODY.items() if k != field}
    err = assert_error(client.post(docs_path(), json=body), 400, 4002, field)
    assert err["type"] == "Request Body Validation Failure"
    assert field in err["details"]["message"]


@pytest.mark.servers
@pytest.mark.parametrize(
    ("over", "path"),
    [
        ({"type": "selfie"}, "type"),
        ({"type": "License"}, "type"),
        ({"name": 3}, "name"),
        ({"extension": ""}, "extension"),
        ({"type": None}, "type"),
        ({"note": 5}, "note"),
        ({"note_author_agent_email": ""}, "note_author_agent_email"),
    ],
)
def test_invalid_fields(client: httpx.Client, over: dict[str, Any], path: str) -> None:
    err = assert_error(client.post(docs_path(), json={**BODY, **over}), 400, 4002, path)
    if over.get("type") == "selfie":
        assert all(t in err["details"]["message"] for t in DOCUMENT_TYPES)


@pytest.mark.servers
def test_invalid_json_and_non_object(client: httpx.Client, sandbox: SandboxServer) -> None:
    assert_error(client.post(docs_path(), content=b"{not json"), 400, 4002, None)
    assert_error(client.post(docs_path(), json=[1, 2]), 400, 4002, None)
    assert sandbox.state.stats()["documents"] == 0


@pytest.mark.servers
def test_auth_required_when_configured() -> None:
    with SandboxServer(token="tok", secret="sec") as sb, hx(sb.url) as c:
        r = c.post(docs_path(), json=BODY)
        assert_error(r, 401, 4011)
        assert r.headers["www-authenticate"].lower().startswith("basic")
        assert_error(c.post(docs_path(), json=BODY, auth=("tok", "wrong")), 401, 4011)
        assert_error(c.get(docs_path(), auth=("other", "sec")), 401, 4011)
        assert_error(c.get(docs_path(), headers={"Authorization": "Basic !!!"}), 401, 4011)
        assert_error(c.get(docs_path(), headers={"Authorization": "Bearer x"}), 401, 4011)
        assert_error(c.get(f"{sb.admin_url}/stats"), 401, 4011)
        assert sb.state.stats()["documents"] == 0
        assert c.post(docs_path(), json=BODY, auth=("tok", "sec")).status_code == 200
        stats = c.get(f"{sb.admin_url}/stats", auth=("tok", "sec")).json()
        assert stats["documents"] == 1
        assert stats["statuses"] == {"401": 5, "200": 1}


def test_token_without_secret_is_rejected() -> None:
    with pytest.raises(ValueError):
        SandboxServer(token="tok")


@pytest.mark.servers
def test_unknown_document_404(client: httpx.Client) -> None:
    missing = "D-aaaaaaaaaaaaaaaaaaaa"
    assert_error(client.get(f"{docs_path()}/{missing}"), 404, 4041, "document")
    assert_error(
        client.put(f"{docs_path()}/{missing}", content=b"x", headers=OCTET), 404, 4041, "document"
    )
    tok = describe(client)["document_token"]
    # not uploaded yet
    assert_error(client.get(f"{docs_path()}/{tok}"), 404, 4041, "document")
    # belongs to another entity
    assert_error(client.put(f"{docs_path(OTHER)}/{tok}", content=b"x", headers=OCTET), 404, 4041)
    assert_error(client.get(f"{docs_path(OTHER)}/{tok}"), 404, 4041)


@pytest.mark.servers
def test_second_put_conflicts(client: httpx.Client) -> None:
    tok = describe(client)["document_token"]
    url = f"{docs_path()}/{tok}"
    assert client.put(url, content=b"first", headers=OCTET).status_code == 200
    assert_error(client.put(url, content=b"second", headers=OCTET), 409, 4091)
    assert client.get(url).content == b"first"


@pytest.mark.servers
def test_allow_reupload_option() -> None:
    with SandboxServer(allow_reupload=True) as sb, hx(sb.url) as c:
        url = f"{docs_path()}/{describe(c)['document_token']}"
        assert c.put(url, content=b"first", headers=OCTET).status_code == 200
        assert c.put(url, content=b"second!", headers=OCTET).status_code == 200
        assert c.get(url).content == b"second!"
        assert sb.state.stats()["uploaded"] == 1 and sb.state.stats()["bytes_stored"] == 7


@pytest.mark.servers
@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "application/pdf"}, {"Content-Type": "application/json"}, {}],
)
def test_upload_needs_octet_stream(client: httpx.Client, headers: dict[str, str]) -> None:
    tok = describe(client)["document_token"]
    r = client.put(f"{docs_path()}/{tok}", content=b"abc", headers=headers)
    err = assert_error(r, 400, 4001, "content-type")
    assert err["type"] == "Header Validation Failure"
    ok = client.put(
        f"{docs_path()}/{tok}",
        content=b"abc",
        headers={"Content-Type": "Application/Octet-Stream; charset=binary"},
    )
    assert ok.status_code == 200


@pytest.mark.servers
def test_agents_are_checked() -> None:
    with SandboxServer(agents=["john.doe@example.com", "ops@example.com"]) as sb:
        with hx(sb.url) as c:
            describe(c)
            describe(c, note_author_agent_email="John.Doe@Example.com")
            describe(c, note_author_agent_email=None)
            r = c.post(docs_path(), json={**BODY, "note_author_agent_email": "eve@example.com"})
            assert_error(r, 400, 4002, "note_author_agent_email")
            assert sb.state.stats()["documents"] == 3


@pytest.mark.servers
def test_entities_restriction() -> None:
    with SandboxServer(entities=[ENTITY]) as sb, hx(sb.url) as c:
        tok = describe(c)["document_token"]
        stranger = "P-zzzzzzzzzzzzzzzzzzzz"
        for r in (
            c.post(docs_path(stranger), json=BODY),
            c.get(docs_path(stranger)),
            c.put(f"{docs_path(stranger)}/{tok}", content=b"x", headers=OCTET),
            c.get(f"{docs_path(stranger)}/{tok}"),
        ):
            assert_error(r, 400, 4013, "entity")
        assert len(c.get(docs_path()).json()) == 1


@pytest.mark.servers
def test_extensions_option() -> None:
    with SandboxServer(extensions=["pdf", ".JPG"]) as sb, hx(sb.url) as c:
        describe(c, extension="PDF")
        describe(c, extension="jpg")
        assert_error(c.post(docs_path(), json={**BODY, "extension": "exe"}), 400, 4002, "extension")


@pytest.mark.servers
def test_oversized_upload_413_keeps_connection() -> None:
    with SandboxServer(max_upload_bytes=1000) as sb, hx(sb.url) as c:
        url = f"{docs_path()}/{describe(c)['document_token']}"
        assert_error(c.put(url, content=b"x" * 1001, headers=OCTET), 413, 4131)
        assert_error(c.put(url, content=iter([b"x" * 600, b"x" * 600]), headers=OCTET), 413, 4131)
        assert c.put(url, content=b"x" * 1000, headers=OCTET).status_code == 200
        assert sb.state.stats()["bytes_stored"] == 1000


@pytest.mark.servers
def test_unknown_route_and_wrong_method(client: httpx.Client, sandbox: SandboxServer) -> None:
    assert_error(client.get("/entities"), 404, 4041)
    assert_error(client.get(f"{docs_path()}/D-x/extra"), 404, 4041)
    assert_error(client.get(f"{sandbox.root_url}/nothing"), 404, 4041)
    r = client.delete(docs_path())
    assert_error(r, 405, 4051)
    assert r.headers["allow"] == "GET, HEAD, POST"
    r = client.post(f"{docs_path()}/D-aaaaaaaaaaaaaaaaaaaa", json={})
    assert_error(r, 405, 4051)
    assert r.headers["allow"] == "GET, HEAD, PUT"
    # the connection is still usable after errors
    assert client.get(docs_path()).status_code == 200


@pytest.mark.servers
def test_keep_alive_single_connection(sandbox: SandboxServer) -> None:
    with hx(sandbox.url) as c:
        for _ in range(20):
            describe(c)
        assert c.get(docs_path()).status_code == 200
    # one connection only: httpx pooled it, the server saw 21 requests
    assert sandbox.state.stats()["requests_total"] == 21


@pytest.mark.servers
def test_concurrent_clients_consistent_state(sandbox: SandboxServer) -> None:
    errors: list[Exception] = []

    def worker(i: int) -> None:
        try:
            entity = f"P-{i:020d}"
            with hx(sandbox.url) as c:
                for j in range(25):
                    tok = describe(c, entity, name=f"{i}-{j}")["document_token"]
                    r = c.put(
                        f"{docs_path(entity)}/{tok}", content=f"{i}-{j}".encode(), headers=OCTET
                    )
                    assert r.status_code == 200
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = sandbox.state.stats()
    assert stats["documents"] == stats["uploaded"] == 200 and stats["entities"] == 8
    for i in range(8):
        names = [d["name"] for d in sandbox.state.list(f"P-{i:020d}")]
        assert names == [f"{i}-{j}" for j in range(25)]


# --------------------------------------------------------------------------- raw HTTP


def raw_exchange(sb: SandboxServer, data: bytes) -> bytes:
    """Send bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", sb.port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(headers.get("content-length", "0")) if status >= 200 else 0
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def req(method: str, path: str, body: bytes = b"", extra: str = "", version: str = "1.1") -> bytes:
    head = f"{method} {path} HTTP/{version}\r\nHost: x\r\n{extra}"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.servers
def test_raw_pipelined_keep_alive_and_close(sandbox: SandboxServer) -> None:
    body = json.dumps(BODY).encode()
    path = "/v1" + docs_path()
    data = raw_exchange(
        sandbox,
        req("POST", path, body)
        + req("POST", path, body)
        + req("GET", path, extra="Connection: close\r\n"),
    )
    resps = parse_responses(data)
    assert [r[0] for r in resps] == [200, 200, 200]
    assert "connection" not in resps[0][1]
    assert resps[2][1]["connection"] == "close"
    assert len(json.loads(resps[2][2])) == 2


@pytest.mark.servers
def test_raw_http10_and_expect_continue(sandbox: SandboxServer) -> None:
    path = "/v1" + docs_path()
    data = raw_exchange(sandbox, req("GET", path, version="1.0"))
    ((status, headers, body),) = parse_responses(data)
    assert status == 200 and headers["connection"] == "close" and body == b"[]"
    body = json.dumps(BODY).encode()
    resps = parse_responses(
        raw_exchange(
            sandbox, req("POST", path, body, "Expect: 100-continue\r\nConnection: close\r\n")
        )
    )
    assert [r[0] for r in resps] == [100, 200]
    folded = req("GET", path, extra="X-Long: a\r\n  continued\r\nConnection: close\r\n")
    assert parse_responses(raw_exchange(sandbox, folded))[0][0] == 200


@pytest.mark.servers
@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v1/x HTTP/2.0\r\n\r\n", 505),
        (b"GET /v1/x HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /v1/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /v1/x HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
        (b"BREW /v1/x HTTP/1.1\r\n\r\n", 501),
    ],
)
def test_raw_malformed_requests(sandbox: SandboxServer, data: bytes, status: int) -> None:
    ((got, headers, body),) = parse_responses(raw_exchange(sandbox, data))
    assert got == status and headers["connection"] == "close"
    parsed = json.loads(body)
    assert parsed["status_code"] == status and uuid.UUID(parsed["error"]["error_token"])


@pytest.mark.servers
def test_raw_bad_content_length(sandbox: SandboxServer) -> None:
    data = b"POST /v1" + docs_path().encode() + b" HTTP/1.1\r\nContent-Length: -5\r\n\r\n"
    ((status, headers, body),) = parse_responses(raw_exchange(sandbox, data))
    assert status == 400 and json.loads(body)["error"]["minor_code"] == 4001
    assert headers["connection"] == "close"


# --------------------------------------------------------------------------- faults


@pytest.mark.servers
def test_error_500_nothing_stored() -> None:
    with SandboxServer(faults=Faults(error_500=1.0, seed=7)) as sb, hx(sb.url) as c:
        for _ in range(10):
            assert_error(c.post(docs_path(), json=BODY), 500, 5000)
        assert_error(c.get(docs_path()), 500, 5000)
        stats = c.get(f"{sb.admin_url}/stats").json()  # admin is never faulted
    assert stats["documents"] == 0
    assert stats["faults"]["error_500"] == 11
    assert stats["statuses"] == {"500": 11}


@pytest.mark.servers
def test_error_503() -> None:
    with SandboxServer(faults=Faults(error_503=1.0)) as sb, hx(sb.url) as c:
        assert_error(c.post(docs_path(), json=BODY), 503, 5031)
        assert sb.state.stats()["documents"] == 0


@pytest.mark.servers
def test_rate_limit_retry_after() -> None:
    faults = Faults(rate_429=1.0, retry_after_fraction=1.0, retry_after_seconds=2, seed=1)
    with SandboxServer(faults=faults) as sb, hx(sb.url) as c:
        r = c.post(docs_path(), json=BODY)
        assert_error(r, 429, 4033)
        assert r.headers["retry-after"] == "2"
        sb.set_faults(retry_after_fraction=0.0)
        r = c.post(docs_path(), json=BODY)
        assert_error(r, 429, 4033)
        assert "retry-after" not in r.headers
        sb.set_faults(retry_after_fraction=1.0, retry_after_seconds=0.25)
        assert c.get(docs_path()).headers["retry-after"] == "0.25"
        stats = sb.state.stats()
    assert stats["documents"] == 0
    assert stats["faults"]["rate_429"] == 3 and stats["faults"]["retry_after"] == 2


@pytest.mark.servers
def test_drop_closes_without_response() -> None:
    with SandboxServer(faults=Faults(drop_fraction=1.0)) as sb, hx(sb.url) as c:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            c.post(docs_path(), json=BODY)
        assert sb.state.stats()["documents"] == 0  # not applied by default
        sb.set_faults(drop_after_apply=True)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            c.post(docs_path(), json=BODY)
        sb.set_faults(drop_fraction=0.0)
        listed = c.get(docs_path()).json()
        assert len(listed) == 1  # applied, response lost
        assert sb.state.stats()["faults"]["drop"] == 2


@pytest.mark.servers
def test_slow_success_times_out_client_but_applies() -> None:
    with SandboxServer(faults=Faults(slow_fraction=1.0, slow_ms=4000)) as sb:
        with hx(sb.url, timeout=httpx.Timeout(5, read=0.3)) as c:
            t0 = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                c.post(docs_path(), json=BODY)
        # applied at once, although the response was late: well before it would leave
        stats = wait_until(  # (the document is stored a moment before it is counted)
            lambda: (s := sb.state.stats())["documents"] == 1 and s["faults"]["slow"] == 1 and s,
            timeout=3,
        )
        assert time.monotonic() - t0 < 3.5  # counted before the wait, not after it
        assert stats["requests_total"] == 1
        assert sb.state.list(ENTITY)[0]["name"] == "driver_license"


@pytest.mark.servers
def test_latency() -> None:
    with SandboxServer(faults=Faults(latency_ms=50)) as sb, hx(sb.url) as c:
        t0 = time.monotonic()
        describe(c)
        assert time.monotonic() - t0 >= 0.05


@pytest.mark.servers
def test_fault_fractions_are_seeded_and_exact_shares() -> None:
    def run(sb: SandboxServer, c: httpx.Client) -> list[int]:
        return [c.get(docs_path()).status_code for _ in range(300)]

    faults = Faults(error_500=0.3, rate_429=0.2, retry_after_fraction=0.0, seed=42)
    with SandboxServer(faults=faults) as sb, hx(sb.url) as c:
        first = run(sb, c)
        sb.reset()  # re-seeds
        second = run(sb, c)
    assert first == second
    assert 60 <= first.count(500) <= 120  # ~90
    assert 35 <= first.count(429) <= 85  # ~60
    assert first.count(200) == 300 - first.count(500) - first.count(429)


@pytest.mark.servers
def test_admin_faults_at_runtime_and_stats(client: httpx.Client, sandbox: SandboxServer) -> None:
    admin = sandbox.admin_url
    assert client.get(f"{admin}/faults").json() == Faults().to_dict()
    describe(client)
    r = client.put(f"{admin}/faults", json={"error_500": 1.0, "seed": 3})
    assert r.status_code == 200
    assert r.json()["error_500"] == 1.0 and r.json()["rate_429"] == 0.0
    assert_error(client.post(docs_path(), json=BODY), 500, 5000)
    # partial update keeps the other fields
    r = client.put(f"{admin}/faults", json={"slow_ms": 5})
    assert r.json()["error_500"] == 1.0 and r.json()["seed"] == 3
    assert_error(client.put(f"{admin}/faults", json={"nope": 1}), 400, 4002, "nope")
    assert_error(client.put(f"{admin}/faults", json={"error_500": 2}), 400, 4002, "error_500")
    assert_error(client.put(f"{admin}/faults", json={"seed": "x"}), 400, 4002, "seed")
    assert client.get(f"{admin}/faults").json()["error_500"] == 1.0
    client.put(f"{admin}/faults", json={"error_500": 0})
    tok = describe(client)["document_token"]
    client.put(f"{docs_path()}/{tok}", content=b"abc", headers=OCTET)

    stats = client.get(f"{admin}/stats").json()
    assert stats["documents"] == 2 and stats["uploaded"] == 1 and stats["bytes_stored"] == 3
    assert stats["requests"] == {
        "POST /v1/entities/{entity}/documents": 3,
        "PUT /v1/entities/{entity}/documents/{document}": 1,
    }
    assert stats["statuses"] == {"200": 3, "500": 1}
    assert stats["faults"]["error_500"] == 1
    assert stats["requests_total"] == 4

    assert client.post(f"{admin}/reset").json() == {"reset": True}
    stats = client.get(f"{admin}/stats").json()
    assert stats["documents"] == 0 and stats["requests_total"] == 0
    assert client.get(docs_path()).json() == []
    assert_error(client.get(f"{admin}/nothing"), 404, 4041)
    assert_error(client.delete(f"{admin}/stats"), 405, 4051)


# --------------------------------------------------------------------------- late, refused, clock

NEW_FAULT_KINDS = ("late_commit", "refused")
NEW_FIELDS = ("refuse_fraction", "late_commit_fraction", "late_commit_ms", "clock_offset_ms")


def http_date(r: httpx.Response) -> float:
    """The response's ``Date`` header, in epoch seconds."""
    return parsedate_to_datetime(r.headers["date"]).timestamp()


@pytest.mark.slow
@pytest.mark.servers
def test_late_commit_times_out_client_then_applies() -> None:
    # a hold of 2 s: time enough, on a loaded machine, to look while it is held
    faults = Faults(late_commit_fraction=1.0, late_commit_ms=2000)
    with SandboxServer(faults=faults) as sb, hx(sb.url) as other:
        wall0, t0 = time.time(), time.monotonic()
        with hx(sb.url, timeout=httpx.Timeout(5, read=0.3)) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                impatient.post(docs_path(), json=BODY)
        # held, not applied: another connection is served meanwhile (GETs are never held)
        assert other.get(docs_path()).json() == []
        assert sb.state.stats()["documents"] == 0
        assert sb.state.stats()["faults"]["late_commit"] == 0  # counted when applied
        assert time.monotonic() - t0 < 1.95  # (the looks above were inside the hold)
        (doc,) = wait_until(lambda: other.get(docs_path()).json())
        assert time.monotonic() - t0 >= 1.95
        assert doc["uploaded"] is False and doc["name"] == "driver_license"
        assert doc["timestamp"] >= wall0 * 1000 + 1950  # the time it was applied
        # a patient client gets its answer after the hold, the document created by then
        t2 = time.monotonic()
        later = describe(other, name="patient")
        assert time.monotonic() - t2 >= 1.95
        assert [d["name"] for d in sb.state.list(ENTITY)] == ["driver_license", "patient"]
        assert later == sb.state.list(ENTITY)[1]
        stats = sb.state.stats()
    assert stats["faults"]["late_commit"] == 2  # the GETs that drew it were not held
    assert stats["requests"]["POST /v1/entities/{entity}/documents"] == 2
    assert stats["statuses"].get("200", 0) == stats["requests_total"]


@pytest.mark.slow
@pytest.mark.servers
def test_late_commit_put_stores_bytes_after_delay() -> None:
    with SandboxServer() as sb, hx(sb.url) as c:
        tok = describe(c)["document_token"]
        url = f"{docs_path()}/{tok}"
        sb.set_faults(late_commit_fraction=1.0, late_commit_ms=2000)
        t0 = time.monotonic()
        with hx(sb.url, timeout=httpx.Timeout(5, read=0.3)) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                impatient.put(url, content=b"late bytes", headers=OCTET)
        assert_error(c.get(url), 404, 4041, "document")  # the bytes are not stored yet
        assert sb.state.stats()["uploaded"] == 0
        assert time.monotonic() - t0 < 1.95  # (the looks above were inside the hold)
        wait_until(lambda: c.get(url).status_code == 200)
        assert time.monotonic() - t0 >= 1.95
        assert c.get(url).content == b"late bytes"
        assert sb.state.document(ENTITY, tok)["uploaded"] is True
        # the retry the client would make now conflicts (after its own hold)
        assert_error(c.put(url, content=b"late bytes", headers=OCTET), 409, 4091, "document")
        # a chunked body is read in full before the hold too
        tok2 = sb.state.describe(ENTITY, dict(BODY))["document_token"]
        r = c.put(f"{docs_path()}/{tok2}", content=iter([b"a" * 70_000, b"b"]), headers=OCTET)
        assert r.status_code == 200 and r.json()["uploaded"] is True
        assert sb.state.download(ENTITY, tok2) == b"a" * 70_000 + b"b"
        stats = sb.state.stats()
    assert stats["uploaded"] == 2 and stats["bytes_stored"] == 10 + 70_001
    assert stats["faults"]["late_commit"] == 3


@pytest.mark.servers
def test_late_commit_oversized_body_answered_at_once() -> None:
    faults = Faults(late_commit_fraction=1.0, late_commit_ms=3000)
    with SandboxServer(max_upload_bytes=10, faults=faults) as sb, hx(sb.url) as c:
        tok = sb.state.describe(ENTITY, dict(BODY))["document_token"]
        t0 = time.monotonic()
        assert_error(c.put(f"{docs_path()}/{tok}", content=b"x" * 11, headers=OCTET), 413, 4131)
        assert time.monotonic() - t0 < 1
        assert sb.state.stats()["faults"]["late_commit"] == 0


@pytest.mark.servers
def test_stop_during_late_commit_applies_nothing() -> None:
    sb = SandboxServer(faults=Faults(late_commit_fraction=1.0, late_commit_ms=10_000)).start()
    seen: list[BaseException] = []

    def post() -> None:
        try:
            with hx(sb.url) as c:
                c.post(docs_path(), json=BODY)
        except httpx.HTTPError as exc:
            seen.append(exc)

    held = threading.Event()
    sleep = sb.sleep

    def hold(seconds: float) -> bool:  # the sandbox's own wait, noticed
        held.set()
        return sleep(seconds)

    sb.sleep = hold  # type: ignore[method-assign]
    thread = threading.Thread(target=post)
    thread.start()
    assert held.wait(10), "the request never reached its hold"
    t0 = time.monotonic()
    sb.stop()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 2
    assert len(seen) == 1  # the connection was closed without an answer
    wait_until(lambda: sb.state.stats()["faults"]["late_commit"] == 1)  # the handler woke
    stats = sb.state.stats()
    assert stats["documents"] == 0 and stats["statuses"] == {}


@pytest.mark.servers
def test_refusal_is_a_final_400_and_applies_nothing() -> None:
    with SandboxServer(faults=Faults(refuse_fraction=1.0, seed=11)) as sb, hx(sb.url) as c:
        tok = sb.state.describe(ENTITY, dict(BODY))["document_token"]
        for _ in range(5):
            err = assert_error(c.post(docs_path(), json=BODY), 400, 4002, "type")
            assert err["type"] == "Request Body Validation Failure"
            assert "refuse" in err["details"]["message"]
        r = c.put(f"{docs_path()}/{tok}", content=b"abc", headers=OCTET)
        err = assert_error(r, 400, 4001, "content-type")
        assert err["type"] == "Header Validation Failure"
        # other routes are not refused, the connection is kept; the method is checked first
        assert len(c.get(docs_path()).json()) == 1
        assert_error(c.get(f"{docs_path()}/{tok}"), 404, 4041, "document")  # never uploaded
        assert_error(c.delete(docs_path()), 405, 4051)
        stats = c.get(f"{sb.admin_url}/stats").json()
    assert stats["documents"] == 1 and stats["uploaded"] == 0 and stats["bytes_stored"] == 0
    assert stats["faults"]["refused"] == 6
    assert stats["statuses"] == {"400": 6, "200": 1, "404": 1, "405": 1}
    assert stats["requests_total"] == 9


@pytest.mark.servers
def test_refusal_comes_after_auth() -> None:
    faults = Faults(refuse_fraction=1.0)
    with SandboxServer(token="t", secret="s", faults=faults) as sb, hx(sb.url) as c:
        assert_error(c.post(docs_path(), json=BODY), 401, 4011)
        assert_error(c.post(docs_path(), json=BODY, auth=("t", "s")), 400, 4002, "type")
        assert sb.state.stats()["faults"]["refused"] == 1


def _plans(n: int, **kw: Any) -> list[Any]:
    sb = SandboxServer(faults=Faults(**kw))  # draws need no running server
    try:
        return [sb.draw_faults() for _ in range(n)]
    finally:
        sb.stop()


def test_new_fractions_take_only_what_the_old_ones_leave() -> None:
    old: dict[str, Any] = {
        "drop_fraction": 0.05,
        "rate_429": 0.1,
        "error_500": 0.2,
        "retry_after_fraction": 0.5,
        "slow_fraction": 0.3,
        "slow_ms": 1,
        "seed": 42,
    }
    n = 4000
    base = _plans(n, **old)
    new = _plans(n, **old, refuse_fraction=0.25, late_commit_fraction=0.15, late_commit_ms=10)
    for a, b in zip(base, new, strict=True):
        assert (a.drop, a.error_minor, a.retry_after, a.slow_s) == (
            b.drop,
            b.error_minor,
            b.retry_after,
            b.slow_s,
        )
        assert not (a.refuse or a.late_s)
        if a.drop or a.error_minor:
            assert not (b.refuse or b.late_s)
        assert not (b.refuse and b.late_s)
    # still three draws a request, partitioned in the documented order
    rng = random.Random(42)
    edges = [0.05]
    for share in (0.1, 0.0, 0.2, 0.25, 0.15):  # 429, 503, 500, refuse, late commit
        edges.append(edges[-1] + share)
    for p in new:
        u, _v, w = rng.random(), rng.random(), rng.random()
        assert p.refuse == (edges[3] <= u < edges[4])
        assert (p.late_s == 0.01) == (edges[4] <= u < edges[5])
        assert bool(p.slow_s) == (w < 0.3)
    assert abs(sum(p.refuse for p in new) / n - 0.25) < 0.03
    assert abs(sum(bool(p.late_s) for p in new) / n - 0.15) < 0.03
    # late_commit_ms = 0: drawn, but no fault
    assert not any(p.late_s for p in _plans(50, late_commit_fraction=1.0, seed=1))


@pytest.mark.servers
def test_new_fractions_seeded_over_http() -> None:
    faults = Faults(
        error_500=0.2, refuse_fraction=0.3, late_commit_fraction=0.2, late_commit_ms=1, seed=7
    )

    def run(c: httpx.Client) -> list[int]:
        return [c.post(docs_path(), json=BODY).status_code for _ in range(200)]

    with SandboxServer(faults=faults) as sb, hx(sb.url) as c:
        first = run(c)
        stats = sb.state.stats()
        sb.reset()  # re-seeds
        second = run(c)
        assert sb.state.stats()["faults"] == stats["faults"]
    assert first == second
    assert set(first) == {200, 400, 500}
    assert 20 <= first.count(500) <= 60  # ~40
    assert 35 <= first.count(400) <= 85  # ~60
    assert stats["faults"]["refused"] == first.count(400)
    assert stats["faults"]["error_500"] == first.count(500)
    assert 20 <= stats["faults"]["late_commit"] <= 60  # ~40, all answered 200
    assert stats["documents"] == first.count(200)


@pytest.mark.servers
def test_clock_offset_shifts_written_timestamps() -> None:
    hour, day = 3_600_000, 86_400_000
    with SandboxServer(faults=Faults(clock_offset_ms=hour)) as sb, hx(sb.url) as c:
        before = time.time_ns() // 1_000_000
        r = c.post(docs_path(), json=BODY)
        after = time.time_ns() // 1_000_000
        doc = r.json()
        assert before + hour <= doc["timestamp"] <= after + hour
        assert doc["notes"][0]["created_at"] == doc["notes"][0]["updated_at"] == doc["timestamp"]
        assert abs(http_date(r) - (time.time() + 3600)) < 2.5
        missing = c.get(f"{docs_path()}/D-aaaaaaaaaaaaaaaaaaaa")
        assert_error(missing, 404, 4041)
        assert abs(missing.json()["timestamp"] - (time.time() * 1000 + hour)) < 2000
        assert abs(http_date(missing) - (time.time() + 3600)) < 2.5
        # set over the admin API, negative; shown by GET; the admin answers are shifted too
        r = c.put(f"{sb.admin_url}/faults", json={"clock_offset_ms": -day})
        assert r.status_code == 200 and r.json()["clock_offset_ms"] == -day
        assert abs(http_date(r) - (time.time() - 86_400)) < 2.5
        assert c.get(f"{sb.admin_url}/faults").json()["clock_offset_ms"] == -day
        doc2 = describe(c)
        assert abs(doc2["timestamp"] - (time.time() * 1000 - day)) < 2000
        # stored timestamps are not re-shifted; uploads()' uploaded_at is the real clock
        assert c.get(docs_path()).json()[0]["timestamp"] == doc["timestamp"]
        tok = doc2["document_token"]
        assert c.put(f"{docs_path()}/{tok}", content=b"x", headers=OCTET).status_code == 200
        assert abs(sb.state.uploads()[0]["uploaded_at"] - time.time()) < 2
        stats = sb.state.stats()
    assert set(stats["faults"].values()) == {0}  # not a drawn fault, not counted
    assert not Faults(clock_offset_ms=5).active


@pytest.mark.servers
def test_new_faults_over_admin_api(client: httpx.Client, sandbox: SandboxServer) -> None:
    admin = f"{sandbox.admin_url}/faults"
    shown = client.get(admin).json()
    assert {k: shown[k] for k in NEW_FIELDS} == {
        "refuse_fraction": 0.0,
        "late_commit_fraction": 0.0,
        "late_commit_ms": 0.0,
        "clock_offset_ms": 0,
    }
    new: dict[str, Any] = {
        "refuse_fraction": 0.5,
        "late_commit_fraction": 0.25,
        "late_commit_ms": 1500,
        "clock_offset_ms": -30_000,
    }
    r = client.put(admin, json=new)
    assert r.status_code == 200 and {k: r.json()[k] for k in NEW_FIELDS} == new
    assert sandbox.faults == Faults(**new)
    assert sandbox.state.clock_offset_ms == -30_000


@pytest.mark.servers
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("refuse_fraction", 1.5),
        ("refuse_fraction", -0.1),
        ("refuse_fraction", True),
        ("late_commit_fraction", 2),
        ("late_commit_fraction", "0.5"),
        ("late_commit_ms", -1),
        ("late_commit_ms", "slow"),
        ("late_commit_ms", None),
        ("clock_offset_ms", 1.5),
        ("clock_offset_ms", "5"),
        ("clock_offset_ms", True),
        ("clock_offset_ms", None),
        ("clock_offset_ms", 10**15),
    ],
)
def test_new_faults_validated_over_admin_api(
    client: httpx.Client, sandbox: SandboxServer, field: str, value: Any
) -> None:
    admin = f"{sandbox.admin_url}/faults"
    before = client.get(admin).json()
    err = assert_error(client.put(admin, json={field: value}), 400, 4002, field)
    assert err["type"] == "Request Body Validation Failure"
    assert client.get(admin).json() == before  # nothing changed


def test_new_faults_dataclass() -> None:
    f = Faults(refuse_fraction=1, late_commit_fraction=0.5, late_commit_ms=2, clock_offset_ms=-7)
    assert Faults.from_dict(f.to_dict()) == f and f.active
    assert Faults(refuse_fraction=0.1).active and Faults(late_commit_fraction=0.1).active
    limit = 3650 * 86_400_000
    assert Faults(clock_offset_ms=-limit).clock_offset_ms == -limit
    for bad in (
        {"refuse_fraction": float("nan")},
        {"late_commit_fraction": 1.01},
        {"late_commit_ms": float("inf")},
        {"clock_offset_ms": limit + 1},
        {"clock_offset_ms": 2.0},
        {"clock_skew_ms": 1},
    ):
        with pytest.raises(FaultsError) as exc:
            Faults.from_dict(bad)
        assert exc.value.field == next(iter(bad))


@pytest.mark.servers
def test_stats_count_every_fault_kind(sandbox: SandboxServer) -> None:
    assert sandbox.state.stats()["faults"] == {
        "drop": 0,
        "rate_429": 0,
        "retry_after": 0,
        "error_503": 0,
        "error_500": 0,
        "slow": 0,
        "late_commit": 0,
        "refused": 0,
    }
    sandbox.set_faults(refuse_fraction=1.0, slow_fraction=1.0, slow_ms=1)
    with hx(sandbox.url) as c:
        assert_error(c.post(docs_path(), json=BODY), 400, 4002, "type")
        sandbox.set_faults(refuse_fraction=0.0, late_commit_fraction=1.0, late_commit_ms=1)
        describe(c)
    faults = sandbox.state.stats()["faults"]
    assert {k: faults[k] for k in (*NEW_FAULT_KINDS, "slow")} == {
        "late_commit": 1,
        "refused": 1,
        "slow": 2,
    }


def test_cli_options_for_new_faults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert faults_from_args(parser.parse_args([])) == Faults()
    args = parser.parse_args(
        [
            "--refuse-fraction",
            "0.1",
            "--late-commit-fraction",
            "0.2",
            "--late-commit-ms",
            "1500",
            "--clock-offset-ms",
            "-30000",
            "--seed",
            "4",
        ]
    )
    assert faults_from_args(args) == Faults(
        refuse_fraction=0.1,
        late_commit_fraction=0.2,
        late_commit_ms=1500,
        clock_offset_ms=-30_000,
        seed=4,
    )
    with pytest.raises(FaultsError):
        faults_from_args(parser.parse_args(["--refuse-fraction", "2"]))


# --------------------------------------------------------------------------- misc


def test_faults_dataclass() -> None:
    f = Faults.from_dict({"rate_429": 0.5, "seed": 9})
    assert f.rate_429 == 0.5 and f.seed == 9 and f.retry_after_fraction == 0.5
    assert Faults.from_dict(f.to_dict()) == f
    assert Faults.from_dict({"slow_ms": 3}, base=f).rate_429 == 0.5
    assert not Faults().active and f.active
    for bad in (
        {"error_500": -0.1},
        {"latency_ms": float("nan")},
        {"drop_after_apply": 1},
        {"unknown": 1},
        {"rate_429": True},
    ):
        with pytest.raises(FaultsError):
            Faults.from_dict(bad)


def test_state_without_http() -> None:
    st = SandboxState(entities=[ENTITY])
    doc = st.describe(ENTITY, dict(BODY))
    with pytest.raises(AlloyLikeError) as exc:
        st.download(ENTITY, doc["document_token"])
    assert (exc.value.status, exc.value.minor) == (404, 4041)
    assert st.upload(ENTITY, doc["document_token"], b"x")["uploaded"] is True
    assert st.download(ENTITY, doc["document_token"]) == b"x"
    assert [d["document_token"] for d in st.list(ENTITY)] == [doc["document_token"]]
    with pytest.raises(AlloyLikeError) as exc:
        st.list(OTHER)
    assert exc.value.minor == 4013
    body = exc.value.body()
    assert body["status_code"] == 400 and body["error"]["minor_code"] == 4013
    assert is_entity_token(new_entity_token("B")) and not is_entity_token("customer-1")


def test_urls() -> None:
    with SandboxServer(base_path="api/v1/") as sb:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api/v1", sb.url)
        assert sb.admin_url == sb.url.removesuffix("/api/v1") + "/_admin"
        assert sb.port > 0
        describe(hx(sb.url))


@pytest.mark.servers
def test_cli_module_runs_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailingest_testbed.alloy_sandbox",
            "--port",
            "0",
            "--token",
            "t",
            "--secret",
            "s",
            "--agents",
            "john.doe@example.com",
            "--error-500",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        m = re.fullmatch(r"Alloy sandbox on (http://127\.0\.0\.1:\d+/v1)", line)
        assert m, line
        with hx(m.group(1), auth=("t", "s")) as c:
            describe(c)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.servers
def test_many_describes_over_one_keep_alive_connection_are_all_stored(
    sandbox: SandboxServer,
) -> None:
    """(Its speed: ``python -m bench micro``.)"""
    n = 200
    with hx(sandbox.url) as c:
        for _ in range(n):
            assert c.post(docs_path(), json=BODY).status_code == 200
    assert sandbox.state.stats()["documents"] == n


@pytest.mark.servers
@pytest.mark.parametrize("keep_bodies", [True, False])
def test_uploads_lists_size_hash_and_time_and_digests_only_keeps_no_bytes(
    keep_bodies: bool,
) -> None:
    """The benchmark's mode: thousands of documents, only their size and SHA-256 kept."""
    import hashlib

    with SandboxServer(keep_bodies=keep_bodies) as sb, hx(sb.url) as client:
        tok = describe(client)["document_token"]
        before = time.time()
        put = client.put(f"{docs_path()}/{tok}", content=b"abc", headers=OCTET)
        assert put.status_code == 200
        (upload,) = sb.state.uploads()
        assert upload["document_token"] == tok and upload["size"] == 3
        assert upload["sha256"] == hashlib.sha256(b"abc").hexdigest()
        assert before <= upload["uploaded_at"] <= time.time()
        again = client.put(f"{docs_path()}/{tok}", content=b"abc", headers=OCTET)
        assert_error(again, 409, 4091)
        got = client.get(f"{docs_path()}/{tok}")
        if keep_bodies:
            assert got.content == b"abc"
        else:
            assert "SHA-256" in assert_error(got, 404, 4041)["details"]["message"]
