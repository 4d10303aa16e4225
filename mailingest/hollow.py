"""Large base64 bodies kept out of the stdlib's MIME parser.

``email``'s feed parser handles a message line by line: a 25 MB attachment is
about 460,000 line objects while it parses, and again while ``get_payload``
decodes it. Parsing a 35 MB mail that way peaks near eight times its size and
takes about a second. So before parsing, every run of at least
:data:`MIN_LINES` lines made only of base64 characters is replaced by one
placeholder line; the parser then sees the same sequence of header, boundary and
body lines (a base64 line can be neither a header line nor a ``--boundary``
line), only fewer of them. Decoding a part that holds a placeholder puts its
lines back and decodes them the way ``email`` itself does
(``email._encoded_words.decode_b``, same defects), from one buffer instead of
hundreds of thousands of lines. ``tests/test_hollow.py`` checks that a mail
parses to exactly the same result either way, hostile corpus included.
"""

from __future__ import annotations

import email._encoded_words as encoded_words
import email.message
import functools
import os
import re
from dataclasses import dataclass, field

from mailparser.utils import decode_header_part, mime_header_view

MIN_LINES = 256  # about 19 KB of base64: smaller bodies are cheap to parse as they are

_ALPHABET = rb"[A-Za-z0-9+/]{1,998}={0,2}"


@functools.lru_cache(maxsize=4)
def _runs(min_lines: int) -> re.Pattern[bytes]:
    return re.compile(rb"(?:^%s\r?\n){%d,}" % (_ALPHABET, min_lines), re.M)


@dataclass
class Hollowed:
    """A mail with its long base64 runs replaced by placeholder lines."""

    raw: bytes  # what the parser gets
    # placeholder -> the lines it replaced, but for the last line break
    runs: dict[bytes, bytes] = field(default_factory=dict)

    def restore(self, data: bytes) -> bytes:
        """``data`` (a slice of :attr:`raw`) with the original lines back."""
        for placeholder, lines in self.runs.items():
            if placeholder in data:
                data = data.replace(placeholder, lines)
        return data

    def holds(self, text: str) -> bool:
        return any(p.decode("ascii") in text for p in self.runs)


def hollow(raw: bytes, *, min_lines: int | None = None) -> Hollowed:
    matches = list(_runs(MIN_LINES if min_lines is None else min_lines).finditer(raw))
    if not matches:
        return Hollowed(raw)
    tag = _tag(raw)
    out: list[bytes] = []
    runs: dict[bytes, bytes] = {}
    last = 0
    for n, match in enumerate(matches):
        lines = match.group()
        eol = b"\r\n" if lines.endswith(b"\r\n") else b"\n"
        # base64 of its own, length a multiple of 4: it decodes without a defect. It
        # stands for the lines without their last line break, which stays in place (the
        # parser gives the break before a boundary to the boundary, not to the body).
        placeholder = b"%sx%08d" % (tag, n)
        runs[placeholder] = lines[: -len(eol)]
        out += [raw[last : match.start()], placeholder, eol]
        last = match.end()
    out.append(raw[last:])
    return Hollowed(b"".join(out), runs)


def _tag(raw: bytes) -> bytes:
    """A random 23-character base64 word the mail does not contain."""
    while True:
        tag = b"MiHoLLoW" + os.urandom(12).hex()[:15].encode()
        if tag not in raw:
            return tag


def unfold(message: email.message.Message, hollowed: Hollowed) -> None:
    """Put the original lines back everywhere but in base64 bodies of non-text leaves.

    Those are the documents, and only they are decoded through :func:`decoded_payload`;
    text parts, preambles and epilogues get their own text back, so whatever reads
    them (mail-parser's body and charset checks) sees the mail as it came.
    """
    if not hollowed.runs:
        return
    for part in message.walk():
        for attribute in ("preamble", "epilogue"):
            text = getattr(part, attribute, None)
            if isinstance(text, str) and hollowed.holds(text):
                setattr(part, attribute, _restored(text, hollowed))
        payload = _raw_payload(part)
        if not isinstance(payload, str) or not hollowed.holds(payload):
            continue
        if _decodes_here(part):
            continue
        part.set_payload(_restored(payload, hollowed))  # a str, no charset: stored as is


def _raw_payload(part: email.message.Message) -> object:
    """The payload as the parser stored it (``get_payload()`` may re-decode the text)."""
    return getattr(part, "_payload", None)


def _decodes_here(part: email.message.Message) -> bool:
    """A document only :func:`decoded_payload` decodes: base64 as ``get_payload`` reads
    the header, not text, and an attachment in mail-parser's eyes (named, or disposition
    attachment), so mail-parser keeps its encoded text and never decodes it as a body."""
    cte = str(part.get("content-transfer-encoding", "")).lower()  # as get_payload reads it
    if cte != "base64" or part.get_content_maintype() == "text" or part.is_multipart():
        return False
    try:
        view, _ = mime_header_view(part)
        named = decode_header_part(view.get_filename(), defects=[])
        return bool(named) or str(view.get_content_disposition()).lower() == "attachment"
    except Exception:  # noqa: BLE001 - when in doubt, the part gets its own text back
        return False


def _restored(text: str, hollowed: Hollowed) -> str:
    return hollowed.restore(text.encode("ascii", "surrogateescape")).decode(
        "ascii", "surrogateescape"
    )


def decoded_payload(part: email.message.Message, hollowed: Hollowed) -> bytes | None:
    """The decoded body of ``part`` if it still holds a placeholder, else None.

    Does what ``Message.get_payload(decode=True)`` does for a base64 body, defects
    included, without splitting the body into lines.
    """
    payload = _raw_payload(part)
    if not isinstance(payload, str) or not hollowed.holds(payload):
        return None
    body = hollowed.restore(payload.encode("ascii", "surrogateescape"))
    value, defects = encoded_words.decode_b(_joined(body))
    for defect in defects:
        part.policy.handle_defect(part, defect)
    return value


def _joined(body: bytes) -> bytes:
    """``b"".join(body.splitlines())`` without making a list of its lines."""
    if b"\r" in body and body.count(b"\r") != body.count(b"\r\n"):
        return b"".join(body.splitlines())  # a lone CR also ends a line
    return body.replace(b"\r\n", b"").replace(b"\n", b"")
