"""README.md's settings table and ``.env.example``, written from the table of settings.

Both documents are generated, not kept by hand, so that they cannot drift from what the
loader does: ``python -m mailingest.config.docs`` rewrites them (run it from the
repository's root after changing :mod:`mailingest.config.table`), ``--check`` only says
whether they are current (tests/test_settings.py fails when they are not).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

from mailingest.config.table import DAY, SETTINGS, KiB, MiB, Section, Setting

README_START = (
    "<!-- settings table: generated from mailingest/config/table.py by "
    "`python -m mailingest.config.docs`; edit it there -->"
)
README_END = "<!-- end of the settings table -->"

ENV_HEADER = """\
# mailingest with Docker Compose: copy to .env, fill in, `docker compose up -d`.
# .env is git-ignored and kept out of the image (.dockerignore); chmod 600 it.
#
# Every MAILINGEST_* setting may instead be given as MAILINGEST_*_FILE=/path naming a file
# that holds the value (Docker/Kubernetes secrets); not both. Empty means "not set".
# Several inboxes: MAILINGEST_CONFIG names a TOML file (see deploy/k8s/configmap.yaml for
# one); mount it into the containers, and these variables override the file.
# Every setting is listed below; a commented-out one keeps the default it shows. A name
# that is not a setting stops start-up (a typo would silently keep the default).
# Generated from mailingest/config/table.py by `python -m mailingest.config.docs`.

# -- Compose -----------------------------------------------------------------------
# Which services `docker compose up` starts: prod = Redis, worker, beat, Flower, console.
# (`docker compose --profile demo up` runs the demo instead and needs none of this file.)
COMPOSE_PROFILES=prod
# Flower's login, user:password (several: comma-separated). Flower refuses to start without.
FLOWER_BASIC_AUTH=ops:change-me
# Where Flower is published on the host; 0.0.0.0:5555 for other machines (add TLS in front).
FLOWER_PUBLISH=127.0.0.1:5555"""

SECTIONS: dict[Section, str] = {
    "redis": "Redis: broker, ledger, staged documents, RedBeat lock, rate limit, OAuth tokens",
    "inbox": "The inbox (one here; several: MAILINGEST_CONFIG), and its OAuth login",
    "senders": "Who the senders are (docs/security.md)",
    "replies": "Replies to customers (off unless MAILINGEST_REPLIES is set)",
    "alloy": "Alloy",
    "screening": "What a mail may be (docs/security.md)",
    "console": "The operator console (mailingest console)",
    "operations": "Operations (docker-compose.yml sets the worker's METRICS_PORT=9808)",
}


def _number(n: float) -> str:
    """``n`` as written in a variable: 604800, not 6.048e+05."""
    return str(int(n)) if n == int(n) else repr(float(n))


def _size(n: float) -> str:
    for unit, size in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{_number(n / size)} {unit}"
    return f"{_number(n)} bytes"


def _seconds(n: float) -> str:
    for unit, size in (("days", DAY), ("h", 3600)):
        if n >= size and n % size == 0:
            return f"{_number(n)} s ({_number(n / size)} {unit})"
    return f"{_number(n)} s"


def _amount(setting: Setting, n: float) -> str:
    if setting.unit == "bytes":
        return _size(n)
    if setting.unit == "s":
        return _seconds(n)
    return _number(n)


def default_text(setting: Setting) -> str:
    """The default in words: the value, what it is computed from, or what unset means."""
    if setting.default_text:
        text = setting.default_text
    elif isinstance(setting.default, str):
        text = f"`{setting.default}`" if setting.default else "empty"
    elif setting.default is not None:
        text = _amount(setting, setting.default)
    else:
        text = ""
    if setting.required:
        return f"{text}; {setting.required}" if text else setting.required
    return text or "none"


def values_text(setting: Setting) -> str:
    """What may be given, in words."""
    if setting.values_text:
        text = setting.values_text
    elif setting.kind in ("integer", "number"):
        assert setting.minimum is not None and setting.maximum is not None
        low, high = _amount(setting, setting.minimum), _amount(setting, setting.maximum)
        text = f"{low.split(' (')[0]} to {high.split(' (')[0]}"
        text += "" if setting.kind == "integer" or setting.unit == "bytes" else ", decimals too"
    elif setting.kind == "choice":
        text = ", ".join(f"`{choice}`" for choice in setting.choices)
    elif setting.kind == "url":
        text = "/".join(f"`{scheme}`" for scheme in setting.schemes) + " URL"
    else:
        text = {
            "text": "text",
            "secret": "text",
            "email": "e-mail address",
            "path": "file",
            "folder": "IMAP folder",
            "list": "comma-separated list",
        }[setting.kind]
    return text + (", never logged" if setting.secret else "")


def readme_table() -> str:
    """The README's table of settings, between its markers."""
    rows = [
        README_START,
        "| variable | default | values | scope | meaning |",
        "|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        scope = "*per inbox*" if setting.per_inbox else "shared"
        if setting.env_only:
            scope = "environment"
        cells = [f"`{setting.var}`", default_text(setting), values_text(setting), scope]
        cells.append(setting.help)
        assert not any("|" in cell for cell in cells), setting.name
        rows.append("| " + " | ".join(cells) + " |")
    rows.append(README_END)
    return "\n".join(rows) + "\n"


def _comment(text: str) -> list[str]:
    """``text`` as comment lines; a `code span` is never broken (a command stays one line)."""
    whole = re.sub(r"`[^`]*`", lambda span: span.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(
        whole,
        88,
        initial_indent="# ",
        subsequent_indent="#   ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return [line.replace("\0", " ").replace("`", "") for line in lines]


def env_example() -> str:
    """The whole ``.env.example``: Compose's own variables, then every setting."""
    out = [ENV_HEADER]
    for section, title in SECTIONS.items():
        out.append("")
        out.append(f"# -- {title} " + "-" * max(3, 84 - len(title)))
        for setting in (s for s in SETTINGS if s.section == section):
            facts = [values_text(setting)]
            if setting.per_inbox:
                facts.append("per inbox")
            if setting.required:
                facts.append(setting.required)
            if setting.default_text:
                facts.append(f"default: {setting.default_text}")
            elif setting.example is not None and setting.default is not None:
                facts.append(f"default: {_env_value(setting.default)}")
            out += _comment(f"{setting.help} ({'; '.join(facts)})")
            if setting.example is not None:
                out.append(f"{setting.var}={setting.example}")
            else:
                out.append(f"# {setting.var}={_env_value(setting.default)}")
    return "\n".join(out) + "\n"


def _env_value(value: str | int | float | None) -> str:
    if value is None:
        return ""
    return _number(value) if isinstance(value, float) else str(value)


def with_readme_table(readme: str) -> str:
    """``readme`` with its settings table replaced by the generated one."""
    start = readme.index(README_START)
    end = readme.index(README_END) + len(README_END) + 1
    return readme[:start] + readme_table() + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailingest.config.docs",
        description="Write README.md's settings table and .env.example from the table of "
        "settings (mailingest/config/table.py).",
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository's root")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if either is stale"
    )
    args = parser.parse_args(argv)
    readme, env = args.root / "README.md", args.root / ".env.example"
    wanted = {
        readme: with_readme_table(readme.read_text(encoding="utf-8")),
        env: env_example(),
    }
    stale = [path for path, text in wanted.items() if path.read_text(encoding="utf-8") != text]
    for path in stale:
        if args.check:
            print(f"{path} differs from mailingest/config/table.py", file=sys.stderr)
        else:
            path.write_text(wanted[path], encoding="utf-8")
            print(f"{path} written")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
