"""Raw RFC 822 bytes -> :class:`ParsedMail` (pure logic, no I/O).

Headers (Subject, Message-ID, Date, defects) come from mail-parser; the parts
come from our own walk of ``MailParser.message`` (the stdlib
``email.message.Message`` of the same parse), because mail-parser's
``attachments`` list is lossy:

* it drops parts that have neither a filename nor a Content-ID;
* it renames an inline image after its Content-ID and invents a random
  ``.txt`` name for an attachment without a filename;
* for an attached ``message/rfc822`` it returns a re-flattened copy and then
  the inner attachments a second time.

Part rules (see :func:`parse_mail`):

* Leaves are numbered depth-first over the whole mail, body parts included,
  ``message/*`` parts counting as one leaf.  ``Attachment.index`` and
  ``SkippedPart.index`` are that number, so an index depends only on the
  bytes of the mail, never on the inline-image floor or on which parts turn
  out to be documents.
* Body: the first ``text/plain`` and the first ``text/html`` leaf that has no
  filename, whose disposition is absent or ``inline`` and that does not sit
  inside a container with an attachment disposition.  Later parts that would
  also qualify (Apple Mail splits the body around an inline PDF into several
  ``text/plain`` chunks) are body fragments: they are reported in ``skipped``
  (never silently dropped) rather than sent to Alloy as documents.
* Every other leaf is a candidate document, named or not, inline or not.
* An image that is inline (disposition ``inline``, or no disposition and a
  Content-ID) and smaller than ``inline_image_floor`` bytes is a signature
  logo: skipped and reported.  A part with an attachment disposition is
  never skipped by size.
* The signature part of ``multipart/signed`` (``smime.p7s``,
  ``signature.asc``) and the version part of ``multipart/encrypted`` are
  skipped and reported: they are transport artefacts, not documents.
* ``message/rfc822`` (and any other ``message/*`` except
  ``message/delivery-status``) is one document holding the ORIGINAL bytes of
  the encapsulated message, sliced out of the raw input.  The slice is
  verified by parsing it again and comparing it with what the stdlib parsed
  for that part; if it cannot be located or does not verify, the sub-message
  is re-serialised with ``as_bytes()`` and a defect records it.  What becomes
  of it is ``forwarded``'s choice: ``"eml"`` keeps it as that one document;
  ``"documents"`` replaces it by the documents inside it (parsed by these same
  rules, forwarded mail inside it included, to ``MAX_FORWARD_DEPTH`` levels; one
  without any is skipped and reported); ``"both"`` keeps it and adds them.
* Outlook's ``winmail.dat`` (TNEF, known by its bytes) is replaced by the files
  inside it (:mod:`mailingest.core.tnef`).
* A document taken out of a container (a forwarded mail, a winmail.dat) is
  numbered after every leaf of the mail, in order, and names its container.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.message
import email.policy
import hashlib
import html as html_lib
import logging
import mimetypes
import quopri
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import collapse_rfc2231_value, getaddresses
from typing import TypeVar

import mailparser

from mailingest.config.table import BY_NAME
from mailingest.core.base64_bodies import Hollowed, decoded_payload, hollow, unfold
from mailingest.core.tnef import TnefError, is_tnef, unpack

# mail-parser warns for every unnamed non-text part it takes for body text; we handle
# those parts ourselves, so its warnings are noise in the worker's log.
logging.getLogger("mailparser").setLevel(logging.ERROR)

_T = TypeVar("_T")
_D = TypeVar("_D")

__all__ = [
    "Attachment",
    "MailParseError",
    "ParsedMail",
    "SkippedPart",
    "parse_mail",
]


@dataclass(frozen=True)
class Attachment:
    """One candidate document found in a mail."""

    #: Decoded filename as the mail declared it (RFC 2047 / RFC 2231 decoded),
    #: None when it had none.  Exception: a ``message/rfc822`` part without a
    #: filename is given ``"<inner Subject>.eml"`` (``/`` and ``\\`` replaced
    #: by ``-``) when the inner message has a Subject.
    filename: str | None
    content_type: str  # lower-case "type/subtype"
    payload: bytes
    inline: bool
    content_id: str | None  # without angle brackets
    index: int  # 0-based leaf number in the mail (stable: used to key documents)
    # taken out of the container at this index (a forwarded mail, a winmail.dat); its
    # own index then comes after every leaf's, in the container's order
    unpacked_from: int | None = None
    container: str = ""  # what that container is, for reasons: "winmail.dat", ...
    # set when the part cannot be a document whatever its bytes (a winmail.dat that
    # cannot be unpacked): screening refuses it with this reason
    refusal: str | None = None


@dataclass(frozen=True)
class SkippedPart:
    index: int
    content_type: str
    size: int
    reason: str  # e.g. "inline image below 4096-byte floor"


@dataclass(frozen=True)
class ParsedMail:
    message_id: str | None  # without angle brackets
    sender: str | None  # the From: address, stripped and lower-cased
    subject: str
    date: datetime | None  # timezone-aware (UTC)
    attachments: tuple[Attachment, ...]
    skipped: tuple[SkippedPart, ...]
    defects: tuple[str, ...]
    # the From: of each mail forwarded in this one (attached as message/rfc822), in order
    # (when the forwarded policy opens them); None for one without a single sender, or
    # kept whole unopened
    forwarded_senders: tuple[str | None, ...] = ()
    # every address it was sent to (To, Cc, Delivered-To, X-Original-To), as written
    recipients: tuple[str, ...] = ()
    # the text body (the plain text, else the HTML's text), its first BODY_TEXT_LIMIT
    # characters: what an inbox rule's body filter reads, never logged nor stored
    body: str = field(default="", repr=False)

    @property
    def own_documents(self) -> bool:
        """Candidate documents of the mail itself, beside what it forwards: not taken
        out of a forwarded mail, nor a forwarded mail kept whole."""
        return any(
            a.container != FORWARDED_CONTAINER and a.content_type not in _FORWARDED_TYPES
            for a in self.attachments
        )


class MailParseError(Exception):
    """The input is not a mail at all (empty, no header fields, unparseable)."""


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


FORWARDED_POLICIES = BY_NAME["FORWARDED"].choices
FORWARDED_CONTAINER = "forwarded message"  # Attachment.container of what one held
MAX_FORWARD_DEPTH = 5  # forwarded mail inside forwarded mail, opened this deep


def parse_mail(
    raw: bytes,
    *,
    inline_image_floor: int = 4096,
    message: email.message.Message | None = None,
    hollowed: Hollowed | None = None,
    forwarded: str = "eml",
    max_parts: int = 10_000,
    _depth: int = 0,
    _budget: list[int] | None = None,
) -> ParsedMail:
    """Parse one raw RFC 822 message.

    ``message`` and ``hollowed``: the caller's parse of ``hollowed.raw`` (compat32,
    see :mod:`mailingest.core.base64_bodies`) when it has one; parsing a large mail is the
    costly part, so it is done once.

    Raises :class:`MailParseError` only when the input is not a mail at all:
    empty or blank input, no header field, or a structure mail-parser refuses
    (e.g. nesting deep enough to exhaust the recursion limit).  A bad part
    (broken base64, undecodable filename, ...) never raises: it is recorded in
    ``defects`` and its bytes are kept as well as they can be.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError(f"parse_mail expects bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    if not raw.strip():
        raise MailParseError("empty input")
    if hollowed is None:
        hollowed = hollow(raw)
    try:
        if message is None:
            message = email.message_from_bytes(hollowed.raw, policy=email.policy.compat32)
            unfold(message, hollowed)
        parser = mailparser.MailParser(message)
    except RecursionError as exc:  # pragma: no cover - mail-parser converts it
        raise MailParseError("mail nested too deeply") from exc
    except Exception as exc:  # anything mail-parser chokes on
        raise MailParseError(f"mail-parser failed: {type(exc).__name__}: {exc}") from exc
    message = parser.message
    if message is None or not message.keys():
        raise MailParseError("no RFC 822 header fields")

    defects = _Defects()
    for entry in _or_default(lambda: parser.defects, []) or []:
        if isinstance(entry, dict):
            for key, values in entry.items():
                for value in values if isinstance(values, list) else [values]:
                    defects.add(f"{key}: {value}")

    try:
        attachments, skipped, leaves = _extract_parts(
            hollowed, message, inline_image_floor, defects
        )
    except RecursionError as exc:
        raise MailParseError("mail nested too deeply") from exc
    senders: list[str | None] = []
    attachments, skipped = _unpack(
        attachments,
        skipped,
        leaves,
        floor=inline_image_floor,
        forwarded=forwarded,
        depth=_depth,
        senders=senders,
        budget=[max_parts - leaves] if _budget is None else _budget,
    )

    return ParsedMail(
        message_id=_message_id(parser),
        sender=_sender(message, defects),
        subject=_subject(parser),
        date=_date(parser),
        attachments=tuple(attachments),
        skipped=tuple(skipped),
        defects=defects.as_tuple(),
        forwarded_senders=tuple(senders),
        recipients=_recipients(message),
        body=_or_default(lambda: _body_text(parser), ""),
    )


# --------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------


class _Defects:
    def __init__(self) -> None:
        self._items: list[str] = []
        self._seen: set[str] = set()

    def add(self, text: str) -> None:
        text = " ".join(_unsurrogate(str(text)).split())
        if text and text not in self._seen:
            self._seen.add(text)
            self._items.append(text)

    def as_tuple(self) -> tuple[str, ...]:
        return tuple(self._items)


def _or_default(fn: Callable[[], _T], default: _D) -> _T | _D:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - header extraction must never kill the parse
        return default


def _first(value: object) -> str:
    """mail-parser answers a repeated header with a list: take the first."""
    if isinstance(value, list):
        value = value[0] if value else ""
    return "" if value is None else str(value)


BODY_TEXT_LIMIT = 64 * 1024
_TAG = re.compile(r"<[^>]{0,2000}>")


def _body_text(parser: mailparser.MailParser) -> str:
    """The mail's own text: its plain-text body, else its HTML body without tags."""
    plain = "\n".join(parser.text_plain or [])
    if plain.strip():
        return plain[:BODY_TEXT_LIMIT]
    html = "\n".join(parser.text_html or [])[: BODY_TEXT_LIMIT * 4]
    return html_lib.unescape(_TAG.sub(" ", html))[:BODY_TEXT_LIMIT]


def _subject(parser: mailparser.MailParser) -> str:
    text = _first(_or_default(lambda: parser.subject, ""))
    return " ".join(_unsurrogate(text).split())


def _message_id(parser: mailparser.MailParser) -> str | None:
    text = _unsurrogate(_first(_or_default(lambda: parser.message_id, ""))).strip()
    match = re.search(r"<([^<>]*)>", text)
    if match:
        text = match.group(1)
    text = "".join(text.split())
    return text or None


def _date(parser: mailparser.MailParser) -> datetime | None:
    value = _or_default(lambda: parser.date, None)
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _sender(message: email.message.Message, defects: _Defects) -> str | None:
    """The From: address (never the display name), stripped and lower-cased.

    None when From is missing or unparseable, and also when it names several
    different mailboxes: the sender picks the customer entity, so an ambiguous
    From must not be resolved by guessing.
    """
    values = [_unsurrogate(str(v)) for k, v in message.raw_items() if k.lower() == "from"]
    if not values:
        return None
    addresses: list[str] = []
    for _name, given in getaddresses(values):
        address = given.strip().lower()
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in address):
            continue
        if address not in addresses:
            addresses.append(address)
    if len(addresses) > 1:
        defects.add(f"from: several different addresses {addresses}; sender left unset")
        return None
    if not addresses:
        defects.add("from: no parseable address; sender left unset")
        return None
    return addresses[0]


