"""mailingest.core.mail: raw RFC 822 bytes -> ParsedMail.

Every fixture is built here, in code (EmailMessage or hand-written MIME).
"""

from __future__ import annotations

import base64
import email
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailingest.core.documents import DOCUMENT_TYPES, describe_attachments
from mailingest.core.mail import Attachment, MailParseError, ParsedMail, parse_mail

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 20 + b"\n%%EOF\n"
PNG_BIG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 24  # > 4096 bytes
PNG_LOGO = b"\x89PNG\r\n\x1a\n" + b"\x00" * 492  # 500 bytes


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii")


def base_message(subject: str = "Documents") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Jane Doe <jane@example.com>"
    msg["To"] = "kyc@bank.example"
    msg["Subject"] = subject
    msg["Message-ID"] = "<m1@example.com>"
    msg["Date"] = "Tue, 05 Mar 2024 10:15:00 +0100"
    return msg


def by_type(mail: ParsedMail, content_type: str) -> list[Attachment]:
    return [a for a in mail.attachments if a.content_type == content_type]


def hand_written(body: str, *, crlf: bool = False) -> bytes:
    raw = body.lstrip("\n").encode("utf-8")
    return raw.replace(b"\n", b"\r\n") if crlf else raw


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


def plain_attachment_mail() -> bytes:
    msg = base_message()
    msg.set_content("Hi, my licence is attached.\n")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="driver_license.pdf")
    return msg.as_bytes()


def apple_inline_pdf_mail() -> bytes:
    # Apple Mail: body split around an inline PDF, which carries a filename.
    return hand_written(f"""
From: Jane Doe <jane@example.com>
Subject: scan
Message-ID: <apple@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="Apple-Mail=_1"

--Apple-Mail=_1
Content-Transfer-Encoding: 7bit
Content-Type: text/plain; charset=us-ascii

Here it is:

--Apple-Mail=_1
Content-Disposition: inline; filename=passport.pdf
Content-Type: application/pdf; x-unix-mode=0644; name="passport.pdf"
Content-Transfer-Encoding: base64

{b64(PDF)}
--Apple-Mail=_1
Content-Transfer-Encoding: 7bit
Content-Type: text/plain; charset=us-ascii


Sent from my iPhone
--Apple-Mail=_1--
""")


def related_images_mail() -> bytes:
    # An HTML body with two cid-referenced images, neither with a name:
    # a photographed document (kept) and a 500-byte signature logo (skipped).
    return hand_written(f"""
From: jane@example.com
Subject: photo
Content-Type: multipart/related; boundary="rel"

--rel
Content-Type: text/html; charset=utf-8

<p>see <img src="cid:photo@x"> regards <img src="cid:logo@x"></p>
--rel
Content-Type: image/png
Content-ID: <photo@x>
Content-Transfer-Encoding: base64

{b64(PNG_BIG)}
--rel
Content-Type: image/png
Content-ID: <logo@x>
Content-Disposition: inline
Content-Transfer-Encoding: base64

{b64(PNG_LOGO)}
--rel--
""")


def octet_stream_mail() -> bytes:
    return hand_written(f"""
From: jane@example.com
Subject: file
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

body
--b
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

{b64(PDF)}
--b--
""")


def forwarded_mail(*, crlf: bool = False) -> bytes:
    inner = base_message("Fwd: my utility bill")
    inner.replace_header("Message-ID", "<inner@example.com>")
    inner.set_content("See attached bill.\n")
    inner.add_attachment(PDF, maintype="application", subtype="pdf", filename="bill.pdf")
    outer = base_message("forwarding")
    outer.set_content("Forwarded below.\n")
    outer.add_attachment(inner)  # message/rfc822, no filename
    raw = outer.as_bytes()
    return raw.replace(b"\n", b"\r\n") if crlf else raw


