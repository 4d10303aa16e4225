"""The console's people (issue 15, the access part): passwords hashed with scrypt, the
users file checked at start-up, `mailingest console-user` making its lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailingest.config.settings import load_settings
from mailingest.core.console_users import (
    hash_password,
    parse_users,
    user_line,
    verify_password,
)
from mailingest.core.errors import ConfigError

from .helpers import run_cli

BASE = {
    "MAILINGEST_REDIS_URL": "redis://127.0.0.1:1/0",
    "MAILINGEST_IMAP_HOST": "imap.example.com",
}


def test_a_password_is_stored_salted_and_checked_in_constant_time() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt$16384$8$1$")
    assert "correct horse" not in stored
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batterY", stored)
    assert hash_password("correct horse battery") != stored  # a new salt each time
    assert not verify_password("x", "scrypt$1$1$1$AAAA$AAAA")  # a cost scrypt refuses
    assert not verify_password("x", "plain-text-password")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("alice:admin:scrypt$16384$8$1$AAAA$AAAA", "a role is one of viewer, operator"),
        ("alice:viewer", "must be name:role:hash"),
        ("alice:viewer:hunter2", "not one `mailingest console-user` makes"),
        ("al ice:viewer:scrypt$16384$8$1$AAAA$AAAA", "a name is 1-64"),
    ],
)
def test_a_wrong_line_is_named(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_users(f"# the console's people\n{line}\n", "users")
    assert "users line 2" in str(caught.value)


def test_a_name_twice_is_refused() -> None:
    line = user_line("alice", "viewer", "correct horse battery")
    with pytest.raises(ValueError, match="named twice"):
        parse_users(f"{line}\n{line}\n")


def test_the_users_file_is_read_and_checked_at_start_up(tmp_path: Path) -> None:
    users = tmp_path / "console-users"
    users.write_text(user_line("alice", "operator", "correct horse battery") + "\n")
    settings = load_settings(BASE | {"MAILINGEST_CONSOLE_USERS": str(users)})
    alice = settings.console_users["alice"]
    assert alice.may_act and verify_password("correct horse battery", alice.password_hash)
    users.write_text("alice:root:x\n")
    with pytest.raises(ConfigError, match="MAILINGEST_CONSOLE_USERS"):
        load_settings(BASE | {"MAILINGEST_CONSOLE_USERS": str(users)})
    with pytest.raises(ConfigError, match="MAILINGEST_CONSOLE_SECRET must be at least 32"):
        load_settings(BASE | {"MAILINGEST_CONSOLE_SECRET": "short"})
    with pytest.raises(ConfigError, match="lets no one in anonymously"):
        load_settings(BASE | {"MAILINGEST_CONSOLE_SECRET": "x" * 32}, require=("console",))


def test_console_user_prints_a_line_the_settings_accept(tmp_path: Path) -> None:
    import subprocess
    import sys

    made = subprocess.run(
        [sys.executable, "-m", "mailingest", "console-user", "bob", "--role", "viewer"],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert made.returncode == 0, made.stderr
    assert "a long enough password" not in made.stdout + made.stderr
    users = tmp_path / "console-users"
    users.write_text(made.stdout)
    bob = load_settings(BASE | {"MAILINGEST_CONSOLE_USERS": str(users)}).console_users["bob"]
    assert not bob.may_act and verify_password("a long enough password", bob.password_hash)
    short = run_cli({}, "console-user", "bob")  # no input: an empty password
    assert short.returncode != 0 and "at least 12 characters" in short.stderr
