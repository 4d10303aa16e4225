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


def unpack(data: bytes) -> list[TnefFile]:
    """The files attached inside a TNEF stream, in order (the message body it may also
    carry is not a document and is left out). Raises :class:`TnefError`."""
    try:
        tnef = tnefparse.TNEF(data, do_checksum=True)
    except Exception as exc:  # any decoder failure is this part's outcome
        raise TnefError(f"cannot unpack winmail.dat (TNEF): {type(exc).__name__}") from exc
    if _cut_short(data, tnef.objects):
        raise TnefError("winmail.dat (TNEF) is cut short: an object runs past its end")
    if not all(obj.good_checksum for obj in tnef.objects):
        raise TnefError("winmail.dat (TNEF) is damaged: a checksum does not match its data")
    files: list[TnefFile] = []
    for attachment in tnef.attachments:
        try:
            name = attachment.long_filename() or attachment.name or None
        except Exception:  # noqa: BLE001 - a name must never cost us the file
            name = None
        payload = attachment.data if isinstance(attachment.data, bytes) else b""
        text = name.decode("latin-1") if isinstance(name, bytes) else name
        files.append(TnefFile(text.strip("\x00 ") or None if text else None, payload))
    return files


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
