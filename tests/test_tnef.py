"""Outlook's winmail.dat (TNEF) unpacked into its real files (issue 13, part 3), with
real Outlook TNEF streams (tests/data/tnef/README.md says where they come from)."""

from __future__ import annotations

import hashlib
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import authentication_results, pdf_bytes
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import ledger as L
from mailingest.core.mail import document_payload, parse_mail
from mailingest.core.screening import Limits, screen
from mailingest.core.tnef import TnefError, is_tnef, unpack

from .helpers import deliver, poll_once_on

DATA = Path(__file__).parent / "data" / "tnef"
SENDER, ENTITY = "olaf@example.com", "P-olafOlafOlafOlafOla"


def tnef(name: str) -> bytes:
    return (DATA / name).read_bytes()


def outlook_mail(*tnef_files: str, pdf: bool = False) -> bytes:
    """A mail as a misconfigured Outlook sends it: its attachments in winmail.dat."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, "documents@support.example", "documents"
    msg["Message-ID"] = "<outlook@mail.example>"
    msg["Authentication-Results"] = authentication_results(SENDER)
    msg.set_content("Please find my documents attached.")
    if pdf:
        msg.add_attachment(
            pdf_bytes("licence", 3000), maintype="application", subtype="pdf", filename="l.pdf"
        )
    for name in tnef_files:
        msg.add_attachment(
            tnef(name), maintype="application", subtype="ms-tnef", filename="winmail.dat"
        )
    return msg.as_bytes()


def names(screened: object) -> list[str]:
    return [f"{d.spec.name}.{d.spec.extension}" for d in screened.documents]  # type: ignore[attr-defined]


# -- the decoder ------------------------------------------------------------------------


def test_the_files_inside_come_out_with_their_long_names() -> None:
    assert [(f.filename, len(f.payload)) for f in unpack(tnef("two-files.tnef"))] == [
        ("AUTHORS", 244),
        ("README", 893),
    ]
    assert [f.filename for f in unpack(tnef("umlaut.tnef"))] == [
        "TBZ PARIV GmbH.jpg",
        "image003.jpg",
        "UmlautAnhang-äüö.txt",
    ]
    assert [f.filename for f in unpack(tnef("long-filename.tnef"))] == ["allproductsmar2000.dat"]
    assert [f.filename for f in unpack(tnef("missing-filenames.tnef"))] == [
        "generpts.src",
        "TechlibDEC99.doc",
        "TechlibDEC99-JAN00.doc",
        "TechlibNOV99.doc",
    ]
    assert unpack(tnef("body.tnef")) == []  # a message body only


def test_a_damaged_or_foreign_stream_is_an_error_with_a_reason() -> None:
    with pytest.raises(TnefError, match="cut short"):  # its last object lacks 2 bytes
        unpack(tnef("bad_checksum.tnef"))
    whole = tnef("two-files.tnef")
    # cut inside an object (a cut exactly between two objects leaves a shorter TNEF
    # that is whole as far as its format can tell: it has no overall length)
    for cut in (500, 2000, len(whole) - 10):
        with pytest.raises(TnefError, match=r"cut short|damaged"):
            unpack(whole[:cut])
    with pytest.raises(TnefError, match="cannot unpack"):  # tnefparse itself fails
        unpack(whole[:20])
    assert not is_tnef(b"%PDF-1.4") and is_tnef(tnef("one-file.tnef"))


# -- in a mail ---------------------------------------------------------------------------


def test_winmail_dat_becomes_the_documents_inside_it() -> None:
    screened = screen(outlook_mail("umlaut.tnef", pdf=True), Limits(), None)
    assert screened.refusal is None and screened.refused == ()
    assert names(screened) == [
        "l.pdf",
        "TBZ PARIV GmbH.jpg",
        "image003.jpg",
        "UmlautAnhang-äüö.txt",
    ]
    # each is sniffed like any other part: the JPEGs are JPEGs
    assert [d.kind for d in screened.documents] == ["pdf", "jpeg", "jpeg", "txt"]


def test_a_file_without_extension_is_named_from_its_bytes() -> None:
    screened = screen(outlook_mail("one-file.tnef"), Limits(), None)
    assert names(screened) == ["AUTHORS.txt"]


def test_a_damaged_winmail_dat_is_one_refused_part() -> None:
    screened = screen(outlook_mail("bad_checksum.tnef", pdf=True), Limits(), None)
    assert names(screened) == ["l.pdf"]
    (refusal,) = screened.refused
    assert "(winmail.dat)" in refusal and "is cut short" in refusal
    alone = screen(outlook_mail("bad_checksum.tnef"), Limits(), None)
    assert alone.refusal is not None and "is cut short" in alone.refusal


def test_a_winmail_dat_with_only_a_body_is_skipped_not_refused() -> None:
    screened = screen(outlook_mail("body.tnef", pdf=True), Limits(), None)
    assert names(screened) == ["l.pdf"] and screened.refused == ()
    alone = screen(outlook_mail("body.tnef"), Limits(), None)
    assert alone.refusal is not None and alone.refusal.startswith("no documents attached")


def test_a_document_inside_winmail_dat_is_found_again_by_its_hash() -> None:
    """Its staged copy expired: the upload cuts it out of the raw mail again."""
    raw = outlook_mail("two-files.tnef")
    readme = unpack(tnef("two-files.tnef"))[1].payload
    assert document_payload(raw, hashlib.sha256(readme).hexdigest()) == readme
    parsed = parse_mail(raw)
    assert [a.unpacked_from for a in parsed.attachments] == [1, 1]
    assert [a.index for a in parsed.attachments] == [2, 3]  # after every leaf's


# -- the whole flow, on the real servers -------------------------------------------------


@pytest.mark.servers
def test_an_outlook_mail_reaches_alloy_as_its_real_files(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    senders_file.write_text(f"email,entity_token\n{SENDER},{ENTITY}\n", encoding="utf-8")
    deliver(imap, [outlook_mail("umlaut.tnef", pdf=True)])
    (mail,) = poll_once_on(env).mails
    assert mail.state == L.DONE and mail.filed_to == "Processed", mail
    held = {
        f"{d['name']}.{d['extension']}": sandbox.state.download(ENTITY, d["document_token"])
        for d in sandbox.state.list(ENTITY)
    }
    inside = {f.filename: f.payload for f in unpack(tnef("umlaut.tnef"))}
    assert held == {"l.pdf": held["l.pdf"], **inside}


# -- hostile streams (written by tests/tnef_hostile.py: no Outlook writes these) ----------


def test_nested_embedded_messages_are_refused_before_they_are_parsed() -> None:
    """tnefparse parses an embedded Outlook message as a TNEF of its own, recursively,
    holding about three copies per level: 300 levels of 5 MB took 4.3 GB and 26 s."""
    from . import tnef_hostile as h

    inner = h.tnef(h.attachment(b"passport.pdf", b"%PDF-1.4\n" + b"\x01" * 200_000))
    for _ in range(300):
        inner = h.tnef(h.embedded(inner))
    started = time.perf_counter()
    with pytest.raises(TnefError, match="nested in each other"):
        unpack(inner)
    assert time.perf_counter() - started < 5  # refused from the bytes alone, not parsed
    one = h.tnef(h.embedded(h.tnef(h.attachment(b"a.pdf", b"%PDF-1.4 x"))))
    assert len(unpack(one)) == 1  # one embedded message is parsed as tnefparse does


def test_a_stream_of_thousands_of_objects_is_refused_before_it_is_parsed() -> None:
    """tnefparse copies the rest of the stream for each object: 320,000 tiny objects in
    4.8 MB took 19 s, a 40 MB mail would take about 20 minutes."""
    import struct

    from . import tnef_hostile as h

    data = h.SIG + struct.pack("<H", 1) + h.version() + h.obj(1, 0x0004, 0x0006, b"") * 320_000
    with pytest.raises(TnefError, match="more than 500 objects"):
        unpack(data)


def test_a_name_property_of_another_type_costs_the_name_not_the_mail() -> None:
    """A long-filename property typed as an integer used to raise AttributeError out of
    screen(), which then refused the whole mail, its good PDF too."""
    import struct

    from . import tnef_hostile as h

    mapi = struct.pack("<IHHI", 1, 0x0003, 0x3707, 7)  # PR_ATTACH_LONG_FILENAME, a LONG
    attach = (
        h.obj(2, 0x9002, 0x0006, b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 8)
        + h.obj(2, 0x800F, 0x0006, b"%PDF-1.4 in tnef\n%%EOF\n")
        + h.obj(2, 0x9005, 0x0006, mapi)
    )
    msg = EmailMessage()
    msg["From"], msg["Subject"] = SENDER, "docs"
    msg["Authentication-Results"] = authentication_results(SENDER)
    msg.set_content("attached")
    msg.add_attachment(
        pdf_bytes("passport", 3000), maintype="application", subtype="pdf", filename="p.pdf"
    )
    msg.add_attachment(
        h.tnef(attach), maintype="application", subtype="ms-tnef", filename="winmail.dat"
    )
    screened = screen(msg.as_bytes(), Limits(), None)
    assert screened.refusal is None
    assert "p.pdf" in names(screened)
