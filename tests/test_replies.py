"""Replies to customers (issue 14): who is never answered (one test per rule), which
reply an outcome calls for, and the replies themselves through a real SMTP server in
this process (aiosmtpd), after the real pipeline on Dovecot, Redis and the sandbox."""

from __future__ import annotations

import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import authentication_results, jpeg_bytes, pdf_bytes
from mailingest_testbed.servers import ImapServer
from mailingest_testbed.servers.smtp import SmtpServer

from mailingest.adapters import ledger as L
from mailingest.application import pipeline
from mailingest.application import replies as reply_step
from mailingest.application.poll_once import Summary, poll_once
from mailingest.application.services import build_context
from mailingest.config.settings import load_settings
from mailingest.core import replies
from mailingest.core.errors import Busy
from mailingest.core.replies import Ours, headers_of, suppressed

from .helpers import deliver, poll_once_on, run_cli
from .tls import make_tls_files

DANA, DANA_ENTITY = "dana@example.com", "P-danadanadanadanadan"
OURS = Ours("support@support.example", "support.example")


def customer_mail(
    sender: str = DANA,
    subject: str = "My passport",
    *,
    files: tuple[str, ...] = ("passport.pdf",),
    dmarc: str = "pass",
    headers: dict[str, str] | None = None,
    message_id: str = "",
) -> bytes:
    msg = EmailMessage()
    msg["Return-Path"] = f"<{sender}>"
    msg["From"], msg["To"], msg["Subject"] = sender, "documents@support.example", subject
    msg["Message-ID"] = f"<{message_id or abs(hash((sender, subject, files)))}@mail.example>"
    msg["Authentication-Results"] = authentication_results(sender, dmarc=dmarc)
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content("Here it is.")
    for name in files:
        if name.endswith(".pdf"):
            msg.add_attachment(
                pdf_bytes(name, 2000), maintype="application", subtype="pdf", filename=name
            )
        elif name.endswith(".zip"):
            msg.add_attachment(
                b"PK\x03\x04" + b"\0" * 200, maintype="application", subtype="zip", filename=name
            )
        else:
            msg.add_attachment(jpeg_bytes(6000), maintype="image", subtype="jpeg", filename=name)
    return msg.as_bytes()


# -- who is never answered: one rule, one test ----------------------------------------

ROBOTS: list[tuple[str, dict[str, str], str, str]] = [
    # (id, extra headers, From, the reason's start)
    ("auto-submitted", {"Auto-Submitted": "auto-replied"}, DANA, "Auto-Submitted"),
    ("out-of-office", {"Auto-Submitted": "auto-generated; vacation"}, DANA, "Auto-Submitted"),
    ("precedence-bulk", {"Precedence": "bulk"}, DANA, "Precedence: bulk"),
    ("precedence-list", {"Precedence": "list"}, DANA, "Precedence: list"),
    ("precedence-junk", {"Precedence": "junk"}, DANA, "Precedence: junk"),
    ("list-id", {"List-Id": "<customers.example.com>"}, DANA, "a mailing list"),
    ("list-unsubscribe", {"List-Unsubscribe": "<mailto:u@x.example>"}, DANA, "a mailing list"),
    ("x-auto-response-suppress", {"X-Auto-Response-Suppress": "OOF"}, DANA, "X-Auto-Response"),
    ("x-loop", {"X-Loop": "support@support.example"}, DANA, "X-Loop"),
    ("mailer-daemon", {}, "MAILER-DAEMON@mx.example.com", "mailer-daemon@mx.example.com is a"),
    ("postmaster", {}, "postmaster@example.com", "postmaster@example.com is a robot"),
    ("noreply", {}, "noreply@shop.example", "noreply@shop.example is a robot"),
    ("no-reply", {}, "no-reply@shop.example", "no-reply@shop.example is a robot"),
    ("our own address", {}, "support@support.example", "our own address"),
]


