"""XOAUTH2 login: the shared refresh-token flow over real HTTP and Redis, then real Dovecot.

The token endpoint and Dovecot's introspection endpoint are the OAuth sandbox
(``mailingest_testbed.oauth_sandbox``); Dovecot checks every XOAUTH2 login there, so an
access token the sandbox expired or revoked is really refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
import redis
from mailingest_testbed.alloy_sandbox import SandboxServer
from mailingest_testbed.demo import local_environment
from mailingest_testbed.oauth_sandbox import OAuthSandbox
from mailingest_testbed.samples import bulk_scenario
from mailingest_testbed.servers import DovecotServer, ServerNotAvailable, free_port

from mailingest.adapters import keys
from mailingest.adapters.encryption import Sealer
from mailingest.adapters.imap import Mailbox
from mailingest.adapters.oauth import TokenSource
from mailingest.application.pipeline import RETRYABLE
from mailingest.config.settings import InboxSettings, OAuthSettings, Secret
from mailingest.core.errors import ConfigError, MailboxError, OAuthError

from .conftest import ALLOY_SECRET, ALLOY_TOKEN, require_or_skip
from .helpers import deliver, inbox_settings
from .tls import make_tls_files

pytestmark = pytest.mark.servers

CLIENT_ID = "mailingest-test"
CLIENT_SECRET = "planted-client-secret-Z8"
NO_AUTH_PENALTY = "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
SEALER = Sealer(Secret(base64.urlsafe_b64encode(bytes(range(32))).decode()))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider() -> Iterator[OAuthSandbox]:
    server = OAuthSandbox(client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    yield server
    server.stop()


def settings(server: OAuthSandbox, refresh_token: str, **changes: object) -> OAuthSettings:
    oauth = OAuthSettings(
        token_url=server.token_url,
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        refresh_token=Secret(refresh_token),
        scope="imap",
    )
    return replace(oauth, **changes)  # type: ignore[arg-type]


def source(
    client: redis.Redis, oauth: OAuthSettings, inbox: str = "test", **kw: object
) -> TokenSource:
    return TokenSource(client, inbox, oauth, SEALER, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- TokenSource


def test_one_refresh_serves_every_call_of_every_worker(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    oauth = settings(provider, provider.consent("customer-support"))
    with source(redis_client, oauth) as first, source(redis_client, oauth) as second:
        tokens = {first.access_token() for _ in range(5)} | {second.access_token()}
    assert len(tokens) == 1 and provider.refreshes == 1
    assert provider.is_active(tokens.pop())


def test_refreshed_before_expiry_not_after(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    clock = Clock()
    oauth = settings(provider, provider.consent("customer-support"))
    with source(redis_client, oauth, clock=clock, refresh_margin=300) as tokens:
        token = tokens.access_token()
        clock.now += 3600 - 301  # 301 s left: still used
        assert tokens.access_token() == token and provider.refreshes == 1
        clock.now += 2  # 299 s left: within the margin, refreshed
        fresh = tokens.access_token()
    assert fresh != token and provider.refreshes == 2


def test_token_shorter_lived_than_the_margin_is_used_for_half_its_life(
    redis_client: redis.Redis,
) -> None:
    clock = Clock()
    with OAuthSandbox(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, access_lifetime=60) as p:
        oauth = settings(p, p.consent("customer-support"))
        with source(redis_client, oauth, clock=clock, refresh_margin=300) as tokens:
            token = tokens.access_token()
            clock.now += 29
            assert tokens.access_token() == token
            clock.now += 2
            assert tokens.access_token() != token
        assert p.refreshes == 2


def test_rotated_refresh_token_is_stored_and_used_by_the_next_worker(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    clock = Clock()
    configured = provider.consent("customer-support")
    oauth = settings(provider, configured)
    with source(redis_client, oauth, clock=clock) as worker:
        worker.access_token()
    assert not provider.refresh_token_valid(configured)  # rotated: the old one is revoked
    clock.now += 7200  # the access token expired: a new worker refreshes ...
    with source(redis_client, oauth, clock=clock) as other:
        other.access_token()  # ... with the stored rotated token, or this is invalid_grant
    assert provider.refreshes == 2
    valid = [t for t in provider.issued_refresh_tokens if provider.refresh_token_valid(t)]
    assert len(valid) == 1  # the newest, which the next refresh will use
    clock.now += 7200
    with source(redis_client, oauth, clock=clock) as third:
        third.access_token()
    assert provider.refreshes == 3


def test_without_rotation_the_configured_token_keeps_working(redis_client: redis.Redis) -> None:
    clock = Clock()
    with OAuthSandbox(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, rotate=False) as p:
        configured = p.consent("customer-support")
        with source(redis_client, settings(p, configured), clock=clock) as tokens:
            first = tokens.access_token()
            clock.now += 7200
            assert tokens.access_token() != first
        assert p.refreshes == 2 and p.refresh_token_valid(configured)


def test_a_newly_configured_refresh_token_wins_over_the_stored_one(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    with source(redis_client, settings(provider, provider.consent("customer-support"))) as old:
        cached = old.access_token()
    reconsented = provider.consent("customer-support")  # the operator configures a new one
    with source(redis_client, settings(provider, reconsented)) as new:
        token = new.access_token()  # not the cached token of the replaced grant
    assert token != cached and provider.refreshes == 2
    assert not provider.refresh_token_valid(reconsented)  # it was used (and rotated)
    fingerprint = redis_client.hget(keys.oauth("test"), "configured_sha256")
    assert fingerprint == hashlib.sha256(reconsented.encode()).hexdigest().encode()


def test_concurrent_workers_refresh_exactly_once(redis_client: redis.Redis, redis_url: str) -> None:
    with OAuthSandbox(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, token_delay=0.3) as p:
        oauth = settings(p, p.consent("customer-support"))
        barrier = threading.Barrier(8)
        results: list[str] = []
        errors: list[BaseException] = []

        def worker() -> None:
            client = redis.Redis.from_url(redis_url)  # one connection per "process"
            try:
                with source(client, oauth) as tokens:
                    barrier.wait()
                    results.append(tokens.access_token())
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors and len(results) == 8 and len(set(results)) == 1
        assert p.token_requests == 1 and p.refreshes == 1


def test_invalidate_drops_only_the_token_it_handed_out(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    oauth = settings(provider, provider.consent("customer-support"))
    with source(redis_client, oauth) as first, source(redis_client, oauth) as second:
        refused = first.access_token()
        assert second.access_token() == refused
        second.invalidate()  # the IMAP server refused it
        fresh = second.access_token()
        first.invalidate()  # refused the same old token: the fresh one stays
        assert first.access_token() == fresh != refused
    assert provider.refreshes == 2


def test_revoked_refresh_token_is_a_clear_error_without_secrets(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    configured = provider.consent("customer-support")
    provider.revoke(configured)
    with source(redis_client, settings(provider, configured), inbox="support-eu") as tokens:
        with pytest.raises(OAuthError) as caught:
            tokens.access_token()
    error = caught.value
    assert isinstance(error, MailboxError) and error.needs_operator
    assert (error.status, error.error, error.inbox) == (400, "invalid_grant", "support-eu")
    text = str(error)
    assert "inbox support-eu" in text and provider.token_url in text
    assert "invalid_grant" in text and "consent again" in text
    for shown in (text, repr(error), repr(error.__dict__)):
        assert configured not in shown and CLIENT_SECRET not in shown
    copy = pickle.loads(pickle.dumps(error))  # as a Celery result carries it
    assert str(copy) == text and copy.needs_operator and copy.error == "invalid_grant"


def test_wrong_client_secret_says_fix_the_client_and_hides_url_query(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    oauth = settings(
        provider,
        provider.consent("customer-support"),
        token_url=provider.token_url + "?sig=planted-query-Q7",
        client_secret=Secret("wrong-secret-W3"),
    )
    with source(redis_client, oauth) as tokens, pytest.raises(OAuthError) as caught:
        tokens.access_token()
    text = str(caught.value)
    assert caught.value.error == "invalid_client" and caught.value.needs_operator
    assert "fix the OAuth client" in text
    assert "planted-query" not in text and "wrong-secret" not in text


def test_unavailable_endpoint_is_retryable(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    oauth = settings(provider, provider.consent("customer-support"))
    provider.fail_token_requests(1, status=503)
    with source(redis_client, oauth) as tokens:
        with pytest.raises(OAuthError) as caught:
            tokens.access_token()
        assert caught.value.status == 503 and not caught.value.needs_operator
        assert isinstance(caught.value, RETRYABLE)  # what the pipeline retries
        assert tokens.access_token()  # the next poll succeeds
    closed = settings(provider, "rt-x", token_url=f"http://127.0.0.1:{free_port()}/token")
    with source(redis_client, closed, timeout=2) as tokens, pytest.raises(OAuthError) as caught:
        tokens.access_token()
    assert "could not connect" in str(caught.value) and not caught.value.needs_operator


def test_redis_never_holds_a_token_in_clear(
    redis_client: redis.Redis, provider: OAuthSandbox
) -> None:
    clock = Clock()
    oauth = settings(provider, provider.consent("customer-support"))
    with source(redis_client, oauth, clock=clock) as tokens:
        tokens.access_token()
        clock.now += 7200
        tokens.access_token()  # a second rotation: several tokens to look for
    secrets = provider.issued_access_tokens + provider.issued_refresh_tokens + [CLIENT_SECRET]
    assert len(secrets) == 6
    stored: list[bytes] = []
    for key in redis_client.scan_iter():
        if redis_client.type(key) == b"hash":
            for field, value in redis_client.hgetall(key).items():
                stored += [bytes(field), bytes(value)]  # type: ignore[arg-type]
        else:
            stored.append(key)
    assert stored
    for secret in secrets:
        raw = secret.encode()
        for value in stored:
            assert raw not in value and base64.b64encode(raw)[:16] not in value


def test_token_url_must_be_https_unless_loopback(redis_client: redis.Redis) -> None:
    plain = OAuthSettings("http://login.example.com/token", "c", None, Secret("rt"))
    with pytest.raises(ConfigError, match="https"):
        source(redis_client, plain)
    source(redis_client, replace(plain, token_url="https://login.example.com/token")).close()
    source(redis_client, replace(plain, token_url="http://127.0.0.1:9/token")).close()


def test_private_ca_is_trusted_only_when_given(tmp_path: Path, redis_client: redis.Redis) -> None:
    ca, cert, key = make_tls_files(tmp_path / "pki")
    tls = (str(cert), str(key))
    with OAuthSandbox(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, tls=tls) as p:
        assert p.token_url.startswith("https://127.0.0.1:")
        oauth = settings(p, p.consent("customer-support"))
        with source(redis_client, oauth) as tokens, pytest.raises(OAuthError, match="TLS"):
            tokens.access_token()  # untrusted: refused, no bypass
        with source(redis_client, oauth, ca_file=ca) as tokens:
            assert p.is_active(tokens.access_token())


# --------------------------------------------------------------------------- Dovecot


@pytest.fixture(scope="module")
def oauth_dovecot(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DovecotServer, OAuthSandbox]]:
    """Dovecot checking XOAUTH2 logins at the sandbox's introspection endpoint."""
    provider = OAuthSandbox(client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    server = DovecotServer(
        tmp_path_factory.mktemp("oauth-imap"),
        oauth2_introspection_url=provider.introspection_url,
        # no auth penalty: each refused login would delay the next one from 127.0.0.1
        # by 4 s, 8 s, ... (the retry still works with it, only slower)
        extra_config=NO_AUTH_PENALTY,
    )
    try:
        server.start()
    except ServerNotAvailable as exc:
        provider.stop()
        require_or_skip(str(exc))
    yield server, provider
    server.stop()
    provider.stop()


def xoauth2_inbox(server: DovecotServer, provider: OAuthSandbox, refresh: str) -> InboxSettings:
    return inbox_settings(
        server.account, password=None, auth="xoauth2", oauth=settings(provider, refresh)
    )


def test_xoauth2_login_reads_the_inbox(
    oauth_dovecot: tuple[DovecotServer, OAuthSandbox], redis_client: redis.Redis
) -> None:
    server, provider = oauth_dovecot
    msg = EmailMessage()
    msg["From"], msg["Subject"], msg["Message-ID"] = "erin@example.com", "licence", "<x2@t>"
    msg.set_content("delivered with the password account")
    deliver(server, [msg.as_bytes()])  # the password login keeps working beside XOAUTH2
    inbox = xoauth2_inbox(server, provider, provider.consent(server.account.user))
    assert inbox.oauth is not None
    seen = provider.active_introspections
    with source(redis_client, inbox.oauth) as tokens, Mailbox(inbox, token_source=tokens) as box:
        assert box.select("INBOX") > 0
        uids = box.uids_after(0)
        assert len(uids) == 1
        assert b"delivered with the password account" in box.fetch(uids)[0].raw
    assert provider.active_introspections == seen + 1  # Dovecot asked the sandbox
    assert "method=XOAUTH2" in server.log_path.read_text()


def test_token_expired_at_the_server_is_refreshed_once_and_login_succeeds(
    oauth_dovecot: tuple[DovecotServer, OAuthSandbox], redis_client: redis.Redis
) -> None:
    server, provider = oauth_dovecot
    inbox = xoauth2_inbox(server, provider, provider.consent(server.account.user))
    assert inbox.oauth is not None
    with source(redis_client, inbox.oauth) as tokens:
        with Mailbox(inbox, token_source=tokens) as box:
            box.select("INBOX")
        refreshes, inactive = provider.refreshes, provider.introspections
        inactive -= provider.active_introspections
        old = tokens.access_token()
        provider.expire_access_tokens()  # early, as a provider may: our cache still trusts it
        with Mailbox(inbox, token_source=tokens) as box:  # refused, invalidated, refreshed
            box.select("INBOX")
        assert provider.refreshes == refreshes + 1
        assert provider.introspections - provider.active_introspections == inactive + 1
        assert tokens.access_token() != old


def test_revoked_refresh_token_fails_naming_the_inbox(
    oauth_dovecot: tuple[DovecotServer, OAuthSandbox], redis_client: redis.Redis
) -> None:
    server, provider = oauth_dovecot
    inbox = xoauth2_inbox(server, provider, provider.consent(server.account.user))
    assert inbox.oauth is not None
    with source(redis_client, inbox.oauth) as tokens:
        Mailbox(inbox, token_source=tokens).connect()
        for token in provider.issued_refresh_tokens:  # the owner withdrew consent
            provider.revoke(token)
        provider.expire_access_tokens()
        with pytest.raises(MailboxError) as caught:
            Mailbox(inbox, token_source=tokens).connect()
    assert isinstance(caught.value, OAuthError) and caught.value.error == "invalid_grant"
    assert "inbox test" in str(caught.value)


def test_token_of_another_user_is_refused_after_one_retry(
    oauth_dovecot: tuple[DovecotServer, OAuthSandbox], redis_client: redis.Redis
) -> None:
    server, provider = oauth_dovecot
    inbox = xoauth2_inbox(server, provider, provider.consent("someone-else"))
    assert inbox.oauth is not None
    refreshes = provider.refreshes
    with source(redis_client, inbox.oauth) as tokens:
        with pytest.raises(MailboxError, match="XOAUTH2 login refused") as caught:
            Mailbox(inbox, token_source=tokens).connect()
    assert provider.refreshes == refreshes + 2  # refused, refreshed, refused again: stop
    for token in provider.issued_access_tokens:
        assert token not in str(caught.value)


def test_xoauth2_without_a_token_source_is_a_mailbox_error(
    oauth_dovecot: tuple[DovecotServer, OAuthSandbox],
) -> None:
    server, provider = oauth_dovecot
    inbox = xoauth2_inbox(server, provider, "rt-unused")
    with pytest.raises(MailboxError, match="no OAuth token source"):
        Mailbox(inbox).connect()


def test_the_sandbox_answers_introspection_like_rfc_7662(provider: OAuthSandbox) -> None:
    refresh = provider.consent("customer-support")
    form = {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": CLIENT_ID}
    answer = httpx.post(provider.token_url, data=form, auth=(CLIENT_ID, CLIENT_SECRET)).json()
    token = answer["access_token"]
    assert answer["refresh_token"] != refresh and answer["token_type"] == "Bearer"
    active = httpx.post(provider.introspection_url, data={"token": token}).json()
    assert active["active"] is True and active["username"] == "customer-support"
    assert httpx.get(provider.introspection_url, params={"token": token}).json()["active"]
    provider.expire_access_tokens()
    assert httpx.post(provider.introspection_url, data={"token": token}).json() == {"active": False}
    again = httpx.post(provider.token_url, data=form, auth=(CLIENT_ID, CLIENT_SECRET))
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_an_xoauth2_inbox_configured_by_environment_is_checked_and_ingested(
    oauth_dovecot: tuple[DovecotServer, OAuthSandbox],
    redis_url: str,
    sandbox: SandboxServer,
    tmp_path: Path,
) -> None:
    """The whole wiring: settings -> runtime -> token source -> XOAUTH2 -> pipeline."""
    server, provider = oauth_dovecot
    empty_inbox(server)
    scenario = bulk_scenario(2, seed=31)
    senders = tmp_path / "senders.csv"
    senders.write_text(scenario.senders_csv(), encoding="utf-8")
    deliver(server, [m.raw for m in scenario.mails[:2]])  # two known senders
    env = local_environment(
        redis_url,
        server.account,
        sandbox.url,
        senders,
        alloy_token=ALLOY_TOKEN,
        alloy_secret=ALLOY_SECRET,
    ) | {
        "MAILINGEST_IMAP_AUTH": "xoauth2",
        "MAILINGEST_OAUTH_TOKEN_URL": provider.token_url,
        "MAILINGEST_OAUTH_CLIENT_ID": CLIENT_ID,
        "MAILINGEST_OAUTH_CLIENT_SECRET": CLIENT_SECRET,
        "MAILINGEST_OAUTH_REFRESH_TOKEN": provider.consent(server.account.user),
        "MAILINGEST_STAGING_KEY": base64.urlsafe_b64encode(bytes(32)).decode(),
    }
    del env["MAILINGEST_IMAP_PASSWORD"]  # no password anywhere
    refreshes = provider.refreshes

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailingest", *args],
            env={"PATH": "/usr/bin:/bin"} | env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    checked = run("check-config", "--connect")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok    inbox default: logged in as" in checked.stdout
    polled = run("poll-once", "--json")
    assert polled.returncode == 0, polled.stdout + polled.stderr
    assert json.loads(polled.stdout)["processed"] == 2
    # the first process refreshed (and rotated the refresh token); the second used the
    # access token it left in Redis, so the revoked configured token never mattered
    assert provider.refreshes == refreshes + 1
    assert CLIENT_SECRET not in checked.stdout + checked.stderr + polled.stdout + polled.stderr


def empty_inbox(server: DovecotServer) -> None:
    from imapclient import IMAPClient

    account = server.account
    client = IMAPClient(account.host, port=account.port, ssl=False, timeout=10)
    client.login(account.user, account.password)
    client.select_folder("INBOX")
    uids = client.search(["ALL"])
    if uids:
        client.delete_messages(uids)
        client.expunge()
    client.logout()
