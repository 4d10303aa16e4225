"""IMAP edges: UIDVALIDITY change, no MOVE, a failed move, a server restart, a mail
deleted by a person while in flight. Real Dovecot (pymap where Dovecot is missing),
real Redis and the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest
from imapclient import IMAPClient
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import bulk_scenario
from mailingest_testbed.servers import ImapServer

from mailingest.adapters import ledger as L
from mailingest.adapters.imap import Mailbox
from mailingest.application.pipeline import Step, describe, finish, ingest, poll, upload
from mailingest.application.poll_once import poll_once
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings
from mailingest.core.errors import MailboxError

from .conftest import require_or_skip
from .helpers import deliver, dovecot_without_move, folder_counts, inbox_settings, write_senders

pytestmark = pytest.mark.servers


def imap_client(imap: ImapServer) -> IMAPClient:
    client = IMAPClient(imap.account.host, port=imap.account.port, ssl=False, timeout=10)
    client.login(imap.account.user, imap.account.password)
    return client


def test_uidvalidity_change_does_not_upload_again(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """The folder is recreated (new UIDVALIDITY, UIDs from 1 again) and the old mail
    comes back with new mail: the old documents are matched by Message-ID and digest."""
    scenario = bulk_scenario(4, seed=41)
    write_senders(senders_file, scenario)
    env = env | {"MAILINGEST_IMAP_FOLDER": "Support"}
    client = imap_client(imap)
    client.create_folder("Support")
    client.logout()
    old, new = scenario.mails[:3], scenario.mails[3:4]
    deliver(imap, [m.raw for m in old], folder="Support")
    ctx = build_context(load_settings(env))
    try:
        first = poll_once(ctx)
        assert first.processed == 3
        documents_before = sandbox.state.stats()["documents"]
        client = imap_client(imap)
        client.delete_folder("Support")  # an admin restores the folder from a backup
        client.create_folder("Support")
        client.logout()
        deliver(imap, [m.raw for m in old + new], folder="Support")
        second = poll_once(ctx)
        assert second.found == 4 and second.processed == 4, second
        epochs = {L.MailRef.parse(m.mail_id).uidvalidity for m in first.mails + second.mails}
        assert len(epochs) == 2  # the same UIDs again, in a new epoch
    finally:
        ctx.close()
    new_documents = len(new[0].documents)
    assert sandbox.state.stats()["documents"] == documents_before + new_documents
    assert all(d["uploaded"] for e in scenario.senders.values() for d in sandbox.state.list(e))


def test_move_without_the_move_capability(tmp_path: Path) -> None:
    """COPY + \\Deleted + UID EXPUNGE of that UID only: another mail flagged \\Deleted
    by a person stays where it is."""
    server = dovecot_without_move(tmp_path)
    try:
        account = server.account
        inbox = inbox_settings(account)
        deliver(server, [b"Subject: one\r\n\r\n1\r\n", b"Subject: two\r\n\r\n2\r\n"])
        client = imap_client(server)
        client.select_folder("INBOX")
        keep, move = sorted(client.search(["ALL"]))
        client.add_flags([keep], [b"\\Deleted"])  # a person's pending deletion
        client.logout()
        with Mailbox(inbox) as box:
            assert not box.client.has_capability("MOVE")
            box.select("INBOX")
            box.move(move, "Processed")
        client = imap_client(server)
        client.select_folder("INBOX")
        assert client.search(["ALL"]) == [keep]  # not expunged by our move
        assert client.select_folder("Processed")[b"EXISTS"] == 1
        client.logout()
    finally:
        server.stop()


def test_a_failed_move_is_retried_without_uploading_again(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    if imap.kind != "dovecot":
        require_or_skip("pymap loses its mail on restart; this needs Dovecot")
    scenario = bulk_scenario(1, seed=42)
    write_senders(senders_file, scenario)
    deliver(imap, [scenario.mails[0].raw])
    ctx = build_context(load_settings(env | {"MAILINGEST_FINISH_GRACE": "0"}))
    try:
        (step,) = poll(ctx, "default").steps
        mail_id = step.mail_id
        pending = ingest(ctx, mail_id)
        steps = [s for p in pending for s in describe(ctx, p.mail_id, p.index)]  # type: ignore[arg-type]
        finishing = [s for u in steps for s in upload(ctx, u.mail_id, u.index)]  # type: ignore[arg-type]
        assert finishing == [Step("finish", mail_id)]
        uploads = sandbox.state.stats()["uploaded"]
        imap.stop()
        with pytest.raises(MailboxError):
            finish(ctx, mail_id)  # the server went away after the uploads succeeded
        imap.start()
        assert ctx.ledger.mail(mail_id).state == L.DONE  # type: ignore[union-attr]
        summary = poll_once(ctx)  # the next poll moves it; nothing is uploaded again
        assert summary.found == 0
        assert ctx.ledger.mail(mail_id).filed_to == "Processed"  # type: ignore[union-attr]
        assert sandbox.state.stats()["uploaded"] == uploads
        assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 1}
    finally:
        ctx.close()


def test_mail_deleted_by_a_person_while_in_flight(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    scenario = bulk_scenario(2, seed=43)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails[:2]])
    ctx = build_context(load_settings(env))
    try:
        first, second = poll(ctx, "default").steps
        client = imap_client(imap)
        client.select_folder("INBOX")
        client.delete_messages(client.search(["ALL"]))
        client.expunge()
        client.logout()
        # the first had its bytes staged: it is ingested and uploaded, then cannot be moved
        ctx.ledger.drop_raw(second.mail_id)  # the second's staged copy expired meanwhile
        from mailingest.application.poll_once import run_steps

        run_steps(ctx, [first, second])
        one, two = ctx.ledger.mail(first.mail_id), ctx.ledger.mail(second.mail_id)
        assert one is not None and one.state == L.DONE and one.filed_to == "-"
        assert "left INBOX before" in one.reason
        assert two is not None and two.state == L.FAILED
        assert "no longer in INBOX" in two.reason
    finally:
        ctx.close()


def test_imap_server_restart_between_polls(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    if imap.kind != "dovecot":
        require_or_skip("pymap loses its mail on restart; this needs Dovecot")
    scenario = bulk_scenario(3, seed=44)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails[:2]])
    ctx = build_context(load_settings(env))
    try:
        assert poll_once(ctx).processed == 2
        imap.restart()
        deliver(imap, [scenario.mails[2].raw])
        assert poll_once(ctx).processed == 1
    finally:
        ctx.close()
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 3}


@pytest.mark.slow
def test_copy_fallback_does_not_copy_twice_after_a_crash(tmp_path: Path) -> None:
    """A run died after COPY, before STORE/EXPUNGE, having recorded the COPYUID: the next
    move finds that very copy in the destination and only removes the original."""
    server = dovecot_without_move(tmp_path)
    try:
        account = server.account
        inbox = inbox_settings(account)
        deliver(server, [b"Message-ID: <once@x>\r\nSubject: one\r\n\r\n1\r\n"])
        with Mailbox(inbox) as box:
            box.ensure_folders("Processed")
            box.select("INBOX")
            (uid,) = box.uids_after(0)
            copied = box._copy(uid, "Processed")  # the first run got this far, then died
        assert copied
        with Mailbox(inbox) as box:
            box.select("INBOX")
            box.move(uid, "Processed", copied_uid=copied)
        client = imap_client(server)
        assert client.select_folder("Processed")[b"EXISTS"] == 1
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
        client.logout()
    finally:
        server.stop()
