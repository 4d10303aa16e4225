"""The benchmark's workload: deterministic customer mails, written once, delivered fast.

Mail ``i`` of a workload depends only on ``(seed, tag, i)``: the first 500 mails
of the 10,000-mail workload are the 500-mail workload. Each mail has 1-3
attachments (uniform); each attachment's size is log-uniform between 50 kB and
2 MB (50,000 and 2,000,000 bytes; mean about 0.53 MB), its kind PDF (50 %),
JPEG (30 %) or PNG (20 %): a valid magic number and structure head (what
``mailingest.core.sniff`` looks at) followed by random bytes, so every document is
unique and incompressible. The sender is one of 20 customers of the sender
directory; the ``Authentication-Results`` header says DMARC pass by the trusted
receiving server (``mailingest_testbed.samples``).

Mails are written as files with LF line endings, the way Dovecot stores them,
once per workdir (the *corpus*); a run delivers the first N of them into the
INBOX maildir as hard links named with their size (``,S=<bytes>,W=<bytes with
CRLF>``) so Dovecot reads no file to index them. Delivering 10,000 mails this
way takes about a second; IMAP APPEND of the same 14 GB would take minutes.
The latency measurement delivers by IMAP APPEND instead (its start is the APPEND).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import pwd
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from mailingest_testbed.samples import authentication_results

MIN_SIZE, MAX_SIZE = 50_000, 2_000_000
SENDERS = 20
LINE = 76  # base64 characters per line

# stem, extension, Alloy type the name implies (mailingest.core.documents.infer_type), weight
KINDS: tuple[tuple[str, str, str, float], ...] = (
    ("driver_license", "pdf", "license", 0.2),
    ("utility_bill", "pdf", "utility", 0.2),
    ("rental_agreement", "pdf", "contract", 0.1),
    ("passport_scan", "jpg", "passport", 0.2),
    ("id_card_photo", "jpg", "other", 0.1),
    ("selfie", "png", "other", 0.2),
)
CONTENT_TYPES = {"pdf": "application/pdf", "jpg": "image/jpeg", "png": "image/png"}


@dataclass(frozen=True)
class DocSpec:
    name: str
    extension: str
    type: str
    size: int
    sha256: str


@dataclass(frozen=True)
class MailSpec:
    index: int
    tag: str
    sender: str
    entity: str
    message_id: str
    size: int  # bytes of the file (LF line endings)
    vsize: int  # bytes with CRLF line endings: what IMAP reports as RFC822.SIZE
    docs: tuple[DocSpec, ...] = field(default_factory=tuple)

    @property
    def doc_bytes(self) -> int:
        return sum(d.size for d in self.docs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MailSpec:
        docs = tuple(DocSpec(**x) for x in d.pop("docs"))
        return cls(**d, docs=docs)


def _entity(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "P-" + "".join(rng.choice(alphabet) for _ in range(20))


def senders(seed: int) -> dict[str, str]:
    """The sender directory: e-mail -> entity token, 20 customers."""
    rng = random.Random(f"mailingest-bench-senders:{seed}")
    return {f"customer{j:02d}@example.com": _entity(rng) for j in range(SENDERS)}


def senders_csv(seed: int) -> str:
    return "email,entity_token\n" + "".join(f"{e},{t}\n" for e, t in senders(seed).items())


def log_uniform(rng: random.Random, low: int = MIN_SIZE, high: int = MAX_SIZE) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def content(extension: str, size: int, rng: random.Random) -> bytes:
    """``size`` bytes whose head is a real PDF/JPEG/PNG head, the rest random."""
    if extension == "pdf":
        head = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
        tail = b"\n%%EOF\n"
    elif extension == "jpg":
        head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        tail = b"\xff\xd9"
    else:
        head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x04\x00\x00\x00\x03\x00\x08\x02"
        tail = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return head + rng.randbytes(max(0, size - len(head) - len(tail))) + tail


def _b64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"\n".join([encoded[i : i + LINE] for i in range(0, len(encoded), LINE)])


def make_mail(
    seed: int,
    index: int,
    *,
    tag: str = "w",
    attachment_sizes: Sequence[int] | None = None,
    kinds: Sequence[int] | None = None,
) -> tuple[bytes, MailSpec]:
    """Mail ``index`` of workload ``(seed, tag)``: its bytes (LF endings) and what it holds.

    ``attachment_sizes`` overrides the random sizes (the 25 MB mail of the RSS test).
    """
    rng = random.Random(f"mailingest-bench:{seed}:{tag}:{index}")
    directory = senders(seed)
    sender = sorted(directory)[rng.randrange(SENDERS)]
    count = len(attachment_sizes) if attachment_sizes else rng.randint(1, 3)
    sizes = list(attachment_sizes) if attachment_sizes else [log_uniform(rng) for _ in range(count)]
    weights = [k[3] for k in KINDS]
    chosen = list(kinds) if kinds else [rng.choices(range(len(KINDS)), weights)[0] for _ in sizes]
    boundary = f"=_bench_{tag}_{index}_{rng.getrandbits(32):08x}"
    when = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=index)
    message_id = f"bench-{seed}-{tag}-{index}@mail.example"
    head = (
        f"Authentication-Results: {authentication_results(sender)}\n"
        f"From: Customer <{sender}>\n"
        "To: documents@support.example\n"
        f"Subject: Documents {tag} {index}\n"
        f"Date: {format_datetime(when)}\n"
        f"Message-ID: <{message_id}>\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\n'
        "\n"
        f"--{boundary}\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 7bit\n"
        "\n"
        "Hello, please find my documents for the verification attached.\n"
        "Kind regards\n"
    ).encode()
    parts = [head]
    docs = []
    for k, (size, kind) in enumerate(zip(sizes, chosen, strict=True)):
        stem, extension, doc_type, _ = KINDS[kind]
        name = f"{stem}_{tag}{index:05d}_{k}"
        data = content(extension, size, rng)
        filename = f"{name}.{extension}"
        parts.append(
            (
                f"--{boundary}\n"
                f'Content-Type: {CONTENT_TYPES[extension]}; name="{filename}"\n'
                f'Content-Disposition: attachment; filename="{filename}"\n'
                "Content-Transfer-Encoding: base64\n"
                "\n"
            ).encode()
        )
        parts.append(_b64_lines(data) + b"\n")
        docs.append(DocSpec(name, extension, doc_type, len(data), hashlib.sha256(data).hexdigest()))
    parts.append(f"--{boundary}--\n".encode())
    raw = b"".join(parts)
    spec = MailSpec(
        index=index,
        tag=tag,
        sender=sender,
        entity=directory[sender],
        message_id=message_id,
        size=len(raw),
        vsize=len(raw) + raw.count(b"\n"),
        docs=tuple(docs),
    )
    return raw, spec


def crlf(raw: bytes) -> bytes:
    """The same mail with CRLF line endings, as IMAP APPEND carries it."""
    return raw.replace(b"\n", b"\r\n")


# --------------------------------------------------------------------------- owner


def mail_owner() -> tuple[int, int]:
    """uid/gid that own Dovecot's maildir (mailingest_testbed.servers: ``mail`` when root)."""
    if os.geteuid() == 0:
        for name in ("mail", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return entry.pw_uid, entry.pw_gid
    return os.getuid(), os.getgid()


def make_maildir(path: Path, owner: tuple[int, int]) -> None:
    for sub in ("", "cur", "new", "tmp"):
        d = path / sub if sub else path
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, *owner)
        d.chmod(0o700)


