"""The console's door as pure logic: credentials parsed, addresses grouped, CSRF tokens
and nonces bound to what they were made for, entity ids checked (no server)."""

from __future__ import annotations

import base64

import pytest
import redis

pytest.importorskip("starlette")  # the [console] extra, installed by ./dev and CI

from mailingest.adapters.senders import check_entity
from mailingest.console.access import Gate, Person, basic_credentials, network_of


def _basic(text: bytes) -> str:
    return "Basic " + base64.b64encode(text).decode()


def test_basic_credentials_are_parsed_or_refused() -> None:
    assert basic_credentials(_basic(b"olga:pa:ss")) == ("olga", "pa:ss")
    assert basic_credentials(_basic("olga:pässwörd".encode())) == ("olga", "pässwörd")
    assert basic_credentials("basic " + base64.b64encode(b"a:b").decode()) == ("a", "b")
    for bad in (None, "", "Bearer x", _basic(b"no-colon"), _basic(b"\xff:x"), "Basic !!"):
        assert basic_credentials(bad) is None, bad


def test_logins_are_counted_by_address_and_ipv6_by_its_64() -> None:
    assert network_of("192.0.2.7") == "192.0.2.7"
    assert network_of("2001:db8:1:2:aaaa::1") == network_of("2001:db8:1:2:bbbb::9")
    assert network_of("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert network_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert network_of("unknown") == "unknown"


def test_tokens_and_nonces_are_good_for_what_they_were_made_for() -> None:
    gate = Gate(users={}, trusted_header=None, secret=b"s" * 32, client=redis.Redis())
    olga, vic = Person("olga", "operator"), Person("vic", "operator")
    token = gate.csrf_token("session-1", olga)
    assert gate.csrf_ok("session-1", olga, token)
    assert not gate.csrf_ok("session-2", olga, token)
    assert not gate.csrf_ok("session-1", vic, token)
    assert not gate.csrf_ok("", olga, token) and not gate.csrf_ok("session-1", olga, "")
    nonce = gate.nonce(olga, "replay", "eu/INBOX/1/2")
    assert gate.nonce_ok(nonce, olga, "replay", "eu/INBOX/1/2")
    assert nonce != gate.nonce(olga, "replay", "eu/INBOX/1/2")  # one per form
    for person, action, subject in (
        (vic, "replay", "eu/INBOX/1/2"),
        (olga, "mark_handled", "eu/INBOX/1/2"),
        (olga, "replay", "eu/INBOX/1/3"),
    ):
        assert not gate.nonce_ok(nonce, person, action, subject)
    assert not gate.nonce_ok("n" * 20, olga, "replay", "eu/INBOX/1/2")
    assert not gate.nonce_ok("", olga, "replay", "eu/INBOX/1/2")


@pytest.mark.parametrize("entity", ["..", ".", "P-\u202eevil", "a b", "P-\x00x", "a/b", "x?y", ""])
def test_an_entity_that_would_name_another_path_or_hide_a_character_is_refused(
    entity: str,
) -> None:
    with pytest.raises(ValueError):
        check_entity(entity)


@pytest.mark.parametrize("entity", ["P-x4vtIdFD20vv6jWshIYD", "cust=1%2", "ext:42", "a..b"])
def test_tokens_and_external_ids_directories_hold_pass(entity: str) -> None:
    assert check_entity(f" {entity} ") == entity
