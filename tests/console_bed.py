"""What the console's tests share: its users file, its settings, a quarantined mail."""

from __future__ import annotations

import os
from pathlib import Path

from mailingest.core.console_users import user_line

OPERATOR = ("olga", "olga-password-1234")
VIEWER = ("vic", "vic-password-12345")
SECRET = "console-secret-for-the-tests-0123456789abcdef"


def console_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The process environment of a console (and its workers) on the test's servers."""
    users = tmp_path / "console-users"
    users.write_text(
        "\n".join(
            [
                user_line(OPERATOR[0], "operator", OPERATOR[1]),
                user_line(VIEWER[0], "viewer", VIEWER[1]),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
    return (
        base
        | env
        | {
            "MAILINGEST_CONSOLE_USERS": str(users),
            "MAILINGEST_CONSOLE_SECRET": SECRET,
            # as behind a TLS proxy on loopback: its X-Forwarded-Proto is believed
            "FORWARDED_ALLOW_IPS": "127.0.0.1",
        }
    )
