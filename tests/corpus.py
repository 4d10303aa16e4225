"""The bad-input corpus: hostile and broken mails made in code, each with its expected outcome.

``CASES`` is the table `docs/security.md` shows. Each case is screened with
:data:`LIMITS` and :data:`AUTH` (the receiving server ``mx.support.example``).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

from mailingest_testbed.samples import AUTHSERV_ID, authentication_results, jpeg_bytes, pdf_bytes

from mailingest.core.screening import Limits
from mailingest.core.sender_auth import AuthPolicy

SENDER = "alice@example.com"
LIMITS = Limits(max_message_bytes=2 * 1024 * 1024, max_attachment_bytes=512 * 1024)
AUTH = AuthPolicy(trusted_authserv_ids=(AUTHSERV_ID,))
PDF = pdf_bytes("corpus", 3000)
JPEG = jpeg_bytes(5000)
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(2000)
ZIP = (
    b"PK\x03\x04\x14\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x00\x00PK\x05\x06" + bytes(18)
)


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    refusal: str | None  # a substring of the quarantine reason; None: accepted
    documents: tuple[tuple[str, str], ...] = ()  # (name, extension) when accepted
    note: str = ""  # a substring of a note (skipped part, corrected extension)


def mail(
    *attachments: tuple[bytes, str, str, str | None],
    sender: str = SENDER,
    auth: str | None = "pass",
    subject: str = "my documents",
) -> EmailMessage:
    """attachments: (bytes, maintype, subtype, filename)."""
    msg = EmailMessage()
    if auth is not None:
        msg["Authentication-Results"] = authentication_results(sender, auth)
    msg["From"] = sender
    msg["Subject"] = subject
    msg["Message-ID"] = "<corpus@mail.example>"
    msg.set_content("Please find my documents attached.")
    for data, maintype, subtype, filename in attachments:
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def nested(depth: int) -> bytes:
    head = authentication_results(SENDER)
    parts = [f"Authentication-Results: {head}\r\nFrom: {SENDER}\r\nSubject: deep\r\n".encode()]
    for level in range(depth):
        parts.append(
            f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b{level}"\r\n'
            f"\r\n--b{level}\r\n".encode()
        )
    parts.append(b"Content-Type: text/plain\r\n\r\ndeep\r\n")
    for level in reversed(range(depth)):
        parts.append(f"--b{level}--\r\n".encode())
    return b"".join(parts)


def many_parts(count: int) -> bytes:
    head = (
        f"Authentication-Results: {authentication_results(SENDER)}\r\nFrom: {SENDER}\r\n"
        'Subject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="x"\r\n'
        "\r\n"
    ).encode()
    body = b"".join(b"--x\r\nContent-Type: text/plain\r\n\r\npart\r\n" for _ in range(count))
    return head + body + b"--x--\r\n"


def _cases() -> list[Case]:
    forged_elsewhere = mail((PDF, "application", "pdf", "passport.pdf"), auth=None)
    forged_elsewhere["Authentication-Results"] = (
        "mx.attacker.example; dmarc=pass header.from=example.com"
    )
    broken = mail((PDF, "application", "pdf", "licence.pdf")).as_bytes()
    start = broken.index(b"JVBER")  # the PDF's base64
    broken_base64 = broken[: start + 40] + b"!!##not base64##!!" + broken[start + 40 :]
    good = mail((PDF, "application", "pdf", "passport.pdf")).as_bytes()
    return [
        Case("a passport PDF from an authenticated customer", good, None, (("passport", "pdf"),)),
        Case(
            "message over the size limit",
            mail((pdf_bytes("big", 3 * 1024 * 1024), "application", "pdf", "big.pdf")).as_bytes(),
            "message too large",
        ),
        Case("5,000 MIME parts", many_parts(5000), "too many MIME parts: 5001"),
        Case("MIME nested 50 deep", nested(50), "MIME nesting too deep: 50"),
        Case(
            "one attachment over the attachment limit",
            mail((pdf_bytes("big", 700 * 1024), "application", "pdf", "bill.pdf")).as_bytes(),
            "attachment too large",
        ),
        Case(
            "25 documents in one mail",
            mail(
                *[
                    (pdf_bytes(f"d{i}", 1500), "application", "pdf", f"page{i}.pdf")
                    for i in range(25)
                ]
            ).as_bytes(),
            "too many documents: 25",
        ),
        Case(
            "an executable named passport.pdf",
            mail((EXE, "application", "pdf", "passport.pdf")).as_bytes(),
            "refused content: part 1 (passport.pdf) is exe",
        ),
        Case(
            "a ZIP archive", mail((ZIP, "application", "zip", "documents.zip")).as_bytes(), "is zip"
        ),
        Case(
            "HTML named licence.pdf",
            mail(
                (
                    b"<!DOCTYPE html><html><script>alert(1)</script></html>",
                    "application",
                    "pdf",
                    "licence.pdf",
                )
            ).as_bytes(),
            "is html",
        ),
        Case(
            "a PDF named passport.jpg (the name lies)",
            mail((PDF, "image", "jpeg", "passport.jpg")).as_bytes(),
            None,
            (("passport", "pdf"),),
            note="content is pdf, sent as .pdf",
        ),
        Case(
            "filename ../../etc/passwd on a PDF",
            mail((PDF, "application", "pdf", "../../etc/passwd")).as_bytes(),
            None,
            (("passwd", "pdf"),),
        ),
        Case(
            "bidi override: \u202egpj.exe on a JPEG",
            mail((JPEG, "image", "jpeg", "\u202egpj.exe")).as_bytes(),
            None,
            (("gpj", "jpg"),),
        ),
        Case(
            "a zero-byte part next to a PDF",
            mail(
                (b"", "application", "pdf", "empty.pdf"),
                (PDF, "application", "pdf", "bill.pdf"),
            ).as_bytes(),
            None,
            (("bill", "pdf"),),
            note="zero bytes",
        ),
        Case(
            "only a zero-byte part",
            mail((b"", "application", "pdf", "empty.pdf")).as_bytes(),
            "no documents attached",
        ),
        Case(
            "From: forged, DMARC fail at our server",
            mail((PDF, "application", "pdf", "passport.pdf"), auth="fail").as_bytes(),
            "sender not authenticated: dmarc=fail",
        ),
        Case(
            "no Authentication-Results at all",
            mail((PDF, "application", "pdf", "passport.pdf"), auth=None).as_bytes(),
            "sender not authenticated",
        ),
        Case(
            "a pass claimed by another server",
            forged_elsewhere.as_bytes(),
            "sender not authenticated",
        ),
        Case("broken base64 in the attachment", broken_base64, "a part could not be decoded"),
        Case(
            "truncated in the middle of the attachment",
            good[: len(good) // 2],
            "the mail is truncated",
        ),
        Case(
            "a 1 MB Subject header",
            mail((PDF, "application", "pdf", "passport.pdf"), subject="x" * 1_000_000).as_bytes(),
            "headers too large",
        ),
        Case("empty bytes", b"", "cannot parse the mail"),
        Case("binary garbage", bytes(range(256)) * 40, "cannot parse the mail"),
    ]


CASES = _cases()