@pytest.mark.parametrize(
    ("extra", "sender", "reason"), [r[1:] for r in ROBOTS], ids=[r[0] for r in ROBOTS]
)
def test_a_robot_or_a_list_is_never_answered(
    extra: dict[str, str], sender: str, reason: str
) -> None:
    headers = headers_of(customer_mail(sender, headers=extra))
    found = suppressed(headers, authenticated=True, ours=OURS)
    assert found is not None and found.lower().startswith(reason.lower()), found


def test_a_customer_is_answered() -> None:
    assert suppressed(headers_of(customer_mail()), authenticated=True, ours=OURS) is None
    polite = customer_mail(headers={"Auto-Submitted": "no"})
    assert suppressed(headers_of(polite), authenticated=True, ours=OURS) is None


def test_a_sender_that_failed_authentication_is_never_answered() -> None:
    """Backscatter: the From of an unauthenticated mail may be anyone's."""
    found = suppressed(headers_of(customer_mail()), authenticated=False, ours=OURS)
    assert found is not None and found.startswith("sender not authenticated")


@pytest.mark.parametrize(("path", "reason"), [(None, "no Return-Path"), ("<>", "null Return-Path")])
def test_a_bounce_is_never_answered(path: str | None, reason: str) -> None:
    raw = customer_mail()
    raw = raw.replace(b"Return-Path: <dana@example.com>\n", b"")
    if path is not None:
        raw = f"Return-Path: {path}\n".encode() + raw
    found = suppressed(headers_of(raw), authenticated=True, ours=OURS)
    assert found is not None and found.startswith(reason), found


def test_our_own_reply_is_recognised_by_its_message_id() -> None:
    ours = customer_mail(message_id="reply-received-0123@support.example")
    found = suppressed(headers_of(ours), authenticated=True, ours=OURS)
    assert found == "our own reply (its Message-ID)"


# -- which reply ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "reason", "refused", "enabled", "kind"),
    [
        ("done", "", "", {"received"}, "received"),
        (
            "done",
            "",
            "refused content: part 2 (a.zip) is zip (application/zip), x",
            {"received", "refused"},
            "refused",
        ),
        (
            "done",
            "",
            "refused content: part 2 (a.zip) is zip (application/zip), x",
            {"received"},
            "received",
        ),
        ("quarantined", "unknown sender dana@example.com: no entity", "", {"unknown"}, "unknown"),
        ("quarantined", "no documents attached", "", {"refused"}, "refused"),
        (
            "quarantined",
            "attachment too large: part 1 (a.pdf) is 9 bytes (limit 1)",
            "",
            {"refused"},
            "refused",
        ),
        ("quarantined", "document 0 (a.pdf): Alloy refused it (400)", "", {"refused"}, None),
        ("quarantined", "unknown sender x@y.example: no entity", "", {"received"}, None),
    ],
)
def test_the_outcome_decides_the_reply(
    state: str, reason: str, refused: str, enabled: set[str], kind: str | None
) -> None:
    plan = replies.plan(
        state=state, reason=reason, refused=refused, block="", enabled=frozenset(enabled)
    )
    assert plan.kind == kind, plan


def test_each_refused_part_is_named_with_what_the_customer_can_do() -> None:
    reasons = (
        "refused content: part 8 (h.zip) is zip (application/zip), not an allowed document "
        "type; attachment too large: part 2 (b.jpg) is 900000 bytes (limit 10); refused "
        "content: part 3 (winmail.dat): the file is damaged (checksum); refused content: "
        "part 4 (run.exe, in forwarded message) is exe (application/x-dosexec), not an "
        "allowed document type"
    )
    assert replies.refused_parts(reasons) == [
        replies.RefusedPart("h.zip", "archive"),
        replies.RefusedPart("b.jpg", "too_large"),
        replies.RefusedPart("winmail.dat", "unreadable"),
        replies.RefusedPart("run.exe", "type"),
    ]


