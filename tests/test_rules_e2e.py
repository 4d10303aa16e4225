"""Inbox rules (issue 13, part 4) on the real IMAP server, the real Redis and the Alloy
sandbox: each filter, each action, each assignment, a mail no rule takes, the server's
SEARCH (never missing a mail a rule takes), `explain` and `check-config`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis
from imapclient import IMAPClient
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import authentication_results, jpeg_bytes, pdf_bytes
from mailingest_testbed.servers import ImapServer, start_imap_server

from mailingest.adapters import ledger as L
from mailingest.adapters.imap import Mailbox
from mailingest.adapters.ledger import Ledger
from mailingest.application.pipeline import ruled, screen_for
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings
from mailingest.core import rules

from .helpers import folder_counts, poll_once_on, run_cli

pytestmark = pytest.mark.servers

CUSTOMER, ENTITY = "dana@example.com", "P-danadanadanadanadan"
BANK, BANK_ENTITY = "statements@bank.example", "P-bankbankbankbankban"


@pytest.fixture
def known(senders_file: Path) -> Path:
    senders_file.write_text(
        f"email,entity_token\n{CUSTOMER},{ENTITY}\n{BANK},{BANK_ENTITY}\n", encoding="utf-8"
    )
    return senders_file


def mail(
    sender: str = CUSTOMER,
    subject: str = "my documents",
    body: str = "Here they are.",
    to: str = "documents@support.example",
    files: tuple[str, ...] = ("passport.pdf",),
    message_id: str = "",
) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Date"] = "Fri, 4 Dec 2026 09:00:00 +0000"
    msg["Message-ID"] = f"<{message_id or abs(hash((sender, subject, body, files)))}@mail.example>"
    msg["Authentication-Results"] = authentication_results(sender)
    msg.set_content(body)
    for name in files:
        if name.endswith(".pdf"):
            msg.add_attachment(
                pdf_bytes(name, 2000), maintype="application", subtype="pdf", filename=name
            )
        else:
            msg.add_attachment(jpeg_bytes(6000), maintype="image", subtype="jpeg", filename=name)
    return msg.as_bytes()


def client(imap: ImapServer) -> IMAPClient:
    account = imap.account
    c = IMAPClient(account.host, port=account.port, ssl=False, timeout=10)
    c.login(account.user, account.password)
    return c


def deliver(imap: ImapServer, *raws: bytes, arrived: datetime | None = None) -> None:
    c = client(imap)
    for raw in raws:
        c.append("INBOX", raw, msg_time=arrived)
    c.logout()


def flags(imap: ImapServer, folder: str) -> list[set[bytes]]:
    c = client(imap)
    c.select_folder(folder, readonly=True)
    data = c.fetch(c.search(["ALL"]), ["FLAGS"])
    c.logout()
    return [set(item[b"FLAGS"]) for _, item in sorted(data.items())]


def with_rules(env: dict[str, str], tmp_path: Path, rules_toml: str) -> dict[str, str]:
    """``env`` with a configuration file whose one inbox has these rules."""
    config = tmp_path / "mailingest.toml"
    config.write_text('[[inboxes]]\nname = "default"\n' + rules_toml, encoding="utf-8")
    return env | {"MAILINGEST_CONFIG": str(config)}


def outcome(env: dict[str, str]) -> dict[str, list[str]]:
    """Each recorded mail's subject by the state it ended in."""
    ctx = build_context(load_settings(env))
    try:
        by_state: dict[str, list[str]] = {}
        for state in L.MAIL_STATES:
            for record in ctx.ledger.mails((state,)):
                by_state.setdefault(str(state), []).append(record.subject)
        return {state: sorted(subjects) for state, subjects in by_state.items()}
    finally:
        ctx.close()


# -- filters: one mail taken, one left in the inbox, for each ---------------------------

