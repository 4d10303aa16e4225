"""Issue 12 (flat at scale), IMAP: a move on a kept selection sends no SELECT and no
search of the inbox, only a NOOP and a UID FETCH of the mail's size in one round trip
(they vouch for the selection and find the mail), then the MOVE, whose answer names the
new UID (UIDPLUS COPYUID).
Whatever may have changed the selection makes the next one a SELECT.

Real Dovecot (pymap with MAILINGEST_TEST_IMAP=pymap), real Redis and the sandbox. The IMAP
commands are counted as they leave imaplib (bench/imapcount.py), so a SELECT or a UID
SEARCH that comes back into the hot path fails these tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.samples import bulk_scenario
from mailingest_testbed.servers import ImapServer

from bench.imapcount import ImapCounter
from mailingest.adapters import ledger as L
from mailingest.adapters.imap import Mailbox, Moved, Selection, _new_uid
from mailingest.application.pipeline import Step, finish, poll, run_step
from mailingest.application.poll_once import run_steps
from mailingest.application.services import Context, build_context
from mailingest.config.settings import load_settings
from mailingest.core.errors import MailboxError

from .conftest import ALLOY_SECRET, ALLOY_TOKEN
from .helpers import deliver, dovecot_without_move, folder_counts, inbox_settings, write_senders

pytestmark = pytest.mark.servers


def imap_client(imap: ImapServer) -> IMAPClient:
    client = IMAPClient(imap.account.host, port=imap.account.port, ssl=False, timeout=10)
    client.login(imap.account.user, imap.account.password)
    return client


def verbs(commands: list[str]) -> list[str]:
    """``UID MOVE 3 "Processed"`` -> ``UID MOVE``; ``SELECT "INBOX"`` -> ``SELECT``."""
    out = []
    for command in commands:
        words = command.split()
        out.append(" ".join(words[:2]) if words[0] == "UID" else words[0])
    return out


def decide(ctx: Context) -> list[str]:
    """Poll and run every step but the moves; the mails waiting to be moved, in order."""
    ready = list(poll(ctx, "default").steps)
    waiting: list[str] = []
    while ready:
        step = ready.pop(0)
        if step.task == "finish":
            if step.mail_id not in waiting:
                waiting.append(step.mail_id)
            continue
        ready.extend(run_step(ctx, step))
    return waiting


def finish_counted(ctx: Context, mail_ids: list[str]) -> list[list[str]]:
    """Run each mail's finish; the IMAP commands each one sent."""
    sent = []
    with ImapCounter() as counter:
        for mail_id in mail_ids:
            start = len(counter.commands)
            assert finish(ctx, mail_id) == []
            sent.append(verbs(counter.commands[start:]))
    return sent


def uids_by_subject(imap: ImapServer, folder: str) -> dict[str, int]:
    client = imap_client(imap)
    client.select_folder(folder, readonly=True)
    uids = client.search(["ALL"])
    data = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"]) if uids else {}
    client.logout()
    return {
        item[b"BODY[HEADER.FIELDS (SUBJECT)]"].decode().split(":", 1)[1].strip(): uid
        for uid, item in data.items()
    }


def validity_of(imap: ImapServer, folder: str) -> int:
    client = imap_client(imap)
    validity = int(client.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"])
    client.logout()
    return validity


@pytest.fixture
def ctx(env: dict[str, str]) -> Iterator[Context]:
    context = build_context(load_settings(env))
    yield context
    context.close()


def test_the_move_answer_names_the_new_uid_no_search_no_select(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """On the connection the poll used, each move is a NOOP and a UID FETCH (of the
    mail's size), sent together, and a UID MOVE: no SELECT, no UID SEARCH. The ledger
    records the UID the answer named, and that UID in the destination is this very
    mail."""
    scenario = bulk_scenario(4, seed=120)  # four customers' mails and one stranger's
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails])
    waiting = decide(ctx)
    assert len(waiting) == 5
    sent = finish_counted(ctx, waiting)
    assert sent == [["NOOP", "UID FETCH", "UID MOVE"]] * 5, sent
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 0,
        "Processed": 4,
        "Quarantine": 1,
    }
    for folder in ("Processed", "Quarantine"):
        validity = validity_of(imap, folder)
        for subject, uid in uids_by_subject(imap, folder).items():
            (record,) = [r for r in ctx.ledger.mails(L.MAIL_STATES) if r.subject == subject]
            assert record.filed_to == folder
            assert record.copied_uid == f"{validity}:{uid}", (subject, record.copied_uid)