def umlaut_mail() -> bytes:
    return hand_written(f"""
From: jane@example.com
Subject: =?utf-8?q?F=C3=BChrerschein?=
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain; charset=utf-8

Hallo
--b
Content-Type: application/pdf
Content-Disposition: attachment; filename*=UTF-8''F%C3%BChrerschein.pdf
Content-Transfer-Encoding: base64

{b64(PDF)}
--b
Content-Type: application/pdf; name="=?UTF-8?B?RsO8aHJlcnNjaGVpbl9ydWVja3NlaXRlLnBkZg==?="
Content-Disposition: attachment;
 filename="=?UTF-8?B?RsO8aHJlcnNjaGVpbl9ydWVja3NlaXRlLnBkZg==?="
Content-Transfer-Encoding: base64

{b64(PDF)}
--b
Content-Type: image/jpeg; name="=?ISO-8859-1?Q?Stromrechnung_M=E4rz?=.jpg"
Content-Transfer-Encoding: base64

{b64(PNG_BIG)}
--b
Content-Type: application/pdf
Content-Disposition: attachment; filename*0*=utf-8''Gr%C3%BC%C3%9Fe_; filename*1*=aus_K%C3%B6ln.pdf
Content-Transfer-Encoding: base64

{b64(PDF)}
--b
Content-Type: application/pdf
Content-Disposition: attachment; filename="Pässe.pdf"
Content-Transfer-Encoding: base64

{b64(PDF)}
--b--
""")


def alternative_body_mail() -> bytes:
    msg = base_message("docs")
    msg.set_content("plain body\n")
    msg.add_alternative("<p>html body</p>\n", subtype="html")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="contract.pdf")
    msg.add_attachment(PNG_BIG, maintype="image", subtype="png", filename="passport.png")
    msg.add_attachment("notes\n", subtype="plain", filename="notes.txt")
    return msg.as_bytes()


def winmail_mail() -> bytes:
    tnef = b"\x78\x9f\x3e\x22" + b"\x00" * 300
    return hand_written(f"""
From: "Outlook User" <USER@Corp.Example>
Subject: docs
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

see attachment
--b
Content-Type: application/ms-tnef; name="winmail.dat"
Content-Disposition: attachment; filename="winmail.dat"
Content-Transfer-Encoding: base64

{b64(tnef)}
--b
Content-Type: application/vnd.ms-tnef
Content-Transfer-Encoding: base64

{b64(tnef)}
--b--
""")


def broken_base64_mail() -> bytes:
    return hand_written("""
From: jane@example.com
Subject: broken
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

body
--b
Content-Type: application/pdf
Content-Disposition: attachment; filename="broken.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQK!!!not*base64 at all~~~
JVBER
--b--
""")


SAMPLES = [
    plain_attachment_mail(),
    apple_inline_pdf_mail(),
    related_images_mail(),
    octet_stream_mail(),
    forwarded_mail(),
    umlaut_mail(),
    alternative_body_mail(),
    winmail_mail(),
    broken_base64_mail(),
]


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_plain_attachment_and_headers() -> None:
    mail = parse_mail(plain_attachment_mail())
    assert mail.message_id == "m1@example.com"
    assert mail.sender == "jane@example.com"
    assert mail.subject == "Documents"
    assert mail.date == datetime(2024, 3, 5, 9, 15, tzinfo=UTC)
    assert len(mail.attachments) == 1
    (att,) = mail.attachments
    assert att.filename == "driver_license.pdf"
    assert att.content_type == "application/pdf"
    assert att.payload == PDF
    assert att.inline is False
    assert att.index == 1  # leaf 0 is the body
    assert mail.skipped == ()


def test_apple_mail_inline_pdf_is_kept_and_body_fragments_are_not_documents() -> None:
    mail = parse_mail(apple_inline_pdf_mail())
    assert [a.filename for a in mail.attachments] == ["passport.pdf"]
    (pdf,) = mail.attachments
    assert pdf.inline is True
    assert pdf.payload == PDF
    # The trailing "Sent from my iPhone" chunk is body text: reported, not a document.
    assert [(s.index, s.content_type) for s in mail.skipped] == [(2, "text/plain")]
    assert "body" in mail.skipped[0].reason


