"""Hollowing long base64 bodies changes nothing a mail parses to, only what it costs.

Every mail here is parsed twice: with hollowing on every run of two or more
base64 lines (far more than the production threshold hollows) and with it
off; the results, defects included, must be equal. Inputs: the hostile
corpus, the sample scenarios, crafted edge cases, and mutated MIME.
"""

from __future__ import annotations

import base64
import random
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailingest_testbed.samples import bulk_scenario, demo_scenario, jpeg_bytes, pdf_bytes

from mailingest.core import base64_bodies as hollow
from mailingest.core.mail import parse_mail
from mailingest.core.screening import screen

from .corpus import AUTH, CASES, LIMITS
from .test_hostile import SEEDS, mutate


def both_ways(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hollow, "MIN_LINES", 2)
    hollowed_parse, hollowed_screen = parse_or_error(raw), screen(raw, LIMITS, AUTH)
    monkeypatch.setattr(hollow, "MIN_LINES", 10**9)
    plain_parse, plain_screen = parse_or_error(raw), screen(raw, LIMITS, AUTH)
    assert hollowed_parse == plain_parse
    assert hollowed_screen == plain_screen


def parse_or_error(raw: bytes) -> object:
    try:
        return parse_mail(raw)
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        return (type(exc).__name__, str(exc))


def big_mail(**changes: object) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["Subject"] = "documents"
    msg["Message-ID"] = "<big@example.com>"
    msg.set_content("Here they are.")
    msg.add_attachment(
        pdf_bytes("passport", 60_000, random.Random(1)),
        maintype="application",
        subtype="pdf",
        filename="passport.pdf",
    )
    return msg


def crafted() -> dict[str, bytes]:
    mail = big_mail()
    raw = mail.as_bytes()
    crlf = raw.replace(b"\n", b"\r\n")
    forwarded = EmailMessage()
    forwarded["From"] = "bob@example.com"
    forwarded["Subject"] = "Fwd: documents"
    forwarded.set_content("see attached")
    forwarded.add_attachment(mail)  # message/rfc822 holding a long base64 body
    # a text body sent as base64 that is not valid UTF-8: mail-parser reports a charset
    # defect, which must survive hollowing
    text = EmailMessage()
    text["From"] = "carol@example.com"
    text.set_content(bytes(range(128, 256)) * 200, maintype="text", subtype="plain", cte="base64")
    encoded = base64.encodebytes(jpeg_bytes(40_000, random.Random(2)))
    bad_padding = raw.replace(b"\n\n--", b"A\n\n--", 1)  # one character too many
    lone_cr = raw.replace(b"\n", b"\r", 40)
    headers_then_lines = b"From: dave@example.com\n" + encoded + b"\nbody\n"
    preamble = (
        b"From: erin@example.com\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="b1"\n\n'
        + encoded
        + b"--b1\nContent-Type: image/jpeg\nContent-Transfer-Encoding: base64\n"
        b'Content-Disposition: attachment; filename="a.jpg"\n\n' + encoded + b"--b1--\n" + encoded
    )
    not_base64_cte = raw.replace(
        b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: 7bit"
    )
    return {
        "lf": raw,
        "crlf": crlf,
        "forwarded": forwarded.as_bytes(),
        "base64 text, not utf-8": text.as_bytes(),
        "bad padding": bad_padding,
        "lone CR": lone_cr,
        "base64 lines in the header block": headers_then_lines,
        "preamble and epilogue": preamble,
        "base64 lines declared 7bit": not_base64_cte,
        "truncated": raw[: len(raw) * 2 // 3],
    }


@pytest.mark.parametrize(("name", "raw"), list(crafted().items()), ids=list(crafted()))
def test_crafted_mails_parse_the_same(
    name: str, raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_ways(raw, monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_corpus_parses_the_same(case, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    both_ways(case.raw, monkeypatch)


def test_sample_mails_parse_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    for mail in demo_scenario(seed=4).mails + bulk_scenario(6, seed=5).mails:
        both_ways(mail.raw, monkeypatch)


@pytest.mark.slow
@settings(
    max_examples=120,
    deadline=10000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(SEEDS) - 1))
def test_mutated_mime_parses_the_same(
    seed: int, which: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    both_ways(mutate(SEEDS[which], random.Random(seed)), monkeypatch)


def test_a_long_body_is_hollowed_and_restored_exactly() -> None:
    raw = big_mail().as_bytes()
    hollowed = hollow.hollow(raw)
    assert len(hollowed.runs) == 1 and len(hollowed.raw) < 2000 < len(raw)
    assert hollowed.restore(hollowed.raw) == raw
    assert hollow.hollow(b"From: a@b.example\n\nhello\n").runs == {}