def test_a_mail_moved_by_hand_is_found_where_it_went_or_recorded_as_gone(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """A mail not on the kept selection: the slow path of before (a fresh SELECT, the
    UID looked for, then this very mail looked for in the destination)."""
    scenario = bulk_scenario(3, seed=121)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails[:3]])
    first, second, third = decide(ctx)
    client = imap_client(imap)
    client.create_folder("Archive")
    client.select_folder("INBOX")
    by_subject = uids_by_subject(imap, "INBOX")
    records = {r.id: r for r in ctx.ledger.mails(L.MAIL_STATES)}
    client.move([by_subject[records[second].subject]], "Processed")  # a person files it
    client.move([by_subject[records[third].subject]], "Archive")  # or puts it elsewhere
    client.logout()
    sent = finish_counted(ctx, [first, second, third])
    # the NOOP brought the person's expunges: the FETCH beside it may have been answered
    # from the view before them (Dovecot does), so it is asked again in the synced view
    assert sent[0] == ["NOOP", "UID FETCH", "UID FETCH", "UID MOVE"], sent[0]
    # not on the kept selection: SELECT, look again, then look in the destination
    assert sent[1][:4] == ["NOOP", "UID FETCH", "SELECT", "UID FETCH"], sent[1]
    assert "EXAMINE" in sent[1] and "UID MOVE" not in sent[1], sent[1]
    one, two, three = (ctx.ledger.mail(m) for m in (first, second, third))
    assert one is not None and one.filed_to == "Processed" and one.copied_uid
    assert two is not None and two.filed_to == "Processed" and not two.copied_uid
    assert three is not None and three.filed_to == "-"
    assert "the mail left INBOX before" in three.reason
    assert folder_counts(imap, "INBOX", "Processed", "Archive") == {
        "INBOX": 0,
        "Processed": 2,
        "Archive": 1,
    }


def test_without_move_copy_then_expunge_reads_the_copy_answer(
    tmp_path: Path, redis_url: str, sandbox: SandboxServer, senders_file: Path
) -> None:
    """Dovecot without MOVE: COPY (its COPYUID recorded before anything is removed),
    \\Deleted, UID EXPUNGE of that UID; no SELECT, no search."""
    server = dovecot_without_move(tmp_path)
    try:
        scenario = bulk_scenario(3, seed=122)
        write_senders(senders_file, scenario)
        deliver(server, [m.raw for m in scenario.mails[:3]])
        env = local_environment(
            redis_url,
            server.account,
            sandbox.url,
            senders_file,
            alloy_token=ALLOY_TOKEN,
            alloy_secret=ALLOY_SECRET,
        )
        context = build_context(load_settings(env))
        try:
            waiting = decide(context)
            sent = finish_counted(context, waiting)
            records = [context.ledger.mail(m) for m in waiting]
        finally:
            context.close()
        assert sent == [["NOOP", "UID FETCH", "UID COPY", "UID STORE", "UID EXPUNGE"]] * 3, sent
        validity = validity_of(server, "Processed")
        held = uids_by_subject(server, "Processed")
        for record in records:
            assert record is not None and record.filed_to == "Processed"
            assert record.copied_uid == f"{validity}:{held[record.subject]}"
        assert folder_counts(server, "INBOX", "Processed") == {"INBOX": 0, "Processed": 3}
        # once COPY answers named the new UID, one that names none removes nothing
        deliver(server, [b"Subject: four\r\n\r\n4\r\n"])
        with ImapCounter() as counter, Mailbox(inbox_settings(server.account)) as box:
            box.select("INBOX")
            (uid,) = box.uids_after(0)
            assert box.move(uid, "Processed").to
            start = len(counter.commands)
            assert box.move(uid, "Processed") == Moved(missed=True)
            assert verbs(counter.commands[start:]) == ["UID COPY"]
    finally:
        server.stop()


