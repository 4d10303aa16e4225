"""What an attachment really is, decided from its bytes (pure logic, no I/O).

Mail attachments come from the internet, so the filename and the declared
``Content-Type`` are whatever the sender wanted them to be.  :func:`sniff`
looks at the content only (magic numbers, container directories, text
shape) and says what the bytes are, which MIME type and extension Alloy
should be given for them, and whether an identity-document upload may carry
them at all.

Allowed (:data:`ALLOWED_KINDS`): documents and images a customer plausibly
sends as proof of identity or address -- PDF, JPEG, PNG, GIF, TIFF,
HEIC/HEIF, AVIF, WebP, BMP, Word/Excel (``docx``, ``xlsx``, legacy OLE2
``doc``/``xls``), ODF text, RTF, plain text and forwarded mail (``eml``).

Refused: archives (they hide their content from this check), executables and
scripts, HTML and SVG (active content a browser would run), Office documents
carrying VBA or XLM macros (``macro``), OLE2 files that are neither a Word
document nor an Excel workbook (``ole``: MSI installers are classified
``exe``, Outlook ``.msg``, PowerPoint, password-encrypted OOXML...), anything
unrecognised, and empty data.

Work is bounded: magic and text checks read at most the first
:data:`SCAN_LIMIT` bytes; a ZIP's central directory (never a member's data,
apart from an ODF ``mimetype`` entry of at most 255 bytes) and an OLE2
directory chain are the only structures followed, both with hard caps.
:func:`sniff` never raises.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from dataclasses import dataclass

__all__ = [
    "ALLOWED_KINDS",
    "KNOWN_KINDS",
    "SCAN_LIMIT",
    "Sniffed",
    "sniff",
]

SCAN_LIMIT = 64 * 1024  # bytes looked at for magic numbers and text checks
_PDF_WINDOW = 1024  # Acrobat finds "%PDF-" anywhere in the first KiB
_MAX_ZIP_CD_BYTES = 1024 * 1024  # central directory larger than this: refused as "zip"
_MAX_ZIP_ENTRIES = 10_000
_MAX_ZIP_MIMETYPE = 255  # ODF "mimetype" member is a few dozen bytes
_MAX_OLE_DIR_SECTORS = 256
_MAX_CONTROL_RATIO = 0.01  # C0 control characters tolerated in "txt"


@dataclass(frozen=True)
class Sniffed:
    kind: str  # canonical short name, one of KNOWN_KINDS
    mime: str  # e.g. "application/pdf"
    extension: str  # extension Alloy should get for this content, lower case, no dot
    allowed: bool  # True iff kind in ALLOWED_KINDS


# kind -> (mime, extension)
_TYPES: dict[str, tuple[str, str]] = {
    # allowed
    "pdf": ("application/pdf", "pdf"),
    "jpeg": ("image/jpeg", "jpg"),
    "png": ("image/png", "png"),
    "gif": ("image/gif", "gif"),
    "tiff": ("image/tiff", "tif"),
    "heic": ("image/heic", "heic"),
    "avif": ("image/avif", "avif"),
    "webp": ("image/webp", "webp"),
    "bmp": ("image/bmp", "bmp"),
    "docx": (
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "docx",
    ),
    "xlsx": ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx"),
    "odt": ("application/vnd.oasis.opendocument.text", "odt"),
    "doc": ("application/msword", "doc"),  # an OLE2 Excel workbook: vnd.ms-excel, xls
    "rtf": ("application/rtf", "rtf"),
    "txt": ("text/plain", "txt"),
    "eml": ("message/rfc822", "eml"),
    # refused
    "zip": ("application/zip", "zip"),
    "rar": ("application/vnd.rar", "rar"),
    "7z": ("application/x-7z-compressed", "7z"),
    "gzip": ("application/gzip", "gz"),
    "bzip2": ("application/x-bzip2", "bz2"),
    "xz": ("application/x-xz", "xz"),
    "tar": ("application/x-tar", "tar"),
    "exe": ("application/vnd.microsoft.portable-executable", "exe"),  # MSI: x-msi, msi
    "elf": ("application/x-executable", "elf"),
    "macho": ("application/x-mach-binary", "macho"),
    "script": ("text/x-shellscript", "sh"),
    "html": ("text/html", "html"),
    "svg": ("image/svg+xml", "svg"),
    "macro": ("application/vnd.ms-word.document.macroEnabled.12", "docm"),  # per container
    "ole": ("application/x-ole-storage", "ole"),
    "unknown": ("application/octet-stream", "bin"),
    "empty": ("application/x-empty", "bin"),
}

KNOWN_KINDS: frozenset[str] = frozenset(_TYPES)

ALLOWED_KINDS: frozenset[str] = frozenset(
    {
        "pdf",
        "jpeg",
        "png",
        "gif",
        "tiff",
        "heic",
        "avif",
        "webp",
        "bmp",
        "docx",
        "xlsx",
        "odt",
        "doc",
        "rtf",
        "txt",
        "eml",
    }
)


def _result(kind: str, mime: str = "", extension: str = "") -> Sniffed:
    default_mime, default_extension = _TYPES[kind]
    return Sniffed(
        kind=kind,
        mime=mime or default_mime,
        extension=extension or default_extension,
        allowed=kind in ALLOWED_KINDS,
    )


def sniff(data: bytes, *, declared_type: str = "", filename: str = "") -> Sniffed:
    """Classify ``data`` from its content.

    ``declared_type`` (the part's ``Content-Type``) matters in one case only:
    text without any magic number is taken as a forwarded mail (``eml``) when
    it was declared ``message/rfc822`` and starts with a header block.
    ``filename`` is never consulted; it is accepted so callers can pass what
    they have without the decision depending on it.

    Never raises: an unexpected error while looking at hostile bytes gives
    ``unknown`` (refused).
    """
    try:
        return _sniff(bytes(data), declared_type)
    except Exception:  # noqa: BLE001 - fail closed on anything a parser did not foresee
        return _result("unknown")


def _sniff(data: bytes, declared_type: str) -> Sniffed:
    if not data:
        return _result("empty")
    head = data[:SCAN_LIMIT]
    found = _magic(data, head)
    if found is not None:
        return found
    return _textual(data, head, declared_type)


# --------------------------------------------------------------------------
# Magic numbers at fixed offsets
# --------------------------------------------------------------------------

_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
_HEIF_GENERIC_BRANDS = frozenset({b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

_MACHO = (
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",  # fat binary (also a Java class file: refused all the same)
    b"\xca\xfe\xba\xbf",
    b"\xbe\xba\xfe\xca",
    b"\xbf\xba\xfe\xca",
)

# Refused magics come first; the tar check (offset 257) before everything, so
# a PDF/JPEG that is also a valid tar header is refused rather than allowed.
_SIMPLE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"MZ", "exe"),
    (b"\x7fELF", "elf"),
    *((magic, "macho") for magic in _MACHO),
    (b"#!", "script"),
    (b"Rar!\x1a\x07", "rar"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"%PDF-", "pdf"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"{\\rtf", "rtf"),
)


def _magic(data: bytes, head: bytes) -> Sniffed | None:
    if head[257:265] in (b"ustar\x0000", b"ustar  \x00"):
        return _result("tar")
    for magic, kind in _SIMPLE_MAGIC:
        if head.startswith(magic):
            return _result(kind)
    if head.startswith(b"BZh") and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return _result("bzip2")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _result("webp")
    if head[4:8] == b"ftyp":
        return _isobmff(head)
    if head.startswith(b"BM") and _plausible_bmp(head):
        return _result("bmp")
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return _ole2(data)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return _zip(data)
    return None


def _isobmff(head: bytes) -> Sniffed:
    """HEIC/HEIF/AVIF by the ``ftyp`` box; other ISO BMFF (MP4, MOV...) is unknown."""
    (box_size,) = struct.unpack_from(">I", head, 0)
    major = head[8:12]
    if major in _HEIC_BRANDS:
        return _result("heic")
    if major in _AVIF_BRANDS:
        return _result("avif")
    if major in _HEIF_GENERIC_BRANDS:
        end = min(box_size, len(head)) if box_size >= 16 else 16
        compatible = {head[i : i + 4] for i in range(16, end - 3, 4)}
        if compatible & _AVIF_BRANDS:
            return _result("avif")
        return _result("heic")
    return _result("unknown")


_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def _plausible_bmp(head: bytes) -> bool:
    """``BM`` alone is two letters of text; require a sane header after it."""
    if len(head) < 26:
        return False
    pixel_offset, dib_size = struct.unpack_from("<II", head, 10)
    if dib_size not in _BMP_DIB_SIZES or pixel_offset < 14 + dib_size:
        return False
    planes_at = 22 if dib_size == 12 else 26
    if len(head) < planes_at + 2:
        return False
    (planes,) = struct.unpack_from("<H", head, planes_at)
    return bool(planes == 1)


# --------------------------------------------------------------------------
# ZIP: OOXML / ODF, or refused
# --------------------------------------------------------------------------

_ODT_MIME = b"application/vnd.oasis.opendocument.text"


def _zip(data: bytes) -> Sniffed:
    if not _zip_directory_bounded(data):
        return _result("zip")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            names = [info.filename.replace("\\", "/").lower() for info in infos]
            if "[content_types].xml" in names:
                macros = any(
                    name.endswith("vbaproject.bin") or name.startswith("xl/macrosheets/")
                    for name in names
                )
                if any(name.startswith("word/") for name in names):
                    if macros:
                        return _result(
                            "macro", "application/vnd.ms-word.document.macroEnabled.12", "docm"
                        )
                    return _result("docx")
                if any(name.startswith("xl/") for name in names):
                    if macros:
                        return _result(
                            "macro", "application/vnd.ms-excel.sheet.macroEnabled.12", "xlsm"
                        )
                    return _result("xlsx")
            mimetype = next((info for info in infos if info.filename == "mimetype"), None)
            if (
                mimetype is not None
                and mimetype.file_size <= _MAX_ZIP_MIMETYPE
                and mimetype.compress_size <= _MAX_ZIP_MIMETYPE
                and mimetype.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                and archive.read(mimetype).strip() == _ODT_MIME
            ):
                return _result("odt")
    except Exception:  # noqa: BLE001 - BadZipFile, struct.error, encrypted member, bad CRC...
        return _result("zip")
    return _result("zip")


def _zip_directory_bounded(data: bytes) -> bool:
    """Whether the central directory is small enough to hand to :mod:`zipfile`.

    ``zipfile`` parses every central-directory entry up front, so a 25 MB
    archive of empty members costs seconds.  This finds the end-of-central-
    directory record exactly as ``zipfile._EndRecData`` does (including its
    ZIP64 twin, which ``zipfile`` prefers whenever a locator precedes the
    record) and checks the directory size and entry count declared there.
    False for oversized or unlocatable directories (both refused as ``zip``).
    """
    if data[-22:-18] == b"PK\x05\x06" and data[-2:] == b"\x00\x00":
        eocd = len(data) - 22
    else:
        eocd = data.rfind(b"PK\x05\x06", max(0, len(data) - (1 << 16) - 22))
        if eocd < 0 or len(data) - eocd < 22:
            return False
    entries, cd_size = struct.unpack_from("<HI", data, eocd + 10)
    locator = eocd - 20
    if locator >= 0 and data[locator : locator + 4] == b"PK\x06\x07":
        record = locator - 56
        if record >= 0 and data[record : record + 4] == b"PK\x06\x06":
            entries, cd_size = struct.unpack_from("<QQ", data, record + 32)
    return bool(entries <= _MAX_ZIP_ENTRIES and cd_size <= _MAX_ZIP_CD_BYTES)


# --------------------------------------------------------------------------
# OLE2 compound files: Word / Excel, macros, MSI, or refused
# --------------------------------------------------------------------------

_MSI_CLSIDS = frozenset(
    {
        # {000C1084-...} installer, {000C1086-...} patch, {000C1082-...} transform
        bytes.fromhex("84100c00000000000000000000000046"),
        bytes.fromhex("86100c00000000000000000000000046"),
        bytes.fromhex("82100c00000000000000000000000046"),
    }
)
_OLE_MACRO_NAMES = frozenset({"macros", "_vba_project_cur", "vba", "_vba_project"})
_OLE_LAST_SECTOR = 0xFFFFFFF9  # above: DIFSECT, FATSECT, ENDOFCHAIN, FREE


def _ole2(data: bytes) -> Sniffed:
    directory = _ole_directory(data)
    if directory is None:
        return _result("ole")
    root_clsid, names = directory
    if root_clsid in _MSI_CLSIDS:
        return _result("exe", "application/x-msi", "msi")
    word = "worddocument" in names
    excel = "workbook" in names or "book" in names
    if (word or excel) and names & _OLE_MACRO_NAMES:
        if word:
            return _result("macro", "application/msword", "doc")
        return _result("macro", "application/vnd.ms-excel", "xls")
    if word:
        return _result("doc")
    if excel:
        return _result("doc", "application/vnd.ms-excel", "xls")
    return _result("ole")


def _ole_directory(data: bytes) -> tuple[bytes, set[str]] | None:
    """(root CLSID, lower-cased names of every directory entry), or None if unreadable.

    Follows the directory's sector chain through the FAT sectors listed in the
    header (the 109 DIFAT slots cover every file up to ~6.8 MB with 512-byte
    sectors and any realistic file with 4096-byte ones), at most
    ``_MAX_OLE_DIR_SECTORS`` sectors, stopping at a loop or the end of data.
    """
    if len(data) < 512:
        return None
    (sector_shift,) = struct.unpack_from("<H", data, 30)
    if sector_shift not in (9, 12):
        return None
    sector_size = 1 << sector_shift
    per_fat_sector = sector_size // 4
    (sector,) = struct.unpack_from("<I", data, 48)
    difat = struct.unpack_from("<109I", data, 76)

    def next_sector(current: int) -> int:
        slot = current // per_fat_sector
        if slot >= len(difat) or difat[slot] > _OLE_LAST_SECTOR:
            return 0xFFFFFFFE
        at = (difat[slot] + 1) * sector_size + (current % per_fat_sector) * 4
        if at + 4 > len(data):
            return 0xFFFFFFFE
        (following,) = struct.unpack_from("<I", data, at)
        return int(following)

    root_clsid: bytes | None = None
    names: set[str] = set()
    seen: set[int] = set()
    while sector <= _OLE_LAST_SECTOR and sector not in seen and len(seen) < _MAX_OLE_DIR_SECTORS:
        seen.add(sector)
        start = (sector + 1) * sector_size
        if start + sector_size > len(data):
            break
        for entry in range(start, start + sector_size, 128):
            name_length = struct.unpack_from("<H", data, entry + 64)[0]
            object_type = data[entry + 66]
            if root_clsid is None:
                if object_type != 5:  # the first entry must be the root storage
                    return None
                root_clsid = data[entry + 80 : entry + 96]
            if object_type in (1, 2) and 2 <= name_length <= 64 and name_length % 2 == 0:
                raw = data[entry : entry + name_length - 2]
                names.add(raw.decode("utf-16-le", errors="replace").lower())
        sector = next_sector(sector)
    if root_clsid is None:
        return None
    return root_clsid, names


# --------------------------------------------------------------------------
# No magic: mail, active markup, PDF after junk, text
# --------------------------------------------------------------------------

# The WHATWG MIME-sniffing "HTML" patterns: a browser renders content that
# starts with one of these (after whitespace) as HTML whatever it is called.
_HTML_START = re.compile(
    rb"<!--|<(?:!doctype html|html|head|script|iframe|h1|div|font|table|a|style|title|b|body"
    rb"|br|p)(?:[ >\t\n\r\x0c/]|$)"
)
# Anywhere in markup (content starting with "<"): SVG, XHTML, or HTML behind a
# comment, XML declaration or doctype; a namespace prefix ("<svg:svg") counts.
_ACTIVE_TAG = re.compile(
    rb"<(?:[a-z0-9_.-]+:)?(svg|html|script|iframe|object|embed|body)(?:[ >\t\n\r\x0c/]|$)"
)
_WHITESPACE = b" \t\r\n\x0c\x0b"
# C0 controls that do not occur in text (tab, LF, VT, FF, CR, SUB, ESC do).
_CONTROLS = bytes(c for c in range(0x20) if c not in b"\t\n\x0b\x0c\r\x1a\x1b") + b"\x7f"


def _textual(data: bytes, head: bytes, declared_type: str) -> Sniffed:
    """Content without a magic number: eml (if declared), markup, PDF after junk, text."""
    text = _as_utf8(head)
    truncated = len(data) > len(head)
    if _mime_type(declared_type) == "message/rfc822" and _looks_like_headers(text, truncated):
        return _result("eml")
    markup = _markup(text)
    if markup is not None:
        return _result(markup)
    if b"%PDF-" in head[: _PDF_WINDOW + 4]:
        return _result("pdf")
    if _looks_like_text(text):
        return _result("txt")
    return _result("unknown")


def _mime_type(declared_type: str) -> str:
    return declared_type.split(";", 1)[0].strip().lower()


def _as_utf8(head: bytes) -> bytes:
    """``head`` without a UTF-8 BOM; UTF-16 with a BOM re-encoded as UTF-8."""
    if head.startswith(b"\xef\xbb\xbf"):
        return head[3:]
    for bom, codec in ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if head.startswith(bom):
            body = head[2:]
            if len(body) % 2:  # a whole file of odd length is not UTF-16: keep its NULs
                return head
            return body.decode(codec, errors="replace").encode("utf-8", errors="replace")
    return head


def _markup(text: bytes) -> str | None:
    """``"html"``/``"svg"`` for active markup near the start, else None."""
    start = text.lstrip(_WHITESPACE)
    if not start.startswith(b"<"):
        return None
    lowered = start.lower()
    if _HTML_START.match(lowered):
        return "svg" if lowered.startswith(b"<!--") and _svg_first(lowered) else "html"
    found = _ACTIVE_TAG.search(lowered)
    if found is None:
        return None
    return "svg" if found.group(1) == b"svg" else "html"


def _svg_first(lowered: bytes) -> bool:
    found = _ACTIVE_TAG.search(lowered)
    return found is not None and found.group(1) == b"svg"


def _looks_like_headers(text: bytes, truncated: bool) -> bool:
    """Whether ``text`` opens with an RFC 5322 header block (``Name: value`` lines).

    The block ends at the first empty line; a prefix cut by :data:`SCAN_LIMIT`
    inside the headers passes on its complete lines.
    """
    lines = text.split(b"\n")
    if truncated and len(lines) > 1:
        lines.pop()  # cut mid-line
    if len(lines) > 1 and lines[0].startswith(b"From "):  # mbox separator
        lines = lines[1:]
    headers = 0
    for raw_line in lines:
        line = raw_line.rstrip(b"\r")
        if not line:
            return headers > 0
        if b"\x00" in line:
            return False
        if line[:1] in (b" ", b"\t"):
            if headers == 0:
                return False
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not name or any(c < 33 or c > 126 for c in name):
            return False
        headers += 1
    return headers > 0  # no blank line within the scanned prefix: headers only


def _looks_like_text(text: bytes) -> bool:
    if b"\x00" in text:
        return False
    controls = len(text) - len(text.translate(None, _CONTROLS))
    return controls <= len(text) * _MAX_CONTROL_RATIO
