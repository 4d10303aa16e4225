"""mailingest.core.documents: Attachment -> the document Alloy is told about."""

from __future__ import annotations

import pytest

from mailingest.core.documents import (
    DOCUMENT_TYPES,
    MAX_NAME_LENGTH,
    DocumentSpec,
    describe_attachments,
    extension_for,
    infer_type,
    sanitize_name,
    split_extension,
)
from mailingest.core.mail import Attachment, ParsedMail


def attachment(
    filename: str | None, content_type: str = "application/pdf", *, index: int = 1
) -> Attachment:
    return Attachment(
        filename=filename,
        content_type=content_type,
        payload=b"x" * (index + 1),
        inline=False,
        content_id=None,
        index=index,
    )


def mail(*attachments: Attachment, subject: str = "") -> ParsedMail:
    return ParsedMail(
        message_id="m@x",
        sender="jane@example.com",
        subject=subject,
        date=None,
        attachments=attachments,
        skipped=(),
        defects=(),
    )


# --------------------------------------------------------------------------
# sanitize_name
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("driver_license.pdf", "driver_license.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\passport.pdf", "passport.pdf"),
        ("/abs/path/to/bill.pdf", "bill.pdf"),
        ("dir\\..\\..\\x.pdf", "x.pdf"),
        ("\u202egpj.exe", "gpj.exe"),  # RIGHT-TO-LEFT OVERRIDE
        ("scan\u2066\u2069\u200e\u200f\u202a\u202b\u202c\u202d.pdf", "scan.pdf"),
        ("pass\x00port\x07\x1b.pdf", "passport.pdf"),
        ("my \t\n  passport\r\n  scan.pdf", "my passport scan.pdf"),
        ("  spaced.pdf  ", "spaced.pdf"),
        ("Fu\u0308hrerschein.pdf", "F\u00fchrerschein.pdf"),  # NFD -> NFC
        ("Re: bill 03.2024.pdf", "Re: bill 03.2024.pdf"),
    ],
)
def test_sanitize_name(raw: str, expected: str) -> None:
    assert sanitize_name(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "..", "../..", "/", "\\\\", "\x00\x01", "\u202e"])
def test_sanitize_name_never_empty(raw: str) -> None:
    assert sanitize_name(raw) == "document"
    assert sanitize_name(raw, fallback="attachment-3") == "attachment-3"
    assert sanitize_name(raw, fallback="") == ""


def test_sanitize_name_bounds_length_and_keeps_extension() -> None:
    name = sanitize_name("a" * 500 + ".pdf")
    assert len(name) == MAX_NAME_LENGTH
    assert name.endswith("a.pdf")
    assert len(sanitize_name("b" * 500)) == MAX_NAME_LENGTH
    assert len(sanitize_name("ü" * 500 + ".jpeg")) == MAX_NAME_LENGTH


# --------------------------------------------------------------------------
# split_extension / extension_for
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("driver_license.pdf", ("driver_license", "pdf")),
        ("SCAN.PDF", ("SCAN", "pdf")),
        ("a.tar.gz", ("a.tar", "gz")),
        ("noext", ("noext", "")),
        (".pdf", ("", "pdf")),
        ("trailing.", ("trailing.", "")),
        ("Re: bill no. 5", ("Re: bill no. 5", "")),
        ("Mr. Smith passport", ("Mr. Smith passport", "")),
        ("photo.heic", ("photo", "heic")),
    ],
)
def test_split_extension(filename: str, expected: tuple[str, str]) -> None:
    assert split_extension(filename) == expected


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/pdf", "pdf"),
        ("image/jpeg", "jpg"),
        ("image/png", "png"),
        ("image/heic", "heic"),
        ("image/tiff", "tif"),
        ("image/gif", "gif"),
        ("message/rfc822", "eml"),
        ("text/plain", "txt"),
        ("application/msword", "doc"),
        ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", "docx"),
        ("application/octet-stream", "bin"),
        ("application/ms-tnef", "dat"),
        ("Application/PDF; name=x.pdf", "pdf"),
        ("application/x-unknown-thing", "bin"),
        ("", "bin"),
    ],
)
def test_extension_for(content_type: str, expected: str) -> None:
    assert extension_for(content_type) == expected