def test_a_reply_is_threaded_marked_automatic_and_has_one_recipient() -> None:
    headers = headers_of(customer_mail(headers={"References": "<a@x.example>"}))
    message = replies.compose(
        to=DANA,
        from_address="support@support.example",
        from_name="Support",
        subject="Re: My passport",
        message_id=replies.reply_message_id("key", "received", "support.example"),
        original=headers.message_id,
        references=replies.references(headers),
        language="en",
        text="hello",
        html=None,
        date="Fri, 04 Dec 2026 10:00:00 -0000",
    )
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["To"] == DANA and message.get_all("Cc") is None
    assert message["Subject"] == "Re: My passport"  # not "Re: Re:"
    assert message["In-Reply-To"] == f"<{headers.message_id}>"
    assert message["References"] == f"<a@x.example> <{headers.message_id}>"
    assert message["Message-ID"].endswith("@support.example>")
    assert message["Content-Language"] == "en"
    assert replies.reply_message_id("key", "received", "s.example") == (
        replies.reply_message_id("key", "received", "s.example")
    )


# -- through the real servers ---------------------------------------------------------


@pytest.fixture
def smtp() -> SmtpServer:
    server = SmtpServer().start()
    yield server  # type: ignore[misc]
    server.stop()


@pytest.fixture
def answering(env: dict[str, str], smtp: SmtpServer, senders_file: Path) -> dict[str, str]:
    senders_file.write_text(f"email,entity_token\n{DANA},{DANA_ENTITY}\n", encoding="utf-8")
    return env | {
        "MAILINGEST_REPLIES": "received,refused,unknown",
        "MAILINGEST_SMTP_HOST": smtp.host,
        "MAILINGEST_SMTP_PORT": str(smtp.port),
        "MAILINGEST_SMTP_SECURITY": "plain",
        "MAILINGEST_REPLY_FROM": "support@support.example",
        "MAILINGEST_REPLY_FROM_NAME": "Example Support",
    }


def record_of(env: dict[str, str], mail_id: str) -> object:
    ctx = build_context(load_settings(env))
    try:
        return ctx.ledger.mail(mail_id)
    finally:
        ctx.close()


