"""Outlook's ``winmail.dat`` (TNEF, ``application/ms-tnef``): the files inside it.

An Outlook that sends "Rich Text" mail wraps every attachment in one TNEF part; the
customer's passport is in there. :func:`unpack` takes the files out with tnefparse
(a maintained pure-Python decoder); each is then sniffed and screened like any other
part. A TNEF part is recognised by its bytes (the signature ``0x223E9F78``), not by
its name or declared type. One that cannot be decoded, or whose checksums say it is
damaged, raises :class:`TnefError`: its part is refused with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tnefparse

__all__ = ["SIGNATURE", "TnefError", "TnefFile", "is_tnef", "unpack"]

SIGNATURE = b"\x78\x9f\x3e\x22"  # 0x223E9F78, little-endian

# tnefparse logs each checksum it finds wrong (and more) as a warning; the verdict is
# ours to give, once, in the part's reason
logging.getLogger("tnefparse").setLevel(logging.ERROR)


class TnefError(ValueError):
    """A TNEF part that cannot be unpacked (the reason says why)."""


@dataclass(frozen=True)
class TnefFile:
    filename: str | None  # the long file name when Outlook gave one, else the 8.3 name
    payload: bytes


def is_tnef(payload: bytes) -> bool:
    return payload[:4] == SIGNATURE


# Outlook writes a few objects per attachment and a dozen for the message (the real
# files of tests/data/tnef hold 3 to 34). tnefparse copies the rest of the stream for
# every object it reads, and parses an embedded message (an Outlook item attached in
# rich text) as a whole TNEF of its own, recursively: both are bounded before it runs.
MAX_OBJECTS = 500
MAX_EMBEDDED = 1
_EMBEDDED_MESSAGE = b"\x07\x03\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"


def unpack(data: bytes) -> list[TnefFile]:
    """The files attached inside a TNEF stream, in order (the message body it may also
    carry is not a document and is left out). Raises :class:`TnefError`."""
    objects = _count_objects(data)
    if objects > MAX_OBJECTS:
        raise TnefError(f"winmail.dat (TNEF) holds more than {MAX_OBJECTS} objects: not unpacked")
    if data.count(_EMBEDDED_MESSAGE) > MAX_EMBEDDED:
        raise TnefError(
            "winmail.dat (TNEF) holds Outlook messages nested in each other: not unpacked"
        )
    try:
        tnef = tnefparse.TNEF(data, do_checksum=True)
    except Exception as exc:  # any decoder failure is this part's outcome
        raise TnefError(f"cannot unpack winmail.dat (TNEF): {type(exc).__name__}") from exc
    if _cut_short(data, tnef.objects):
        raise TnefError("winmail.dat (TNEF) is cut short: an object runs past its end")
    if not all(obj.good_checksum for obj in tnef.objects):
        raise TnefError("winmail.dat (TNEF) is damaged: a checksum does not match its data")
    try:
        return [_file(attachment) for attachment in tnef.attachments]
    except Exception as exc:  # whatever tnefparse left in a property: this part's outcome
        raise TnefError(f"cannot unpack winmail.dat (TNEF): {type(exc).__name__}") from exc


def _file(attachment: object) -> TnefFile:
    try:
        name = attachment.long_filename() or attachment.name or None  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a name must never cost us the file
        name = None
    data = getattr(attachment, "data", b"")
    payload = bytes(data) if isinstance(data, bytes | bytearray) else b""
    text = name.decode("latin-1") if isinstance(name, bytes | bytearray) else name
    if not isinstance(text, str):
        text = None  # a name property of another type: no name
    text = text.strip("\x00 ") if text else None
    return TnefFile(text or None, payload)


def _count_objects(data: bytes) -> int:
    """How many top-level objects the stream declares, from their headers alone (an
    object: level 1 byte, id 4, length 4, data, checksum 2)."""
    count, offset = 0, 6
    while offset + 9 <= len(data) and count <= MAX_OBJECTS:
        offset += int.from_bytes(data[offset + 5 : offset + 9], "little") + 11
        count += 1
    return count


def _cut_short(data: bytes, objects: list[object]) -> bool:
    """An object whose declared length (a 32-bit count at byte 5 of its header, plus
    the 11 bytes of header and checksum) runs past the end: tnefparse keeps what there
    is, silently."""
    offset = 6
    for obj in objects:
        declared = int.from_bytes(data[offset + 5 : offset + 9], "little") + 11
        if offset + declared > len(data):
            return True
        offset += int(getattr(obj, "length", declared))
    return False
