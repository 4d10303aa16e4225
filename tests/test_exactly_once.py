"""The eleven ways the promise broke (issue 10), each reproduced against the real Redis,
Dovecot and the Alloy sandbox by calling the steps in the order that broke it.

Each test failed on the code before the fix (commit 0d2eb94) and names the finding it
reproduces. The deterministic simulation (tests/sim) explores these paths and their
neighbours under every interleaving; these tests pin each one down by name.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from imapclient import IMAPClient
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import (
    AGENT_EMAIL,
    authentication_results,
    jpeg_bytes,
    pdf_bytes,
    png_bytes,
)
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import keys
from mailingest.adapters import ledger as L
from mailingest.adapters.imap import Mailbox
from mailingest.application.pipeline import (
    Step,
    describe,
    finish,
    give_up,
    ingest,
    poll,
    quarantine,
    recover,
    replay,
    run_step,
    upload,
)
from mailingest.application.poll_once import poll_once, run_steps
from mailingest.application.services import Context, build_context
from mailingest.config.settings import load_settings
from mailingest.core.decisions import Liveness, SweepPolicy, stale
from mailingest.core.errors import AlloyUnavailable, Busy, InDoubt

from .helpers import (
    deliver,
    dovecot_without_move,
    folder_counts,
    inbox_settings,
    wait_until,
)

pytestmark = pytest.mark.servers

SENDER, ENTITY = "dana@example.com", "P-danadanadanadanadan"


def mail(
    *parts: tuple[bytes, str, str, str],
    message_id: str | None = "<m1@mail.example>",
    received: str = "from mx1 by mx; Mon, 1 Dec 2026 10:00:00 +0000",
    subject: str = "my documents",
) -> bytes:
    """A mail from SENDER with (payload, maintype/subtype, filename, disposition) parts."""
    msg = EmailMessage()
    msg["Received"] = received
    msg["Authentication-Results"] = authentication_results(SENDER)
    msg["From"], msg["To"], msg["Subject"] = SENDER, "documents@support.example", subject
    msg["Date"] = "Mon, 1 Dec 2026 10:00:00 +0000"
    if message_id:
        msg["Message-ID"] = message_id
    msg.set_content("see attached")
    for payload, ctype, filename, disposition in parts:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(
            payload, maintype=maintype, subtype=subtype, filename=filename, disposition=disposition
        )
    return msg.as_bytes()


PDF = (pdf_bytes("bill", 3000), "application/pdf", "bill.pdf", "attachment")
JPG = (jpeg_bytes(5000), "image/jpeg", "passport.jpg", "attachment")


@pytest.fixture
def known(senders_file: Path) -> Path:
    senders_file.write_text(f"email,entity_token\n{SENDER},{ENTITY}\n", encoding="utf-8")
    return senders_file


@pytest.fixture
def ctx(env: dict[str, str], known: Path) -> Iterator[Context]:
    context = build_context(load_settings(env))
    yield context
    context.close()


def documents_at(sandbox: SandboxServer, entity: str = ENTITY) -> list[dict]:
    return sandbox.state.list(entity)


def drain(ctx: Context, steps: list[Step]) -> None:
    """Run steps and what they return to the end, in order (waits included)."""
    run_steps(ctx, steps)


def lost_describe(ctx: Context, mail_id: str, *, record_attempt: bool) -> str:
    """A POST of document 0 that reached Alloy and whose answer never came back; with
    ``record_attempt`` the attempt was recorded first, as describe() does."""
    doc = ctx.ledger.document(mail_id, 0)
    assert doc is not None
    if record_attempt:
        slot = ctx.ledger.slot(ENTITY, doc.fingerprint)
        doubt = L.doubt_key(ENTITY, doc)
        assert ctx.ledger.begin_attempt(slot, mail_id, doubt, window_ms=60_000).verdict == "go"
    return post_description(ctx, doc)


def post_description(ctx: Context, doc: L.DocumentRecord) -> str:
    """The describe POST of ``doc`` reaching Alloy (as the product sends it); its token."""
    inbox = ctx.settings.inbox("default")
    return ctx.alloy.describe(
        ENTITY,
        name=doc.name,
        extension=doc.extension,
        type=doc.type,
        note=inbox.note,
        note_author_agent_email=inbox.agent_email,
    ).token


def until_done(ctx: Context, mail_id: str) -> L.MailRecord:
    """Ingest, describe and upload every document; the mail is done, not yet moved."""
    for step in ingest(ctx, mail_id):
        assert step.index is not None
        describe(ctx, mail_id, step.index)
        upload(ctx, mail_id, step.index)
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.state == L.DONE and record.filed_to == ""
    return record


def deliver_raw(ctx: Context, raw: bytes) -> None:
    with Mailbox(ctx.settings.inbox("default")) as box:
        box.append("INBOX", raw)


def first_mail(ctx: Context) -> str:
    (step,) = poll(ctx, "default").steps
    return step.mail_id


# -- 1. a refusal mid-mail ---------------------------------------------------------------


def test_1_a_refusal_while_an_upload_waits_leaves_no_empty_description(
    env: dict[str, str], imap: ImapServer, known: Path
) -> None:
    """Document 0 is described and its upload still queued when Alloy refuses document 1:
    `finish` runs first. It must not move the mail (or drop the staged bytes) before
    document 0 is uploaded; and a replay of the quarantined mail adds no second copy."""
    picky = SandboxServer(token="t", secret="s", agents=[AGENT_EMAIL], extensions=["pdf"]).start()
    deliver(imap, [mail(PDF, JPG)])
    context = build_context(
        load_settings(
            env
            | {
                "MAILINGEST_ALLOY_URL": picky.url,
                "MAILINGEST_ALLOY_TOKEN": "t",
                "MAILINGEST_ALLOY_SECRET": "s",
            }
        )
    )
    try:
        mail_id = first_mail(context)
        ingest(context, mail_id)
        assert describe(context, mail_id, 0) == [Step("upload", mail_id, 0)]  # upload waits
        assert describe(context, mail_id, 1) == [Step("finish", mail_id)]  # refused: .jpg
        # finish runs before the queued upload: it settles document 0 instead of moving
        assert finish(context, mail_id) == [Step("upload", mail_id, 0)]
        assert context.ledger.mail(mail_id).filed_to == ""  # type: ignore[union-attr]
        drain(context, [Step("upload", mail_id, 0)])
        record = context.ledger.mail(mail_id)
        assert record is not None and record.filed_to == "Quarantine"
        docs = picky.state.list(ENTITY)
        assert [(d["extension"], d["uploaded"]) for d in docs] == [("pdf", True)]
        # replayed after the refusal is fixed: the PDF is recognised, only the JPEG is new
        picky.state.extensions = None  # type: ignore[attr-defined]
        replay(context, mail_id)
        summary = poll_once(context)
        assert summary.processed == 1, summary
    finally:
        context.close()
        docs = picky.state.list(ENTITY)
        picky.stop()
    assert sorted((d["extension"], d["uploaded"]) for d in docs) == [("jpg", True), ("pdf", True)]


def test_1b_a_lost_describe_of_a_quarantined_mail_is_settled(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """Document 0's POST reached Alloy but its answer was lost, then the mail was
    quarantined: the description is found and uploaded before the mail moves."""
    deliver(imap, [mail(PDF, JPG)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    lost = lost_describe(ctx, mail_id, record_attempt=True)
    # then Alloy refuses document 1 for good: the mail is quarantined
    drain(ctx, quarantine(ctx, mail_id, "document 1 (passport.jpg): refused (test)"))
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.filed_to == "Quarantine"
    (only,) = documents_at(sandbox)
    assert only["document_token"] == lost and only["uploaded"]


# -- 2. no MOVE: another mail with the same Message-ID ----------------------------------


def test_2_without_move_a_mail_sharing_a_message_id_is_copied_not_lost(
    tmp_path: Path,
) -> None:
    server = dovecot_without_move(tmp_path)
    try:
        other = b"Message-ID: <same@x>\r\nSubject: another mail\r\n\r\nother\r\n"
        ours = b"Message-ID: <same@x>\r\nSubject: this mail\r\n\r\nours\r\n"
        deliver(server, [other], folder="INBOX")
        client = IMAPClient(server.account.host, port=server.account.port, ssl=False, timeout=10)
        client.login(server.account.user, server.account.password)
        client.create_folder("Processed")
        client.select_folder("INBOX")
        (first,) = client.search(["ALL"])
        client.copy([first], "Processed")  # filed earlier: the other mail is in Processed
        client.delete_messages([first])
        client.expunge()
        client.logout()
        deliver(server, [ours])
        with Mailbox(inbox_settings(server.account)) as box:
            box.select("INBOX")
            (uid,) = box.uids_after(0)
            copies: list[str] = []
            box.move(uid, "Processed", on_copied=copies.append)
            assert copies and copies[0].count(":") == 1  # COPYUID, to record
        client = IMAPClient(server.account.host, port=server.account.port, ssl=False, timeout=10)
        client.login(server.account.user, server.account.password)
        client.select_folder("Processed", readonly=True)
        bodies = [
            v[b"BODY[]"] for v in client.fetch(client.search(["ALL"]), ["BODY.PEEK[]"]).values()
        ]
        client.logout()
        assert sorted(b.split(b"\r\n\r\n")[1] for b in bodies) == [b"other\r\n", b"ours\r\n"]
    finally:
        server.stop()


def test_2b_a_vanished_mail_is_not_recorded_as_filed_because_another_shares_its_id(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """The mail left the inbox by hand; another mail with its Message-ID sits in
    Processed. The ledger must not claim that this mail was filed there."""
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    until_done(ctx, mail_id)
    account = imap.account
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=10)
    client.login(account.user, account.password)
    client.append("Processed", mail(PDF, received="from elsewhere; Tue, 2 Dec 2026"))
    client.select_folder("INBOX")
    client.delete_messages(client.search(["ALL"]))  # a person deleted ours
    client.expunge()
    client.logout()
    finish(ctx, mail_id)
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.filed_to == "-"
    assert "left INBOX before" in record.reason


# -- 3. a POST that Alloy commits late ----------------------------------------------------


@pytest.mark.slow
def test_3_a_describe_alloy_commits_late_is_waited_for_not_sent_again(
    ctx: Context, env: dict[str, str], imap: ImapServer, sandbox: SandboxServer
) -> None:
    """The first POST times out and Alloy commits it 4 s after it came, after the retry would
    have listed the entity: the retry must not POST a twin; it adopts the late one."""
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    # a hold of 4 s: the retry's look, inside it, has time on a loaded machine
    sandbox.set_faults(late_commit_fraction=1.0, late_commit_ms=4000, seed=1)
    fast = build_context(load_settings(env | {"MAILINGEST_ALLOY_READ_TIMEOUT": "1"}))
    try:
        with pytest.raises(Exception) as lost:
            describe(fast, mail_id, 0)
        assert "timed out" in str(lost.value)
        sandbox.set_faults(late_commit_fraction=0.0)
        assert documents_at(sandbox) == []  # not committed yet
        with pytest.raises(InDoubt):  # the retry waits instead of describing again
            describe(fast, mail_id, 0)
        assert documents_at(sandbox) == []
        drain(fast, [Step("describe", mail_id, 0)])  # after the window: adopted
    finally:
        fast.close()
    wait_until(  # the held POST has landed before the invariant
        lambda: sandbox.state.stats()["faults"].get("late_commit", 0) >= 1,
        15,
        "the held POST applied",
    )
    (only,) = documents_at(sandbox)
    assert only["uploaded"]
    assert sandbox.state.stats()["requests"].get("POST /v1/entities/{entity}/documents") == 1


# -- 4. a second copy takes over from a failed first -------------------------------------


def test_4_a_copy_of_a_failed_mail_uploads_the_same_document_not_a_second(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    deliver(imap, [mail(PDF), mail(PDF, received="from mx2; Mon, 1 Dec 2026 10:00:09 +0000")])
    first, second = (s.mail_id for s in poll(ctx, "default").steps)
    ingest(ctx, first)
    assert describe(ctx, first, 0) == [Step("upload", first, 0)]
    give_up(ctx, Step("upload", first, 0), RuntimeError("worker lost"))  # the owner fails
    drain(ctx, ingest(ctx, second))  # the copy takes over: it uploads the same document
    drain(ctx, replay(ctx, first))  # the owner's own retry comes back
    (only,) = documents_at(sandbox)
    assert only["uploaded"]
    assert {ctx.ledger.mail(m).state for m in (first, second)} == {L.DONE}  # type: ignore[union-attr]


# -- 5. deliveries without Message-ID --------------------------------------------------


def test_5_a_mail_without_message_id_delivered_twice_is_uploaded_once(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    raw = mail(PDF, JPG, message_id=None)
    again = b"Received: from mx2 by mx; Mon, 1 Dec 2026 10:00:07 +0000\r\n" + raw
    deliver(imap, [raw, again])  # the relay delivered it twice, with its own trace header
    summary = poll_once(ctx)
    assert summary.processed == 2, summary
    docs = documents_at(sandbox)
    assert len(docs) == 2 and all(d["uploaded"] for d in docs)


def test_5b_a_move_whose_answer_was_lost_is_recorded_where_it_went(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """No Message-ID; the MOVE went through but its answer never came (here: the mail
    moved by our earlier run). The ledger records it in Processed, by size and date."""
    deliver(imap, [mail(PDF, message_id=None)])
    mail_id = first_mail(ctx)
    record = until_done(ctx, mail_id)
    with Mailbox(ctx.settings.inbox("default")) as box:  # the MOVE that went through
        box.ensure_folders("Processed")
        box.select("INBOX")
        box.move(record.ref.uid, "Processed")
    finish(ctx, mail_id)
    assert ctx.ledger.mail(mail_id).filed_to == "Processed"  # type: ignore[union-attr]


# -- 6. expired staging and changed settings ----------------------------------------


def _expire_and_run(env: dict[str, str], sandbox: SandboxServer, changes: dict[str, str]) -> None:
    """Plan a mail (logo skipped, bill.pdf at index 0), let its staged bytes expire,
    change the settings, run it to the end: bill.pdf must get exactly its bytes."""
    logo = (png_bytes(900), "image/png", "logo.png", "inline")
    first = build_context(load_settings(env))
    try:
        deliver_raw(first, mail(logo, PDF))
        mail_id = first_mail(first)
        ingest(first, mail_id)
        doc = first.ledger.document(mail_id, 0)
        assert doc is not None and doc.name == "bill"
    finally:
        first.close()
    changed = build_context(load_settings(env | changes))
    try:
        changed.redis.delete(*changed.redis.keys("mailingest:blob:*"))  # the TTL ran out
        drain(changed, [Step("describe", mail_id, 0)])
        record = changed.ledger.mail(mail_id)
        assert record is not None and record.state == L.DONE and record.filed_to == "Processed"
    finally:
        changed.close()
    (only,) = documents_at(sandbox)
    assert sandbox.state.download(ENTITY, only["document_token"]) == PDF[0]


def test_6_expired_bytes_are_found_by_hash_not_by_screening_again(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path
) -> None:
    """The inline-image floor was lowered meanwhile: screening again would put the logo
    at index 0 and upload it as bill.pdf. The bytes sent must be the bytes planned."""
    _expire_and_run(env, sandbox, {"MAILINGEST_INLINE_IMAGE_FLOOR": "0"})


@pytest.mark.timeout(60)
def test_6b_expired_bytes_are_found_when_the_allowed_types_changed(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path
) -> None:
    """PDFs are no longer allowed: screening again finds nothing to stage, and upload
    and re-staging alternated without end. The planned bytes are still the ones sent."""
    _expire_and_run(env, sandbox, {"MAILINGEST_ALLOWED_TYPES": "png"})


# -- 7. a step frozen past its lock ------------------------------------------------------


def test_7_a_describe_frozen_past_its_lock_does_not_post_beside_its_successor(
    ctx: Context, env: dict[str, str], imap: ImapServer, sandbox: SandboxServer
) -> None:
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    frozen, resume = threading.Event(), threading.Event()
    real_list = ctx.alloy.list

    def list_then_freeze(entity: str):  # type: ignore[no-untyped-def]
        found = real_list(entity)  # the real call; then this run stops (SIGSTOP, VM pause)
        frozen.set()
        resume.wait(30)
        return found

    ctx.alloy.list = list_then_freeze  # type: ignore[method-assign]
    out: list[object] = []
    sleeper = threading.Thread(target=lambda: out.append(describe(ctx, mail_id, 0)))
    sleeper.start()
    assert frozen.wait(10)
    ctx.redis.delete(*ctx.redis.keys("mailingest:lock:step:*"))  # its lock expired
    other = build_context(load_settings(env))
    try:
        drain(other, [Step("describe", mail_id, 0)])  # the successor does the work
    finally:
        other.close()
    resume.set()
    sleeper.join(30)
    assert out and out[0] in ([], [Step("upload", mail_id, 0)])
    (only,) = documents_at(sandbox)
    assert only["uploaded"]


# -- 8. clock skew, and timestamps in seconds ------------------------------------------


def test_8_a_lost_describe_is_adopted_whatever_alloys_clock_says(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    sandbox.set_faults(clock_offset_ms=-45_000)  # Alloy's clock 45 s behind ours
    lost = lost_describe(ctx, mail_id, record_attempt=True)
    drain(ctx, [Step("describe", mail_id, 0)])
    (only,) = documents_at(sandbox)
    assert only["document_token"] == lost and only["uploaded"]


def test_8b_alloy_timestamps_in_seconds_or_missing_are_read_as_such() -> None:
    from mailingest.adapters.alloy import Document

    base = {"document_token": "D-x", "name": "a", "extension": "pdf", "type": "other"}
    assert Document.from_json(base | {"timestamp": 1_700_000_000}).timestamp == 1_700_000_000_000
    assert (
        Document.from_json(base | {"timestamp": 1_700_000_000_123}).timestamp == 1_700_000_000_123
    )
    assert Document.from_json(base).timestamp is None
    assert Document.from_json(base | {"timestamp": "soon"}).timestamp is None


# -- 9. Redis loses its last writes ---------------------------------------------------


def snapshot(client: redis.Redis) -> dict[bytes, bytes]:
    return {key: client.dump(key) for key in client.keys("*")}  # type: ignore[misc]


def restore(client: redis.Redis, state: dict[bytes, bytes]) -> None:
    client.flushdb()
    for key, value in state.items():
        client.restore(key, 0, value)


def test_9_a_rollback_of_the_last_writes_uploads_nothing_twice(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """Everything from the attempt record to the upload's record is lost (a host crash
    with appendfsync everysec): the document is at Alloy, uploaded, and the ledger
    does not know. It is recognised by its bytes, not described again."""
    deliver(imap, [mail(PDF, JPG)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    before = snapshot(ctx.redis)
    drain(ctx, [Step("describe", mail_id, 0)])  # document 0 described and uploaded
    restore(ctx.redis, before)  # ... and Redis forgot all of it
    drain(ctx, [Step("describe", mail_id, 0), Step("describe", mail_id, 1)])
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.state == L.DONE and record.filed_to == "Processed"
    docs = documents_at(sandbox)
    assert len(docs) == 2 and all(d["uploaded"] for d in docs)


def test_9b_a_rollback_after_the_post_adopts_the_description(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """Redis lost the attempt record but the POST reached Alloy: without any record of an
    attempt, the document is still looked for before it is described."""
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    before = snapshot(ctx.redis)
    lost = lost_describe(ctx, mail_id, record_attempt=False)
    restore(ctx.redis, before)
    drain(ctx, [Step("describe", mail_id, 0)])
    (only,) = documents_at(sandbox)
    assert only["document_token"] == lost and only["uploaded"]


# -- 10. requeues count only when nothing moved ------------------------------------------


def test_10_a_mail_that_progresses_between_requeues_is_never_failed_as_stuck() -> None:
    def record(**fields: object) -> L.MailRecord:
        h = {"state": L.DOCUMENTS_PENDING} | {k: str(v) for k, v in fields.items()}
        return L.MailRecord.from_hash("default/INBOX/1/1", h)

    now = 10_000_000
    policy = SweepPolicy(
        stale_ms=600_000,
        lease_ms=15_000,
        max_attempts=8,
        failed_retries=0,
        failed_retry_after_ms=0,
        finish_grace_ms=0,
    )
    live = Liveness(leased=False, queued_since=None)
    # requeued 8 times over its life, but it moved on after the last requeue
    progressing = record(requeues=8, requeued_at=now - 900_000, updated_at=now - 700_000)
    verdict = stale(progressing, now, policy=policy, live=live)
    assert verdict is not None and not verdict.fail and verdict.requeues == 1
    # queued again 8 times in a row without any progress: a poison mail
    stuck = record(requeues=8, requeued_at=now - 700_000, updated_at=now - 5_000_000)
    verdict = stale(stuck, now, policy=policy, live=live)
    assert verdict is not None and verdict.fail
    assert stale(record(updated_at=now - 1000), now, policy=policy, live=live) is None


def test_10b_the_sweep_requeues_a_progressing_mail_instead_of_failing_it(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    now = ctx.ledger.now()
    stale_ms = ctx.settings.stale_after * 1000
    ctx.ledger.update(mail_id, updated_at=now - stale_ms - 10_000)
    ctx.redis.hset(
        f"mailingest:mail:{mail_id}",
        mapping={"requeues": ctx.settings.max_attempts, "requeued_at": now - 2 * stale_ms},
    )
    steps = poll(ctx, "default").steps
    assert Step("ingest", mail_id) in steps
    assert ctx.ledger.mail(mail_id).state == L.DOCUMENTS_PENDING  # type: ignore[union-attr]


# -- 11. a copy of a mail already filed ------------------------------------------------


def test_11_a_copy_planned_while_the_first_is_in_flight_is_filed_not_failed(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """The copy is planned while the first mail's upload still waits in the queue: it
    must not wait on the first until its retries run out (it was left `failed`)."""
    deliver(imap, [mail(PDF)])
    first = first_mail(ctx)
    ingest(ctx, first)
    assert describe(ctx, first, 0) == [Step("upload", first, 0)]  # its upload waits
    deliver(imap, [mail(PDF, received="from mx2; Mon, 1 Dec 2026 10:05:00 +0000")])
    (step,) = poll(ctx, "default").steps
    second = step.mail_id
    drain(ctx, [Step("ingest", second)])  # the copy runs meanwhile
    drain(ctx, [Step("upload", first, 0)])  # then the first's queued upload
    for mail_id in (first, second):
        record = ctx.ledger.mail(mail_id)
        assert record is not None
        assert (record.state, record.filed_to) == (L.DONE, "Processed"), record.reason
    (only,) = documents_at(sandbox)
    assert only["uploaded"]
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 2}


def test_11b_a_copy_of_a_mail_filed_long_ago_is_recognised_and_filed(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    deliver(imap, [mail(PDF, JPG)])
    assert poll_once(ctx).processed == 1
    deliver(imap, [mail(PDF, JPG, received="from mx2; Mon, 1 Dec 2026 10:05:00 +0000")])
    summary = poll_once(ctx)
    assert summary.processed == 1, summary
    assert len(documents_at(sandbox)) == 2
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 2}


# -- found by the extended fault suite ---------------------------------------------------


def test_12_a_copy_of_a_mail_whose_upload_alloy_refused_is_quarantined_too(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """Both copies share the document's slot; Alloy refused its bytes for good for the
    first. The second must not wait forever in documents_pending: it is quarantined
    with the reason, and nothing is sent again."""
    raw = mail(PDF)
    deliver(imap, [raw, b"Received: from mx2 by mx; Mon, 1 Dec 2026 10:00:07 +0000\r\n" + raw])
    first, second = (s.mail_id for s in poll(ctx, "default").steps)
    ingest(ctx, first)
    assert describe(ctx, first, 0) == [Step("upload", first, 0)]
    sandbox.set_faults(refuse_fraction=1.0, seed=3)
    drain(ctx, [Step("upload", first, 0)])
    sandbox.set_faults(refuse_fraction=0.0)
    drain(ctx, ingest(ctx, second))
    for mail_id in (first, second):
        record = ctx.ledger.mail(mail_id)
        assert record is not None and record.state == L.QUARANTINED
        assert record.filed_to == "Quarantine"
        assert "document 0 (bill.pdf)" in record.reason and "400/4001" in record.reason
    (only,) = documents_at(sandbox)
    assert not only["uploaded"]  # the refused description stays: Alloy cannot delete it
    assert sandbox.state.stats()["requests"].get("POST /v1/entities/{entity}/documents") == 1


def test_12b_a_second_refusal_in_a_quarantined_mail_is_part_of_its_reason(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    deliver(imap, [mail(PDF, JPG)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    describe(ctx, mail_id, 0)
    describe(ctx, mail_id, 1)
    sandbox.set_faults(refuse_fraction=1.0, seed=3)
    drain(ctx, [Step("upload", mail_id, 0), Step("upload", mail_id, 1)])
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.filed_to == "Quarantine"
    assert "document 0 (bill.pdf)" in record.reason
    assert "document 1 (passport.jpg)" in record.reason


# -- found by the simulation ------------------------------------------------------------


def test_13_a_describe_stalled_after_recording_its_attempt_does_not_send(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path
) -> None:
    """Frozen between its attempt record and the POST for longer than the send guard:
    others count the window from the record, so a late send could land after they had
    described the document. It is not sent; the next run describes it once."""
    ticks = {"skew": 0}
    base = build_context(load_settings(env))
    real_now = base.ledger.now
    base.close()
    ctx = build_context(load_settings(env), clock=lambda: real_now() + ticks["skew"])
    try:
        deliver(imap, [mail(PDF)])
        mail_id = first_mail(ctx)
        ingest(ctx, mail_id)
        real_begin = ctx.ledger.begin_attempt

        def begin_then_stall(*args: Any, **kw: Any) -> Any:
            attempt = real_begin(*args, **kw)
            ticks["skew"] += 10_000  # the process stood still for 10 s right here
            return attempt

        ctx.ledger.begin_attempt = begin_then_stall  # type: ignore[method-assign]
        with pytest.raises(Busy):
            describe(ctx, mail_id, 0)
        assert documents_at(sandbox) == []  # nothing was sent
        ctx.ledger.begin_attempt = real_begin  # type: ignore[method-assign]
        drain(ctx, [Step("describe", mail_id, 0)])  # not in doubt: described at once
    finally:
        ctx.close()
    (only,) = documents_at(sandbox)
    assert only["uploaded"]


def test_14_a_retry_after_redis_lost_the_mail_does_not_hide_it_from_the_next_poll(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """Redis lost the mail's record (and the watermark) while a step of it was failing:
    the step's retry bookkeeping must not re-create a record without a state, which made
    the next poll skip the mail for good."""
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    ctx.redis.delete(*ctx.redis.keys("mailingest:*"))  # the rollback: all of it gone
    recover(ctx, Step("ingest", mail_id), AlloyUnavailable("down"), 0)  # a retry scheduled
    assert not ctx.redis.exists(f"mailingest:mail:{mail_id}")
    summary = poll_once(ctx)
    assert summary.processed == 1, summary
    assert len(documents_at(sandbox)) == 1


# -- found by the adversarial review ----------------------------------------------------


def test_15_two_documents_of_one_name_both_in_doubt_leave_no_description_behind(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """Mails A and B each carry a different bill.pdf for one customer; both describes'
    answers are lost and Alloy commits them late, inside their windows. B must not take
    A's description while A's describe may still commit (nor A post anew while B's may):
    otherwise the late one is left `uploaded: false`, claimed by nobody."""
    other = (pdf_bytes("other bill", 3000), "application/pdf", "bill.pdf", "attachment")
    deliver(imap, [mail(PDF, message_id="<a@x>"), mail(other, message_id="<b@x>")])
    a, b = (step.mail_id for step in poll(ctx, "default").steps)
    ingest(ctx, a)
    ingest(ctx, b)
    window = ctx.settings.in_doubt_ms
    doc_a, doc_b = ctx.ledger.document(a, 0), ctx.ledger.document(b, 0)
    assert doc_a is not None and doc_b is not None and doc_a.sha256 != doc_b.sha256
    doubt = L.doubt_key(ENTITY, doc_a)
    assert doubt == L.doubt_key(ENTITY, doc_b)  # same name, extension, type

    def begun(doc: L.DocumentRecord, mail_id: str) -> None:  # POSTed; the answer is lost
        slot = ctx.ledger.slot(ENTITY, doc.fingerprint)
        assert ctx.ledger.begin_attempt(slot, mail_id, doubt, window_ms=window).verdict == "go"

    def age(doc: L.DocumentRecord, ms: int) -> None:  # the attempt was begun ms ago
        at = ctx.ledger.now() - ms
        ctx.redis.hset(f"mailingest:slot:{ENTITY}:{doc.fingerprint}", "attempt_at", at)
        ctx.redis.zadd(doubt, {doc.fingerprint: at})

    begun(doc_a, a)
    begun(doc_b, b)
    age(doc_a, 10_000)  # A's went out 10 s before B's
    post_description(ctx, doc_a)  # Alloy applies A's POST, sent earlier
    with pytest.raises(InDoubt):  # B's retry: A's late description may be A's
        describe(ctx, b, 0)
    age(doc_a, window + 1)  # A's window is over; B's (10 s later) is not
    age(doc_b, window + 1 - 10_000)
    with pytest.raises(InDoubt):  # A does not post anew while B's may still commit
        describe(ctx, a, 0)
    post_description(ctx, doc_b)  # B's lost POST commits, inside its window
    age(doc_b, window + 1)
    drain(ctx, [Step("describe", a, 0), Step("describe", b, 0)])
    for mail_id in (a, b):
        record = ctx.ledger.mail(mail_id)
        assert record is not None and (record.state, record.filed_to) == (L.DONE, "Processed")
    docs = documents_at(sandbox)
    assert len(docs) == 2 and all(d["uploaded"] for d in docs)
    held = {sandbox.state.download(ENTITY, d["document_token"]) for d in docs}
    assert held == {PDF[0], other[0]}


# -- found by the benchmark's recovery phase --------------------------------------------


def test_16_a_document_step_failing_for_good_in_a_quarantined_mail_does_not_loop(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """Document 0's PUT got through but its answer was lost (a killed worker); its retry
    is answered 409, and Alloy's download of the token answers 404 (here: the sandbox
    keeps only digests of what it is sent). Document 1 was refused, so the mail is
    quarantined. The upload failing for good must settle document 0 (refused, with
    Alloy's answer in the reason): before, finish sent the same upload again, which
    quarantined the mail again, which sent finish again, without end."""
    deliver(imap, [mail(PDF, JPG)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    assert describe(ctx, mail_id, 0) == [Step("upload", mail_id, 0)]
    doc = ctx.ledger.document(mail_id, 0)
    assert doc is not None and doc.token
    sandbox.state.keep_bodies = False  # type: ignore[attr-defined]
    ctx.alloy.upload(ENTITY, doc.token, PDF[0])  # the PUT whose answer was lost
    ready = quarantine(ctx, mail_id, "document 1 (passport.jpg): refused (test)")
    ran = 0
    while ready:  # what the workers do, with a bound where they have none
        ran += 1
        assert ran < 20, f"still running after {ran} steps: {ready}"
        step = ready.pop(0)
        try:
            ready += run_step(ctx, step)
        except Exception as exc:  # noqa: BLE001 - as the task runner does
            ready += recover(ctx, step, exc, 0).steps
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.filed_to == "Quarantine"
    assert "document 0 (bill.pdf)" in record.reason and "404" in record.reason
    slot = ctx.ledger.slot(ENTITY, doc.fingerprint)
    assert slot.refused and not slot.uploaded
    puts = sandbox.state.stats()["requests"].get("PUT /v1/entities/{entity}/documents/{document}")
    assert puts == 2  # the lost one and its retry, not one more


class AnswerOnce(httpx.BaseTransport):
    """The real transport, but the first request ``hit`` matches is answered ``status``
    by "Alloy's edge" (a transient 4xx such as 408) without reaching the sandbox."""

    def __init__(
        self, inner: httpx.BaseTransport, hit: Callable[[httpx.Request], bool], status: int
    ) -> None:
        self.inner, self.hit, self.status, self.left = inner, hit, status, 1

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.left and self.hit(request):
            self.left -= 1
            request.read()
            error = {"minor_code": self.status * 10, "type": "Timeout", "message": "injected"}
            return httpx.Response(self.status, json={"error": error}, request=request)
        return self.inner.handle_request(request)


def answer_once(ctx: Context, hit: Callable[[httpx.Request], bool], status: int) -> None:
    http = ctx.alloy._http  # the client's own transport, wrapped
    http._transport = AnswerOnce(http._transport, hit, status)


def work(ctx: Context, ready: list[Step], bound: int = 40) -> None:
    """What the workers do: run, recover (retries at once), run what comes back."""
    for _ in range(bound):
        if not ready:
            return
        step = ready.pop(0)
        try:
            ready += run_step(ctx, step)
        except Exception as exc:  # noqa: BLE001 - as the task runner does
            recovery = recover(ctx, step, exc, 0)
            ready += [step] if recovery.retry_in is not None else recovery.steps
    raise AssertionError(f"still running after {bound} steps: {ready}")


def test_16b_one_copys_unreadable_staged_bytes_do_not_refuse_the_shared_document(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path
) -> None:
    """Copy A's staged bytes no longer open with the staging key (an unexpected error,
    this copy's own): A's document is lost to A only, and copy B uploads it."""
    key = base64.urlsafe_b64encode(bytes(range(32))).decode()
    ctx = build_context(load_settings(env | {"MAILINGEST_STAGING_KEY": key}))
    try:
        raw = mail(PDF)
        deliver(imap, [raw, b"Received: from mx2 by mx; Mon, 1 Dec 2026 10:00:07 +0000\r\n" + raw])
        a, b = (s.mail_id for s in poll(ctx, "default").steps)
        ingest(ctx, a)
        assert describe(ctx, a, 0) == [Step("upload", a, 0)]
        bad = b"MIS1" + bytes(12) + b"x" * 64  # sealed under another key
        ctx.ledger.redis.set(keys.blob(a, 0), bad)
        ctx.ledger.redis.set(keys.raw(a), bad)
        work(ctx, [Step("upload", a, 0)])
        work(ctx, [Step("ingest", b)])
        first, second = ctx.ledger.mail(a), ctx.ledger.mail(b)
        assert first is not None and first.filed_to == "Quarantine"
        assert second is not None and second.filed_to == "Processed", second.reason
    finally:
        ctx.close()
    (only,) = documents_at(sandbox)
    assert only["uploaded"]


def test_16c_a_408_on_the_download_after_a_409_is_retried_not_a_refusal(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """The PUT got through and its answer was lost; the retry is answered 409 and the
    download that checks Alloy's bytes 408 once: retried, the bytes are ours, done."""
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    assert describe(ctx, mail_id, 0) == [Step("upload", mail_id, 0)]
    doc = ctx.ledger.document(mail_id, 0)
    assert doc is not None and doc.token
    ctx.alloy.upload(ENTITY, doc.token, PDF[0])  # the PUT whose answer was lost
    answer_once(ctx, lambda r: r.method == "GET" and "/documents/" in r.url.path, 408)
    work(ctx, [Step("upload", mail_id, 0)])
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.filed_to == "Processed", record.reason
    assert not ctx.ledger.slot(ENTITY, doc.fingerprint).refused


def test_16d_a_describe_in_doubt_failing_for_good_keeps_its_mail_until_it_is_settled(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer
) -> None:
    """The describe's POST reached Alloy, its answer was lost; its retry fails for good
    (a 400 on the listing that looks for it). A description may be at Alloy: the
    document is not settled, and the mail, quarantined, is not moved at once (the
    sweep's finish looks again after FINISH_GRACE) rather than left with it bare."""
    deliver(imap, [mail(PDF)])
    mail_id = first_mail(ctx)
    ingest(ctx, mail_id)
    lost_describe(ctx, mail_id, record_attempt=True)
    answer_once(ctx, lambda r: r.method == "GET" and r.url.path.endswith("/documents"), 400)
    work(ctx, [Step("describe", mail_id, 0)])
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.state == L.QUARANTINED and record.filed_to == ""
    assert "document 0 (bill.pdf)" in record.reason
    doc = ctx.ledger.document(mail_id, 0)
    assert doc is not None and doc.state != L.DocumentState.LOST
    # the sweep's finish, later: the description is found, adopted and uploaded first
    work(ctx, [Step("finish", mail_id)])
    record = ctx.ledger.mail(mail_id)
    assert record is not None and record.filed_to == "Quarantine"
    (only,) = documents_at(sandbox)
    assert only["uploaded"]
