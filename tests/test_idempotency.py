"""Every step may run twice (late acks, redelivery, a second poller): no second Alloy
document, no lost one. Real Redis, IMAP and sandbox; the steps are called directly."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import bulk_scenario, demo_scenario
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import ledger as L
from mailingest.application.pipeline import Step, describe, finish, ingest, poll, run_step, upload
from mailingest.application.poll_once import poll_once, run_steps
from mailingest.application.services import Context, build_context
from mailingest.config.settings import load_settings

from .helpers import deliver, folder_counts, outcome_problems, write_senders

pytestmark = pytest.mark.servers


def alloy_documents(sandbox: SandboxServer, entities: list[str]) -> list[dict]:
    return [d for e in entities for d in sandbox.state.list(e)]


def test_every_step_run_twice_makes_one_document(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = demo_scenario(seed=31)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw])  # licence and passport
    ctx = build_context(load_settings(env))
    try:
        (first,) = poll(ctx, "default").steps
        mail_id = first.mail_id
        assert ingest(ctx, mail_id) == ingest(ctx, mail_id)  # a redelivered ingest
        for index in (0, 1):
            assert describe(ctx, mail_id, index) == [Step("upload", mail_id, index)]
            assert describe(ctx, mail_id, index) == [Step("upload", mail_id, index)]
        upload(ctx, mail_id, 0)
        upload(ctx, mail_id, 0)
        assert upload(ctx, mail_id, 1) == [Step("finish", mail_id)]
        assert upload(ctx, mail_id, 1) == []  # done already: finish was queued once
        finish(ctx, mail_id)
        finish(ctx, mail_id)
        assert ingest(ctx, mail_id) == []  # and once more after it was filed
    finally:
        ctx.close()
    docs = alloy_documents(sandbox, list(scenario.senders.values()))
    assert len(docs) == 2 and all(d["uploaded"] for d in docs)
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 1}


def test_post_reached_alloy_but_the_token_was_never_recorded(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """A worker killed between the POST and recording its answer: the document is
    adopted from Alloy's list, not described a second time."""
    scenario = demo_scenario(seed=32)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[1].raw])  # the utility bill
    ctx = build_context(load_settings(env))
    try:
        (first,) = poll(ctx, "default").steps
        mail_id = first.mail_id
        (describe_step,) = ingest(ctx, mail_id)
        doc = ctx.ledger.document(mail_id, 0)
        assert doc is not None
        slot = ctx.ledger.slot(ctx.ledger.mail(mail_id).entity, doc.fingerprint)  # type: ignore[union-attr]
        ctx.ledger.begin_attempt(  # what describe() records first
            slot, mail_id, L.doubt_key(slot.entity, doc), window_ms=60_000
        )
        inbox = ctx.settings.inbox("default")
        lost = ctx.alloy.describe(  # the POST whose answer the dead worker never recorded
            ctx.ledger.mail(mail_id).entity,  # type: ignore[union-attr]
            name=doc.name,
            extension=doc.extension,
            type=doc.type,
            note=inbox.note,
            note_author_agent_email=inbox.agent_email,
        )
        run_steps(ctx, [describe_step])
        assert ctx.ledger.document(mail_id, 0).token == lost.token  # type: ignore[union-attr]
        assert ctx.ledger.mail(mail_id).state == L.DONE  # type: ignore[union-attr]
    finally:
        ctx.close()
    (only,) = alloy_documents(sandbox, list(scenario.senders.values()))
    assert only["document_token"] == lost.token and only["uploaded"]


def test_two_pollers_at_once_upload_each_document_once(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = bulk_scenario(12, seed=33)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    contexts = [build_context(load_settings(env)) for _ in range(2)]
    errors: list[BaseException] = []

    def run(ctx: Context) -> None:
        try:
            for _ in range(3):
                poll_once(ctx)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # a step skipped because the other poller held its lock is picked up by this sweep
    ctx = contexts[0]
    pending = [Step("ingest", m) for m in ctx.ledger.mail_ids(L.DOCUMENTS_PENDING)]
    run_steps(ctx, pending)
    for c in contexts:
        c.close()
    assert errors == []
    assert outcome_problems(env, scenario) == []
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 0,
        "Processed": 12,
        "Quarantine": 1,
    }


