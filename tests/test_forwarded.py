"""Forwarded mail by policy (issue 13, part 2): the documents inside a forwarded mail
(nested twice, with and without attachments), the whole .eml, or both."""

from __future__ import annotations

import hashlib
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import authentication_results, jpeg_bytes, pdf_bytes
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import ledger as L
from mailingest.application.poll_once import poll_once
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings
from mailingest.core.mail import MAX_FORWARD_DEPTH, document_payload, parse_mail
from mailingest.core.screening import Limits, screen

from .helpers import deliver, poll_once_on

SENDER, ENTITY = "carol@example.com", "P-carolCarolCarolCaro"
CONTRACT = pdf_bytes("contract", 2200)
PASSPORT = jpeg_bytes(6000)
TNEF = (Path(__file__).parent / "data" / "tnef" / "two-files.tnef").read_bytes()


def message(sender: str, subject: str, *attachments: tuple[bytes, str, str]) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "documents@support.example", subject
    msg["Message-ID"] = f"<{abs(hash(subject))}@mail.example>"
    msg.set_content(f"{subject}: see attached.")
    for data, ctype, filename in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def forward(inner: EmailMessage, subject: str, sender: str = SENDER) -> EmailMessage:
    outer = message(sender, subject)
    outer.add_attachment(inner, filename=f"{inner['Subject']}.eml")
    return outer


def customer_mail(msg: EmailMessage) -> bytes:
    msg["Authentication-Results"] = authentication_results(SENDER)
    return msg.as_bytes()


def signed_agreement() -> EmailMessage:
    return message(
        "legal@partner.example", "Signed agreement", (CONTRACT, "application/pdf", "signed.pdf")
    )


def names(raw: bytes, forwarded: str) -> list[str]:
    screened = screen(raw, Limits(), None, forwarded=forwarded)
    assert screened.refusal is None, screened.refusal
    return [f"{d.spec.name}.{d.spec.extension}" for d in screened.documents]


def test_the_attachment_inside_is_the_document_by_default() -> None:
    raw = customer_mail(forward(signed_agreement(), "Fwd: Signed agreement"))
    screened = screen(raw, Limits(), None)
    (document,) = screened.documents
    assert (document.spec.name, document.spec.extension) == ("signed", "pdf")
    assert document.payload == CONTRACT
    assert document.spec.type == "contract"  # from the subject: "agreement"


def test_eml_and_both_keep_the_forwarded_mail_whole() -> None:
    raw = customer_mail(forward(signed_agreement(), "Fwd: Signed agreement"))
    assert names(raw, "eml") == ["Signed agreement.eml"]
    assert names(raw, "both") == ["Signed agreement.eml", "signed.pdf"]


def test_a_forward_of_a_forward_is_opened_to_the_documents() -> None:
    passport = message("dana@example.com", "My passport", (PASSPORT, "image/jpeg", "pass.jpg"))
    once = forward(passport, "Fwd: My passport", sender="agent@support.example")
    once.add_attachment(CONTRACT, maintype="application", subtype="pdf", filename="c.pdf")
    twice = customer_mail(forward(once, "Fwd: Fwd: My passport"))
    assert names(twice, "documents") == ["pass.jpg", "c.pdf"]  # in the mail's order
    assert names(twice, "both") == [
        "Fwd: My passport.eml",
        "My passport.eml",
        "pass.jpg",
        "c.pdf",
    ]
    parsed = parse_mail(twice, forwarded="documents")
    assert {a.container for a in parsed.attachments} == {"forwarded message"}
    assert [a.unpacked_from for a in parsed.attachments] == [1, 1]


def test_a_forward_without_attachments_is_skipped_and_said() -> None:
    bare = message(
        "dana@example.com",
        "Question",
    )
    raw = customer_mail(forward(bare, "Fwd: Question"))
    screened = screen(raw, Limits(), None)
    assert screened.refusal is not None
    assert screened.refusal.startswith("no documents attached")
    assert "forwarded message without attachments" in screened.refusal
    assert names(raw, "eml") == ["Question.eml"]