def test_inline_images_without_name_kept_above_floor_and_logo_skipped() -> None:
    mail = parse_mail(related_images_mail())
    assert len(mail.attachments) == 1
    photo = mail.attachments[0]
    assert photo.filename is None
    assert photo.content_id == "photo@x"
    assert photo.inline is True
    assert photo.payload == PNG_BIG
    (logo,) = mail.skipped
    assert logo.content_type == "image/png"
    assert logo.size == 500
    assert logo.reason == "inline image below 4096-byte floor"
    assert logo.index == 2


def test_floor_is_configurable_and_indices_do_not_move() -> None:
    default = parse_mail(related_images_mail())
    no_floor = parse_mail(related_images_mail(), inline_image_floor=0)
    assert [a.index for a in no_floor.attachments] == [1, 2]
    assert default.attachments[0].index == no_floor.attachments[0].index
    assert no_floor.skipped == ()


def test_attached_small_image_is_never_skipped_by_size() -> None:
    msg = base_message()
    msg.set_content("tiny scan attached")
    msg.add_attachment(PNG_LOGO, maintype="image", subtype="png", filename="dl.png")
    mail = parse_mail(msg.as_bytes())
    assert [a.filename for a in mail.attachments] == ["dl.png"]
    assert mail.skipped == ()


def test_octet_stream_without_name_or_disposition_is_kept() -> None:
    mail = parse_mail(octet_stream_mail())
    (att,) = mail.attachments
    assert att.filename is None
    assert att.content_type == "application/octet-stream"
    assert att.payload == PDF
    assert att.inline is False
    (spec,) = describe_attachments(mail)
    assert spec.extension == "bin"
    assert spec.name == "attachment-2"


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_forwarded_message_is_one_eml_with_the_original_bytes(crlf: bool) -> None:
    raw = forwarded_mail(crlf=crlf)
    mail = parse_mail(raw)
    assert [a.content_type for a in mail.attachments] == ["message/rfc822"]
    (eml,) = mail.attachments
    assert eml.filename == "Fwd: my utility bill.eml"
    # Original bytes, sliced out of the raw mail (line endings untouched)...
    assert eml.payload in raw
    assert eml.payload.startswith(b"From: Jane Doe")
    assert not any("re-serialised" in d for d in mail.defects)
    # ...which parse back to the inner message, PDF and all.
    inner = email.message_from_bytes(eml.payload)
    assert inner["Subject"] == "Fwd: my utility bill"
    assert inner["Message-ID"] == "<inner@example.com>"
    pdfs = [p for p in inner.walk() if p.get_content_type() == "application/pdf"]
    assert [p.get_payload(decode=True) for p in pdfs] == [PDF]
    # The inner PDF is not taken a second time.
    assert by_type(mail, "application/pdf") == []
    (spec,) = describe_attachments(mail)
    assert (spec.name, spec.extension) == ("Fwd: my utility bill", "eml")
    assert spec.type == "utility"


def test_forwarded_message_with_filename_and_simple_inner_body() -> None:
    raw = hand_written("""
From: jane@example.com
Subject: fwd
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

see below
--b
Content-Type: message/rfc822; name="Original.eml"
Content-Disposition: attachment; filename="Original.eml"

From: someone@else.example
Subject: inner

just text, no MIME
--b--
""")
    mail = parse_mail(raw)
    (eml,) = mail.attachments
    assert eml.filename == "Original.eml"
    assert eml.payload == (b"From: someone@else.example\nSubject: inner\n\njust text, no MIME")
    assert not any("re-serialised" in d for d in mail.defects)