def test_a_move_that_moved_nothing_of_ours_looks_in_the_destination(
    ctx: Context, imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """The mail was there when looked at, and a person moved it before our MOVE: the
    answer names no UID of ours (the server named its moves before), so this very mail
    is looked for in the destination, and found there."""
    scenario = bulk_scenario(2, seed=124)
    write_senders(senders_file, scenario)
    deliver(imap, [m.raw for m in scenario.mails[:2]])
    first, second = decide(ctx)
    assert finish(ctx, first) == []  # the connection sees COPYUID in a MOVE's answer
    record = ctx.ledger.mail(second)
    assert record is not None
    client = imap_client(imap)
    client.select_folder("INBOX")
    client.move([record.ref.uid], "Processed")  # between our look and our MOVE
    client.logout()
    looked = Mailbox.select_mail

    def there_when_looked_at(box: Mailbox, folder: str, uid: int, *, size: int = 0) -> Selection:
        return Selection(looked(box, folder, uid, size=size).uidvalidity, True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Mailbox, "select_mail", there_when_looked_at)
        (sent,) = finish_counted(ctx, [second])
    at = sent.index("UID MOVE")
    assert "EXAMINE" in sent[at:], sent  # find_copy in Processed
    record = ctx.ledger.mail(second)
    assert record is not None and record.filed_to == "Processed" and not record.copied_uid
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 2}


def test_a_kept_selection_is_vouched_for_by_the_mail_and_dropped_when_anything_changed_it(
    imap: ImapServer,
) -> None:
    """select_mail() on a connection that has the folder selected sends a NOOP and a UID
    FETCH (one round trip), not SELECT. A mail the kept selection does not show, a size
    that is not the one recorded, a read-only look at another folder, a SELECT behind
    the adapter's back, a failed command, a new connection: each makes it a SELECT (then
    the UID is looked at again). select() itself always sends SELECT."""
    deliver(imap, [b"Subject: one\r\n\r\n1\r\n"])
    inbox = inbox_settings(imap.account)
    with ImapCounter() as counter, Mailbox(inbox) as box:

        def sent(call: Callable[[], object]) -> list[str]:
            start = len(counter.commands)
            call()
            return verbs(counter.commands[start:])

        assert sent(lambda: box.select("INBOX")) == ["SELECT"]
        validity = box.select("INBOX")
        (one,) = box.uids_after(0)
        size = box.sizes([one])[one]
        kept = ["NOOP", "UID FETCH"]
        fresh = [*kept, "SELECT", "UID FETCH"]
        where = box.select_mail("INBOX", one, size=size)
        assert where.uidvalidity == validity and where.present
        assert sent(lambda: box.select_mail("INBOX", one, size=size)) == kept
        assert sent(lambda: box.select_mail("INBOX", one)) == kept  # size 0: not compared
        assert sent(lambda: box.select_mail("INBOX", one, size=size + 1)) == fresh
        deliver(imap, [b"Subject: two\r\n\r\n2\r\n"])  # another session
        two = one + 1 if imap.kind == "dovecot" else max(box.uids_after(0))
        where = box.select_mail("INBOX", two)
        assert where.present  # on Dovecot not in the kept view yet: SELECT, then found
        assert sent(lambda: box.select_mail("INBOX", two)) == kept
        missing = box.select_mail("INBOX", two + 100)
        assert missing.uidvalidity == validity and not missing.present
        assert sent(lambda: box.select_mail("INBOX", one)) == kept
        box.find_copy("Processed", size=1, internaldate="")  # no such folder: LIST only
        assert sent(lambda: box.select_mail("INBOX", one)) == kept
        box.ensure_folders("Processed")
        box.find_copy("Processed", size=1, internaldate="")  # EXAMINE Processed
        assert sent(lambda: box.select_mail("INBOX", one)) == ["SELECT", "UID FETCH"]
        box.client.select_folder("Processed")  # behind the adapter's back
        assert sent(lambda: box.select_mail("INBOX", one)) == ["SELECT", "UID FETCH"]
        with pytest.raises(MailboxError):
            box.select("No such folder")
        assert sent(lambda: box.select_mail("INBOX", one)) == ["SELECT", "UID FETCH"]
        assert sent(lambda: box.select("INBOX")) == ["SELECT"]
        box.close()
        box.connect()
        assert sent(lambda: box.select_mail("INBOX", one)) == ["SELECT", "UID FETCH"]


