"""What we accept from the internet: one mail's bytes -> its documents, or why not.

A pure function (no I/O), run before anything is sent anywhere, cheapest checks
first so a hostile mail costs as little as possible:

1. size of the whole message (the poll already refused it by ``RFC822.SIZE``
   before fetching, when the server reports it);
2. structure: number of MIME parts and nesting depth (headers only, nothing decoded);
3. the sender: ``Authentication-Results`` of the trusted receiving server
   (:mod:`mailingest.core.sender_auth`), unless the operator turned it off;
4. each part: zero bytes (reported, not uploaded), its size, and its real type
   sniffed from the bytes (:mod:`mailingest.core.sniff`); the extension sent to Alloy
   follows the content when the name lies;
5. the number of documents.

Every refusal names the limit or check and the value that failed it.
"""

from __future__ import annotations

import email
import email.policy
import json
from dataclasses import dataclass, field, replace
from email.message import Message

from mailingest.config.table import BY_NAME, default, default_int
from mailingest.core.base64_bodies import hollow, unfold
from mailingest.core.documents import DocumentSpec, describe_attachments
from mailingest.core.mail import ParsedMail, parse_mail
from mailingest.core.sender_auth import AuthPolicy, evaluate
from mailingest.core.sniff import sniff


@dataclass(frozen=True)
class Limits:
    """What one mail may be; the defaults are the settings' (:mod:`mailingest.config.table`)."""

    max_message_bytes: int = default_int("MAX_MESSAGE_BYTES")
    max_parts: int = default_int("MAX_PARTS")
    max_depth: int = default_int("MAX_DEPTH")
    max_attachment_bytes: int = default_int("MAX_ATTACHMENT_BYTES")
    max_documents: int = default_int("MAX_DOCUMENTS")
    allowed_kinds: frozenset[str] = frozenset(str(default("ALLOWED_TYPES")).split(","))
    inline_image_floor: int = default_int("INLINE_IMAGE_FLOOR")
    max_header_bytes: int = 256 * 1024  # not a setting


@dataclass(frozen=True)
class Document:
    """A document that passed every check: what Alloy is told, and the bytes."""

    spec: DocumentSpec
    payload: bytes
    kind: str


@dataclass(frozen=True)
class Screened:
    """The outcome for one mail: ``refusal`` set (quarantine), or the documents, with
    the parts refused beside them (``refused``: one reason each) when the inbox files
    a mail's good documents anyway (``on_refused_part = "skip"``)."""

    mail: ParsedMail | None
    documents: tuple[Document, ...] = ()
    refusal: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)  # skipped parts, auth verdict
    refused: tuple[str, ...] = ()
    # the receiving server vouched for the sender (True), did not (False), or it was not
    # asked (None: sender authentication off, or the mail refused before it was)
    authenticated: bool | None = None

    @property
    def accepted(self) -> bool:
        return self.refusal is None

    def parts(self) -> str:
        """What the mail carried, for the console: each document's name, sniffed type
        and size, and each part refused with its reason (JSON; never a byte of it)."""
        rows: list[dict[str, object]] = [
            {
                "name": f"{doc.spec.name}.{doc.spec.extension}",
                "type": doc.kind,  # what its bytes are (sniffed), not what it claims
                "document_type": doc.spec.type,
                "size": len(doc.payload),
                "outcome": "document",
            }
            for doc in self.documents
        ]
        rows += [{"name": "", "type": "", "size": 0, "outcome": why} for why in self.refused]
        return json.dumps(rows, ensure_ascii=False)[:4000]


def structure(message: Message) -> tuple[int, int]:
    """(number of MIME parts, deepest nesting), from the parsed headers alone."""
    count = 0
    deepest = 0
    stack: list[tuple[Message, int]] = [(message, 0)]
    while stack:
        part, depth = stack.pop()
        count += 1
        deepest = max(deepest, depth)
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((p, depth + 1) for p in payload if isinstance(p, Message))
    return count, deepest


REFUSED_PART_POLICIES = BY_NAME["ON_REFUSED_PART"].choices