def test_forwarded_message_falls_back_to_as_bytes_when_not_located(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mailingest.core.mail as mail_module

    monkeypatch.setattr(mail_module, "_locate", lambda raw, message: {})
    mail = parse_mail(forwarded_mail())
    (eml,) = mail.attachments
    assert email.message_from_bytes(eml.payload)["Subject"] == "Fwd: my utility bill"
    assert any("re-serialised (round-trips)" in d for d in mail.defects)


def test_base64_encoded_forwarded_message_is_decoded() -> None:
    inner = b"From: a@b.example\nSubject: Passport scan\n\nhello\n"
    raw = hand_written(f"""
From: jane@example.com
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

fwd
--b
Content-Type: message/rfc822
Content-Transfer-Encoding: base64

{b64(inner)}
--b--
""")
    mail = parse_mail(raw)
    (eml,) = mail.attachments
    assert eml.payload == inner
    assert eml.filename == "Passport scan.eml"
    assert any("base64" in d for d in mail.defects)


def test_umlaut_filenames_rfc2231_rfc2047_and_raw_utf8() -> None:
    mail = parse_mail(umlaut_mail())
    assert mail.subject == "Führerschein"
    assert [a.filename for a in mail.attachments] == [
        "Führerschein.pdf",  # RFC 2231
        "Führerschein_rueckseite.pdf",  # RFC 2047 (Outlook style)
        "Stromrechnung März.jpg",  # RFC 2047 glued to ".jpg", ISO-8859-1, name= only
        "Grüße_aus_Köln.pdf",  # RFC 2231 continuations
        "Pässe.pdf",  # raw 8-bit UTF-8 (non-compliant, common)
    ]
    specs = describe_attachments(mail)
    assert [s.type for s in specs] == ["license", "license", "utility", "license", "license"]


def test_text_plain_attachment_kept_while_body_is_not() -> None:
    mail = parse_mail(alternative_body_mail())
    assert [(a.filename, a.content_type) for a in mail.attachments] == [
        ("contract.pdf", "application/pdf"),
        ("passport.png", "image/png"),
        ("notes.txt", "text/plain"),
    ]
    assert mail.attachments[2].payload == b"notes\n"
    assert mail.skipped == ()


def test_nameless_text_with_attachment_disposition_is_a_document() -> None:
    raw = hand_written("""
From: jane@example.com
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

body
--b
Content-Type: text/plain
Content-Disposition: attachment

an attached text
--b--
""")
    mail = parse_mail(raw)
    assert [(a.filename, a.payload) for a in mail.attachments] == [(None, b"an attached text")]
    assert mail.subject == ""
    assert mail.message_id is None
    assert mail.date is None


def test_single_part_pdf_mail_is_a_document() -> None:
    raw = hand_written(f"""
From: scanner@office.example
Subject: Scan
Content-Type: application/pdf
Content-Transfer-Encoding: base64

{b64(PDF)}""")
    mail = parse_mail(raw)
    assert [(a.index, a.payload) for a in mail.attachments] == [(0, PDF)]


def test_winmail_dat_is_unpacked_and_one_holding_no_file_is_skipped() -> None:
    """The TNEF signature and empty objects: nothing attached inside (the real Outlook
    files of tests/test_tnef.py hold files, which replace the container)."""
    mail = parse_mail(winmail_mail())
    assert mail.attachments == ()
    assert [(s.content_type, s.reason) for s in mail.skipped] == [
        ("application/ms-tnef", "winmail.dat (TNEF) holds no attached file, only its message"),
        ("application/vnd.ms-tnef", "winmail.dat (TNEF) holds no attached file, only its message"),
    ]
    assert mail.sender == "user@corp.example"


def test_broken_base64_does_not_raise_and_is_reported() -> None:
    mail = parse_mail(broken_base64_mail())
    (att,) = mail.attachments
    assert att.filename == "broken.pdf"
    assert isinstance(att.payload, bytes) and att.payload
    assert any("Base64" in d for d in mail.defects)


def test_signature_part_of_multipart_signed_is_skipped() -> None:
    raw = hand_written("""
From: jane@example.com
Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="s"

--s
Content-Type: multipart/mixed; boundary="m"

--m
Content-Type: text/plain

body
--m
Content-Type: application/pdf; name="contract.pdf"
Content-Disposition: attachment; filename="contract.pdf"

%PDF-1.4
--m--
--s
Content-Type: application/pkcs7-signature; name="smime.p7s"
Content-Disposition: attachment; filename="smime.p7s"
Content-Transfer-Encoding: base64

MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwEAAA==
--s--
""")
    mail = parse_mail(raw)
    assert [a.filename for a in mail.attachments] == ["contract.pdf"]
    assert [s.reason for s in mail.skipped] == ["signature part of multipart/signed"]


@pytest.mark.parametrize(
    ("from_header", "expected"),
    [
        ('"DOE, Jane" <Jane.DOE@Example.COM>', "jane.doe@example.com"),
        ("  JANE@EXAMPLE.COM  ", "jane@example.com"),
        ("=?utf-8?q?J=C3=BCrgen?= <Juergen@Example.de>", "juergen@example.de"),
        ('"boss@bank.example" <attacker@evil.example>', "attacker@evil.example"),
        ("undisclosed", None),
        ("a@example.com, b@example.com", None),  # ambiguous: never guess
    ],
)
def test_sender_is_the_address_only(from_header: str, expected: str | None) -> None:
    raw = f"From: {from_header}\nSubject: x\n\nbody\n".encode()
    assert parse_mail(raw).sender == expected


def test_missing_from_gives_no_sender() -> None:
    assert parse_mail(b"Subject: x\n\nbody\n").sender is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("<abc.123@mail.example>", "abc.123@mail.example"),
        (" <abc@x> (comment)", "abc@x"),
        ("abc@no-brackets", "abc@no-brackets"),
    ],
)
def test_message_id_without_brackets(header: str, expected: str) -> None:
    raw = f"From: a@b.example\nMessage-ID: {header}\n\nbody\n".encode()
    assert parse_mail(raw).message_id == expected


