"""The console over real HTTP (uvicorn in its own process) on real Redis, IMAP and the
sandbox: nothing for the unauthenticated, security headers on every answer, failed
logins counted and refused, viewers cannot act, an action needs its CSRF token and runs
once however often its form is sent, and the pages show what the ledger holds."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from mailingest_testbed.samples import bulk_scenario
from mailingest_testbed.servers import ConsoleProcess, ImapServer

from mailingest.adapters import keys
from mailingest.adapters.ledger import Ledger
from mailingest.application.services import connect_redis
from mailingest.core.states import MailState

from .console_bed import OPERATOR, VIEWER, console_env
from .helpers import deliver, poll_once_on

pytestmark = [pytest.mark.servers]
PAGES = ["/", "/live", "/mails", "/mail?id=x", "/search?q=a", "/audit", "/confirm?action=poll"]


@pytest.fixture
def console(env: dict[str, str], imap: ImapServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    pytest.importorskip("starlette")  # the [console] extra, installed by ./dev and CI
    scenario = bulk_scenario(1, seed=5)  # one customer's mail and the stranger's
    Path(env["MAILINGEST_SENDERS_FILE"]).write_text(scenario.senders_csv(), encoding="utf-8")
    deliver(imap, [m.raw for m in scenario.mails])
    summary = poll_once_on(env)
    assert summary.quarantined == 1, summary
    with ConsoleProcess(console_env(env, tmp_path), tmp_path / "console.log") as process:
        yield process


def _get(console: ConsoleProcess, path: str, auth: tuple[str, str] | None = OPERATOR, **kw):  # type: ignore[no-untyped-def]
    return httpx.get(console.url + path, auth=auth, timeout=20, **kw)


def _quarantined(env: dict[str, str]) -> str:
    ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
    (record,) = ledger.mails((MailState.QUARANTINED,))
    return record.id


def test_no_one_gets_anything_without_a_login(console: ConsoleProcess) -> None:
    for path in [*PAGES, "/static/htmx.min.js", "/static/console.css"]:
        answer = _get(console, path, auth=None)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"].startswith("Basic realm=")
        assert answer.text == "authentication required"
        assert answer.headers["content-security-policy"].endswith("frame-ancestors 'none'")
    posted = httpx.post(console.url + "/act", data={"action": "poll"}, timeout=20)
    assert posted.status_code == 401
    wrong = _get(console, "/", auth=(OPERATOR[0], "not-the-password"))
    assert wrong.status_code == 401 and "olga" not in wrong.text
    health = _get(console, "/healthz", auth=None)
    assert health.status_code == 200 and health.text == "ok"


def test_every_answer_carries_the_security_headers(console: ConsoleProcess) -> None:
    answer = _get(console, "/")
    assert answer.status_code == 200
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert "secure" not in cookie  # plain HTTP to loopback: a browser would drop it
    # behind a TLS proxy (loopback is uvicorn's trusted proxy): Secure
    proxied = _get(console, "/", headers={"X-Forwarded-Proto": "https"})
    assert "; secure" in proxied.headers["set-cookie"].lower()
    public = _get(console, "/", headers={"Host": "console.example.com"})
    assert "; secure" in public.headers["set-cookie"].lower()
    assert "server" not in answer.headers  # uvicorn's name and version are not told
    missing = _get(console, "/no-such-page")
    assert missing.status_code == 404 and missing.headers["x-frame-options"] == "DENY"


def test_failed_logins_are_counted_refused_and_logged(console: ConsoleProcess) -> None:
    for _ in range(10):
        assert _get(console, "/", auth=(VIEWER[0], "guess-" * 3)).status_code == 401
    # the eleventh try is refused whatever its password, the right one too
    locked = _get(console, "/", auth=VIEWER)
    assert locked.status_code == 429 and "too many failed logins" in locked.text
    # another user from the same address is not locked out by those guesses
    assert _get(console, "/", auth=OPERATOR).status_code == 200
    log = console.log_path.read_text()
    assert log.count("console: failed login for vic from 127.0.0.1") == 10
    assert "guess-" not in log


def test_a_locked_address_learns_nothing_from_a_login_made_elsewhere(
    console: ConsoleProcess,
) -> None:
    """The owner logged in from one address; a guesser at another is locked out after
    ten, and its right guess then gets 429 too (no cache tells it apart)."""
    owner, guesser = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "203.0.113.9"}
    client = httpx.Client(base_url=console.url, auth=VIEWER, timeout=20, headers=owner)
    assert client.get("/").status_code == 200
    assert client.get("/live").status_code == 200  # the same session, its cookie sent
    for _ in range(10):
        assert (
            _get(console, "/", auth=(VIEWER[0], "guess-" * 3), headers=guesser).status_code == 401
        )
    assert _get(console, "/", auth=VIEWER, headers=guesser).status_code == 429
    assert client.get("/").status_code == 200  # the owner, in its session, is not locked out
    assert _get(console, "/", auth=VIEWER, headers=owner).status_code == 200
    log = console.log_path.read_text()
    assert "console: failed login for vic from 203.0.113.9" in log


def test_guesses_sent_at_once_are_held_to_the_limit(console: ConsoleProcess) -> None:
    """Counted before the (slow) password check: 40 wrong guesses sent together are
    not all checked."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(40) as pool:
        codes = list(
            pool.map(
                lambda _: _get(console, "/", auth=(VIEWER[0], "x" * 14)).status_code, range(40)
            )
        )
    # ten at most were checked (401), the rest refused unchecked (429). On a loaded
    # machine a guess may find the four scrypt slots busy for half a second: 503, its
    # count given back, and a guess arriving after it let through in its place; still no
    # more than ten are ever checked
    assert set(codes) <= {401, 429, 503}, codes
    assert 4 <= codes.count(401) <= 10, codes


