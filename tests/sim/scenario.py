"""The mails of one schedule: who sends what, and every delivery (APPEND) of it.

A logical :class:`Mail` may be delivered more than once: ``resent`` (the same mail with one
more ``Received:`` header, so other bytes but the same Message-ID) or ``same-bytes`` (the
identical bytes again: with no Message-ID, only the bytes tell it is the same mail).
Everything is made from the schedule's RNG, so a seed always makes the same mails.
"""

from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import dataclass, field

from mailingest_testbed.samples import authentication_results, jpeg_bytes, pdf_bytes, png_bytes

from .world import SENDERS, STRANGER

KINDS = [
    ("driver_license", "pdf"),
    ("passport", "jpg"),
    ("utility_bill", "pdf"),
    ("selfie", "png"),
    ("rental_agreement", "pdf"),
]
MIME = {"pdf": ("application", "pdf"), "jpg": ("image", "jpeg"), "png": ("image", "png")}


def normalized(raw: bytes) -> bytes:
    """Bytes as compared: servers may store CRLF or LF line ends."""
    return raw.replace(b"\r\n", b"\n")


def digest(raw: bytes) -> str:
    return hashlib.sha256(normalized(raw)).hexdigest()


@dataclass(frozen=True)
class Document:
    filename: str
    payload: bytes


@dataclass
class Mail:
    """One mail as its sender wrote it; ``entity`` None when the sender is unknown."""

    key: str
    sender: str
    entity: str | None
    message_id: str | None
    documents: list[Document]
    raw: bytes = b""


@dataclass
class Delivery:
    """One APPEND of a mail: ``kind`` is original, resent or same-bytes; ``during`` ones
    are appended at a moment the scheduler picks."""

    mail: Mail
    raw: bytes
    kind: str
    during: bool

    @property
    def digest(self) -> str:
        return digest(self.raw)


@dataclass
class Scenario:
    mails: list[Mail]
    deliveries: list[Delivery] = field(default_factory=list)


def _payload(ext: str, rng: random.Random, title: str) -> bytes:
    if ext == "pdf":
        return pdf_bytes(title, rng.randint(700, 1600), rng)
    if ext == "jpg":
        return jpeg_bytes(rng.randint(500, 1400), rng)
    return png_bytes(rng.randint(300, 900), rng)


def build_mail(key: str, rng: random.Random, seed: int) -> Mail:
    sender = STRANGER if rng.random() < 0.08 else rng.choice(sorted(SENDERS))
    with_id = rng.random() < 0.8
    message_id = f"sim-{seed}-{key}@mail.example" if with_id else None
    documents = []
    for k in range(rng.choice((1, 1, 2, 2, 3))):
        stem, ext = KINDS[rng.randrange(len(KINDS))]
        name = f"{stem}_{key}_{k}.{ext}"
        documents.append(Document(name, _payload(ext, rng, name)))
    headers = [
        "Received: from mx1.example.net by mx.support.example; Mon, 16 Jun 2025 12:00:00 +0000",
        f"Authentication-Results: {authentication_results(sender)}",
        f"From: {sender}",
        "To: documents@support.example",
        f"Subject: My documents ({key})",
        "Date: Mon, 16 Jun 2025 12:00:00 +0000",
    ]
    if message_id:
        headers.append(f"Message-ID: <{message_id}>")
    entity = SENDERS.get(sender)
    return Mail(key, sender, entity, message_id, documents, mime(headers, key, documents))


def mime(headers: list[str], key: str, documents: list[Document]) -> bytes:
    """A multipart/mixed mail: a text part and each document as a base64 attachment
    (written out by hand: the email package's header machinery is slow)."""
    boundary = f"==sim-{key}=="
    lines = [
        *headers,
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        f"--{boundary}",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: 7bit",
        "",
        f"Hello, my documents are attached. ({key})",
    ]
    for doc in documents:
        maintype, subtype = MIME[doc.filename.rsplit(".", 1)[1]]
        lines += [
            f"--{boundary}",
            f"Content-Type: {maintype}/{subtype}",
            "Content-Transfer-Encoding: base64",
            f'Content-Disposition: attachment; filename="{doc.filename}"',
            "",
            base64.encodebytes(doc.payload).decode().rstrip("\n"),
        ]
    lines += [f"--{boundary}--", ""]
    return "\n".join(lines).encode()


def resent(mail: Mail, hop: int) -> bytes:
    """The same mail delivered again through another relay: one more Received: header."""
    received = (
        f"Received: from mx{hop + 1}.example.net by mx.support.example; "
        "Mon, 16 Jun 2025 12:05:00 +0000\n"
    ).encode()
    return received + mail.raw


def draw(rng: random.Random, seed: int, *, duplicates: bool) -> Scenario:
    """One to three mails; with ``duplicates``, some delivered again (at the start or
    while the schedule runs)."""
    mails = [build_mail(f"m{i + 1}", rng, seed) for i in range(rng.choice((1, 1, 1, 2, 2, 3)))]
    scenario = Scenario(mails)
    for mail in mails:
        scenario.deliveries.append(Delivery(mail, mail.raw, "original", during=rng.random() < 0.2))
    if duplicates:
        for hop, mail in enumerate(rng.sample(mails, k=rng.randint(1, len(mails)))):
            if mail.message_id and rng.random() < 0.6:
                delivery = Delivery(mail, resent(mail, hop), "resent", during=rng.random() < 0.6)
            else:
                delivery = Delivery(mail, mail.raw, "same-bytes", during=rng.random() < 0.6)
            scenario.deliveries.append(delivery)
    return scenario