# --------------------------------------------------------------------------
# infer_type
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "subject", "expected"),
    [
        ("driver_license", "", "license"),
        ("Driving-Licence-front", "", "license"),
        ("DriverLicense", "", "license"),
        ("DL_front", "", "license"),
        ("dl", "", "license"),
        ("scan.DL2", "", "license"),
        ("download", "", "other"),  # "dl" only as a whole word
        ("handle", "", "other"),
        ("Führerschein", "", "license"),
        ("FUEHRERSCHEIN", "", "license"),  # the transliteration too
        ("permis de conduire", "", "license"),
        ("permis_de_conduire_recto", "", "license"),
        ("passport", "", "passport"),
        ("Reisepass", "", "passport"),
        ("pasaporte", "", "passport"),
        ("passeport", "", "passport"),
        ("utility_bill", "", "utility"),
        ("Bank-Statement.March", "", "utility"),
        ("Stromrechnung", "", "utility"),
        ("invoice", "", "other"),
        ("rental_agreement", "", "contract"),
        ("Contract", "", "contract"),
        ("Mietvertrag", "", "contract"),
        ("IMG_0001", "", "other"),
        ("", "", "other"),
        # the filename wins over the subject
        ("passport", "my utility bill", "passport"),
        ("IMG_0001", "my utility bill", "utility"),
        ("IMG_0001", "Re: Führerschein", "license"),
        # a subject naming several types cannot type one attachment
        ("IMG_0001", "passport and utility bill", "other"),
        # a filename naming several: table order (identity documents first)
        ("passport_and_bill", "", "passport"),
    ],
)
def test_infer_type(name: str, subject: str, expected: str) -> None:
    assert infer_type(name, subject) == expected


# Realistic pairs as customers send them (issue 13, part 6): a filename from a phone,
# scanner or mail client, and the subject line, in English, German, French and Spanish.
REAL_WORLD = [
    # English
    ("IMG_4821.jpg", "Passport photo page", "passport"),
    ("passport_scan_2026.pdf", "Documents for my account", "passport"),
    ("DL front.jpeg", "ID", "license"),
    ("drivers-licence-back.png", "", "license"),
    ("Scan 12 Nov 2026.pdf", "Proof of address", "utility"),
    ("british_gas_oct.pdf", "", "utility"),
    ("Council Tax Bill 2026-27.pdf", "", "utility"),
    ("bank statement november.pdf", "", "utility"),
    ("EDF Electricity.pdf", "my bill", "utility"),
    ("Tenancy Agreement signed.pdf", "", "contract"),
    ("lease.pdf", "Re: your application", "contract"),
    ("signed_agreement.pdf", "", "contract"),
    ("document.pdf", "Signed contract attached", "contract"),
    ("selfie.jpg", "Verification", "other"),
    ("Screenshot 2026-11-30 at 10.14.22.png", "Re: KYC", "other"),
    ("please_find_attached.pdf", "", "other"),  # "lease" only as a word
    # German
    ("Reisepass_Seite1.jpg", "Unterlagen", "passport"),
    ("scan0001.pdf", "Mein Reisepass", "passport"),
    ("Führerschein Vorderseite.jpg", "", "license"),
    ("Fuehrerschein_Rueckseite.jpg", "", "license"),
    ("Meldebescheinigung.pdf", "Adressnachweis", "utility"),
    ("Stromrechnung_Oktober.pdf", "", "utility"),
    ("Kontoauszug_11_2026.pdf", "", "utility"),
    ("Nebenkostenabrechnung 2025.pdf", "", "utility"),
    ("Mietvertrag.pdf", "Wohnung", "contract"),
    ("Arbeitsvertrag_unterschrieben.pdf", "", "contract"),
    ("IMG_20261130_101500.jpg", "Dokumente wie besprochen", "other"),
    # French
    ("passeport.jpg", "Pièces justificatives", "passport"),
    ("Permis_de_conduire_recto.jpg", "", "license"),
    ("scan.pdf", "Permis de conduire", "license"),
    ("facture_EDF_novembre.pdf", "", "utility"),
    ("Justificatif de domicile.pdf", "", "utility"),
    ("Relevé de compte octobre.pdf", "", "utility"),
    ("avis_d_imposition_2026.pdf", "", "utility"),
    ("quittance de loyer.pdf", "", "utility"),
    ("contrat_de_bail.pdf", "", "contract"),
    ("bail signé.pdf", "", "contract"),
    # Spanish
    ("pasaporte.jpg", "Documentación", "passport"),
    ("carnet de conducir.jpg", "", "license"),
    ("permiso_de_conducir.pdf", "", "license"),
    ("licencia de manejo.jpg", "", "license"),
    ("factura_luz_octubre.pdf", "", "utility"),
    ("recibo de luz.pdf", "", "utility"),
    ("extracto bancario.pdf", "", "utility"),
    ("certificado de empadronamiento.pdf", "", "utility"),
    ("contrato de arrendamiento.pdf", "", "contract"),
    ("foto.jpg", "Mi pasaporte", "passport"),
    # several types in the subject: no one attachment can be typed by it
    ("scan1.pdf", "Reisepass und Stromrechnung", "other"),
    ("IMG_1.jpg", "passport and proof of address", "other"),
]