def test_map_and_other_forms_are_checked_on_the_server(
    console: ConsoleProcess, env: dict[str, str]
) -> None:
    """The page offers "map sender" for an unknown sender's mail only; the server
    checks it too, and the entity; a nonce is good for the form it was made for only."""
    ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
    (done,) = ledger.mails((MailState.DONE,))
    client = _session(console, OPERATOR)
    page = client.get("/confirm", params={"action": "map", "mail": done.id, "entity": "P-x"})
    assert (
        page.status_code == 400 and "only the sender of a mail quarantined as unknown" in page.text
    )
    mail_id = _quarantined(env)
    for odd in ("..", ".", "P-\u202eevil", "a b", "P-\x00"):
        page = client.get("/confirm", params={"action": "map", "mail": mail_id, "entity": odd})
        assert page.status_code == 400 and "not an entity token" in page.text, odd
    # a form for the quarantined mail, sent with the done mail's id instead
    form = _confirm_form(client, action="map", mail=mail_id, entity="P-Mapped0Stranger0001")
    forged = client.post("/act", data={**form, "mail": done.id})
    assert forged.status_code == 400 and "not made by the console for you" in forged.text
    other_entity = client.post("/act", data={**form, "entity": "P-Other000000000000001"})
    assert other_entity.status_code == 400
    poll = _confirm_form(client, action="poll", inbox="default")
    assert client.post("/act", data={**form, "nonce": poll["nonce"]}).status_code == 400
    invented = client.post("/act", data={**form, "nonce": "n" * 20})
    assert invented.status_code == 400
    assert ledger.audit_log() == []  # nothing was done
    customer = done.sender
    assert connect_redis(env["MAILINGEST_REDIS_URL"]).hget(keys.SENDERS, customer) is None


def test_a_viewer_reads_but_cannot_act(console: ConsoleProcess, env: dict[str, str]) -> None:
    mail_id = _quarantined(env)
    page = _get(console, "/mail", auth=VIEWER, params={"id": mail_id})
    assert page.status_code == 200 and "stranger@elsewhere.example" in page.text
    assert "Replay" not in page.text and "Map sender" not in page.text
    confirm = _get(console, "/confirm", auth=VIEWER, params={"action": "replay", "mail": mail_id})
    assert confirm.status_code == 403
    client = _session(console, VIEWER)
    token = "x" * 64
    act = client.post(
        "/act", data={"action": "replay", "mail": mail_id, "csrf": token, "nonce": "n" * 20}
    )
    assert act.status_code == 403
    assert _quarantined(env) == mail_id  # still quarantined


