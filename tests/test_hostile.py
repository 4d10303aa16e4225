"""Hostile and broken mail: every case of the corpus gets its expected outcome, mutated
MIME never escapes as an exception, and through the real pipeline each bad mail is
quarantined with its reason while the good one next to it goes on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import demo_scenario
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import ledger as L
from mailingest.application.poll_once import poll_once
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings
from mailingest.core.screening import screen

from .corpus import AUTH, CASES, LIMITS, Case
from .helpers import deliver, folder_counts

SEEDS = [c.raw for c in CASES if 0 < len(c.raw) < 200_000] + [
    m.raw for m in demo_scenario(seed=61).mails
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case_has_its_expected_outcome(case: Case) -> None:
    result = screen(case.raw, LIMITS, AUTH)
    if case.refusal is None:
        assert result.refusal is None, result.refusal
        assert [(d.spec.name, d.spec.extension) for d in result.documents] == list(case.documents)
    else:
        assert result.refusal is not None and case.refusal in result.refusal, result.refusal
        assert result.documents == ()
    if case.note:
        assert any(case.note in note for note in result.notes), result.notes
    reason = result.refusal or ""
    assert "\n" not in reason and len(reason) < 400


def mutate(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(["flip", "cut", "insert", "boundary", "charset", "dup"])
        if not data:
            break
        at = rng.randrange(len(data))
        if op == "flip":
            data[at] = rng.randrange(256)
        elif op == "cut":
            del data[at : at + rng.randint(1, 4000)]
        elif op == "insert":
            data[at:at] = rng.choice(
                [
                    b"\r\n--",
                    b"\n\n",
                    b"=?utf-8?b?",
                    b"\x00",
                    b"%PDF-",
                    b"Content-Type: multipart/mixed; boundary=",
                    b"\xff" * 50,
                ]
            )
        elif op == "boundary":
            data = bytearray(bytes(data).replace(b"boundary=", b"boundary=x", 1))
        elif op == "charset":
            data = bytearray(bytes(data).replace(b"charset=", b"charset=x-unknown-", 1))
        else:
            data[at:at] = data[at : at + rng.randint(1, 2000)]
    return bytes(data)


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(SEEDS) - 1))
def test_mutated_mime_gets_documents_or_a_reason(seed: int, which: int) -> None:
    raw = mutate(SEEDS[which], random.Random(seed))
    result = screen(raw, LIMITS, AUTH)  # must not raise
    if result.refusal is None:
        assert result.documents, "accepted with nothing to upload"
        assert all(d.payload for d in result.documents)
        assert all(d.kind in LIMITS.allowed_kinds for d in result.documents)
    else:
        assert not result.documents and "\n" not in result.refusal


@settings(max_examples=100, deadline=5000)
@given(raw=st.binary(max_size=4000))
def test_arbitrary_bytes_get_documents_or_a_reason(raw: bytes) -> None:
    result = screen(raw, LIMITS, AUTH)
    assert (result.refusal is None) == bool(result.documents)


@pytest.mark.servers
def test_bad_mail_is_quarantined_and_the_next_goes_on(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    by_name = {c.name: c for c in CASES}
    bad = [
        by_name[n]
        for n in (
            "an executable named passport.pdf",
            "From: forged, DMARC fail at our server",
            "5,000 MIME parts",
            "truncated in the middle of the attachment",
            "message over the size limit",
        )
    ]
    good = by_name["a passport PDF from an authenticated customer"]
    senders_file.write_text("email,entity_token\nalice@example.com,P-aliceAliceAliceAlic\n")
    deliver(imap, [c.raw for c in bad] + [good.raw])
    ctx = build_context(load_settings(env | {"MAILINGEST_MAX_MESSAGE_BYTES": str(2 * 1024 * 1024)}))
    try:
        summary = poll_once(ctx)
        quarantined = {r.reason.split(":")[0] for r in ctx.ledger.mails([L.QUARANTINED])}
        too_big = [r for r in ctx.ledger.mails([L.QUARANTINED]) if "too large" in r.reason]
    finally:
        ctx.close()
    assert summary.ok and (summary.processed, summary.quarantined) == (1, len(bad))
    assert quarantined == {
        "refused content",
        "sender not authenticated",
        "too many MIME parts",
        "the mail is truncated or its MIME structure broken",
        "message too large",
    }
    (big,) = too_big
    assert big.size > 2 * 1024 * 1024 and not big.message_id  # refused before its body came
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 0,
        "Processed": 1,
        "Quarantine": len(bad),
    }
    assert sandbox.state.stats()["documents"] == 1
