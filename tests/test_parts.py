"""An outcome per part (issue 13, part 1): a part screening refuses does not sink the
mail's good documents (``on_refused_part = "skip"``, the default), unless the inbox
asks for the whole mail to be set aside (``"quarantine"``)."""

from __future__ import annotations

import json
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import authentication_results, jpeg_bytes, pdf_bytes, png_bytes
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import ledger as L
from mailingest.application.pipeline import replay
from mailingest.application.poll_once import poll_once
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings
from mailingest.config.table import ALLOWED_TYPES_DEFAULT
from mailingest.core.screening import Limits, screen

from .helpers import deliver, folder_counts, poll_once_on, run_cli
from .test_sniff import docx, make_zip, xlsx

SENDER, ENTITY = "dana@example.com", "P-danadanadanadanadan"
WORD = "vnd.openxmlformats-officedocument.wordprocessingml.document"
EXCEL = "vnd.openxmlformats-officedocument.spreadsheetml.sheet"
NO_TEXT = ",".join(kind for kind in ALLOWED_TYPES_DEFAULT.split(",") if kind != "txt")


def mixed_mail() -> bytes:
    """The mail of the issue: a.pdf, b.jpg, c.png, d.docx, e.xlsx, f.txt, g.csv, h.zip."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, "documents@support.example", "my papers"
    msg["Date"] = "Mon, 1 Dec 2026 10:00:00 +0000"
    msg["Message-ID"] = "<mixed@mail.example>"
    msg["Authentication-Results"] = authentication_results(SENDER)
    msg.set_content("Here is everything you asked for.")
    parts = [
        (pdf_bytes("a", 3000), "application", "pdf", "a.pdf"),
        (jpeg_bytes(5000), "image", "jpeg", "b.jpg"),
        (png_bytes(5000), "image", "png", "c.png"),
        (docx(), "application", WORD, "d.docx"),
        (xlsx(), "application", EXCEL, "e.xlsx"),
        (b"Account 1234, please verify.\n", "text", "plain", "f.txt"),
        (b"date,amount\n2026-11-30,42.00\n", "text", "csv", "g.csv"),
        (make_zip({"passport.pdf": pdf_bytes("p", 2000)}), "application", "zip", "h.zip"),
    ]
    for data, maintype, subtype, filename in parts:
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


GOOD = ["a.pdf", "b.jpg", "c.png", "d.docx", "e.xlsx"]


def names(documents: object) -> list[str]:
    return [f"{d.spec.name}.{d.spec.extension}" for d in documents]  # type: ignore[attr-defined]


# -- screening alone ------------------------------------------------------------------


def test_a_refused_part_is_recorded_and_the_good_documents_go_on() -> None:
    screened = screen(mixed_mail(), Limits(), None)
    assert screened.refusal is None
    assert names(screened.documents) == [*GOOD, "f.txt", "g.txt"]  # CSV is plain text
    (zip_refusal,) = screened.refused
    assert zip_refusal.startswith("refused content: part 8 (h.zip) is zip")


def test_the_refusals_are_the_reason_when_nothing_good_is_left() -> None:
    limits = Limits(allowed_kinds=frozenset(NO_TEXT.split(",")))
    only_bad = EmailMessage()
    only_bad["From"] = SENDER
    only_bad.set_content("two files")
    only_bad.add_attachment(b"notes\n", maintype="text", subtype="plain", filename="f.txt")
    only_bad.add_attachment(
        make_zip({"a.pdf": b"%PDF-1.4"}), maintype="application", subtype="zip", filename="h.zip"
    )
    screened = screen(only_bad.as_bytes(), limits, None)
    assert screened.documents == () and screened.refused == ()
    assert screened.refusal is not None
    assert "part 1 (f.txt) is txt" in screened.refusal and "(h.zip) is zip" in screened.refusal


def test_an_attachment_over_the_limit_is_one_refused_part() -> None:
    limits = Limits(max_attachment_bytes=4000)
    screened = screen(mixed_mail(), limits, None)
    assert names(screened.documents) == ["a.pdf", "d.docx", "e.xlsx", "f.txt", "g.txt"]
    assert [r.split(" is ")[0] for r in screened.refused] == [
        "attachment too large: part 2 (b.jpg)",
        "attachment too large: part 3 (c.png)",
        "refused content: part 8 (h.zip)",
    ]


def test_quarantine_policy_refuses_the_whole_mail_at_the_first_refused_part() -> None:
    screened = screen(mixed_mail(), Limits(), None, on_refused_part="quarantine")
    assert screened.documents == () and screened.refused == ()
    assert screened.refusal is not None and "(h.zip) is zip" in screened.refusal


def test_mail_level_problems_refuse_the_whole_mail_under_either_policy() -> None:
    limits = Limits(max_documents=3)
    for policy in ("skip", "quarantine"):
        screened = screen(mixed_mail(), limits, None, on_refused_part=policy)
        assert screened.refusal is not None
        expected = "too many documents" if policy == "skip" else "refused content"
        assert screened.refusal.startswith(expected), (policy, screened.refusal)


# -- the whole flow, on the real servers ----------------------------------------------


@pytest.fixture
def known(senders_file: Path) -> Path:
    senders_file.write_text(f"email,entity_token\n{SENDER},{ENTITY}\n", encoding="utf-8")
    return senders_file


@pytest.mark.servers
def test_the_mixed_mail_files_its_good_documents_and_says_what_was_refused(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path
) -> None:
    """A team that takes no plain text: the five good documents reach Alloy, the three
    others are refused with their reasons, and the mail is filed as processed. Its
    replay once text is allowed sends only what was refused (the five are not sent
    again); the archive stays refused."""
    env = env | {"MAILINGEST_ALLOWED_TYPES": NO_TEXT}
    deliver(imap, [mixed_mail()])
    ctx = build_context(load_settings(env))
    try:
        summary = poll_once(ctx)
        (mail,) = summary.mails
        assert (summary.processed, summary.quarantined) == (1, 0), summary
        record = ctx.ledger.mail(mail.mail_id)
        assert record is not None and record.state == L.DONE
        assert record.filed_to == "Processed" and record.documents == 5
        refused = record.refused_parts.split("; ")
        assert [r.split(")")[0] for r in refused] == [
            "refused content: part 6 (f.txt",
            "refused content: part 7 (g.csv",
            "refused content: part 8 (h.zip",
        ]
        assert mail.refused_parts == record.refused_parts  # poll-once's JSON says it too
    finally:
        ctx.close()
    status = json.loads(run_cli(env, "status", "--json").stdout)
    (row,) = status["refused_parts"]
    assert row["mail_id"] == mail.mail_id and len(row["refused_parts"]) == 3
    assert "parts refused" in run_cli(env, "status").stdout
    at_alloy = sorted(f"{d['name']}.{d['extension']}" for d in sandbox.state.list(ENTITY))
    assert at_alloy == sorted(GOOD)
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 0,
        "Processed": 1,
        "Quarantine": 0,
    }

    # text allowed now: the operator replays the mail
    env = env | {"MAILINGEST_ALLOWED_TYPES": ALLOWED_TYPES_DEFAULT}
    ctx = build_context(load_settings(env))
    try:
        assert replay(ctx, mail.mail_id) == []
        assert ctx.ledger.mail(mail.mail_id).state == L.REPLAYED  # type: ignore[union-attr]
        again = poll_once(ctx)
        (second,) = again.mails
        assert second.state == L.DONE and second.filed_to == "Processed"
        assert second.refused_parts.startswith("refused content: part 8 (h.zip)")
    finally:
        ctx.close()
    at_alloy = sorted(f"{d['name']}.{d['extension']}" for d in sandbox.state.list(ENTITY))
    assert at_alloy == sorted([*GOOD, "f.txt", "g.txt"])  # each once
    assert all(d["uploaded"] for d in sandbox.state.list(ENTITY))


@pytest.mark.servers
def test_with_the_quarantine_policy_the_mixed_mail_is_quarantined_as_before(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path
) -> None:
    deliver(imap, [mixed_mail()])
    summary = poll_once_on(env, on_refused_part="quarantine")
    (mail,) = summary.mails
    assert summary.quarantined == 1 and mail.state == L.QUARANTINED
    assert mail.reason.startswith("refused content: part 8 (h.zip)")
    assert sandbox.state.list(ENTITY) == []


@pytest.mark.servers
def test_explain_says_what_would_happen_and_sends_nothing(
    env: dict[str, str], sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    """`mailingest explain MAIL.eml`: the documents, each refusal, the entity and how
    it was found, the outcome; no request reaches Alloy, nothing is written."""
    mail_file = tmp_path / "mixed.eml"
    mail_file.write_bytes(mixed_mail())
    shown = run_cli(env, "explain", str(mail_file))
    assert shown.returncode == 0, shown.stderr
    assert f"entity: {ENTITY} (found by csv)" in shown.stdout
    assert "refused: refused content: part 8 (h.zip) is zip" in shown.stdout
    assert "outcome: 7 document(s) to Alloy, then filed as processed; 1 part(s) refused" in (
        shown.stdout
    )
    as_json = json.loads(run_cli(env, "explain", "--json", str(mail_file)).stdout)
    assert as_json["outcome"] == L.DONE and len(as_json["refused"]) == 1
    assert [d["name"] for d in as_json["documents"]] == [*GOOD, "f.txt", "g.txt"]
    strict = run_cli(env | {"MAILINGEST_ON_REFUSED_PART": "quarantine"}, "explain", str(mail_file))
    assert "outcome: quarantined: refused content: part 8 (h.zip)" in strict.stdout
    assert sandbox.state.stats()["requests"] == {}


def test_a_parts_name_does_not_depend_on_which_others_were_refused() -> None:
    """A replay after a limit was raised must name each part as the first run did (its
    name is part of its slot): part 1 "scan.jpg" is a PDF and too large, part 2 is
    "scan.pdf". Part 2 is "scan-2.pdf" in both runs, not "scan.pdf" first."""
    msg = EmailMessage()
    msg["From"], msg["Subject"] = SENDER, "scans"
    msg.set_content("two scans")
    big = b"%PDF-1.4\n" + b"0" * 200_000 + b"\n%%EOF\n"
    msg.add_attachment(big, maintype="image", subtype="jpeg", filename="scan.jpg")
    msg.add_attachment(
        b"%PDF-1.4 small\n", maintype="application", subtype="pdf", filename="scan.pdf"
    )
    raw = msg.as_bytes()
    first = screen(raw, Limits(max_attachment_bytes=100_000), None)
    again = screen(raw, Limits(max_attachment_bytes=1_000_000), None)
    assert names(first.documents) == ["scan-2.pdf"] and len(first.refused) == 1
    assert names(again.documents) == ["scan.pdf", "scan-2.pdf"]
