"""Realistic customer mails, made in code, for the demo and the tests.

Nothing is downloaded: the "documents" are small files whose first bytes are
those of a real PDF, JPEG or PNG, with random content so every one is unique.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr

AGENT_EMAIL = "kyc.agent@support.example"


def pdf_bytes(title: str, size: int = 2048, rng: random.Random | None = None) -> bytes:
    rng = rng or random.Random()
    head = (
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Title ("
        + title.encode("ascii", "replace")
        + b") >>\nendobj\n"
    )
    body = bytes(rng.getrandbits(8) for _ in range(max(0, size - len(head) - 6)))
    return head + body + b"\n%%EOF"


def jpeg_bytes(size: int = 4096, rng: random.Random | None = None) -> bytes:
    rng = rng or random.Random()
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    body = bytes(rng.getrandbits(8) for _ in range(max(0, size - len(head) - 2)))
    return head + body + b"\xff\xd9"


def png_bytes(size: int = 600, rng: random.Random | None = None) -> bytes:
    rng = rng or random.Random()
    head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    return head + bytes(rng.getrandbits(8) for _ in range(max(0, size - len(head))))


@dataclass(frozen=True)
class ExpectedDocument:
    entity: str
    name: str
    extension: str
    type: str
    payload: bytes


@dataclass
class SampleMail:
    sender: str
    subject: str
    raw: bytes
    documents: list[ExpectedDocument] = field(default_factory=list)
    quarantine_reason: str | None = None  # a substring of the expected reason


AUTHSERV_ID = "mx.support.example"  # the support mailbox's receiving server


def authentication_results(sender: str, dmarc: str = "pass") -> str:
    """The header our receiving server adds: DMARC for the From domain (RFC 8601)."""
    address = sender.rsplit("<", 1)[-1].rstrip(">").strip().lower()
    domain = address.rsplit("@", 1)[-1]
    dkim = "pass" if dmarc == "pass" else "fail"
    return (
        f"{AUTHSERV_ID}; dkim={dkim} header.d={domain}; spf={dkim} smtp.mailfrom={address}; "
        f"dmarc={dmarc} (p=REJECT) header.from={domain}"
    )


def _base(sender: str, subject: str, text: str, *, dmarc: str = "pass") -> EmailMessage:
    msg = EmailMessage()
    msg["Return-Path"] = f"<{parseaddr(sender)[1]}>"  # what the delivering server writes
    msg["Authentication-Results"] = authentication_results(sender, dmarc)
    msg["From"] = sender
    msg["To"] = "documents@support.example"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain="mail.example")
    msg.set_content(text)
    return msg


def entity_token(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "P-" + "".join(rng.choice(alphabet) for _ in range(20))


@dataclass
class Scenario:
    senders: dict[str, str]  # e-mail -> entity token
    mails: list[SampleMail]

    def senders_csv(self) -> str:
        return "email,entity_token\n" + "".join(f"{e},{t}\n" for e, t in self.senders.items())

    @property
    def expected_documents(self) -> list[ExpectedDocument]:
        return [d for m in self.mails for d in m.documents]


def demo_scenario(seed: int | None = None) -> Scenario:
    """A handful of customer mails: licence, passport, utility bill (inline, Apple Mail
    style, with a signature logo), a forwarded contract, an umlaut filename, and one
    stranger."""
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(4), "big"))
    alice, bob, carol = (
        "alice.martin@example.com",
        "bob.okafor@example.org",
        "carol.nguyen@example.net",
    )
    senders = {alice: entity_token(rng), bob: entity_token(rng), carol: entity_token(rng)}
    mails: list[SampleMail] = []

    # 1. licence and passport, plain attachments, display name and mixed case From
    msg = _base(
        f"Alice Martin <{alice.replace('alice', 'Alice')}>",
        "My documents for verification",
        "Hi, please find my driver's licence and passport attached.\nAlice",
    )
    lic, pas = pdf_bytes("licence", 3000, rng), jpeg_bytes(5000, rng)
    msg.add_attachment(lic, maintype="application", subtype="pdf", filename="driver_license.pdf")
    msg.add_attachment(pas, maintype="image", subtype="jpeg", filename="passport_scan.jpg")
    mails.append(
        SampleMail(
            alice,
            msg["Subject"],
            msg.as_bytes(),
            [
                ExpectedDocument(senders[alice], "driver_license", "pdf", "license", lic),
                ExpectedDocument(senders[alice], "passport_scan", "jpg", "passport", pas),
            ],
        )
    )

    # 2. utility bill sent inline (Apple Mail), plus a tiny signature logo that is skipped
    msg = _base(bob, "Proof of address", "Here is my utility bill.\n-- \nBob")
    bill, logo = pdf_bytes("bill", 2500, rng), png_bytes(600, rng)
    msg.add_attachment(
        bill,
        maintype="application",
        subtype="pdf",
        filename="utility_bill_march.pdf",
        disposition="inline",
    )
    msg.add_attachment(
        logo, maintype="image", subtype="png", disposition="inline", cid="<logo@mail.example>"
    )
    mails.append(
        SampleMail(
            bob,
            msg["Subject"],
            msg.as_bytes(),
            [
                ExpectedDocument(senders[bob], "utility_bill_march", "pdf", "utility", bill),
            ],
        )
    )

    # 3. a forwarded mail: the attachment inside it is the document (MAILINGEST_FORWARDED
    # = documents, the default), not the forwarded mail as an .eml
    contract = pdf_bytes("contract", 2200, rng)
    inner = _base("legal@partner.example", "Signed agreement", "The signed contract is attached.")
    inner.add_attachment(
        contract, maintype="application", subtype="pdf", filename="signed_contract.pdf"
    )
    msg = _base(carol, "Fwd: Signed agreement", "Forwarding the contract as requested.")
    msg.add_attachment(inner, filename="signed_agreement.eml")
    mails.append(
        SampleMail(
            carol,
            msg["Subject"],
            msg.as_bytes(),
            [ExpectedDocument(senders[carol], "signed_contract", "pdf", "contract", contract)],
        )
    )

    # 4. a German filename with umlauts (RFC 2231), type from the filename
    msg = _base(alice, "Rückseite", "Die Rückseite meines Führerscheins.")
    back = jpeg_bytes(4500, rng)
    msg.add_attachment(
        back, maintype="image", subtype="jpeg", filename="Führerschein Rückseite.jpg"
    )
    mails.append(
        SampleMail(
            alice,
            msg["Subject"],
            msg.as_bytes(),
            [
                ExpectedDocument(senders[alice], "Führerschein Rückseite", "jpg", "license", back),
            ],
        )
    )

    # 5. a forgery: a stranger's "passport" with Alice's From:, and DMARC says fail
    msg = _base(alice, "passport", "my passport", dmarc="fail")
    msg.add_attachment(
        jpeg_bytes(4300, rng), maintype="image", subtype="jpeg", filename="passport.jpg"
    )
    mails.append(
        SampleMail(
            alice, msg["Subject"], msg.as_bytes(), [], quarantine_reason="sender not authenticated"
        )
    )

    # 6. a stranger: no entity for this sender, so the mail goes to quarantine
    stranger = "mallory@unknown.example"
    msg = _base(stranger, "passport", "here is my passport")
    msg.add_attachment(
        jpeg_bytes(4200, rng), maintype="image", subtype="jpeg", filename="passport.jpg"
    )
    mails.append(
        SampleMail(stranger, msg["Subject"], msg.as_bytes(), [], quarantine_reason="unknown sender")
    )

    return Scenario(senders, mails)


def bulk_scenario(count: int, seed: int = 7) -> Scenario:
    """``count`` mails from three known senders with one to three assorted documents
    each, plus one mail from a stranger (quarantined)."""
    rng = random.Random(seed)
    senders = {f"customer{i}@example.com": entity_token(rng) for i in range(1, 4)}
    kinds = [
        ("driver_license", "pdf", "license"),
        ("passport", "jpg", "passport"),
        ("utility_bill", "pdf", "utility"),
        ("rental_agreement", "pdf", "contract"),
        ("selfie", "png", "other"),
    ]
    makers = {"pdf": ("application", "pdf"), "jpg": ("image", "jpeg"), "png": ("image", "png")}
    mails: list[SampleMail] = []
    emails = list(senders)
    for n in range(count):
        sender = emails[n % 3]
        msg = _base(sender, f"Documents {n}", f"Mail {n}: my documents.")
        expected = []
        for k in range(1 + n % 3):
            stem, ext, kind = kinds[(n + k) % len(kinds)]
            name = f"{stem}_{n}_{k}"
            size = rng.randint(5000, 40000)
            data = {
                "pdf": pdf_bytes(name, size, rng),
                "jpg": jpeg_bytes(size, rng),
                "png": png_bytes(size, rng),
            }[ext]
            maintype, subtype = makers[ext]
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=f"{name}.{ext}")
            expected.append(ExpectedDocument(senders[sender], name, ext, kind, data))
        mails.append(SampleMail(sender, msg["Subject"], msg.as_bytes(), expected))
    stranger = _base("stranger@elsewhere.example", "my passport", "Please verify me.")
    stranger.add_attachment(
        jpeg_bytes(6000, rng), maintype="image", subtype="jpeg", filename="passport.jpg"
    )
    mails.append(
        SampleMail(
            "stranger@elsewhere.example",
            stranger["Subject"],
            stranger.as_bytes(),
            [],
            quarantine_reason="unknown sender",
        )
    )
    return Scenario(senders, mails)