def maildir_name(tag: str, index: int, size: int, vsize: int) -> str:
    return f"1700000000.B{tag}{index:06d}.mailingest-bench,S={size},W={vsize}"


# --------------------------------------------------------------------------- corpus


def _write_one(args: tuple[str, int, int, str, tuple[int, int]]) -> dict[str, Any]:
    directory, seed, index, tag, owner = args
    raw, spec = make_mail(seed, index, tag=tag)
    path = Path(directory) / f"{tag}{index:06d}.eml"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(raw)
    os.chown(tmp, *owner)
    tmp.chmod(0o600)
    tmp.rename(path)
    return asdict(spec)


class Corpus:
    """The workload's mails as files under ``directory``, generated once, reused by every run."""

    def __init__(self, directory: Path, seed: int, tag: str = "w") -> None:
        self.directory = Path(directory)
        self.seed = seed
        self.tag = tag
        self.owner = mail_owner()
        self.specs: list[MailSpec] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chown(self.directory, *self.owner)  # links to it are made by Dovecot's user
        manifest = self.directory / "manifest.json"
        if manifest.exists():
            data = json.loads(manifest.read_text())
            if data["seed"] == seed and data["tag"] == tag:
                self.specs = [MailSpec.from_dict(d) for d in data["mails"]]

    def path(self, index: int) -> Path:
        return self.directory / f"{self.tag}{index:06d}.eml"

    def ensure(self, n: int, processes: int = 2) -> float:
        """Generate mails up to ``n``; returns the seconds it took."""
        import time

        started = time.monotonic()
        have = len(self.specs)
        if have >= n:
            return 0.0
        jobs = [(str(self.directory), self.seed, i, self.tag, self.owner) for i in range(have, n)]
        with ProcessPoolExecutor(processes) as pool:
            for spec in pool.map(_write_one, jobs, chunksize=16):
                self.specs.append(MailSpec.from_dict(spec))
        manifest = self.directory / "manifest.json"
        manifest.write_text(
            json.dumps(
                {"seed": self.seed, "tag": self.tag, "mails": [asdict(s) for s in self.specs]}
            )
        )
        return time.monotonic() - started

    def deliver(self, n: int, maildir: Path) -> None:
        """Hard-link the first ``n`` mails into ``maildir/new`` (Dovecot's user owns them)."""
        make_maildir(maildir, self.owner)
        new = maildir / "new"
        for spec in self.specs[:n]:
            name = maildir_name(self.tag, spec.index, spec.size, spec.vsize)
            os.link(self.path(spec.index), new / name)

    def totals(self, n: int) -> dict[str, float]:
        specs = self.specs[:n]
        docs = [d for s in specs for d in s.docs]
        return {
            "mails": len(specs),
            "documents": len(docs),
            "message_bytes": sum(s.vsize for s in specs),
            "document_bytes": sum(d.size for d in docs),
            "mean_message_bytes": sum(s.vsize for s in specs) / max(1, len(specs)),
            "mean_document_bytes": sum(d.size for d in docs) / max(1, len(docs)),
            "documents_per_mail": len(docs) / max(1, len(specs)),
        }

    def bytes_on_disk(self, n: int) -> int:
        return sum(s.size for s in self.specs[:n])