def test_winmail_dat_inside_a_forwarded_mail_is_unpacked_too() -> None:
    outlook = message(
        "olaf@example.com", "From Outlook", (TNEF, "application/ms-tnef", "winmail.dat")
    )
    raw = customer_mail(forward(outlook, "Fwd: From Outlook"))
    assert names(raw, "documents") == ["AUTHORS.txt", "README.txt"]


def test_nesting_deeper_than_the_limit_stays_one_eml() -> None:
    inner = signed_agreement()
    for level in range(MAX_FORWARD_DEPTH + 1):
        inner = forward(inner, f"Fwd{level}")
    screened = screen(customer_mail(inner), Limits(max_depth=50), None, forwarded="documents")
    deepest = [f"{d.spec.name}.{d.spec.extension}" for d in screened.documents]
    # five forwarded mails opened (Fwd4 .. Fwd0); the sixth, inside Fwd0, kept whole
    assert deepest == ["Signed agreement.eml"]


def test_a_document_inside_a_forwarded_mail_is_found_again_by_its_hash() -> None:
    raw = customer_mail(forward(signed_agreement(), "Fwd: Signed agreement"))
    assert document_payload(raw, hashlib.sha256(CONTRACT).hexdigest()) == CONTRACT


@pytest.mark.servers
@pytest.mark.parametrize(
    ("policy", "expected"),
    [("documents", ["signed.pdf"]), ("eml", ["Signed agreement.eml"])],
)
def test_a_forwarded_mail_reaches_alloy_by_the_inbox_policy(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    senders_file: Path,
    policy: str,
    expected: list[str],
) -> None:
    senders_file.write_text(f"email,entity_token\n{SENDER},{ENTITY}\n", encoding="utf-8")
    deliver(imap, [customer_mail(forward(signed_agreement(), "Fwd: Signed agreement"))])
    (mail,) = poll_once_on(env, forwarded=policy).mails
    assert mail.state == L.DONE and mail.filed_to == "Processed", mail
    docs = sandbox.state.list(ENTITY)
    assert [f"{d['name']}.{d['extension']}" for d in docs] == expected
    assert [d["type"] for d in docs] == ["contract"]
    if policy == "documents":
        assert sandbox.state.download(ENTITY, docs[0]["document_token"]) == CONTRACT


