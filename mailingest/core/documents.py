"""Attachment -> the document Alloy is told about (pure logic, no I/O).

Alloy's ``POST /entities/<token>/documents`` takes ``name`` (without
extension), ``extension`` and ``type`` (one of :data:`DOCUMENT_TYPES`); the
bytes follow in a separate PUT.  This module decides those three fields for
every attachment of a :class:`~mailingest.core.mail.ParsedMail`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from mailingest.core.mail import Attachment, ParsedMail

__all__ = [
    "DOCUMENT_TYPES",
    "MAX_NAME_LENGTH",
    "DocumentSpec",
    "describe_attachments",
    "extension_for",
    "infer_type",
    "sanitize_name",
    "split_extension",
]

DOCUMENT_TYPES: tuple[str, ...] = (
    "contract",
    "license",
    "passport",
    "utility",
    "other",
    "internal",
)

MAX_NAME_LENGTH = 100


@dataclass(frozen=True)
class DocumentSpec:
    index: int  # attachment index in the mail
    name: str  # sanitised filename without extension
    extension: str  # lower case, no dot
    type: str  # one of DOCUMENT_TYPES (never "internal" from inference)
    content_type: str
    size: int


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------

# Bidi embeddings/overrides/isolates and marks (Trojan-Source style
# "\u202egpj.exe"), plus the Arabic letter mark and the BOM.
_INVISIBLE = frozenset(
    [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\u200e", "\u200f", "\u061c", "\ufeff"]
)
_EXTENSION = re.compile(r"[0-9a-z]{1,10}")


def sanitize_name(filename: str, *, fallback: str = "document") -> str:
    """A safe display name for a filename a mail declared.

    Strips directories (``/`` and ``\\``), NFC-normalises, drops control and
    surrogate characters and bidi controls, collapses whitespace, strips
    blanks and trailing dots (and ``.``/``..`` components), and bounds the length to
    :data:`MAX_NAME_LENGTH` characters (keeping the extension).  Never returns
    an empty string: when nothing usable is left it returns ``fallback``
    (``describe_attachments`` passes its own, e.g. ``"attachment-2"``; pass
    ``fallback=""`` to detect that case).
    """
    text = unicodedata.normalize("NFC", str(filename))
    kept: list[str] = []
    for ch in text:
        if ch.isspace():
            kept.append(" ")  # tabs, newlines, NBSP...: collapsed below
        elif ch not in _INVISIBLE and unicodedata.category(ch) not in ("Cc", "Cs"):
            kept.append(ch)
    text = "".join(kept)
    components = [c for c in re.split(r"[/\\]", text) if c.strip(" .")]
    text = components[-1] if components else ""
    text = " ".join(text.split()).rstrip(" .").lstrip()
    if len(text) > MAX_NAME_LENGTH:
        stem, extension = split_extension(text)
        if extension and stem:
            keep = MAX_NAME_LENGTH - len(extension) - 1
            text = f"{stem[:keep].rstrip(' .')}.{extension}"
        else:
            text = text[:MAX_NAME_LENGTH].rstrip(" .")
    return text or fallback


def split_extension(filename: str) -> tuple[str, str]:
    """``"driver_license.PDF"`` -> ``("driver_license", "pdf")``.

    Only the last dot counts (``"a.tar.gz"`` -> ``("a.tar", "gz")``), and only
    when what follows it looks like an extension (1-10 ASCII letters/digits):
    ``"Re: bill no. 5"`` and ``"Mr. Smith"`` have none.  ``".pdf"`` gives
    ``("", "pdf")``; no dot gives ``(filename, "")``.
    """
    stem, dot, extension = filename.rpartition(".")
    if not dot or not _EXTENSION.fullmatch(extension.lower()):
        return filename, ""
    return stem, extension.lower()


_EXTENSIONS: dict[str, str] = {
    "application/pdf": "pdf",
    "application/x-pdf": "pdf",
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/pjpeg": "jpg",
    "image/png": "png",
    "image/heic": "heic",
    "image/heif": "heif",
    "image/tiff": "tif",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/bmp": "bmp",
    "image/svg+xml": "svg",
    "message/rfc822": "eml",
    "message/global": "eml",
    "text/plain": "txt",
    "text/html": "html",
    "text/csv": "csv",
    "text/calendar": "ics",
    "text/rtf": "rtf",
    "application/rtf": "rtf",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "application/vnd.oasis.opendocument.text": "odt",
    "application/vnd.oasis.opendocument.spreadsheet": "ods",
    "application/vnd.ms-outlook": "msg",
    "application/ms-tnef": "dat",
    "application/vnd.ms-tnef": "dat",
    "application/zip": "zip",
    "application/json": "json",
    "application/xml": "xml",
    "text/xml": "xml",
    "application/pkcs7-mime": "p7m",
    "application/x-pkcs7-mime": "p7m",
    "application/octet-stream": "bin",
}

_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})


def extension_for(content_type: str) -> str:
    """Extension for a MIME type (parameters and case ignored); ``"bin"`` if unknown."""
    key = content_type.split(";", 1)[0].strip().lower()
    return _EXTENSIONS.get(key, "bin")


# --------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------

# The one table.  Patterns run over the text folded by _fold(): lower case,
# accents removed, every run of non-letters/digits (``_ - .`` included)
# turned into one space, e.g. "Führerschein_Vorderseite.JPG" ->
# "fuhrerschein vorderseite jpg".  Order = priority when one filename
# matches several types.
_TYPE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "passport",
        re.compile(r"passport|reisepass|pasaporte|passeport|passaporto|paspoort|paszport"),
    ),
    (
        "license",
        re.compile(
            r"licen[cs]e|driver|driving|\bdls?\b|\bdl(?=\d)|fuhrerschein|fuehrerschein"
            r"|permis de conduire|permis de conduite|carnet de conducir|permiso de conducir"
            r"|licencia de (?:conducir|manejo)|patente di guida|rijbewijs|prawo jazdy"
        ),
    ),
    (
        "utility",
        re.compile(
            # English
            r"utilit|bill|statement|proof of (?:address|residence)|council tax"
            r"|electricity|\bgas\b|water rates"
            # German: bills, bank statements, proof of registration
            r"|rechnung|nebenkosten|kontoauszug|meldebescheinigung|wohnsitzbescheinigung"
            # French
            r"|facture|releve (?:de compte|bancaire)|justificatif de domicile"
            r"|quittance de loyer|avis d imposition"
            # Spanish
            r"|factura|recibo de (?:luz|agua|gas)|extracto bancario|comprobante de domicilio"
            r"|empadronamiento|bolletta"
        ),
    ),
    (
        "contract",
        re.compile(
            r"contract|agreement|\blease\b|tenancy|vertrag|contrat|\bbail\b|contrato"
            r"|arrendamiento|contratto"
        ),
    ),
)


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(re.split(r"[\W_]+", text)).strip()


def _matching_types(text: str) -> list[str]:
    folded = _fold(text)
    return [doc_type for doc_type, pattern in _TYPE_PATTERNS if pattern.search(folded)]


def infer_type(name: str, subject: str) -> str:
    """The Alloy document type suggested by a filename, else by the subject.

    The filename wins; when it matches several types the table order decides
    (passport, license, utility, contract).  The subject is only consulted
    when the filename says nothing, and only when it names exactly one type:
    "my passport and utility bill" describes several attachments and cannot
    type any single one of them.  Never returns ``"internal"``.
    """
    from_name = _matching_types(name)
    if from_name:
        return from_name[0]
    from_subject = _matching_types(subject)
    if len(from_subject) == 1:
        return from_subject[0]
    return "other"


# --------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------


def _name_and_extension(attachment: Attachment) -> tuple[str, str]:
    content_type = attachment.content_type.lower()
    if content_type in _TNEF_TYPES:
        return "winmail", "dat"  # decoded later; for now the container itself
    clean = sanitize_name(attachment.filename, fallback="") if attachment.filename else ""
    name, extension = split_extension(clean)
    if content_type in _MESSAGE_TYPES and extension != "eml":
        # A forwarded mail is an .eml whatever its (often subject-like) name says.
        name, extension = clean, "eml"
    name = name.strip(" .")  # ".pdf" -> ("", "pdf"); "scan .pdf" -> "scan"
    fallback = f"{_stem_for(content_type)}-{attachment.index + 1}"
    return name or fallback, extension or extension_for(content_type)


def _stem_for(content_type: str) -> str:
    """A name for a part that has none, from its content type."""
    maintype, _, subtype = content_type.partition("/")
    if maintype in ("image", "text", "audio", "video"):
        return maintype
    if maintype == "message":
        return "message"
    if subtype == "pdf" or "word" in subtype or "opendocument" in subtype:
        return "document"
    return "attachment"


def _bounded(name: str, suffix: str, extension: str) -> str:
    room = MAX_NAME_LENGTH - len(suffix) - (len(extension) + 1 if extension else 0)
    return name[:room].rstrip(" .") + suffix


def describe_attachments(mail: ParsedMail) -> tuple[DocumentSpec, ...]:
    """One :class:`DocumentSpec` per attachment, in mail order.

    Name from the filename, else from the content type (``image-<N>``,
    ``document-<N>``, ``message-<N>``, ``attachment-<N>``, ...) where N is the
    1-based leaf number of the part in the mail; extension
    from the filename, else from the content type.  ``message/rfc822`` is
    always ``eml``; TNEF is always ``winmail.dat``.  Names are unique within
    the mail (case-insensitively, name and extension together): a collision
    gets ``-2``, ``-3``, ...
    """
    specs: list[DocumentSpec] = []
    taken: set[tuple[str, str]] = set()
    tried: dict[tuple[str, str], int] = {}  # the last suffix tried per name: linear time
    for attachment in mail.attachments:
        name, extension = _name_and_extension(attachment)
        unique = name
        key = (name.casefold(), extension)
        counter = tried.get(key, 1)
        while (unique.casefold(), extension) in taken:
            counter += 1
            unique = _bounded(name, f"-{counter}", extension)
        tried[key] = counter
        taken.add((unique.casefold(), extension))
        specs.append(
            DocumentSpec(
                index=attachment.index,
                name=unique,
                extension=extension,
                type=infer_type(name, mail.subject),
                content_type=attachment.content_type,
                size=len(attachment.payload),
            )
        )
    return tuple(specs)