@pytest.mark.parametrize("raw", [b"", b"   \r\n\r\n  ", b"\n\njust a body, no header\n"])
def test_not_a_mail(raw: bytes) -> None:
    with pytest.raises(MailParseError):
        parse_mail(raw)


def test_deep_nesting_is_a_parse_error_not_a_crash() -> None:
    depth = 3000
    head = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(depth)
    )
    raw = ("From: a@b.example\n" + head + "Content-Type: text/plain\n\nx\n").encode()
    try:
        mail = parse_mail(raw)
    except MailParseError:
        return
    assert isinstance(mail, ParsedMail)


# --------------------------------------------------------------------------
# Property: nothing but ParsedMail or MailParseError, and usable specs
# --------------------------------------------------------------------------


@st.composite
def mutated_mime(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "dup"]))
        chunk = draw(
            st.one_of(
                st.binary(max_size=12),
                st.sampled_from(
                    [
                        b"\n",
                        b"\r\n",
                        b"--",
                        b"--b\n",
                        b"--b--\n",
                        b"\n\n",
                        b"=?utf-8?q?",
                        b";",
                        b'"',
                        b"Content-Type: message/rfc822\n",
                        b"Content-Type: multipart/mixed\n",
                        b"filename*=",
                        b"\xc3",
                        b"\x00",
                        b"\\",
                        b"<",
                        b">",
                    ]
                ),
            )
        )
        if op == "insert":
            data[pos:pos] = chunk
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "replace":
            data[pos : pos + len(chunk)] = chunk
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 200))]
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=2048), mutated_mime()))
def test_property_parse_never_raises_anything_else(raw: bytes) -> None:
    try:
        mail = parse_mail(raw)
    except MailParseError:
        return
    assert isinstance(mail, ParsedMail)
    indices = [a.index for a in mail.attachments] + [s.index for s in mail.skipped]
    assert len(indices) == len(set(indices))
    specs = describe_attachments(mail)
    assert len(specs) == len(mail.attachments)
    assert all(s.type in DOCUMENT_TYPES and s.type != "internal" for s in specs)
    assert all(s.name and s.name.strip() == s.name for s in specs)
    assert len({(s.name.casefold(), s.extension) for s in specs}) == len(specs)
