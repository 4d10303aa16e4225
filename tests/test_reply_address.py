"""Routing by a signed reply address (issue 13, part 5): ``docs+<external id>.<mac>@``
files a mail on that external entity id, whatever its From; a forged or damaged MAC
is ignored and recorded, and the sender directory decides."""

from __future__ import annotations

import base64
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import authentication_results, pdf_bytes
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import ledger as L
from mailingest.application.poll_once import poll_once
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings
from mailingest.core.reply_address import address, mac, route

from .helpers import deliver, poll_once_on, run_cli

KEY = bytes(range(32))
KEY_TEXT = base64.urlsafe_b64encode(KEY).decode()
BASE = "docs@support.example"


def test_an_address_routes_back_to_its_external_id() -> None:
    signed = address(BASE, KEY, "cust-4711")
    assert signed == f"docs+cust-4711.{mac(KEY, 'cust-4711')}@support.example"
    assert route(["Other <x@example.com>", signed], BASE, KEY).external_id == "cust-4711"
    # the inbox's domain and local part compare without case; the id keeps its case
    upper = signed.replace("docs+", "DOCS+").replace("support.example", "Support.Example")
    assert route([upper], BASE, KEY).external_id == "cust-4711"


@pytest.mark.parametrize(
    "recipient",
    [
        f"docs+cust-4712.{mac(KEY, 'cust-4711')}@support.example",  # another id, same MAC
        "docs+cust-4711.aaaaaaaaaa@support.example",  # a guessed MAC
        "docs+cust-4711@support.example",  # no MAC
        "docs+cust 4711.x@support.example",  # not an id
    ],
)
def test_a_forged_or_damaged_address_is_ignored_and_said(recipient: str) -> None:
    found = route([recipient], BASE, KEY)
    assert found.external_id is None and recipient in found.ignored


def test_addresses_of_other_inboxes_or_no_plus_are_not_looked_at() -> None:
    assert route(["docs@support.example", "info+x.y@other.example"], BASE, KEY).ignored == ""


def test_two_entities_in_one_mail_route_to_none() -> None:
    both = [address(BASE, KEY, "a1"), address(BASE, KEY, "b2")]
    found = route(both, BASE, KEY)
    assert found.external_id is None and "several entities (a1, b2)" in found.ignored


def test_an_external_id_must_fit_an_address_and_a_path() -> None:
    for bad in ("", "a/b", "a.b", "x" * 65, "ä"):
        with pytest.raises(ValueError, match="external id"):
            address(BASE, KEY, bad)


# -- on the real servers ----------------------------------------------------------------


def mail_to(recipient: str, sender: str = "stranger@example.com") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, recipient, "my documents"
    msg["Message-ID"] = f"<{abs(hash(recipient))}@mail.example>"
    msg["Authentication-Results"] = authentication_results(sender)
    msg.set_content("attached")
    msg.add_attachment(
        pdf_bytes("bill", 3000), maintype="application", subtype="pdf", filename="bill.pdf"
    )
    return msg.as_bytes()


@pytest.mark.servers
def test_a_mail_to_a_signed_address_is_filed_on_its_entity_whatever_the_sender(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    env = env | {"MAILINGEST_ADDRESS_KEY": KEY_TEXT, "MAILINGEST_REPLY_ADDRESS": BASE}
    printed = run_cli(env, "address", "cust-4711")
    assert printed.returncode == 0, printed.stderr
    signed = printed.stdout.strip()
    assert signed == address(BASE, KEY, "cust-4711")
    forged = f"docs+cust-4711.{'b' * 10}@support.example"
    senders_file.write_text("email,entity_token\n", encoding="utf-8")
    deliver(imap, [mail_to(signed), mail_to(forged)])
    ctx = build_context(load_settings(env))
    try:
        summary = poll_once(ctx)
        good, bad = (ctx.ledger.mail(m.mail_id) for m in summary.mails)
    finally:
        ctx.close()
    assert good is not None and good.state == L.DONE and good.entity == "cust-4711"
    assert good.entity_source == "signed address"
    assert [d["name"] for d in sandbox.state.list("cust-4711")] == ["bill"]
    # the forged one: ignored, said, and the (empty) directory decides
    assert bad is not None and bad.state == L.QUARANTINED
    assert bad.reason.startswith("unknown sender stranger@example.com")
    assert "signed address ignored" in bad.reason and "MAC does not match" in bad.reason


@pytest.mark.servers
def test_a_signed_address_does_not_waive_sender_authentication(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer
) -> None:
    env = env | {"MAILINGEST_ADDRESS_KEY": KEY_TEXT, "MAILINGEST_REPLY_ADDRESS": BASE}
    raw = mail_to(address(BASE, KEY, "cust-4711")).replace(b"dmarc=pass", b"dmarc=fail")
    deliver(imap, [raw])
    (mail,) = poll_once_on(env).mails
    assert mail.state == L.QUARANTINED and mail.reason.startswith("sender not authenticated")
    assert sandbox.state.list("cust-4711") == []


def test_a_short_key_stops_start_up_with_one_line(env: dict[str, str]) -> None:
    from mailingest.core.errors import ConfigError

    with pytest.raises(ConfigError, match="MAILINGEST_ADDRESS_KEY"):
        load_settings(env | {"MAILINGEST_ADDRESS_KEY": "c2hvcnQ="})