@pytest.mark.slow
def test_slow_answers_past_the_timeout_leave_no_extra_document(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """The sandbox applies a slow request and answers after the client gave up: the
    retry must find and adopt that document, not describe it again."""
    scenario = bulk_scenario(6, seed=34)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    sandbox.set_faults(slow_fraction=0.3, slow_ms=800, seed=5)
    ctx = build_context(
        load_settings(
            env
            | {
                "MAILINGEST_ALLOY_READ_TIMEOUT": "0.3",
                "MAILINGEST_MAX_ATTEMPTS": "30",
            }
        )
    )
    try:
        summary = poll_once(ctx)
    finally:
        ctx.close()
    sandbox.set_faults(slow_fraction=0.0)
    assert summary.ok and summary.processed == 6, summary
    assert sandbox.state.stats()["faults"]["slow"] > 5
    docs = alloy_documents(sandbox, list(scenario.senders.values()))
    assert [d for d in docs if not d["uploaded"]] == []
    assert outcome_problems(env, scenario) == []


def test_a_step_for_a_mail_not_in_the_ledger_does_nothing(
    env: dict[str, str], sandbox: SandboxServer
) -> None:
    ctx = build_context(load_settings(env))
    try:
        for step in (
            Step("ingest", "default/INBOX/1/1"),
            Step("describe", "default/INBOX/1/1", 0),
            Step("upload", "default/INBOX/1/1", 0),
            Step("finish", "default/INBOX/1/1"),
        ):
            assert run_step(ctx, step) == []
    finally:
        ctx.close()
    assert sandbox.state.stats()["requests_total"] == 0


@pytest.mark.slow
def test_two_lost_describes_of_same_named_documents_get_their_own_tokens(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """Two mails from one customer, each with a `scan.pdf`; both POSTs reached Alloy but
    neither answer was recorded. Each document adopts a different token."""
    from email.message import EmailMessage

    from mailingest_testbed.samples import authentication_results, pdf_bytes

    sender, entity = "dana@example.com", "P-danadanadanadanadan"
    senders_file.write_text(f"email,entity_token\n{sender},{entity}\n", encoding="utf-8")
    raws = []
    for n in range(2):
        msg = EmailMessage()
        msg["Authentication-Results"] = authentication_results(sender)
        msg["From"], msg["Subject"], msg["Message-ID"] = sender, f"scan {n}", f"<scan{n}@x>"
        msg.set_content("see attached")
        msg.add_attachment(
            pdf_bytes(f"scan{n}", 3000), maintype="application", subtype="pdf", filename="scan.pdf"
        )
        raws.append(msg.as_bytes())
    deliver(imap, raws)
    ctx = build_context(load_settings(env))
    try:
        steps = list(poll(ctx, "default").steps)
        describes = [d for s in steps for d in ingest(ctx, s.mail_id)]
        inbox = ctx.settings.inbox("default")
        for step in describes:  # the POSTs whose answers were lost
            doc = ctx.ledger.document(step.mail_id, 0)
            assert doc is not None
            ctx.ledger.begin_attempt(
                ctx.ledger.slot(entity, doc.fingerprint),
                step.mail_id,
                L.doubt_key(entity, doc),
                window_ms=60_000,
            )
            ctx.alloy.describe(
                entity,
                name="scan",
                extension="pdf",
                type="other",
                note=inbox.note,
                note_author_agent_email=inbox.agent_email,
            )
        run_steps(ctx, describes)
        tokens = {ctx.ledger.document(s.mail_id, 0).token for s in describes}  # type: ignore[union-attr]
    finally:
        ctx.close()
    docs = sandbox.state.list(entity)
    assert len(tokens) == 2 and len(docs) == 2
    assert all(d["uploaded"] for d in docs)
    assert len({sandbox.state.download(entity, t) for t in tokens}) == 2  # each its own bytes


def test_the_same_mail_twice_at_once_is_uploaded_once(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = demo_scenario(seed=35)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw, scenario.mails[0].raw])  # delivered twice
    ctx = build_context(load_settings(env))
    try:
        first, second = poll(ctx, "default").steps
        steps = ingest(ctx, first.mail_id) + ingest(ctx, second.mail_id)
        run_steps(ctx, steps)  # both copies in flight together
        assert {ctx.ledger.mail(s.mail_id).state for s in (first, second)} == {L.DONE}  # type: ignore[union-attr]
    finally:
        ctx.close()
    docs = sandbox.state.list(scenario.senders["alice.martin@example.com"])
    assert len(docs) == 2 and all(d["uploaded"] for d in docs)
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 2}


def test_a_refusal_mid_flight_leaves_no_empty_description(
    env: dict[str, str], imap: ImapServer, senders_file: Path
) -> None:
    """Alloy refuses the second document for good: the first, already described, is
    still uploaded, so no `uploaded: false` description stays behind at Alloy."""
    scenario = demo_scenario(seed=36)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw])  # a licence PDF and a passport JPEG
    picky = SandboxServer(
        token="t", secret="s", agents=["kyc.agent@support.example"], extensions=["pdf"]
    ).start()
    try:
        ctx = build_context(
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
            summary = poll_once(ctx)
            (record,) = ctx.ledger.mails([L.QUARANTINED])
        finally:
            ctx.close()
        assert summary.quarantined == 1 and "document 1" in record.reason
        docs = picky.state.list(scenario.senders["alice.martin@example.com"])
        assert [(d["extension"], d["uploaded"]) for d in docs] == [("pdf", True)]
    finally:
        picky.stop()