@pytest.mark.parametrize(("filename", "subject", "expected"), REAL_WORLD)
def test_infer_type_on_real_world_names(filename: str, subject: str, expected: str) -> None:
    name = filename.rsplit(".", 1)[0]
    assert infer_type(name, subject) == expected


def test_the_real_world_table_is_large_enough_to_mean_something() -> None:
    assert len(REAL_WORLD) >= 40
    assert {expected for _, _, expected in REAL_WORLD} == {
        "passport",
        "license",
        "utility",
        "contract",
        "other",
    }


def test_infer_type_never_internal() -> None:
    for word in ("internal", "INTERNAL memo", "intern"):
        assert infer_type(word, word) != "internal"


# --------------------------------------------------------------------------
# describe_attachments
# --------------------------------------------------------------------------


def test_describe_basic() -> None:
    specs = describe_attachments(
        mail(attachment("driver_license.pdf", index=1), subject="documents")
    )
    assert specs == (
        DocumentSpec(
            index=1,
            name="driver_license",
            extension="pdf",
            type="license",
            content_type="application/pdf",
            size=2,
        ),
    )


def test_describe_nameless_parts_named_from_index_and_type() -> None:
    specs = describe_attachments(
        mail(
            attachment(None, "image/jpeg", index=1),
            attachment(None, "application/octet-stream", index=4),
            attachment("   ", "application/pdf", index=5),
            attachment(".pdf", "image/png", index=6),
        )
    )
    assert [(s.name, s.extension) for s in specs] == [
        ("image-2", "jpg"),
        ("attachment-5", "bin"),
        ("document-6", "pdf"),
        ("image-7", "pdf"),
    ]


def test_describe_extension_from_type_when_filename_has_none() -> None:
    (spec,) = describe_attachments(mail(attachment("Reisepass", "image/heic")))
    assert (spec.name, spec.extension, spec.type) == ("Reisepass", "heic", "passport")


def test_describe_duplicate_names_made_unique() -> None:
    specs = describe_attachments(
        mail(
            attachment("scan.pdf", index=1),
            attachment("scan.pdf", index=2),
            attachment("SCAN.pdf", index=3),
            attachment("scan-2.pdf", index=4),
            attachment("scan.jpg", "image/jpeg", index=5),
            attachment("dir/scan.pdf", index=6),
        )
    )
    assert [f"{s.name}.{s.extension}" for s in specs] == [
        "scan.pdf",
        "scan-2.pdf",
        "SCAN-3.pdf",
        "scan-2-2.pdf",
        "scan.jpg",
        "scan-4.pdf",
    ]


def test_describe_unique_suffix_stays_within_bound() -> None:
    long_name = "x" * 300 + ".pdf"
    specs = describe_attachments(mail(attachment(long_name), attachment(long_name, index=2)))
    assert specs[0].name != specs[1].name
    assert all(len(s.name) + 1 + len(s.extension) <= MAX_NAME_LENGTH for s in specs)
    assert specs[1].name.endswith("-2")


def test_describe_rfc822_and_tnef() -> None:
    specs = describe_attachments(
        mail(
            attachment("Fwd: bill 01/2024.eml", "message/rfc822", index=1),
            attachment("Original message", "message/rfc822", index=2),
            attachment(None, "message/rfc822", index=3),
            attachment("winmail.dat", "application/ms-tnef", index=4),
            attachment(None, "application/vnd.ms-tnef", index=5),
        )
    )
    assert [(s.name, s.extension) for s in specs] == [
        ("2024", "eml"),  # directories stripped: the mail part said "Fwd: bill 01/2024.eml"
        ("Original message", "eml"),
        ("message-4", "eml"),
        ("winmail", "dat"),
        ("winmail-2", "dat"),
    ]


def test_describe_types_come_from_name_then_subject() -> None:
    specs = describe_attachments(
        mail(
            attachment("passport.jpg", "image/jpeg", index=1),
            attachment("IMG_1234.jpg", "image/jpeg", index=2),
            subject="Utility bill as requested",
        )
    )
    assert [s.type for s in specs] == ["passport", "utility"]
    assert all(s.type in DOCUMENT_TYPES for s in specs)