def test_a_folder_made_anew_under_a_kept_selection_is_not_acted_on(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, senders_file: Path
) -> None:
    """The inbox folder is deleted and created again (a restore) while a worker's
    connection has it selected, and another mail arrives in it with the same UID. The
    move of the old mail must not touch the new one. Dovecot and pymap both let a
    session go on in a folder deleted under it and would MOVE the new folder's mail of
    that UID. The NOOP and UID FETCH that vouch for a kept selection catch it: Dovecot
    answers the NOOP with a NO or a BYE (its FETCH alone still gives the old mail's
    size), pymap the FETCH with the new mail's size; a SELECT (after a BYE, on a new
    connection) then finds the new UIDVALIDITY. With the kept selection trusted as it
    is, this test fails on both."""
    scenario = bulk_scenario(1, seed=123)
    write_senders(senders_file, scenario)
    env = env | {"MAILINGEST_IMAP_FOLDER": "Support"}
    client = imap_client(imap)
    client.create_folder("Support")
    client.logout()
    deliver(imap, [scenario.mails[0].raw], folder="Support")
    context = build_context(load_settings(env))
    try:
        (mail_id,) = decide(context)
        record = context.ledger.mail(mail_id)
        assert record is not None
        client = imap_client(imap)
        client.delete_folder("Support")
        client.create_folder("Support")
        client.append("Support", b"Subject: not ours to move\r\n\r\nnew\r\n")
        client.logout()
        assert list(uids_by_subject(imap, "Support").values()) == [record.ref.uid]
        # Dovecot may answer with a BYE (session inconsistent): the step fails, the
        # connection is closed, and the retry selects the new folder
        run_steps(context, [Step("finish", mail_id)])
        record = context.ledger.mail(mail_id)
    finally:
        context.close()
    assert uids_by_subject(imap, "Support") == {"not ours to move": record.ref.uid}
    assert "not ours to move" not in uids_by_subject(imap, "Processed")
    assert record is not None and record.filed_to == "-"
    assert "UIDVALIDITY of Support changed" in record.reason


def test_copyuid_answers_are_read_in_order_and_only_for_our_uid() -> None:
    assert _new_uid([b"[COPYUID 9 4 12] Moved UIDs."], 4) == "9:12"
    assert _new_uid([b"Move completed", b"[copyuid 9 2:4 7:9] Moved"], 3) == "9:8"
    assert _new_uid([b"[COPYUID 9 2,5:6 20,30:31] Moved"], 6) == "9:31"
    assert _new_uid([b"[COPYUID 9 4 12] Moved UIDs."], 5) == ""
    assert _new_uid([b"No messages found"], 4) == ""
    assert _new_uid([b"[COPYUID 9 1:4294967295 1:4294967295] huge"], 4000000000) == ("9:4000000000")
    assert _new_uid([b"[COPYUID 9 4:x 12] malformed"], 4) == ""


def test_a_move_needs_a_selection_it_can_vouch_for(imap: ImapServer) -> None:
    deliver(imap, [b"Subject: one\r\n\r\n1\r\n"])
    with Mailbox(inbox_settings(imap.account)) as box:
        box.select("INBOX")
        (uid,) = box.uids_after(0)
        box.find_copy("INBOX", size=1, internaldate="")  # read-only now
        with pytest.raises(MailboxError, match="without a selected folder"):
            box.move(uid, "Processed")
        box.select("INBOX")
        moved = box.move(uid, "Processed")
        assert moved.to.startswith(f"{validity_of(imap, 'Processed')}:") and not moved.missed
        assert box.move(uid, "Processed") == Moved(missed=True)  # gone: nothing named


def test_a_kept_selection_of_a_folder_made_anew_is_not_vouched_for(imap: ImapServer) -> None:
    """The same at the adapter: after the folder is made anew under the kept selection,
    select_mail() never answers the old UIDVALIDITY. A FETCH alone does not show it on
    Dovecot (it answers the deleted mail's size), a NOOP alone does not on pymap."""
    client = imap_client(imap)
    client.create_folder("Support")
    client.append("Support", b"Subject: old\r\n\r\n1\r\n")
    with Mailbox(inbox_settings(imap.account)) as box:
        old = box.select("Support")
        (uid,) = box.uids_after(0)
        size = box.sizes([uid])[uid]
        assert box.select_mail("Support", uid, size=size) == Selection(old, True)
        client.delete_folder("Support")
        client.create_folder("Support")
        client.append("Support", b"Subject: the new folder's mail\r\n\r\n1\r\n")
        try:
            where = box.select_mail("Support", uid, size=size)
        except MailboxError:  # Dovecot may say BYE ("session state is inconsistent")
            box.close()
            box.connect()
            where = box.select_mail("Support", uid, size=size)
        assert where.uidvalidity != old
    client.logout()