@pytest.mark.servers
def test_forwards_nested_twice_with_and_without_attachments_on_the_real_servers(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """A forward of a forward with a passport inside and a contract beside it: both
    reach Alloy under their own names, each once, also under "both" (with the two
    .eml beside them); a forward of a forward with no attachment anywhere is
    quarantined saying the forwarded mail had none."""
    senders_file.write_text(f"email,entity_token\n{SENDER},{ENTITY}\n", encoding="utf-8")
    passport = message("dana@example.com", "My passport", (PASSPORT, "image/jpeg", "pass.jpg"))
    once = forward(passport, "Fwd: My passport", sender="agent@support.example")
    once.add_attachment(CONTRACT, maintype="application", subtype="pdf", filename="c.pdf")
    bare = forward(message("dana@example.com", "Question"), "Fwd: Question")
    deliver(
        imap,
        [
            customer_mail(forward(once, "Fwd: Fwd: My passport")),
            customer_mail(forward(bare, "Fwd: Fwd: Question")),
        ],
    )
    summary = poll_once_on(env)
    with_docs, without = summary.mails
    assert with_docs.state == L.DONE, with_docs
    assert without.state == L.QUARANTINED
    assert without.reason.startswith("no documents attached")
    assert "forwarded message without attachments" in without.reason
    docs = {f"{d['name']}.{d['extension']}": d for d in sandbox.state.list(ENTITY)}
    assert sorted(docs) == ["c.pdf", "pass.jpg"]
    assert sandbox.state.download(ENTITY, docs["pass.jpg"]["document_token"]) == PASSPORT

    # the same mail again under "both": the two .eml beside the documents already filed
    deliver(imap, [customer_mail(forward(once, "Fwd: Fwd: My passport"))])
    (again,) = poll_once_on(env, forwarded="both").mails
    assert again.state == L.DONE, again
    assert sorted(f"{d['name']}.{d['extension']}" for d in sandbox.state.list(ENTITY)) == [
        "Fwd: My passport.eml",
        "My passport.eml",
        "c.pdf",
        "pass.jpg",
    ]


# -- an agent forwards a customer's mail (FORWARDERS) -----------------------------------

AGENT = "agent@support.example"
DANA, DANA_ENTITY = "dana@example.com", "P-danaDanaDanaDanaDan"


def agent_forward(*customers: str) -> bytes:
    outer = message(AGENT, "Fwd: documents from a customer")
    for customer in customers:
        inner = message(customer, f"My passport ({customer})", (PASSPORT, "image/jpeg", "p.jpg"))
        outer.add_attachment(inner, filename="forwarded.eml")
    outer["Authentication-Results"] = authentication_results(AGENT)
    return outer.as_bytes()


@pytest.mark.servers
def test_an_agents_forward_is_filed_on_the_customer_it_forwards(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """The agent is a configured forwarder: the passport goes to Dana's entity (the
    forwarded mail's own sender), the ledger says so; a forward of two customers' mails
    is quarantined; without the setting the agent's own address decides (unknown)."""
    senders_file.write_text(
        f"email,entity_token\n{DANA},{DANA_ENTITY}\n{SENDER},{ENTITY}\n", encoding="utf-8"
    )
    deliver(imap, [agent_forward(DANA), agent_forward(DANA, SENDER)])
    ctx = build_context(load_settings(env | {"MAILINGEST_FORWARDERS": AGENT}))
    try:
        summary = poll_once(ctx)
        one, two = (ctx.ledger.mail(m.mail_id) for m in summary.mails)
    finally:
        ctx.close()
    assert one is not None and one.state == L.DONE and one.entity == DANA_ENTITY
    assert one.entity_source == f"csv, forwarded by {AGENT}"
    assert [d["name"] for d in sandbox.state.list(DANA_ENTITY)] == ["p"]
    assert two is not None and two.state == L.QUARANTINED
    assert "the forwarded mails have several senders" in two.reason
    assert sandbox.state.list(ENTITY) == []

    deliver(imap, [agent_forward(DANA)])
    ctx = build_context(load_settings(env))  # no forwarders configured
    try:
        (third,) = poll_once(ctx).mails
    finally:
        ctx.close()
    assert third.state == L.QUARANTINED and third.reason.startswith(f"unknown sender {AGENT}")


def test_a_base64_forward_with_thousands_of_parts_is_kept_whole_not_opened() -> None:
    """Encoded, a forward's parts are invisible to the mail's own MAX_PARTS check:
    opening one of 200,000 parts took 30 s and 700 MB. The whole mail shares one budget
    of parts; a forward past it stays one .eml."""
    inner = message("x@example.com", "many")
    for i in range(5_000):
        inner.add_attachment(b"x", maintype="text", subtype="plain", filename=f"{i}.txt")
    outer = message(SENDER, "Fwd: many")
    part = EmailMessage()
    part["Content-Type"] = "message/rfc822"
    part["Content-Disposition"] = 'attachment; filename="many.eml"'
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(__import__("base64").encodebytes(inner.as_bytes()).decode())
    outer.make_mixed()
    outer.attach(part)
    started = time.perf_counter()
    assert names(customer_mail(outer), "documents") == ["many.eml"]
    assert time.perf_counter() - started < 10


def test_an_agents_forward_is_filed_on_nobody_when_a_forward_has_no_sender() -> None:
    from mailingest.core import decisions

    agent = {"agent@s.example"}
    customer, reason = decisions.customer_of("agent@s.example", ("a@x.example", None), agent)
    assert customer is None and "no single sender" in reason
    customer, reason = decisions.customer_of(
        "agent@s.example", ("a@x.example",), agent, own_documents=True
    )
    assert customer is None and "documents of its own" in reason
