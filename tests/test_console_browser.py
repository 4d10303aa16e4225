"""The console in a real browser: Debian's Chromium driven by Playwright, against a
console, a worker and beat in their own processes, on Redis, Dovecot and the sandbox.

An operator logs in, finds the stranger's quarantined mail, maps the sender to an
entity and replays: the documents reach the sandbox and the mail's new copy moves to
Processed. A viewer sees no action; a form sent without its CSRF token is refused; a
browser without the login gets nothing. htmx refreshes the live part under the strict
Content-Security-Policy, with no violation reported.

Screenshots of each page go to ``$MAILINGEST_CONSOLE_SCREENSHOTS`` when set (the README's
``docs/console/``), else to the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.samples import bulk_scenario
from mailingest_testbed.servers import CeleryProcess, ConsoleProcess, ImapServer

from mailingest.adapters.ledger import Ledger
from mailingest.application.services import connect_redis
from mailingest.core.states import MailState

from .conftest import require_or_skip
from .console_bed import OPERATOR, VIEWER, console_env
from .helpers import deliver, folder_counts, wait_until

pytestmark = [pytest.mark.servers, pytest.mark.slow]
STRANGER = "stranger@elsewhere.example"
NEW_ENTITY = "P-Mapped0Stranger0001"


def chromium() -> str:
    """Debian's chromium (installed by ./dev and CI): Playwright's own download cannot
    run here, so the release pinned is the one whose Chromium has the same major."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        require_or_skip("chromium is not installed (apt-get install chromium)")
    assert found is not None
    return found