def write_small_mails(maildir: Path, count: int, seed: int, owner: tuple[int, int]) -> int:
    """``count`` small processed-looking mails (~3 kB, one 2 kB PDF) straight into
    ``maildir/new``; returns the bytes written. For the idle-cost measurement."""
    make_maildir(maildir, owner)
    new = maildir / "new"
    total = 0
    directory = senders(seed)
    names = sorted(directory)
    rng = random.Random(f"mailingest-bench-small:{seed}")
    pdf = content("pdf", 2000, rng)
    body = _b64_lines(pdf)
    for i in range(count):
        sender = names[i % SENDERS]
        raw = (
            (
                f"Authentication-Results: {authentication_results(sender)}\n"
                f"From: Customer <{sender}>\nTo: documents@support.example\n"
                f"Subject: Documents old {i}\nMessage-ID: <bench-old-{seed}-{i}@mail.example>\n"
                'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n'
                "--b\nContent-Type: text/plain\n\nold mail\n--b\n"
                'Content-Type: application/pdf\nContent-Disposition: attachment; filename="a.pdf"\n'
                "Content-Transfer-Encoding: base64\n\n"
            ).encode()
            + body
            + b"\n--b--\n"
        )
        name = maildir_name("old", i, len(raw), len(raw) + raw.count(b"\n"))
        path = new / name
        with open(path, "wb") as f:
            f.write(raw)
        os.chown(path, *owner)
        total += len(raw)
    return total


def expected_index(specs: Iterable[MailSpec]) -> dict[tuple[str, str, str], DocSpec]:
    """(entity, name, extension) -> the document Alloy must hold exactly once."""
    return {(s.entity, d.name, d.extension): d for s in specs for d in s.docs}