_RECIPIENT_HEADERS = ("to", "cc", "delivered-to", "x-original-to")


def _recipients(message: email.message.Message) -> tuple[str, ...]:
    """The addresses a mail was sent to, case kept (a signed address's id is)."""
    values = [
        _unsurrogate(str(v)) for k, v in message.raw_items() if k.lower() in _RECIPIENT_HEADERS
    ]
    found: list[str] = []
    for _name, given in getaddresses(values):
        address = given.strip()
        if "@" in address and not any(c.isspace() for c in address) and address not in found:
            found.append(address)
    return tuple(found)


# --------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------

_SURROGATES = re.compile("[\udc80-\udcff]")


def _unsurrogate(text: str) -> str:
    """Undo the stdlib's surrogateescape of 8-bit header bytes (UTF-8, else cp1252)."""
    if not _SURROGATES.search(text):
        return text
    data = text.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)\s+(=\?)")


def _decode_bytes(data: bytes, charset: str) -> str:
    charset = charset.split("*", 1)[0].strip() or "utf-8"  # RFC 2231 language suffix
    for candidate in (charset, "utf-8"):
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("cp1252", "replace")


def _decode_encoded_words(text: str) -> str:
    """RFC 2047, leniently: encoded words anywhere (also glued to ``.pdf``)."""
    if "=?" not in text:
        return text
    text = _BETWEEN_WORDS.sub(r"\1\2", text)  # whitespace between words is dropped

    def one(match: re.Match[str]) -> str:
        charset, encoding, encoded = match.groups()
        try:
            if encoding in "bB":
                data = base64.b64decode(encoded + "=" * (-len(encoded) % 4))
            else:
                data = quopri.decodestring(encoded.replace("_", " ").encode("ascii"), header=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            return match.group(0)
        return _decode_bytes(data, charset)

    return _ENCODED_WORD.sub(one, text)


# --------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------

_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_SIGNATURE_TYPES = frozenset(
    {"application/pkcs7-signature", "application/x-pkcs7-signature", "application/pgp-signature"}
)


@dataclass
class _Leaf:
    part: email.message.Message
    parent_type: str | None
    in_attachment: bool  # inside a container whose disposition is not inline


def _walk_leaves(message: email.message.Message) -> Iterator[_Leaf]:
    """Depth-first leaves; ``message/*`` parts are leaves (not descended)."""
    stack: list[tuple[email.message.Message, str | None, bool]] = [(message, None, False)]
    while stack:
        part, parent, in_attachment = stack.pop()
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            disposition = _disposition(part)
            inner = in_attachment or disposition not in (None, "inline")
            ctype = part.get_content_type()
            for child in reversed(payload):
                if isinstance(child, email.message.Message):
                    stack.append((child, ctype, inner))
            continue
        yield _Leaf(part, parent, in_attachment)


def _disposition(part: email.message.Message) -> str | None:
    try:
        value = part.get_content_disposition()
    except Exception:  # noqa: BLE001 - a malformed header must not cost us the part
        return None
    return value.strip().lower() if value else None


def _header(part: email.message.Message, name: str) -> str | None:
    for key, value in part.raw_items():
        if key.lower() == name:
            return _unsurrogate(str(value))
    return None


def _content_id(part: email.message.Message) -> str | None:
    value = _header(part, "content-id")
    if value is None:
        return None
    value = "".join(value.split()).strip("<>")
    return value or None


def _filename(part: email.message.Message, defects: _Defects, where: str) -> str | None:
    """Filename from Content-Disposition ``filename`` or Content-Type ``name``.

    Handles RFC 2231 (``filename*=UTF-8''...``, continuations, wrong charset),
    RFC 2047 encoded words (Outlook, Gmail) and raw 8-bit UTF-8/cp1252.
    """
    view = email.message.Message()
    for name in ("content-disposition", "content-type"):
        header = _header(part, name)
        if header is not None:
            view[name] = header
    value: str | tuple[str | None, str | None, str] | None
    value = view.get_param("filename", None, header="content-disposition")
    if value is None:
        value = view.get_param("name", None, header="content-type")
    if value is None:
        return None
    if isinstance(value, tuple):  # RFC 2231: (charset, language, %-decoded latin-1 text)
        charset, _language, text = value
        try:
            text = _decode_bytes(text.encode("latin-1"), charset or "us-ascii")
        except UnicodeEncodeError:
            text = collapse_rfc2231_value(value)
    else:
        text = str(value)
    try:
        text = _decode_encoded_words(text)
    except Exception as exc:  # noqa: BLE001 - any decoding failure: keep the name as declared
        defects.add(f"{where}: filename not decodable ({exc}); kept as declared")
    text = text.strip()
    return text or None


def _unpack(
    attachments: list[Attachment],
    skipped: list[SkippedPart],
    leaves: int,
    *,
    floor: int,
    forwarded: str,
    depth: int,
    senders: list[str | None],
    budget: list[int],
) -> tuple[list[Attachment], list[SkippedPart]]:
    """Containers replaced by (or, for ``forwarded = "both"``, given beside them) the
    documents inside them: each winmail.dat (TNEF, known by its bytes; one that cannot
    be unpacked stays, marked refused) and each forwarded mail; a container holding
    none is skipped."""
    if forwarded not in FORWARDED_POLICIES:
        raise ValueError(f"forwarded must be one of {FORWARDED_POLICIES}")
    opener = _Opener(leaves, skipped)
    for attachment in attachments:
        if is_tnef(attachment.payload):
            opener.tnef(attachment)
        elif attachment.content_type in _FORWARDED_TYPES and forwarded != "eml":
            opened = _forwarded(attachment.payload, floor, forwarded, depth, budget)
            if forwarded == "both" or opened is None:  # kept whole: nothing is dropped
                opener.out.append(attachment)
            if opened is None:
                senders.append(None)  # not opened: whose it is cannot be told
            if opened is not None:
                documents, inner_skipped, sender = opened
                senders.append(sender)  # None: no single sender (it is said so)
                opener.forwarded(attachment, documents, inner_skipped, forwarded)
        else:
            opener.out.append(attachment)
    return opener.out, skipped


class _Opener:
    """What :func:`_unpack` builds: the documents, numbered after the mail's leaves."""

    def __init__(self, leaves: int, skipped: list[SkippedPart]) -> None:
        self.out: list[Attachment] = []
        self.index = leaves
        self.skipped = skipped

    def _add(self, container: Attachment, kind: str, document: Attachment) -> None:
        self.out.append(
            replace(
                document,
                index=self.index,
                inline=False,
                content_id=None,
                unpacked_from=container.index,
                container=kind,
            )
        )
        self.index += 1

    def _nothing_inside(self, container: Attachment, reason: str) -> None:
        self.skipped.append(
            SkippedPart(container.index, container.content_type, len(container.payload), reason)
        )

    def tnef(self, container: Attachment) -> None:
        try:
            files = unpack(container.payload)
        except TnefError as exc:
            self.out.append(replace(container, refusal=str(exc)))
            return
        if not files:
            self._nothing_inside(
                container, "winmail.dat (TNEF) holds no attached file, only its message"
            )
        for file in files:
            ctype = mimetypes.guess_type(file.filename or "")[0] or "application/octet-stream"
            document = replace(container, filename=file.filename, content_type=ctype)
            self._add(container, "winmail.dat", replace(document, payload=file.payload))

    def forwarded(
        self,
        container: Attachment,
        documents: list[Attachment],
        inner_skipped: list[SkippedPart],
        policy: str,
    ) -> None:
        self.skipped.extend(
            replace(part, index=container.index, reason=f"in a forwarded message: {part.reason}")
            for part in inner_skipped
        )
        if not documents and policy == "documents":
            self._nothing_inside(container, "forwarded message without attachments")
        for document in documents:
            self._add(container, FORWARDED_CONTAINER, document)


_FORWARDED_TYPES = frozenset({"message/rfc822", "message/global"})


def _forwarded(
    data: bytes, floor: int, forwarded: str, depth: int, budget: list[int]
) -> tuple[list[Attachment], list[SkippedPart], str | None] | None:
    """The candidate documents, skipped parts and sender of a forwarded mail (its own
    forwarded mail opened by the same policy); None when it is nested deeper than
    MAX_FORWARD_DEPTH, would take the mail past its parts budget (``max_parts`` for
    the whole mail, forwards included: the outer mail's limits cannot see inside a
    base64-encoded forward), or cannot be parsed: it is then kept whole, as an .eml."""
    if depth >= MAX_FORWARD_DEPTH:
        return None
    parts = data.lower().count(b"content-type:")  # at least its parts: a bound, cheap
    if parts > budget[0]:
        return None
    budget[0] -= parts
    try:
        parsed = parse_mail(
            data, inline_image_floor=floor, forwarded=forwarded, _depth=depth + 1, _budget=budget
        )
    except MailParseError:
        return None
    return list(parsed.attachments), list(parsed.skipped), parsed.sender


def _extract_parts(
    hollowed: Hollowed,
    message: email.message.Message,
    floor: int,
    defects: _Defects,
) -> tuple[list[Attachment], list[SkippedPart], int]:
    """The candidate documents and the skipped parts, and how many leaves there are."""
    attachments: list[Attachment] = []
    skipped: list[SkippedPart] = []
    have_plain = have_html = False
    locations: dict[int, tuple[int, int]] | None = None  # computed on first message/*
    leaves = 0

    for index, leaf in enumerate(_walk_leaves(message)):
        leaves = index + 1
        part = leaf.part
        ctype = part.get_content_type().lower()
        where = f"part {index} ({ctype})"
        disposition = _disposition(part)
        try:
            filename = _filename(part, defects, where)
        except Exception as exc:  # noqa: BLE001 - a filename must never cost us the part
            defects.add(f"{where}: filename unreadable ({type(exc).__name__})")
            filename = None
        content_id = _content_id(part)
        is_attachment = disposition not in (None, "inline")
        inline = disposition == "inline" or (disposition is None and content_id is not None)

        if (
            ctype in ("text/plain", "text/html")
            and filename is None
            and not is_attachment
            and not leaf.in_attachment
        ):
            if ctype == "text/plain" and not have_plain:
                have_plain = True
                continue
            if ctype == "text/html" and not have_html:
                have_html = True
                continue
            size = len(_payload_bytes(part, defects, where, hollowed))
            skipped.append(SkippedPart(index, ctype, size, "additional body text part"))
            continue

        payload_list = part.get_payload()
        if part.get_content_maintype() == "message" and isinstance(payload_list, list):
            if locations is None:
                locations = _or_default(lambda: _locate(hollowed.raw, message), {})
            payload = hollowed.restore(
                _message_bytes(hollowed, part, locations or {}, defects, where)
            )
            if filename is None and ctype != "message/delivery-status":
                filename = _inner_subject_filename(payload)
        else:
            payload = _payload_bytes(part, defects, where, hollowed)

        if leaf.parent_type == "multipart/signed" and ctype in _SIGNATURE_TYPES:
            skipped.append(
                SkippedPart(index, ctype, len(payload), "signature part of multipart/signed")
            )
            continue
        if leaf.parent_type == "multipart/encrypted" and ctype == "application/pgp-encrypted":
            skipped.append(
                SkippedPart(index, ctype, len(payload), "control part of multipart/encrypted")
            )
            continue
        if (
            part.get_content_maintype() == "image"
            and inline
            and not is_attachment
            and len(payload) < floor
        ):
            skipped.append(
                SkippedPart(index, ctype, len(payload), f"inline image below {floor}-byte floor")
            )
            continue

        attachments.append(
            Attachment(
                filename=filename,
                content_type=ctype,
                payload=payload,
                inline=inline,
                content_id=content_id,
                index=index,
            )
        )
    return attachments, skipped, leaves


def _payload_bytes(
    part: email.message.Message, defects: _Defects, where: str, hollowed: Hollowed
) -> bytes:
    """Decoded payload of a leaf; the stdlib is lenient with broken base64/QP."""
    data: object
    try:
        data = decoded_payload(part, hollowed)
        if data is None:
            data = part.get_payload(decode=True)
    except Exception as exc:  # noqa: BLE001 - one bad part must not kill the mail
        defects.add(f"{where}: payload not decodable ({type(exc).__name__}); raw bytes kept")
        raw_payload = part.get_payload()
        data = hollowed.restore(
            raw_payload.encode("utf-8", "surrogateescape") if isinstance(raw_payload, str) else b""
        )
    ctype = part.get_content_type()
    for defect in part.defects:
        defects.add(f"{ctype}: {type(defect).__name__}: {defect.__doc__ or ''}")
    if isinstance(data, bytes):
        return data
    return b""


def _inner_subject_filename(data: bytes) -> str | None:
    """``"<Subject>.eml"`` from the header block of an encapsulated message's bytes."""
    try:
        headers = email.message_from_bytes(data[: _body_start(data, 0, len(data))])
        subject = _header(headers, "subject")
        if subject is None:
            return None
        subject = " ".join(_decode_encoded_words(subject).split())
    except Exception:  # noqa: BLE001 - no name is better than no document
        return None
    subject = subject.replace("/", "-").replace("\\", "-")
    return f"{subject}.eml" if subject else None


# --------------------------------------------------------------------------
# message/rfc822: original bytes
# --------------------------------------------------------------------------

_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_EOL_AT_END = re.compile(rb"(?:\r\n|\r|\n)\Z")


def _body_start(data: bytes, start: int, end: int) -> int:
    """Offset of the body of the entity in ``data[start:end]`` (as the feedparser sees it)."""
    for match in _LINE.finditer(data, start, end):
        line = match.group()
        if _HEADER_LINE.match(line):
            continue
        if line[:1] in (b"\r", b"\n"):
            return match.end()  # the blank separator line is not body
        return match.start()  # header/body separator missing: this line is body
    return end


def _split_multipart(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the body parts of a multipart body in ``data[start:end]``.

    Mirrors ``email.feedparser``: delimiter lines are ``--boundary`` plus
    optional ``--`` and blanks; the line break before a delimiter belongs to
    the delimiter; consecutive delimiters yield no empty parts.
    """
    delimiter = re.compile(re.escape(b"--" + boundary) + rb"(--)?[ \t]*(?:\r\n|\r|\n)?\Z")
    ranges: list[tuple[int, int]] = []
    part_start: int | None = None
    after_delimiter = False
    for match in _LINE.finditer(data, start, end):
        found = delimiter.match(match.group())
        if found:
            if part_start is not None and not after_delimiter:
                ranges.append((part_start, _strip_eol(data, part_start, match.start())))
                part_start = None
            if part_start is None and not after_delimiter and found.group(1):
                return ranges  # close delimiter
            after_delimiter = True
            continue
        if after_delimiter:
            part_start = match.start()
            after_delimiter = False
    if part_start is not None:
        ranges.append((part_start, _strip_eol(data, part_start, end)))
    elif after_delimiter:
        ranges.append((end, end))  # the feedparser makes an empty part here
    return ranges


def _strip_eol(data: bytes, start: int, end: int) -> int:
    found = _EOL_AT_END.search(data, start, end)
    return found.start() if found else end


def _locate(raw: bytes, message: email.message.Message) -> dict[int, tuple[int, int]]:
    """Map ``id(part)`` of every locatable ``message/*`` part to its body range in ``raw``."""
    found: dict[int, tuple[int, int]] = {}
    stack: list[tuple[email.message.Message, int, int]] = [(message, 0, len(raw))]
    while stack:
        part, start, end = stack.pop()
        if not part.is_multipart():
            continue
        payload = _sub_messages(part)
        body = _body_start(raw, start, end)
        maintype = part.get_content_maintype()
        if maintype == "multipart":
            boundary = part.get_boundary()
            if boundary is None:
                continue
            try:
                boundary_bytes = boundary.encode("ascii", "surrogateescape")
            except UnicodeEncodeError:
                continue
            ranges = _split_multipart(raw, body, end, boundary_bytes)
            if len(ranges) != len(payload):
                continue  # our split disagrees with the stdlib: locate nothing below
            for child, (child_start, child_end) in zip(payload, ranges, strict=True):
                stack.append((child, child_start, child_end))
        elif maintype == "message":
            found[id(part)] = (body, end)
            cte = str(part.get("content-transfer-encoding", "")).strip().lower()
            if len(payload) == 1 and cte in ("", "7bit", "8bit", "binary"):
                stack.append((payload[0], body, end))
    return found


def _sub_messages(part: email.message.Message) -> list[email.message.Message]:
    payload = part.get_payload()
    if not isinstance(payload, list):
        return []
    return [p for p in payload if isinstance(p, email.message.Message)]


def _parses_to(data: bytes, expected: list[tuple[object, ...]], hollowed: Hollowed) -> bool:
    """Whether ``data`` (hollowed, like the parse ``expected`` comes from) parses to it."""
    try:
        message = email.message_from_bytes(data)
        unfold(message, hollowed)
        return _signature(message) == expected
    except Exception:  # noqa: BLE001 - whatever goes wrong, it did not verify
        return False


def _signature(message: email.message.Message) -> list[tuple[object, ...]]:
    """What a parse yields, minus preamble/epilogue: enough to verify a slice."""
    out: list[tuple[object, ...]] = []
    for part in message.walk():
        payload = part.get_payload()
        out.append(
            (
                tuple((k, str(v)) for k, v in part.raw_items()),
                part.get_content_type(),
                payload if isinstance(payload, str) else None,
            )
        )
    return out


def _message_bytes(
    hollowed: Hollowed,
    part: email.message.Message,
    locations: dict[int, tuple[int, int]],
    defects: _Defects,
    where: str,
) -> bytes:
    """The bytes of an encapsulated message: the original slice when it verifies.

    Slices are of ``hollowed.raw``; the caller puts the hollowed lines back.
    """
    raw = hollowed.raw
    payload = _sub_messages(part)
    inner = payload[0] if len(payload) == 1 else None
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    location = locations.get(id(part))
    sliced = raw[location[0] : location[1]] if location else None

    if sliced is not None and cte in ("base64", "quoted-printable"):
        # Not allowed by RFC 2046, but some clients do it; the stdlib then
        # parsed the encoded text, so there is nothing to verify against.
        defects.add(f"{where}: encapsulated message with {cte} encoding decoded")
        encoded = hollowed.restore(sliced)
        try:
            if cte == "base64":
                return base64.b64decode(b"".join(encoded.split()) + b"==", validate=False)
            return quopri.decodestring(encoded)
        except (binascii.Error, ValueError):
            return encoded

    if inner is None:  # message/delivery-status & co.: several header blocks
        if sliced is not None:
            return sliced
        defects.add(f"{where}: body re-serialised (not located in the raw bytes)")
        return b"\n".join(_as_bytes(p) or b"" for p in payload)

    try:
        expected: list[tuple[object, ...]] | None = _signature(inner)
    except Exception:  # noqa: BLE001 - no signature: the check is skipped, not failed
        expected = None
    if sliced is not None and expected is not None and location is not None:
        # The stdlib leaves the line break that belongs to the next boundary
        # on an encapsulated message's last payload: accept either form, keep
        # the RFC 2046 one (without it).
        after = location[1]
        eol = (
            2
            if raw[after : after + 2] == b"\r\n"
            else 1
            if raw[after : after + 1] in (b"\r", b"\n")
            else 0
        )
        for candidate in (sliced, raw[location[0] : after + eol]):
            if _parses_to(candidate, expected, hollowed):
                return sliced

    serialised = _as_bytes(inner)
    if serialised is not None:
        round_trips = expected is not None and _parses_to(serialised, expected, hollowed)
        defects.add(
            f"{where}: original bytes of the encapsulated message not recovered; "
            + ("re-serialised (round-trips)" if round_trips else "re-serialised (lossy)")
        )
        if round_trips or sliced is None:
            return serialised
    if sliced is not None:
        defects.add(f"{where}: unverified slice of the original bytes kept")
        return sliced
    defects.add(f"{where}: encapsulated message could not be serialised")
    return b""


def _as_bytes(message: email.message.Message) -> bytes | None:
    try:
        return message.as_bytes()
    except Exception:  # noqa: BLE001 - e.g. a header the generator cannot fold
        return None


# --------------------------------------------------------------------------
# Identity of a mail across deliveries, and of a document's bytes
# --------------------------------------------------------------------------

# headers the sender wrote: the same in every delivery of one mail (trace headers such
# as Received, Delivered-To, Return-Path, Authentication-Results differ per delivery)
_AUTHOR_HEADERS = ("from", "sender", "to", "cc", "date", "subject", "in-reply-to", "references")


def message_key(raw: bytes, message_id: str | None) -> str:
    """One key for every delivery of the same mail: its Message-ID, else a hash of the
    headers its author wrote and of its body (what a relay adds on the way is left out,
    so two deliveries of one mail without a Message-ID are still recognised)."""
    if message_id:
        return message_id
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=-1)
    head, body = (raw, b"") if end < 0 else (raw[:end], raw[end:].lstrip(b"\r\n"))
    parsed = email.message_from_bytes(head + b"\n\n", policy=email.policy.compat32)
    digest = hashlib.sha256()
    for name in _AUTHOR_HEADERS:
        for value in parsed.get_all(name) or []:
            folded = " ".join(str(value).split())
            digest.update(f"{name}:{folded}\n".encode("utf-8", "surrogateescape"))
    digest.update(b"\n")
    digest.update(body.replace(b"\r\n", b"\n"))
    return "content:" + digest.hexdigest()


def document_payload(raw: bytes, sha256: str) -> bytes | None:
    """The bytes of the part of ``raw`` whose SHA-256 is ``sha256``, or None.

    Re-extracting a document (its staged copy expired) never screens the mail again:
    settings may have changed since it was planned, and the bytes sent must be the
    bytes planned, found by their hash."""
    try:
        parsed = parse_mail(raw, inline_image_floor=0, forwarded="both")  # every candidate
    except MailParseError:
        return None
    for attachment in parsed.attachments:
        if hashlib.sha256(attachment.payload).hexdigest() == sha256:
            return attachment.payload
    return None