FILTERS: list[tuple[str, str, dict[str, str], dict[str, str], bool]] = [
    # (filter, toml, taken mail, left mail, does the server narrow it)
    ("from", 'from = "*@bank.example"', {"sender": BANK}, {"sender": CUSTOMER}, True),
    ("from regex", 'from = "re:^statements@"', {"sender": BANK}, {"sender": CUSTOMER}, False),
    (
        "to",
        'to = "documents@*"',
        {"to": "Support <documents@support.example>"},
        {"to": "sales@support.example"},
        True,
    ),
    (
        "to, not narrowed",  # an @ is never asked of the server (a comment may stand by it)
        'to = "kyc@*"',
        {"to": "Support <kyc@support.example>"},
        {"to": "sales@support.example"},
        False,
    ),
    (
        "subject",
        'subject = ["*passport*", "*licence*"]',
        {"subject": "Driving LICENCE scan"},
        {"subject": "hello"},
        True,
    ),
    (
        "subject regex",
        'subject = "re:^(re: )?kyc case \\\\d+$"',
        {"subject": "KYC case 1234"},
        {"subject": "Re: KYC case twelve"},
        False,
    ),
    (
        "body",
        'body = "*reference AB-*"',
        {"body": "My reference AB-7 as asked."},
        {"body": "No reference here."},
        False,  # the body is never asked of the server (HTML writes &eacute; for é)
    ),
]


@pytest.mark.parametrize(
    ("name", "toml", "taken", "left", "narrowed"), FILTERS, ids=[f[0] for f in FILTERS]
)
def test_each_filter_takes_its_mail_and_leaves_the_other_untouched(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    known: Path,
    tmp_path: Path,
    name: str,
    toml: str,
    taken: dict[str, str],
    left: dict[str, str],
    narrowed: bool,
) -> None:
    """The taken mail is filed as before; the other stays in the inbox unread and
    unmoved. Where the server can narrow the filter (a glob's text: IMAP SEARCH), it is
    never fetched; where it cannot (a regular expression), it is fetched, decided on,
    and recorded as ``ignored`` with the rule's reason."""
    env = with_rules(env, tmp_path, f'[[inboxes.rules]]\nname = "{name}"\n{toml}\n')
    deliver(
        imap,
        mail(**({"subject": "taken"} | taken)),  # type: ignore[arg-type]
        mail(**({"subject": "left"} | left)),  # type: ignore[arg-type]
    )
    summary = poll_once_on(env)
    assert summary.processed == 1, summary
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 1,
        "Processed": 1,
        "Quarantine": 0,
    }
    assert flags(imap, "INBOX") == [set()]  # left exactly as it came: not even \Seen
    states = outcome(env)
    assert states.get("done") == [taken.get("subject", "taken")]
    if narrowed:
        assert "ignored" not in states  # the server's SEARCH never listed it
    else:
        (reason,) = [r.reason for r in build_context(load_settings(env)).ledger.mails((L.IGNORED,))]
        assert reason.startswith(f"no rule takes it ({name}: ")
    assert len(sandbox.state.list(ENTITY)) + len(sandbox.state.list(BANK_ENTITY)) == 1
    again = poll_once_on(env)  # the mail left alone is not fetched, searched or recorded again
    assert list(again.mails) == [] and folder_counts(imap, "INBOX")["INBOX"] == 1


