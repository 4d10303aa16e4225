"""A minimal TNEF writer for hostile cases only (streams no Outlook would write: nested
embedded messages, thousands of objects, odd property types). The ordinary cases use
real Outlook files (tests/data/tnef). Written by an adversarial review of issue 13."""

from __future__ import annotations

import struct

SIG = b"\x78\x9f\x3e\x22"


def obj(level: int, name: int, typ: int, data: bytes) -> bytes:
    return (
        struct.pack("<BHHI", level, name, typ, len(data))
        + data
        + struct.pack("<H", sum(data) & 0xFFFF)
    )


def version() -> bytes:
    return obj(1, 0x9006, 0x0008, struct.pack("<I", 0x10000))


def attachment(name: bytes, data: bytes) -> bytes:
    return (
        obj(2, 0x9002, 0x0006, b"\x01\x00\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00")
        + obj(2, 0x8010, 0x0001, name + b"\x00")
        + obj(2, 0x800F, 0x0006, data)
    )


def tnef(*attachments: bytes, key: int = 0x1234) -> bytes:
    return SIG + struct.pack("<H", key) + version() + b"".join(attachments)


IMESSAGE_SIG = b"\x07\x03\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"


def embedded(inner_tnef: bytes) -> bytes:
    """An attachment whose attAttachment MAPI props hold PR_ATTACH_DATA_OBJ = embedded msg."""
    blob = IMESSAGE_SIG + inner_tnef
    pad = (-len(blob)) % 4
    # MAPI props: count 1; type OBJECT (0x000D), ATTACH_DATA_OBJ (0x3701); 1 value; len; data
    mapi = struct.pack("<IHHII", 1, 0x000D, 0x3701, 1, len(blob)) + blob + b"\x00" * pad
    return obj(
        2, 0x9002, 0x0006, b"\x01\x00\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00"
    ) + obj(2, 0x9005, 0x0006, mapi)
