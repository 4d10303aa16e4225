"""What a container runs, checked with the real parsers: mailingest's argparse parser,
Celery's click commands and Flower's options; ``celery -A <module>`` must import and
expose a Celery app. Shared by the Compose and the Kubernetes checks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# What each command needs (Settings.require groups). Importing
# mailingest.application.celery_app (celery -A, Flower, worker, beat) loads and checks
# the settings of a worker.
ALL_GROUPS = ("redis", "imap", "alloy")
MAILINGEST_NEEDS: dict[str, tuple[str, ...]] = {
    "worker": ALL_GROUPS,
    "beat": ALL_GROUPS,
    "poll-once": ALL_GROUPS,
    "replay": ALL_GROUPS,
    "check-config": ALL_GROUPS,
    # it builds a worker's context (ledger, broker, inboxes) and its own door
    "console": (*ALL_GROUPS, "console"),
    "console-user": (),
    "seed": ("redis", "imap"),
    "watch": ("redis", "imap"),
    "poll-now": ("redis",),
    "status": ("redis",),
    "senders": ("redis",),
    "sandbox": (),
    "demo": (),
}
CELERY_SUBCOMMANDS = ("worker", "beat", "flower", "inspect")
# What a container may run besides mailingest and celery: python -c (checked to compile) and
# the shell words of a guard around an `exec mailingest|celery ...`.
SHELL_WORDS = {"if", "then", "else", "elif", "fi", "[", "test", "echo", "printf", "exit", "true"}

# -- commands ------------------------------------------------------------------------


@functools.cache
def mailingest_parser() -> argparse.ArgumentParser:
    from mailingest.application.cli import build_parser

    return build_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("mailingest's parser has no subcommands")


def parse_or_fail(parser: argparse.ArgumentParser, args: list[str], where: str) -> None:
    """argparse exits on a bad argument: turn that into a failure naming it."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"{where}: mailingest {shlex.join(args)}: {stderr.getvalue().strip()}")


def check_mailingest(args: list[str], where: str) -> str:
    """``mailingest ARGS`` parses with the real parser; returns the subcommand."""
    assert args, f"{where}: `mailingest` without a subcommand"
    command, rest = args[0], args[1:]
    real = subcommands(mailingest_parser())
    if command in ("worker", "beat"):
        # mailingest execs `celery -A mailingest <command> <rest>`: celery parses the rest
        parse_or_fail(mailingest_parser(), [command], where)
        check_celery_options(command, rest, where)
    elif command in real:
        parse_or_fail(mailingest_parser(), args, where)
    else:
        pytest.fail(f"{where}: `mailingest {command}` is not a subcommand ({', '.join(real)})")
    assert command in MAILINGEST_NEEDS, f"{where}: add {command!r} to MAILINGEST_NEEDS"
    return command


def check_celery_options(command: str, args: list[str], where: str) -> None:
    import click
    from celery import Celery
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery as celery_group

    assert command in celery_group.commands, f"{where}: `celery {command}` does not exist"
    if command == "flower":
        from flower.options import options

        for arg in args:
            assert arg.startswith("--"), f"{where}: Flower takes --name=value, got {arg!r}"
            name, _, value = arg[2:].partition("=")
            option = options._options.get(name.replace("_", "-"))
            assert option is not None, f"{where}: Flower has no option --{name}"
            if option.type in (int, float):
                option.type(value)  # a bad number raises here
        return
    context = CLIContext(app=Celery(set_as_current=False), no_color=True, workdir=None, quiet=True)
    parent = click.Context(celery_group, info_name="celery", obj=context)
    try:
        celery_group.commands[command].make_context(command, list(args), parent=parent)
    except click.UsageError as exc:
        pytest.fail(f"{where}: celery {command} {shlex.join(args)}: {exc.format_message()}")