def _session(console: ConsoleProcess, auth: tuple[str, str]) -> httpx.Client:
    """A client with the console's session cookie (Secure: httpx keeps it from plain
    HTTP, as a browser would from anywhere but loopback; it is sent here by hand)."""
    client = httpx.Client(base_url=console.url, auth=auth, timeout=30)
    cookie = client.get("/").headers["set-cookie"].split(";", 1)[0]
    client.headers["Cookie"] = cookie
    return client


def _confirm_form(client: httpx.Client, **params: str) -> dict[str, str]:
    page = client.get("/confirm", params=params)
    assert page.status_code == 200, page.text
    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', page.text))


def test_an_action_needs_its_csrf_token_and_runs_once(
    console: ConsoleProcess, env: dict[str, str]
) -> None:
    mail_id = _quarantined(env)
    client = _session(console, OPERATOR)
    form = _confirm_form(client, action="mark_handled", mail=mail_id)
    assert set(form) >= {"csrf", "nonce", "action", "mail"}
    for wrong in ({**form, "csrf": ""}, {**form, "csrf": form["csrf"][:-1] + "0"}):
        refused = client.post("/act", data=wrong)
        assert refused.status_code == 403 and "token" in refused.text
    another = _session(console, OPERATOR)  # another session: the first's token is not its own
    assert another.post("/act", data=form).status_code == 403
    foreign = client.post("/act", data=form, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
    record = ledger.mail(mail_id)
    assert record is not None and record.state == MailState.QUARANTINED
    assert ledger.audit_log(mail_id) == []

    first = client.post("/act", data=form)
    assert first.status_code == 200 and "handled; stays in Quarantine" in first.text
    second = client.post("/act", data=form)  # a double click: the same form again
    assert second.status_code == 200 and "sent before" in second.text
    assert "handled; stays in Quarantine" in second.text
    record = ledger.mail(mail_id)
    assert record is not None and record.state == MailState.HANDLED
    (entry,) = ledger.audit_log(mail_id)
    assert (entry.who, entry.action) == ("olga", "mark handled")
    moves = ledger.history(mail_id)
    assert moves[-1].to == MailState.HANDLED and moves[-1].by == "console:olga"
    # it left the attention list; the mail page shows who did what
    listing = client.get("/mails")
    assert mail_id not in listing.text and "0 mails" in listing.text
    page = client.get("/mail", params={"id": mail_id})
    assert "mark handled" in page.text and "console:olga" in page.text


def test_the_pages_show_what_the_ledger_holds(console: ConsoleProcess, env: dict[str, str]) -> None:
    mail_id = _quarantined(env)
    client = httpx.Client(base_url=console.url, auth=OPERATOR, timeout=30)
    inboxes = client.get("/")
    assert "need attention" in inboxes.text and "<strong>default</strong>" in inboxes.text
    listing = client.get("/mails", params={"kind": "unknown_sender", "age": "24h"})
    assert quote(mail_id, safe="") in listing.text and "1 mail." in listing.text
    assert "passport" in listing.text  # the part's name, its sniffed type and size
    none = client.get("/mails", params={"kind": "refused_content"})
    assert "0 mails" in none.text
    found = client.get("/search", params={"q": "STRANGER@elsewhere.example"})
    assert "1 mail " in found.text and quote(mail_id, safe="") in found.text
    page = client.get("/mail", params={"id": mail_id})
    assert "recorded" in page.text and "parsing" in page.text and "quarantined" in page.text
    # never the body text of the mail
    assert "Please verify me" not in page.text
    assert client.get("/static/htmx.min.js").text.startswith("var htmx=")


def test_the_live_part_is_one_redis_round_trip(
    console: ConsoleProcess, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What /live reads (views.overview), with every request redis-py sends counted."""
    import redis.connection

    from mailingest.config.settings import load_settings
    from mailingest.console import views

    ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
    sent: list[int] = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
        sent.append(1)
        return real(self, command, check_health)

    ledger.redis.ping()  # connected before counting
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    view = views.overview(ledger, load_settings(env))
    assert len(sent) == 1
    assert view.counts["quarantined"] == 1 and view.attention == 1
    (inbox,) = view.inboxes
    assert inbox.polled_at and inbox.counts["done"] == 1 and inbox.backlog == 0