def test_max_age_leaves_old_mail_alone(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    env = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "recent"\nmax_age = "7d"\n')
    now = datetime.now(UTC)
    deliver(imap, mail(subject="old"), arrived=now - timedelta(days=30))
    deliver(imap, mail(subject="two days before the limit"), arrived=now - timedelta(days=5))
    deliver(imap, mail(subject="new"))
    summary = poll_once_on(env)
    assert summary.processed == 2, summary
    assert outcome(env) == {"done": ["new", "two days before the limit"]}
    assert folder_counts(imap, "INBOX")["INBOX"] == 1  # the old one, never fetched


def test_a_day_old_mail_is_decided_by_the_exact_age_not_by_the_day(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    """SINCE counts whole days: the server lists a mail 30 hours old for max_age = 1d,
    and the rule, reading its arrival time, leaves it (recorded ignored)."""
    env = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "today"\nmax_age = "1d"\n')
    deliver(imap, mail(subject="30 hours"), arrived=datetime.now(UTC) - timedelta(hours=30))
    poll_once_on(env)
    assert outcome(env) == {"ignored": ["30 hours"]}
    assert folder_counts(imap, "INBOX")["INBOX"] == 1


# -- attachments and assignments ------------------------------------------------------


def test_filename_globs_and_assignments_reach_alloy(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    """Include and exclude globs pick the documents; the type comes from a filename
    glob, else from the rule; the note and its author from the rule."""
    env = with_rules(
        env,
        tmp_path,
        """
[[inboxes.rules]]
name = "scans"
filenames = ["*.pdf", "*.jpg"]
exclude_filenames = ["logo*", "signature*"]
type = "utility"
note = "Filed by the scans rule"
agent_email = "scans@support.example"
[inboxes.rules.types]
"*passport*" = "passport"
""",
    )
    # the rule's author is another agent of the same Alloy account
    sandbox.state.agents = (sandbox.state.agents or frozenset()) | {"scans@support.example"}
    deliver(imap, mail(files=("passport.pdf", "bill.pdf", "logo.jpg", "selfie.jpg")))
    summary = poll_once_on(env)
    (record,) = summary.mails
    assert record.state == L.DONE, record
    at_alloy = {f"{d['name']}.{d['extension']}": d for d in sandbox.state.list(ENTITY)}
    assert sorted(at_alloy) == ["bill.pdf", "passport.pdf", "selfie.jpg"]
    assert {name: d["type"] for name, d in at_alloy.items()} == {
        "bill.pdf": "utility",
        "passport.pdf": "passport",
        "selfie.jpg": "utility",
    }
    for d in at_alloy.values():
        (note,) = d["notes"]
        assert note["note"] == "Filed by the scans rule"
        assert note["note_author_agent_email"] == "scans@support.example"
        assert d["uploaded"]


def test_a_mail_whose_every_document_a_rule_excludes_is_quarantined_with_why(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    env = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "pdf"\nfilenames = ["*.pdf"]\n')
    deliver(imap, mail(files=("photo.jpg",)))
    (record,) = poll_once_on(env).mails
    assert record.state == L.QUARANTINED
    assert record.reason == (
        "no documents attached (skipped part 1 (photo.jpg): rule pdf: not one of *.pdf)"
    )
    assert sandbox.state.list(ENTITY) == []


def test_rules_apply_in_order_until_stop(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    env = with_rules(
        env,
        tmp_path,
        """
[[inboxes.rules]]
name = "bank"
from = "*@bank.example"
type = "utility"
stop = true
[[inboxes.rules]]
name = "everyone"
type = "other"
note = "Not from the bank"
""",
    )
    deliver(imap, mail(sender=BANK, subject="statement"), mail(subject="passport"))
    assert poll_once_on(env).processed == 2
    (bank_doc,) = sandbox.state.list(BANK_ENTITY)
    (customer_doc,) = sandbox.state.list(ENTITY)
    assert bank_doc["type"] == "utility"
    assert bank_doc["notes"][0]["note"] == "Uploaded from email customer sent"  # the inbox's
    assert customer_doc["type"] == "other"
    assert customer_doc["notes"][0]["note"] == "Not from the bank"
    ctx = build_context(load_settings(env))
    try:
        rules_of = {r.subject: r.rules for r in ctx.ledger.mails((L.DONE,))}
    finally:
        ctx.close()
    assert rules_of == {"statement": "bank", "passport": "everyone"}


# -- actions ----------------------------------------------------------------------------


def test_mark_read_flag_and_keyword_are_set_and_the_mail_moves(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    env = with_rules(
        env,
        tmp_path,
        '[[inboxes.rules]]\nname = "mark"\nactions = ["mark_read", "flag", "keyword:Filed"]\n',
    )
    deliver(imap, mail(), mail(sender="nobody@unknown.example", subject="stranger"))
    summary = poll_once_on(env)
    assert (summary.processed, summary.quarantined) == (1, 1)
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 0,
        "Processed": 1,
        "Quarantine": 1,
    }
    # whatever the outcome, the rule's actions are done
    for folder in ("Processed", "Quarantine"):
        (got,) = flags(imap, folder)
        assert {b"\\Seen", b"\\Flagged", b"Filed"} <= got, (folder, got)


def test_copy_files_a_copy_and_leaves_the_mail_in_the_inbox_once(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    env = with_rules(
        env, tmp_path, '[[inboxes.rules]]\nname = "keep"\nactions = ["copy", "mark_read"]\n'
    )
    deliver(imap, mail())
    (record,) = poll_once_on(env).mails
    assert record.state == L.DONE and record.filed_to == "Processed"
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 1, "Processed": 1}
    assert flags(imap, "INBOX") == [{b"\\Seen"}]  # marked read where it stays
    assert list(poll_once_on(env).mails) == []  # not taken again
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 1, "Processed": 1}
    assert len(sandbox.state.list(ENTITY)) == 1


def test_the_copy_is_not_made_twice_when_finish_runs_again(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    """A finish that died after its COPY and before recording the mail filed runs
    again: the recorded copy is found in the destination and not made a second time."""
    from mailingest.application.pipeline import finish

    env = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "keep"\nactions = ["copy"]\n')
    deliver(imap, mail())
    (record,) = poll_once_on(env).mails
    ctx = build_context(load_settings(env))
    try:
        filed = ctx.ledger.mail(record.mail_id)
        assert filed is not None and filed.copied_uid  # Dovecot names the copy (UIDPLUS)
        # as if the first run died before it recorded the mail filed
        ctx.ledger.update(record.mail_id, filed_to="", moving_to="Processed")
        ctx.redis.sadd("mailingest:unfiled", record.mail_id)
        assert finish(ctx, record.mail_id) == []
        assert ctx.ledger.mail(record.mail_id).filed_to == "Processed"  # type: ignore[union-attr]
    finally:
        ctx.close()
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 1, "Processed": 1}


# -- a mail no rule takes ---------------------------------------------------------------


def test_an_ignored_mail_is_replayed_in_place_once_the_rules_take_it(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    only_bank = with_rules(
        env, tmp_path, '[[inboxes.rules]]\nname = "bank"\nfrom = "re:@bank\\\\.example$"\n'
    )
    deliver(imap, mail(subject="customer mail"))
    (record,) = poll_once_on(only_bank).mails
    assert record.state == L.IGNORED
    status = json.loads(run_cli(only_bank, "status", "--json").stdout)
    assert status["counts"]["ignored"] == 1
    everyone = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "all"\n')
    replayed = run_cli(everyone, "replay", record.mail_id)
    assert replayed.returncode == 0, replayed.stderr
    assert outcome(everyone) == {"done": ["customer mail"]}
    assert folder_counts(imap, "INBOX", "Processed") == {"INBOX": 0, "Processed": 1}
    assert len(sandbox.state.list(ENTITY)) == 1


# -- the server's SEARCH: it must find every mail a rule takes ---------------------------
# The cases an adversarial review found the server's search missing (issue 13): each is
# a mail the rule takes; one poll must fetch it (a miss would pass it by for good).

HEAD = (
    b"From: Dana <dana@example.com>\r\nTo: documents@support.example\r\n"
    b"Date: Fri, 4 Dec 2026 09:00:00 +0000\r\nMessage-ID: <%s@mail.example>\r\n"
)


def raw(
    name: str,
    headers: bytes,
    body: bytes = b"hello\r\n",
    ctype: bytes = b"text/plain; charset=utf-8",
    extra: bytes = b"",
) -> bytes:
    return (
        HEAD.replace(b"%s", name.encode())
        + headers
        + b"MIME-Version: 1.0\r\nContent-Type: "
        + ctype
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


HTML = b"text/html; charset=utf-8"
SUPERSET = {
    "html entity": (
        'body = "*r\u00e9f\u00e9rence AB-*"',
        raw("b1", b"Subject: docs\r\n", b"<p>Votre r&eacute;f&eacute;rence AB-7</p>\r\n", HTML),
    ),
    "html ampersand": (
        'body = "*AT&T account*"',
        raw("b2", b"Subject: docs\r\n", b"<p>My AT&amp;T account</p>\r\n", HTML),
    ),
    "turkish dotted I": (
        'subject = "*istanbul*"',
        raw("c1", "Subject: \u0130STANBUL office\r\n".encode()),
    ),
    "capital sharp s": (
        'subject = "*stra\u00dfe*"',
        raw("c2", "Subject: HAUPTSTRA\u1e9eE 5\r\n".encode()),
    ),
    "kelvin sign": ('subject = "*kyc*"', raw("c3", "Subject: \u212aYC docs\r\n".encode())),
    "to with a comment": (
        'to = "kyc@*"',
        raw("d2", b"Subject: x\r\nCc: kyc(desk)@support.example\r\n"),
    ),
    "to with spaces": ('to = "kyc@*"', raw("d3", b"Subject: x\r\nCc: kyc @ support.example\r\n")),
    "two rules, one not ascii": (
        'subject = "*f\u00fchrerschein*"\n[[inboxes.rules]]\nname = "r2"\nfrom = "*@bank.example"',
        raw("h1", "Subject: F\u00fchrerschein\r\n".encode()),
    ),
    "a list, one not ascii": (
        'subject = ["*f\u00fchrerschein*", "*passport*"]',
        raw("h2", "Subject: F\u00fchrerschein\r\n".encode()),
    ),
    "decomposed umlaut": (
        'subject = "*f\u00fchrerschein*"',
        raw("g5", "Subject: Fu\u0308hrerschein\r\n".encode()),
    ),
    "subject in two encoded words": (
        'subject = "*passport scan*"',
        raw("g1", b"Subject: =?utf-8?q?pass?= =?utf-8?q?port_scan?=\r\n"),
    ),
}


@pytest.mark.parametrize("case", list(SUPERSET))
def test_the_servers_search_never_misses_a_mail_a_rule_takes(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, tmp_path: Path, case: str
) -> None:
    rule, raw_mail = SUPERSET[case]
    env = with_rules(env, tmp_path, f'[[inboxes.rules]]\nname = "r1"\n{rule}\n')
    settings = load_settings(env)
    inbox = settings.inbox("default")
    _, verdict = ruled(inbox, screen_for(settings, inbox, raw_mail), None, datetime.now(UTC))
    assert verdict.taken, f"the rule must take it: {verdict.why_not()}"
    deliver(imap, raw_mail)
    poll_once_on(env)
    assert outcome(env), "the rule takes this mail, but the poll never fetched it"


def test_max_age_is_found_when_the_servers_day_is_behind_utc(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dovecot in California (UTC-8): at 03:00 UTC, a mail of 19.5 hours ago arrived
    "the day before yesterday" in the server's time, and max_age = 20h takes it."""
    monkeypatch.setenv("TZ", "PST8")
    server = start_imap_server(tmp_path / "imap", "dovecot")
    monkeypatch.delenv("TZ")
    try:
        poll_at = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
        arrived = poll_at - timedelta(hours=19, minutes=30)
        c = client(server)
        c.append("INBOX", b"From: a@b.example\r\nSubject: doc\r\n\r\nhi\r\n", msg_time=arrived)
        c.logout()
        listed = rules.parse_rules([{"name": "recent", "max_age": "20h"}])
        narrow = rules.search_criteria(listed, poll_at)
        account = server.account
        settings = load_settings(
            env
            | {
                "MAILINGEST_IMAP_PORT": str(account.port),
                "MAILINGEST_IMAP_USER": account.user,
                "MAILINGEST_IMAP_PASSWORD": account.password,
            }
        )
        with Mailbox(settings.inboxes[0]) as box:
            box.select("INBOX")
            assert box.uids_after(0, narrow) == box.uids_after(0) == [1]
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["too large", "headers too large"])
def test_a_mail_the_rules_cannot_read_is_left_in_the_inbox(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, tmp_path: Path, case: str
) -> None:
    """Too large to fetch (decided by its header alone) or too large to parse: no rule
    takes it, so it stays in the inbox as it came, recorded ignored; not quarantined."""
    env = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "kyc"\nsubject = "re:^KYC [0-9]+"\n')
    if case == "too large":
        env |= {"MAILINGEST_MAX_MESSAGE_BYTES": "2048"}
        mail_bytes = raw("big", b"Subject: holiday photos\r\n", b"x" * 4000 + b"\r\n")
    else:
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 900) for i in range(300))
        mail_bytes = padding + raw("pad", b"Subject: newsletter\r\n")
    deliver(imap, mail_bytes)
    poll_once_on(env)
    assert folder_counts(imap, "INBOX", "Quarantine") == {"INBOX": 1, "Quarantine": 0}
    assert flags(imap, "INBOX") == [set()]
    assert list(outcome(env)) == ["ignored"]
    if case == "too large":  # a rule that takes it by its header still quarantines it
        taking = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "all photos"\n')
        deliver(imap, raw("big2", b"Subject: more photos\r\n", b"x" * 4000 + b"\r\n"))
        poll_once_on(taking)
        assert folder_counts(imap, "Quarantine")["Quarantine"] == 1


def test_a_copy_is_made_once_when_redis_fails_after_it(
    env: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The COPY's new UID is recorded at once: the finish that runs again after Redis
    failed to record the mail filed finds the copy and does not copy again."""
    env = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "keep"\nactions = ["copy"]\n')
    deliver(imap, mail(sender="stranger@unknown.example", subject="unknown"))
    real, calls = Ledger.filed, {"n": 0}

    def failing_once(self: Ledger, mail_id: str, folder: str, **fields: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise redis.ConnectionError("Redis blinked after the COPY")
        real(self, mail_id, folder, **fields)

    monkeypatch.setattr(Ledger, "filed", failing_once)
    poll_once_on(env)
    assert calls["n"] >= 2  # the finish ran again
    assert folder_counts(imap, "INBOX", "Quarantine") == {"INBOX": 1, "Quarantine": 1}


def test_a_copied_mail_is_replayed_in_place_not_doubled(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    env = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "keep"\nactions = ["copy"]\n')
    deliver(imap, mail(sender="erin@example.org", subject="unknown yet"))
    (record,) = poll_once_on(env).mails
    assert record.state == L.QUARANTINED
    assert folder_counts(imap, "INBOX", "Quarantine") == {"INBOX": 1, "Quarantine": 1}
    known.write_text(known.read_text() + f"erin@example.org,{ENTITY}\n", encoding="utf-8")
    replayed = run_cli(env, "replay", record.mail_id)
    assert replayed.returncode == 0, replayed.stderr
    assert outcome(env) == {"done": ["unknown yet"]}
    assert folder_counts(imap, "INBOX", "Processed", "Quarantine") == {
        "INBOX": 1,  # the mail itself, as a copy rule leaves it
        "Processed": 1,
        "Quarantine": 1,  # the first copy stays where it was filed
    }
    done_replay = run_cli(env, "replay", record.mail_id)
    assert done_replay.returncode != 0  # filed by copy and done: a replay would file it twice


# -- the operator's view ----------------------------------------------------------------


def test_explain_names_the_rules_and_check_config_lists_them(
    env: dict[str, str], sandbox: SandboxServer, known: Path, tmp_path: Path
) -> None:
    env = with_rules(
        env,
        tmp_path,
        """
[[inboxes.rules]]
name = "bank"
from = "*@bank.example"
stop = true
[[inboxes.rules]]
name = "passports"
subject = "*passport*"
type = "passport"
actions = ["mark_read", "keyword:KYC"]
""",
    )
    eml = tmp_path / "mail.eml"
    eml.write_bytes(mail(subject="My passport", files=("scan.pdf",)))
    shown = run_cli(env, "explain", str(eml))
    assert shown.returncode == 0, shown.stderr
    assert "rules applied: passports" in shown.stdout
    assert "passed over: bank: from is not *@bank.example" in shown.stdout
    assert "then: move + mark_read + keyword:KYC" in shown.stdout
    assert "document: part 1  scan.pdf  type passport" in shown.stdout
    eml.write_bytes(mail(subject="hello"))
    ignored = json.loads(run_cli(env, "explain", "--json", str(eml)).stdout)
    assert ignored["outcome"] == L.IGNORED and ignored["rules"] == []
    assert sandbox.state.stats()["requests"] == {}

    listed = run_cli(env, "check-config")
    assert listed.returncode == 0, listed.stderr
    assert "inbox default rule 1: bank: from *@bank.example -> stop" in listed.stdout
    assert "inbox default rule 2: passports: subject *passport* -> type passport" in (listed.stdout)
    connected = run_cli(env, "check-config", "--connect")
    assert "the rules' search finds 0" in connected.stdout, connected.stdout


def test_a_wrong_rule_stops_start_up_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    env = with_rules(env, tmp_path, '[[inboxes.rules]]\nname = "x"\nactions = ["delete"]\n')
    result = run_cli(env, "check-config")
    assert result.returncode != 0
    assert "inboxes[default].rules[1] (x).actions 'delete': mailingest never deletes mail" in (
        result.stderr
    ), result.stderr