@functools.cache
def celery_app_module_works(module: str) -> str:
    """Import ``module`` in a child process with a complete (fake) environment; '' if it
    exposes a Celery app as ``app``, else what went wrong."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
    env |= {
        "MAILINGEST_REDIS_URL": "redis://127.0.0.1:6379/15",
        "MAILINGEST_IMAP_HOST": "imap.example.com",
        "MAILINGEST_IMAP_USER": "documents@example.com",
        "MAILINGEST_IMAP_PASSWORD": "secret",
        "MAILINGEST_TRUSTED_AUTHSERV_ID": "mx.example.com",
        "MAILINGEST_ALLOY_TOKEN": "token",
        "MAILINGEST_ALLOY_SECRET": "secret",
        "MAILINGEST_AGENT_EMAIL": "agent@example.com",
    }
    code = (
        "import importlib, celery\n"
        f"app = importlib.import_module({module!r}).app\n"
        "assert isinstance(app, celery.Celery), type(app)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    return "" if done.returncode == 0 else (done.stderr.strip() or done.stdout.strip())


def check_celery(args: list[str], where: str) -> str:
    """``celery -A <module> <subcommand> ...``: the module imports and exposes a Celery app,
    the subcommand exists and takes these options."""
    assert len(args) >= 3, f"{where}: celery {shlex.join(args)}"
    if args[0] in ("-A", "--app"):
        module, rest = args[1], args[2:]
    elif args[0].startswith("--app="):
        module, rest = args[0].split("=", 1)[1], args[1:]
    else:
        pytest.fail(f"{where}: `celery {shlex.join(args)}` does not name the app with -A")
    assert module.startswith("mailingest"), f"{where}: -A {module} is not mailingest's app"
    problem = celery_app_module_works(module)
    assert not problem, f"{where}: -A {module}: {problem}"
    command, options = rest[0], rest[1:]
    assert command in CELERY_SUBCOMMANDS, f"{where}: celery {command} is not one we run"
    check_celery_options(command, options, where)
    return f"celery {command}"


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a small sh script: separators split, keywords like ``if``,
    ``then`` and ``exec`` dropped, redirections removed."""
    commands: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        tokens = list(lexer)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in (";", "&&", "||", "|", "&"):
                commands.append(current)
                current = []
            elif re.fullmatch(r"[<>]+&?", token):
                if current and current[-1].isdigit():  # 2>&1: the fd belongs to it
                    current.pop()
                i += 1  # and its target
            else:
                current.append(token)
            i += 1
        commands.append(current)
    out = []
    for command in commands:
        while command and command[0] in ("if", "then", "else", "elif", "exec", "!"):
            command = command[1:]
        if command and command != ["fi"]:
            out.append(command)
    return out


def check_invocation(argv: list[str], where: str) -> list[str]:
    """What a container runs: mailingest or celery, directly or exec'd from a small sh
    script, or python -c. Returns the mailingest subcommands / celery invocations found."""
    assert argv, f"{where}: empty command"
    program = Path(argv[0]).name
    if program in ("sh", "bash") and argv[1:2] == ["-c"]:
        found: list[str] = []
        for command in shell_commands(argv[2]):
            name = Path(command[0]).name
            if name in ("mailingest", "celery", "python", "python3"):
                found += check_invocation(command, where)
            else:
                assert name in SHELL_WORDS, f"{where}: the script runs {name!r}"
        assert found, f"{where}: the script runs neither mailingest nor celery"
        return found
    if program == "mailingest":
        return [check_mailingest(argv[1:], where)]
    if program == "celery":
        return [check_celery(argv[1:], where)]
    if program in ("python", "python3"):
        assert argv[1:2] == ["-c"] and len(argv) == 3, f"{where}: python {argv[1:]}"
        compile(argv[2], where, "exec")  # a SyntaxError fails the test
        return []
    pytest.fail(f"{where}: runs {argv[0]!r}, not mailingest or celery")


def needs(invocations: list[str]) -> tuple[str, ...]:
    groups: list[str] = []
    for invocation in invocations:
        wanted = ALL_GROUPS if invocation.startswith("celery ") else MAILINGEST_NEEDS[invocation]
        groups += [g for g in wanted if g not in groups]
    return tuple(groups)


def healthcheck_argv(test: Any) -> list[str] | None:
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    if test[0] == "NONE":
        return None
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    assert test[0] == "CMD", f"healthcheck test {test!r}"
    return list(test[1:])