@pytest.mark.servers
def test_a_filed_mail_gets_one_received_reply_naming_its_documents(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    deliver(imap, [customer_mail(files=("passport.pdf", "licence.jpg"))])
    (mail,) = poll_once_on(answering).mails
    assert mail.state == L.DONE
    (sent,) = smtp.received
    assert sent.recipients == [DANA] and sent.sender == "support@support.example"
    message = sent.message
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Subject"] == "Re: My passport"
    body = message.get_content()
    assert "filed 2 documents" in body and "passport.pdf (passport)" in body
    assert "licence.jpg (driving licence)" in body
    record = record_of(answering, mail.mail_id)
    assert record.reply.startswith("received: sent to dana@example.com")  # type: ignore[attr-defined]


@pytest.mark.servers
def test_a_mixed_mail_gets_a_refused_reply_saying_what_to_send(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    deliver(imap, [customer_mail(files=("passport.pdf", "scans.zip"))])
    (mail,) = poll_once_on(answering).mails
    assert mail.state == L.DONE and mail.refused_parts
    (sent,) = smtp.received
    body = sent.message.get_content()
    assert "passport.pdf (passport)" in body
    assert "scans.zip: archives such as .zip are not accepted" in body


@pytest.mark.servers
def test_an_unknown_sender_is_told_and_a_forged_one_is_not(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    deliver(
        imap,
        [
            customer_mail("erin@example.org", "Documents"),
            customer_mail("mallory@example.net", "Forged", dmarc="fail"),
        ],
    )
    summary = poll_once_on(answering)
    assert summary.quarantined == 2
    (sent,) = smtp.received
    assert sent.recipients == ["erin@example.org"]
    assert "is not on file" in sent.message.get_content()
    forged = next(m for m in summary.mails if m.sender == "mallory@example.net")
    record = record_of(answering, forged.mail_id)
    assert record.reply.startswith("none: not sent: sender not authenticated")  # type: ignore[attr-defined]


@pytest.mark.servers
def test_replies_go_once_after_a_replay_and_a_redelivery(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    raw = customer_mail("erin@example.org", "Passport", message_id="erin-1")
    deliver(imap, [raw])
    (mail,) = poll_once_on(answering).mails
    assert mail.state == L.QUARANTINED and len(smtp.received) == 1
    deliver(imap, [raw])  # the same mail delivered again
    poll_once_on(answering)
    assert len(smtp.received) == 1
    replayed = run_cli(answering, "replay", mail.mail_id)
    assert replayed.returncode == 0, replayed.stderr
    poll_once_on(answering)  # the replayed mail comes back as new mail: quarantined again
    assert len(smtp.received) == 1


@pytest.mark.servers
def test_the_rate_limit_is_shared_by_every_worker(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    """Two workers (each its own connection to Redis) count against one limit."""
    env = answering | {"MAILINGEST_REPLY_LIMIT": "2"}
    first, second = build_context(load_settings(env)), build_context(load_settings(env))
    try:
        for ctx in (first, second, first):
            deliver(imap, [customer_mail(subject=f"Passport {id(ctx)} {len(smtp.received)}")])
            poll_once(ctx)
    finally:
        first.close()
        second.close()
    assert len(smtp.received) == 2


@pytest.mark.servers
def test_a_4xx_is_retried_a_5xx_gives_up_and_the_mail_is_filed_anyway(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    smtp.fail("RCPT", "451 4.7.1 try again later")
    deliver(imap, [customer_mail(subject="first")])
    (mail,) = poll_once_on(answering).mails
    assert mail.state == L.DONE and mail.filed_to == "Processed"
    assert len(smtp.received) == 1  # the retry went
    smtp.fail("DATA", "554 5.7.1 rejected")
    deliver(imap, [customer_mail(subject="second")])
    (mail,) = poll_once_on(answering).mails
    assert mail.state == L.DONE and mail.filed_to == "Processed"
    record = record_of(answering, mail.mail_id)
    assert "failed" in record.reply and "554" in record.reply  # type: ignore[attr-defined]
    assert len(smtp.received) == 1


@pytest.mark.servers
def test_a_reply_lost_after_it_was_sent_is_never_sent_again(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    smtp.drop_after_data()
    raw = customer_mail(subject="in doubt", message_id="doubt-1")
    deliver(imap, [raw])
    (mail,) = poll_once_on(answering).mails
    assert len(smtp.received) == 1  # the server has it; we never heard
    record = record_of(answering, mail.mail_id)
    assert record.reply.startswith("received: unconfirmed")  # type: ignore[attr-defined]
    assert "reply-received-" in record.reply  # type: ignore[attr-defined]
    deliver(imap, [raw])
    poll_once_on(answering)
    assert len(smtp.received) == 1


@pytest.mark.servers
def test_starttls_verifies_the_servers_certificate(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    ca, cert, key = make_tls_files(tmp_path / "pki")
    with SmtpServer(tls=(cert, key), login=("replies", "s3cret")) as server:
        env = answering | {
            "MAILINGEST_SMTP_PORT": str(server.port),
            "MAILINGEST_SMTP_SECURITY": "starttls",
            "MAILINGEST_SMTP_USER": "replies",
            "MAILINGEST_SMTP_PASSWORD": "s3cret",
            "MAILINGEST_MAX_ATTEMPTS": "1",
        }
        deliver(imap, [customer_mail(subject="untrusted")])
        (mail,) = poll_once_on(env).mails
        record = record_of(env, mail.mail_id)
        assert "CERTIFICATE_VERIFY_FAILED" in record.reply  # type: ignore[attr-defined]
        assert server.received == []
        deliver(imap, [customer_mail(subject="trusted")])
        poll_once_on(env | {"MAILINGEST_SMTP_CA_FILE": str(ca)})
        (sent,) = server.received
        assert sent.message["Subject"] == "Re: trusted"


def test_a_template_that_cannot_render_stops_check_config(
    env: dict[str, str], tmp_path: Path
) -> None:
    own = tmp_path / "templates" / "en"
    own.mkdir(parents=True)
    (own / "received.txt").write_text("Hello {{ customer_name }}\n", encoding="utf-8")
    result = run_cli(
        env
        | {
            "MAILINGEST_REPLIES": "received",
            "MAILINGEST_SMTP_HOST": "127.0.0.1",
            "MAILINGEST_REPLY_FROM": "support@support.example",
            "MAILINGEST_REPLY_TEMPLATES": str(tmp_path / "templates"),
        },
        "check-config",
    )
    assert result.returncode != 0
    assert "MAILINGEST_REPLY_TEMPLATES" in result.stderr
    assert "received.txt" in result.stderr and "customer_name" in result.stderr


@pytest.mark.servers
def test_six_mails_get_exactly_the_right_replies_once_even_replayed_and_redelivered(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    """A good mail, a mixed mail, an unknown sender, a forged sender, an out-of-office
    reply and a mailing-list mail: a received, a refused and an unknown reply go out,
    to the right person each, and nothing to the other three. Every mail delivered
    again and the quarantined ones replayed: still exactly those three."""
    mails = {
        "good": customer_mail(subject="good", message_id="m-good"),
        "mixed": customer_mail(
            subject="mixed", files=("passport.pdf", "all.zip"), message_id="m-mixed"
        ),
        "unknown": customer_mail("erin@example.org", "unknown", message_id="m-unknown"),
        "forged": customer_mail("mallory@example.net", "forged", dmarc="fail", message_id="m-f"),
        "out of office": customer_mail(
            subject="Automatic reply: out of office",
            headers={"Auto-Submitted": "auto-replied"},
            message_id="m-ooo",
        ),
        "list": customer_mail(
            subject="[customers] digest",
            headers={"List-Id": "<customers.lists.example.com>", "Precedence": "list"},
            message_id="m-list",
        ),
    }
    deliver(imap, list(mails.values()))
    poll_once_on(answering)

    def sent() -> list[tuple[str, str, str]]:
        return sorted(
            (r.recipients[0], str(r.message["Subject"]), _kind(r.message.get_content()))
            for r in smtp.received
        )

    expected = [
        (DANA, "Re: good", "received"),
        (DANA, "Re: mixed", "refused"),
        ("erin@example.org", "Re: unknown", "unknown"),
    ]
    assert sent() == expected
    deliver(imap, list(mails.values()))  # every one of them delivered a second time
    summary = poll_once_on(answering)
    for mail in summary.mails:
        if mail.state == L.QUARANTINED:
            replayed = run_cli(answering, "replay", mail.mail_id)
            assert replayed.returncode == 0, replayed.stderr
    poll_once_on(answering)
    assert sent() == expected
    status = run_cli(answering, "status")
    assert "replies: " in status.stdout
    assert "received sent 1" in status.stdout and "refused sent 1" in status.stdout
    assert "unknown sent 1" in status.stdout
    for why in ("unauthenticated 3", "auto_submitted 2", "list 2"):
        assert why in status.stdout, status.stdout


def _kind(body: str) -> str:
    if "not on file" in body:
        return "unknown"
    return "refused" if "could not accept" in body else "received"


@pytest.mark.servers
def test_an_operators_html_template_goes_as_the_alternative(
    answering: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    smtp: SmtpServer,
    tmp_path: Path,
) -> None:
    own = tmp_path / "templates" / "en"
    own.mkdir(parents=True)
    (own / "received.html").write_text(
        "<p>Filed: {% for d in documents %}<b>{{ d.name }}</b>{% endfor %} for {{ sender }}</p>\n",
        encoding="utf-8",
    )
    env = answering | {"MAILINGEST_REPLY_TEMPLATES": str(tmp_path / "templates")}
    deliver(imap, [customer_mail(subject="<script>", files=("a<b>.pdf",))])
    (mail,) = poll_once_on(env).mails
    assert mail.state == L.DONE, mail
    assert len(smtp.received) == 1, record_of(env, mail.mail_id).reply  # type: ignore[attr-defined]
    (received,) = smtp.received
    message = received.message
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and "filed 1 document" in text.get_content()  # the shipped text
    assert html is not None and "<b>a&lt;b&gt;.pdf</b>" in html.get_content()  # escaped


@pytest.mark.servers
def test_check_config_connect_logs_in_to_the_smtp_server(
    answering: dict[str, str], sandbox: SandboxServer, tmp_path: Path
) -> None:
    listed = run_cli(answering, "check-config")
    assert "replies of inbox default: received, refused, unknown from support@" in listed.stdout
    ca, cert, key = make_tls_files(tmp_path / "pki")
    with SmtpServer(tls=(cert, key), login=("replies", "s3cret")) as server:
        env = answering | {
            "MAILINGEST_SMTP_PORT": str(server.port),
            "MAILINGEST_SMTP_SECURITY": "starttls",
            "MAILINGEST_SMTP_USER": "replies",
            "MAILINGEST_SMTP_CA_FILE": str(ca),
        }
        good = run_cli(env | {"MAILINGEST_SMTP_PASSWORD": "s3cret"}, "check-config", "--connect")
        assert "ok    replies of inbox default: SMTP 127.0.0.1" in good.stdout, good.stdout
        assert "accepted the login as replies" in good.stdout
        bad = run_cli(env | {"MAILINGEST_SMTP_PASSWORD": "wrong"}, "check-config", "--connect")
        assert bad.returncode == 1
        assert "FAIL  replies of inbox default: SMTP 127.0.0.1" in bad.stdout
        assert "login as replies refused (535" in bad.stdout
        assert "wrong" not in bad.stdout + bad.stderr  # the password is never said


# -- what an adversarial review found (issue 14), each now a test ----------------------


def poll_without_replies(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Summary:
    """A poll that files the mail and leaves its reply due, the reply step not run."""
    with monkeypatch.context() as patch:
        patch.setitem(pipeline.STEPS, "reply", lambda ctx, mail_id: [])
        return poll_once_on(env)


@pytest.mark.servers
def test_a_mail_read_while_replies_were_off_is_not_answered_once_they_are_on(
    answering: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its headers were never checked: an out-of-office reply read then must not be
    answered when it is filed after replies were switched on (the rules fail closed)."""
    off = {k: v for k, v in answering.items() if k != "MAILINGEST_REPLIES"}
    ooo = customer_mail(
        subject="Automatic reply", headers={"Auto-Submitted": "auto-replied"}, message_id="o1"
    )
    deliver(imap, [ooo])
    with monkeypatch.context() as patch:  # read, not yet moved, when the worker restarts
        patch.setitem(pipeline.STEPS, "finish", lambda ctx, mail_id: [])
        (mail,) = poll_once_on(off).mails
    poll_once_on(answering | {"MAILINGEST_FINISH_GRACE": "0"})
    record = record_of(answering, mail.mail_id)
    assert record.filed_to  # type: ignore[attr-defined]
    assert smtp.received == []
    assert record.reply == "none: not sent: read while replies were off"  # type: ignore[attr-defined]


@pytest.mark.servers
@pytest.mark.parametrize(
    ("answer", "sent", "reply"),
    [("451 4.3.0 try again later", 1, "received: sent"), ("554 5.5.1 no", 0, "received: failed")],
)
def test_a_refused_data_command_means_not_sent_never_in_doubt(
    answering: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    smtp: SmtpServer,
    answer: str,
    sent: int,
    reply: str,
) -> None:
    """A 4xx or 5xx to the DATA command itself comes before the message: a 4xx is
    tried again (and goes), a 5xx is failed; neither is unconfirmed."""
    smtp.fail("DATA command", answer)
    deliver(imap, [customer_mail(subject="data", message_id="data-1")])
    (mail,) = poll_once_on(answering).mails
    assert len(smtp.received) == sent
    assert record_of(answering, mail.mail_id).reply.startswith(reply)  # type: ignore[attr-defined]


@pytest.mark.servers
def test_a_run_that_stalls_past_its_time_never_sends_what_another_took(
    answering: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run paused between its claim and the message (a GC pause, a stopped VM) for
    longer than the staleness: another run takes the reply over and sends it; the first
    one, awake again, finds its claim gone and sends nothing."""
    deliver(imap, [customer_mail(subject="pause", message_id="pause-1")])
    (mail,) = poll_without_replies(answering, monkeypatch).mails
    monkeypatch.setattr(reply_step, "stale_ms", lambda ctx: 200)
    paused, resumed = threading.Event(), threading.Event()
    first = build_context(load_settings(answering))
    real_count = first.ledger.count_reply

    def stalling_count(*args: object, **kw: object) -> bool:
        paused.set()
        resumed.wait(10)
        return real_count(*args, **kw)  # type: ignore[arg-type]

    first.ledger.count_reply = stalling_count  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def stalled_run() -> None:
        try:
            reply_step.reply(first, mail.mail_id)
        except BaseException as exc:  # noqa: BLE001 - what it raised is looked at below
            errors.append(exc)

    thread = threading.Thread(target=stalled_run)
    thread.start()
    assert paused.wait(10)
    time.sleep(0.4)  # stale now
    second = build_context(load_settings(answering))
    try:
        with pytest.raises(Busy):
            reply_step.reply(second, mail.mail_id)  # takes the stale claim over
        reply_step.reply(second, mail.mail_id)  # and sends it
        resumed.set()
        thread.join(10)
    finally:
        first.close()
        second.close()
    assert len(smtp.received) == 1
    assert [type(e).__name__ for e in errors] in ([], ["ReplyError"], ["Busy"])


@pytest.mark.servers
def test_two_senders_sharing_a_message_id_get_a_reply_each(
    answering: dict[str, str],
    imap: ImapServer,
    sandbox: SandboxServer,
    smtp: SmtpServer,
    senders_file: Path,
) -> None:
    senders_file.write_text(
        f"email,entity_token\n{DANA},{DANA_ENTITY}\nfrank@example.com,{DANA_ENTITY}\n",
        encoding="utf-8",
    )
    deliver(
        imap,
        [
            customer_mail(subject="one", message_id="1@localhost"),
            customer_mail("frank@example.com", "two", message_id="1@localhost"),
        ],
    )
    poll_once_on(answering)
    assert sorted(r.recipients[0] for r in smtp.received) == [DANA, "frank@example.com"]


@pytest.mark.servers
def test_an_agents_forward_gets_no_customer_reply(
    answering: dict[str, str], imap: ImapServer, sandbox: SandboxServer, smtp: SmtpServer
) -> None:
    env = answering | {"MAILINGEST_FORWARDERS": "agent@support.example"}
    inner = EmailMessage()
    inner["From"], inner["Subject"] = "erin@example.org", "my passport"
    inner.set_content("here")
    outer = EmailMessage()
    outer["Return-Path"] = "<agent@support.example>"
    outer["From"], outer["Subject"] = "agent@support.example", "Fwd: my passport"
    outer["Authentication-Results"] = authentication_results("agent@support.example")
    outer.set_content("from a customer")
    outer.add_attachment(inner, filename="forwarded.eml")
    deliver(imap, [outer.as_bytes()])
    (mail,) = poll_once_on(env).mails
    assert smtp.received == []
    assert "forwarded by an agent" in record_of(env, mail.mail_id).reply  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"Precedence": "normal", "X-Precedence": "x"}, None),
        ({"Precedence": '"bulk" (a newsletter)'}, "Precedence: bulk"),
        ({"Precedence": "bulk;"}, "Precedence: bulk"),
        ({"Precedence": "auto_reply"}, "Precedence: auto_reply"),
        ({"X-Autoreply": "yes"}, "an auto-reply"),
        ({"X-Autorespond": "Out of office"}, "an auto-reply"),
    ],
)
def test_robot_marks_in_any_spelling_are_recognised(
    extra: dict[str, str], reason: str | None
) -> None:
    headers = headers_of(customer_mail(headers=extra))
    found = suppressed(headers, authenticated=True, ours=OURS)
    assert (found or "").startswith(reason or "") and (found is None) == (reason is None)


def test_every_precedence_and_auto_submitted_field_is_read() -> None:
    raw = customer_mail(headers={"Precedence": "normal"})
    raw = raw.replace(b"Precedence: normal\n", b"Precedence: normal\nPrecedence: bulk\n")
    found = suppressed(headers_of(raw), authenticated=True, ours=OURS)
    assert found == "Precedence: bulk"


@pytest.mark.parametrize(
    "path",
    [
        '<"MAILER-DAEMON"@x.example>',
        "<SRS0=abc=xx=example.com=noreply@fwd.example>",
        "<prvs=1234abcd=bounces-123@x.example>",
    ],
)
def test_rewritten_or_quoted_robot_addresses_are_recognised(path: str) -> None:
    raw = customer_mail().replace(
        b"Return-Path: <dana@example.com>", f"Return-Path: {path}".encode()
    )
    found = suppressed(headers_of(raw), authenticated=True, ours=OURS)
    assert found is not None and "robot" in found, found


def test_a_delivery_report_is_never_answered() -> None:
    report = EmailMessage()
    report["Return-Path"] = "<dana@example.com>"
    report["From"], report["Subject"] = DANA, "Delivery Status Notification"
    report.set_content("failed")
    report.make_mixed()
    report.replace_header("Content-Type", 'multipart/report; report-type="delivery-status"')
    found = suppressed(headers_of(report.as_bytes()), authenticated=True, ours=OURS)
    assert found is not None and "multipart/report" in found


@pytest.mark.servers
def test_an_xoauth2_login_takes_its_token_from_the_inboxs_oauth_grant(
    redis_client: object, tmp_path: Path
) -> None:
    """SMTP_AUTH = xoauth2: the access token of the inbox's refresh-token grant (the
    machinery IMAP uses), checked by the SMTP server at the provider; a token the
    server refuses is dropped, so the next try refreshes it."""
    import base64 as b64

    from mailingest_testbed.oauth_sandbox import OAuthSandbox

    from mailingest.adapters import smtp as smtp_adapter
    from mailingest.adapters.encryption import Sealer
    from mailingest.adapters.oauth import TokenSource
    from mailingest.config.secret import Secret
    from mailingest.config.settings import OAuthSettings, ReplySettings
    from mailingest.core.errors import ReplyError

    user = "documents@support.example"
    with OAuthSandbox(client_id="c", client_secret="s") as provider:
        refused: list[str] = []

        def check(login: str, token: str) -> bool:
            found = provider.introspect(token)
            ok = bool(found["active"]) and found["username"] == login and token not in refused
            return ok

        with SmtpServer(xoauth2=check) as server:
            grant = OAuthSettings(
                token_url=provider.token_url,
                client_id="c",
                client_secret=Secret("s"),
                refresh_token=Secret(provider.consent(user)),
            )
            sealer = Sealer(Secret(b64.urlsafe_b64encode(bytes(range(32))).decode()))
            tokens = TokenSource(redis_client, "kyc", grant, sealer)  # type: ignore[arg-type]
            replies_settings = ReplySettings(
                kinds=frozenset({"received"}),
                host=server.host,
                port=server.port,
                security="plain",
                user=user,
                password=None,
                auth="xoauth2",
                ca_file=None,
                from_address=user,
                from_name="Support",
                language="en",
                templates=None,
                limit=5,
                window=86400,
            )
            message = EmailMessage()
            message["Subject"] = "Re: hello"
            message.set_content("hello")
            smtp_adapter.send(
                replies_settings, message, to=DANA, before_data=lambda: None, tokens=tokens
            )
            assert len(server.received) == 1
            refused.append(tokens.access_token())  # the server no longer takes this one
            with pytest.raises(ReplyError, match=r"login as documents@support\.example refused"):
                smtp_adapter.send(
                    replies_settings, message, to=DANA, before_data=lambda: None, tokens=tokens
                )
            assert tokens.access_token() not in refused  # dropped: a fresh one next time
            smtp_adapter.send(
                replies_settings, message, to=DANA, before_data=lambda: None, tokens=tokens
            )
            assert len(server.received) == 2