def screen(
    raw: bytes,
    limits: Limits,
    auth: AuthPolicy | None,
    *,
    on_refused_part: str = str(default("ON_REFUSED_PART")),
    forwarded: str = str(default("FORWARDED")),
) -> Screened:
    """Decide what to do with one mail. Never raises for any input.

    A part refused for what it is (a type not allowed, too large) refuses the whole
    mail under ``on_refused_part = "quarantine"``; under ``"skip"`` it is recorded in
    ``refused`` and the mail's other documents go on, unless none is left. What is
    wrong with the mail itself (its size, structure, sender, too many documents)
    always refuses the whole mail."""
    if on_refused_part not in REFUSED_PART_POLICIES:
        raise ValueError(f"on_refused_part must be one of {REFUSED_PART_POLICIES}")
    if len(raw) > limits.max_message_bytes:
        return Screened(None, refusal=size_refusal(len(raw), limits))
    end = _header_end(raw, limits.max_header_bytes)
    if end is None:
        return Screened(
            None,
            refusal=f"headers too large: more than {limits.max_header_bytes} bytes "
            f"(limit {limits.max_header_bytes})",
        )
    try:
        hollowed = hollow(raw)  # long base64 bodies out of the line-by-line parser
        message = email.message_from_bytes(hollowed.raw, policy=email.policy.compat32)
        unfold(message, hollowed)
    except Exception as exc:  # noqa: BLE001 - hostile input
        return Screened(None, refusal=f"cannot parse the mail ({type(exc).__name__})")
    parts, depth = structure(message)
    if parts > limits.max_parts:
        return Screened(None, refusal=f"too many MIME parts: {parts} (limit {limits.max_parts})")
    if depth > limits.max_depth:
        return Screened(
            None, refusal=f"MIME nesting too deep: {depth} levels (limit {limits.max_depth})"
        )
    try:
        mail = parse_mail(
            raw,
            inline_image_floor=limits.inline_image_floor,
            message=message,
            hollowed=hollowed,
            forwarded=forwarded,
            max_parts=limits.max_parts,
        )
        specs = describe_attachments(mail)
    except Exception as exc:  # noqa: BLE001 - hostile input
        return Screened(None, refusal=f"cannot parse the mail ({type(exc).__name__})")

    for defect in mail.defects:
        for marker, problem in _FATAL_DEFECTS.items():
            if marker in defect:
                return Screened(mail, refusal=f"{problem}: {defect[:160]}")
    notes: list[str] = [f"skipped part {s.index}: {s.reason}" for s in mail.skipped]
    if auth is not None:
        verdict = evaluate(
            [str(h) for h in message.get_all("Authentication-Results") or []],
            mail.sender,
            auth,
        )
        if not verdict.accepted:
            return Screened(
                mail, refusal=f"sender not authenticated: {verdict.reason}", authenticated=False
            )
        notes.append(f"sender authenticated: {verdict.reason}")

    authenticated = True if auth is not None else None
    payloads = {att.index: att for att in mail.attachments}
    # every part is named first (its extension from its content, a name unique in the
    # mail), refused or not: a part's name must not depend on which others were
    # refused, or a replay after a limit was raised would describe it anew
    candidates: list[tuple[Document, str | None]] = []  # (document, why refused)
    for spec in specs:
        attachment = payloads[spec.index]
        data = attachment.payload
        label = f"part {spec.index} ({spec.name}.{spec.extension})"
        if attachment.unpacked_from is not None:
            label = f"part {spec.index} ({spec.name}.{spec.extension}, in {attachment.container})"
        if not data:
            notes.append(f"skipped {label}: zero bytes")
            continue
        found = sniff(data, declared_type=attachment.content_type, filename=spec.name)
        wrong: str | None = None
        if attachment.refusal is not None:
            wrong = f"refused content: {label}: {attachment.refusal}"
        elif len(data) > limits.max_attachment_bytes:
            wrong = (
                f"attachment too large: {label} is {len(data)} bytes "
                f"(limit {limits.max_attachment_bytes})"
            )
        elif found.kind not in limits.allowed_kinds:
            wrong = (
                f"refused content: {label} is {found.kind} ({found.mime}), "
                "not an allowed document type"
            )
        if wrong is not None and on_refused_part == "quarantine":
            return Screened(mail, refusal=wrong, authenticated=authenticated)
        named = spec
        if found.extension != spec.extension and attachment.refusal is None:
            if wrong is None:
                notes.append(f"{label}: content is {found.kind}, sent as .{found.extension}")
            named = replace(spec, extension=found.extension, content_type=found.mime)
        candidates.append((Document(named, data, found.kind), wrong))
    unique = _unique([document for document, _ in candidates])
    documents = [doc for doc, (_, wrong) in zip(unique, candidates, strict=True) if not wrong]
    refused = [wrong for _, wrong in candidates if wrong]
    if len(documents) > limits.max_documents:
        return Screened(
            mail,
            refusal=f"too many documents: {len(documents)} (limit {limits.max_documents})",
        )
    if not documents and refused:  # nothing left to file: the refusals are the reason
        return Screened(
            mail, refusal="; ".join(refused), notes=tuple(notes), authenticated=authenticated
        )
    if not documents:
        reason = "no documents attached"
        if notes:
            reason += f" ({'; '.join(n for n in notes if n.startswith('skipped'))})"
        return Screened(
            mail,
            refusal=reason.replace(" ()", ""),
            notes=tuple(notes),
            authenticated=authenticated,
        )
    return Screened(
        mail,
        tuple(documents),
        notes=tuple(notes),
        refused=tuple(refused),
        authenticated=authenticated,
    )


# parse defects that mean a document's bytes are not what the sender sent
_FATAL_DEFECTS = {
    "InvalidBase64LengthDefect": "a part could not be decoded",
    "InvalidBase64CharactersDefect": "a part could not be decoded",
    "CloseBoundaryNotFoundDefect": "the mail is truncated or its MIME structure broken",
    "StartBoundaryNotFoundDefect": "the mail is truncated or its MIME structure broken",
}


def _header_end(raw: bytes, limit: int) -> int | None:
    """Where the header block ends; None when it runs past ``limit`` bytes."""
    window = raw[: limit + 4]
    ends = [i for i in (window.find(b"\r\n\r\n"), window.find(b"\n\n")) if i >= 0]
    if ends:
        return min(ends)
    return len(raw) if len(raw) <= limit else None


def size_refusal(size: int, limits: Limits) -> str:
    return f"message too large: {size} bytes (limit {limits.max_message_bytes})"


def _unique(documents: list[Document]) -> list[Document]:
    """Names stay unique within the mail after an extension was corrected."""
    taken: set[tuple[str, str]] = set()
    tried: dict[tuple[str, str], int] = {}  # the last suffix tried per name: linear time
    out = []
    for doc in documents:
        key = (doc.spec.name.casefold(), doc.spec.extension)
        name, counter = doc.spec.name, tried.get(key, 1)
        while (name.casefold(), doc.spec.extension) in taken:
            counter += 1
            name = f"{doc.spec.name}-{counter}"
        tried[key] = counter
        taken.add((name.casefold(), doc.spec.extension))
        out.append(
            doc if name == doc.spec.name else replace(doc, spec=replace(doc.spec, name=name))
        )
    return out