def test_an_operator_maps_an_unknown_sender_and_replays_in_the_browser(
    env: dict[str, str], imap: ImapServer, sandbox: SandboxServer, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("starlette")
    shots = Path(os.environ.get("MAILINGEST_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    scenario = bulk_scenario(1, seed=5)  # one customer's mail and the stranger's
    Path(env["MAILINGEST_SENDERS_FILE"]).write_text(scenario.senders_csv(), encoding="utf-8")
    deliver(imap, [m.raw for m in scenario.mails])
    process_env = console_env(env, tmp_path)
    ledger = Ledger(connect_redis(env["MAILINGEST_REDIS_URL"]))
    worker = CeleryProcess("worker", process_env, tmp_path / "worker.log", ["--concurrency", "2"])
    beat = CeleryProcess("beat", process_env, tmp_path / "beat.log")
    console = ConsoleProcess(process_env, tmp_path / "console.log")
    with worker, beat, console, sync_api.sync_playwright() as playwright:
        quarantined = wait_until(
            # filed_to is written by the stranger's own finish task, after its state
            lambda: (
                [r for r in ledger.mails((MailState.QUARANTINED,)) if r.filed_to]
                if ledger.counts()["done"]
                else []
            ),
            60,
            "the customer's mail done and the stranger's quarantined and filed",
        )
        (stranger,) = quarantined
        assert stranger.sender == STRANGER and stranger.filed_to == "Quarantine"
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True)
        try:
            _nobody_gets_anything(browser, console.url)
            _a_viewer_cannot_act(browser, console.url, stranger.id)
            operator = browser.new_context(
                http_credentials={"username": OPERATOR[0], "password": OPERATOR[1]},
                viewport={"width": 1280, "height": 860},
            )
            page = operator.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

            page.goto(console.url + "/")
            assert page.locator(".counts li.alert").inner_text() == "1 need attention"
            # htmx is the console's own file and runs under the CSP: the live part refreshes
            with page.expect_request(lambda r: r.url.endswith("/live"), timeout=15_000):
                pass
            page.screenshot(path=shots / "inboxes.png", full_page=True)

            page.click("text=1 need attention")
            page.wait_for_url("**/mails")
            row = page.locator("table.mails tbody tr")
            assert row.count() == 1 and STRANGER in row.inner_text()
            assert "unknown sender" in row.inner_text() and "passport" in row.inner_text()
            page.select_option("select[name=kind]", "unknown_sender")
            page.click("button:has-text('Filter')")
            page.wait_for_url("**kind=unknown_sender**")
            page.screenshot(path=shots / "quarantine.png", full_page=True)

            page.click("table.mails tbody tr a")
            page.wait_for_url("**/mail?id=**")
            assert "recorded" in page.inner_text(".timeline")
            page.screenshot(path=shots / "mail.png", full_page=True)

            page.fill("input[name=entity]", "not a token/")
            page.click("button:has-text('Map sender and replay')")
            assert "not an entity token" in page.inner_text("main")
            assert problems == [
                "Failed to load resource: the server responded with a status of 400 (Bad Request)"
            ]
            problems.clear()  # that 400 was meant
            page.go_back()
            page.fill("input[name=entity]", NEW_ENTITY)
            page.click("button:has-text('Map sender and replay')")
            page.wait_for_url("**/confirm?**")
            assert "replay 1 quarantined mail of this sender" in page.inner_text("main")
            page.screenshot(path=shots / "confirm.png", full_page=True)
            page.dblclick("button:has-text('Confirm')")  # a double click: two POSTs
            page.wait_for_url("**/act")
            assert "moved back to INBOX" in page.inner_text("main"), page.inner_text("main")
            page.screenshot(path=shots / "done.png", full_page=True)
            replayed, mapped = ledger.audit_log(stranger.id)  # done once: newest first
            assert mapped.outcome == f"{STRANGER} mapped to {NEW_ENTITY}"
            assert replayed.outcome == "moved back to INBOX"
            assert {(e.who, e.action) for e in (mapped, replayed)} == {
                ("olga", f"map sender to {NEW_ENTITY}")
            }
            assert [m.to for m in ledger.history(stranger.id)].count("replayed") == 1
            page.go_back()  # the confirmation page again: the mail has moved on
            assert "only the sender of a mail quarantined as unknown" in page.inner_text("main")
            assert page.locator("button:has-text('Confirm')").count() == 0
            problems.clear()  # that page answered 400, as meant

            # the workers take it from here: the replayed copy is polled, filed, uploaded
            def uploaded() -> list[dict[str, object]]:
                found = sandbox.state.list(NEW_ENTITY)
                return found if found and all(d["uploaded"] for d in found) else []

            documents = wait_until(uploaded, 60, "its documents described and uploaded")
            wait_until(
                lambda: (
                    folder_counts(imap, "Processed", "Quarantine")
                    == {"Processed": 2, "Quarantine": 0}
                ),
                60,
                "the replayed mail in Processed",
            )
            page.goto(console.url + "/search")
            page.fill("input[name=q]", STRANGER.upper())
            page.click("button:has-text('Search')")
            rows = page.locator("table.mails tbody tr")
            wait_until(lambda: "done" in rows.first.inner_text(), 30, "the new copy done")
            assert rows.count() == 2 and "replayed" in rows.nth(1).inner_text()
            page.screenshot(path=shots / "search.png", full_page=True)

            rows.first.locator("a").click()
            page.wait_for_url("**/mail?id=**")
            token = documents[0]["document_token"]
            assert token in page.inner_text("main") and NEW_ENTITY in page.inner_text("main")
            page.screenshot(path=shots / "mail-done.png", full_page=True)
            page.goto(console.url + "/audit")
            assert f"map sender to {NEW_ENTITY}" in page.inner_text("main")
            page.screenshot(path=shots / "audit.png", full_page=True)

            # a form without its CSRF token, sent from the page's own session
            refused = operator.request.post(
                console.url + "/act",
                form={"action": "mark_handled", "mail": stranger.id, "nonce": "n" * 20},
            )
            assert refused.status == 403
            assert problems == [], problems  # no CSP violation, no script error
            operator.close()
        finally:
            browser.close()


def _nobody_gets_anything(browser, url: str) -> None:  # type: ignore[no-untyped-def]
    anonymous = browser.new_context()
    page = anonymous.new_page()
    for path in ("/", "/mails", "/search?q=stranger", "/static/htmx.min.js"):
        answer = anonymous.request.get(url + path)  # what the browser is sent
        assert answer.status == 401, path
        assert answer.text() == "authentication required"
        # and the page itself: Chromium, with no login to offer, shows nothing
        with pytest.raises(Exception, match="ERR_INVALID_AUTH_CREDENTIALS"):
            page.goto(url + path)
    anonymous.close()


def _a_viewer_cannot_act(browser, url: str, mail_id: str) -> None:  # type: ignore[no-untyped-def]
    viewer = browser.new_context(http_credentials={"username": VIEWER[0], "password": VIEWER[1]})
    page = viewer.new_page()
    page.goto(url + "/")
    assert page.locator("text=Poll now").count() == 0
    page.goto(f"{url}/mail?id={mail_id}")
    assert STRANGER in page.inner_text("main")
    assert page.locator("text=Replay").count() == 0
    assert page.locator("input[name=entity]").count() == 0
    answer = page.goto(f"{url}/confirm?action=replay&mail={mail_id}")
    assert answer is not None and answer.status == 403
    assert "only an operator" in page.inner_text("main")
    viewer.close()
