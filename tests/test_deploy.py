"""The deployment files, checked without Docker or Kubernetes (nothing is started).

docker-compose.yml, .env.example, .dockerignore, deploy/Dockerfile, the lock files,
deploy/k8s/, the Grafana dashboard and the Prometheus rules are parsed, and checked
against the code they drive:

* every command a container runs (its command, entrypoint, probes and health checks) is
  parsed by the real parsers: mailingest's argparse parser, Celery's click commands,
  Flower's options; ``celery -A <module>`` must import and expose a Celery app;
* every service is given the settings its command needs: the environment a container would
  get (compose ``environment`` + ``env_file``, with .env.example standing in for .env;
  Kubernetes env, ConfigMaps and Secret files laid out in a temporary directory) is loaded
  with mailingest's own settings loader, which must accept it;
* the image uses a slim base, a non-root user and only hash-pinned dependencies that
  satisfy pyproject.toml;
* every metric in the dashboard and the alert rules is one mailingest exports.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import io
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mailingest.application.metrics import METRICS
from mailingest.config.settings import load_settings
from mailingest.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
LOCK = DEPLOY / "requirements.lock"
BUILD_LOCK = DEPLOY / "requirements-build.lock"
K8S = DEPLOY / "k8s"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
DASHBOARD = DEPLOY / "grafana" / "mailingest.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

DEFAULT_TASK_TIME_LIMIT = 300  # MAILINGEST_TASK_TIME_LIMIT's default

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

# -- metrics ------------------------------------------------------------------------

HISTOGRAMS = {"mailingest_alloy_request_seconds", "mailingest_imap_poll_seconds"}
METRIC_LABELS: dict[str, set[str]] = {
    "mailingest_mails_seen_total": {"inbox"},
    "mailingest_mails_processed_total": {"inbox"},
    "mailingest_mails_quarantined_total": {"inbox", "reason"},
    "mailingest_mails_failed_total": {"inbox"},
    "mailingest_documents_described_total": set(),
    "mailingest_documents_uploaded_total": set(),
    "mailingest_upload_bytes_total": set(),
    "mailingest_alloy_request_seconds": {"method", "endpoint"},
    "mailingest_alloy_responses_total": {"method", "endpoint", "status"},
    "mailingest_imap_poll_seconds": {"inbox"},
    "mailingest_oldest_unprocessed_seconds": {"inbox"},
    "mailingest_backlog_mails": {"inbox"},
}


# -- reading the files ---------------------------------------------------------------


def dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (as Compose reads an env_file), comments and blank lines skipped."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{number}"
        values[key] = value
    return values


_VARIABLE = re.compile(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation: ``$$`` is a literal ``$``; ``${X}``, ``${X:-d}``, ``${X-d}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        body = match.group(1) if match.group(1) is not None else match.group(2)
        name, op, default = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?]?)(.*)", body).groups()
        if op in (":?", "?"):
            raise AssertionError(f"${{{body}}}: Compose checks this in every profile")
        given = env.get(name)
        if op == ":-" and not given:
            return default
        if op == "-" and given is None:
            return default
        return given or ""

    return _VARIABLE.sub(replace, value)


@functools.cache
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@functools.cache
def env_example() -> dict[str, str]:
    return dotenv(ENV_EXAMPLE)


def compose(profile: str) -> dict[str, Any]:
    """The file as Compose sees it for a profile: .env (here .env.example) is read for
    interpolation only when the production profile is meant (the demo needs no .env)."""
    return interpolate(compose_raw(), env_example() if profile == "prod" else {})


def compose_services(profile: str) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose(profile)["services"].items()
        if profile in service.get("profiles", [])
    }


@functools.cache
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions per stage, continuation lines joined, ARGs applied."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
            continue
        if instruction == "FROM":
            rest = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest)
            stages.append([])
        assert stages, f"{line!r} before the first FROM"
        stages[-1].append((instruction, rest))
    return stages


def final_stage() -> list[tuple[str, str]]:
    """The default target's instructions, with those of the stages it is built FROM."""
    stages = dockerfile_stages()
    named = {stage[0][1].split()[-1]: stage for stage in stages if " AS " in stage[0][1]}
    chain, stage = [], stages[-1]
    while True:
        chain[:0] = stage[1:]
        parent = stage[0][1].split()[0]
        if parent not in named:
            return [stage[0], *chain]
        stage = named[parent]


def image_default(instruction: str) -> list[str]:
    """ENTRYPOINT or CMD of the final stage, as an argv."""
    values = [rest for ins, rest in final_stage() if ins == instruction]
    assert values, f"the final stage has no {instruction}"
    return json.loads(values[-1])


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                yield path, document


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc.get("kind") == kind]


def k8s_workloads() -> list[dict[str, Any]]:
    return [
        doc
        for _, doc in k8s_documents()
        if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def is_ours(image: str) -> bool:
    """The image built from deploy/Dockerfile (kustomize renames it)."""
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return name == "mailingest"


def k8s_our_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (f"{w['metadata']['name']}/{c['name']}", w, c)
        for w in k8s_workloads()
        for c in containers(w)
        if is_ours(c["image"])
    ]


@functools.cache
def secret_example() -> dict[str, str]:
    (secret,) = yaml.safe_load_all(SECRET_EXAMPLE.read_text(encoding="utf-8"))
    assert secret["kind"] == "Secret"
    data = dict(secret.get("stringData") or {})
    for key, value in (secret.get("data") or {}).items():
        data[key] = base64.b64decode(value).decode()
    return data


def secret_name() -> str:
    return yaml.safe_load(SECRET_EXAMPLE.read_text(encoding="utf-8"))["metadata"]["name"]


@functools.cache
def configmaps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data", {}) for doc in k8s_kind("ConfigMap")}


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


def as_argv(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def compose_argv(service: dict[str, Any]) -> list[str]:
    """The container's argv: an entrypoint given in the file also drops the image's CMD."""
    if "entrypoint" in service:
        return as_argv(service["entrypoint"]) + as_argv(service.get("command", []))
    return image_default("ENTRYPOINT") + as_argv(service.get("command", image_default("CMD")))


def compose_is_ours(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile":
        return True
    return is_ours(service.get("image", ""))


def compose_cases() -> list[tuple[str, str]]:
    """(profile, service) of every service running the image (not redis, dovecot)."""
    return [
        (profile, name)
        for name, service in compose_raw()["services"].items()
        for profile in service.get("profiles", [])
        if compose_is_ours(service)
    ]


def compose_environment(profile: str, service: dict[str, Any]) -> dict[str, str]:
    """The variables the container gets: env_file (.env is .env.example here), then
    ``environment``, which wins."""
    env: dict[str, str] = {}
    files = service.get("env_file", [])
    for entry in [files] if isinstance(files, str | dict) else files:
        path = entry if isinstance(entry, str) else entry["path"]
        assert path == ".env", f"env_file {path}: only .env (from .env.example) is known"
        env |= env_example()
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env |= {k: "" if v is None else str(v) for k, v in environment.items()}
    return env


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def option_value(argv: list[str], option: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def duration_seconds(text: str) -> float:
    """Compose durations (1m30s, 6m, 300s) and Prometheus ones (5m, 1h)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s|d|w|y)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"duration {text!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return sum(float(n) * scale.get(u, 31536000) for n, u in parts)


# -- docker-compose.yml ----------------------------------------------------------------


def test_compose_profiles_keep_production_and_demo_apart() -> None:
    services = compose_raw()["services"]
    for name, service in services.items():
        profiles = service.get("profiles", [])
        assert len(profiles) == 1 and profiles[0] in ("prod", "demo"), (
            f"{name}: profiles {profiles}: every service is in prod or demo, so that "
            "`--profile demo` replaces the COMPOSE_PROFILES=prod of .env"
        )
    prod, demo = compose_services("prod"), compose_services("demo")
    assert {"redis", "worker", "beat", "flower"} <= set(prod)
    assert {"dovecot", "sandbox", "seed"} <= set(demo)
    for kind in ("worker", "beat", "flower"):
        assert any(kind in name for name in demo), f"the demo has no {kind}"
    assert env_example().get("COMPOSE_PROFILES") == "prod", (
        ".env.example must set COMPOSE_PROFILES=prod, or `docker compose up` starts nothing"
    )
    for profile, group in (("prod", prod), ("demo", demo)):
        for name, service in group.items():
            depends = service.get("depends_on", {})
            others = list(depends) if isinstance(depends, dict | list) else []
            mode = service.get("network_mode", "")
            if mode.startswith("service:"):
                others.append(mode.split(":", 1)[1])
            for other in others:
                assert other in group, f"{name} ({profile}) depends on {other}, not in {profile}"


def compose_strings(value: Any) -> Iterator[str]:
    """Every string of the compose file (keys and values), as Compose interpolates them."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from compose_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from compose_strings(item)
    elif isinstance(value, str):
        yield value


def compose_variables() -> list[str]:
    """The bodies of the ``${...}`` Compose interpolates (``$${...}`` is a literal)."""
    return [
        body
        for text in compose_strings(compose_raw())
        for body in re.findall(r"(?<!\$)\$\{([^}]*)\}", text.replace("$$", ""))
    ]


def test_compose_demo_needs_no_dotenv() -> None:
    for body in compose_variables():
        assert re.fullmatch(r"\w+:?-.*", body), (
            f"${{{body}}} has no default: without a .env (the demo) Compose would fail or "
            "substitute an empty string"
        )
    compose("demo")  # interpolates without a .env
    for name, service in compose_services("demo").items():
        assert "env_file" not in service, f"{name}: the demo must not read .env"
    for name, service in compose_services("prod").items():
        if compose_is_ours(service):
            assert "env_file" in service, f"{name}: production settings come from .env"
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8").split()
    assert ".env" in gitignore and "!.env.example" in gitignore


@pytest.mark.parametrize(("profile", "name"), compose_cases())
def test_compose_commands_are_real_entry_points(profile: str, name: str) -> None:
    service = compose(profile)["services"][name]
    invocations = check_invocation(compose_argv(service), f"{name}: command")
    assert invocations, f"{name} runs neither mailingest nor celery"
    health = service.get("healthcheck", {}).get("test")
    if health is not None:
        argv = healthcheck_argv(health)
        if argv is not None:
            check_invocation(argv, f"{name}: healthcheck")


@pytest.mark.parametrize(("profile", "name"), compose_cases())
def test_compose_services_get_the_settings_they_need(profile: str, name: str) -> None:
    service = compose(profile)["services"][name]
    invocations = check_invocation(compose_argv(service), name)
    health = service.get("healthcheck", {}).get("test")
    if health is not None and healthcheck_argv(health):
        invocations += check_invocation(healthcheck_argv(health), name)
    env = compose_environment(profile, service)
    try:
        load_settings(env).require(*needs(invocations))
    except ConfigError as exc:
        pytest.fail(f"{name} ({profile}): {' and '.join(invocations)}: {exc}")
    if any("flower" in invocation for invocation in invocations):
        assert env.get("FLOWER_BASIC_AUTH"), f"{name}: Flower without FLOWER_BASIC_AUTH"


def test_compose_services_reach_their_servers() -> None:
    """Redis and IMAP hosts are services of the same profile; plain-http Alloy (the
    sandbox) is reached on loopback, inside the sandbox's network namespace."""
    for profile in ("prod", "demo"):
        group = compose_services(profile)
        for name, service in group.items():
            if not compose_is_ours(service):
                continue
            env = compose_environment(profile, service)
            for var in ("MAILINGEST_REDIS_URL", "MAILINGEST_BROKER_URL"):
                if env.get(var):
                    assert host_of(env[var]) in group, f"{name}: {var} names no {profile} service"
            imap = env.get("MAILINGEST_IMAP_HOST", "")
            if profile == "demo":
                assert imap in group, f"{name}: the demo's IMAP host {imap!r} is not a service"
            alloy = env.get("MAILINGEST_ALLOY_URL", "")
            if not alloy.startswith("http://") or "worker" not in name:
                continue
            mode = service.get("network_mode", "")
            assert is_loopback(host_of(alloy)) and mode.startswith("service:"), (
                f"{name}: http Alloy must be on loopback, in another service's network"
            )
            sandbox = group[mode.split(":", 1)[1]]
            argv = compose_argv(sandbox)
            assert check_invocation(argv, "sandbox") == ["sandbox"]
            assert str(urlsplit(alloy).port) == option_value(argv, "--port")
            assert option_value(argv, "--host") in ("127.0.0.1", "0.0.0.0", "localhost")
            assert option_value(argv, "--token") == env["MAILINGEST_ALLOY_TOKEN"]
            assert option_value(argv, "--secret") == env["MAILINGEST_ALLOY_SECRET"]
            agents = (option_value(argv, "--agents") or "").split(",")
            assert env["MAILINGEST_AGENT_EMAIL"] in agents, "the sandbox refuses the agent"


def test_compose_redis_is_private_and_persistent() -> None:
    for profile in ("prod", "demo"):
        for name, service in compose_services(profile).items():
            if not service.get("image", "").startswith("redis:"):
                continue
            assert service["image"].split(":")[1].startswith("7"), f"{name}: not Redis 7"
            assert not service.get("ports"), f"{name}: Redis must not be published to the host"
            command = as_argv(service.get("command", []))
            assert option_value(command, "--appendonly") == "yes", f"{name}: AOF is off"
            policy = option_value(command, "--maxmemory-policy")
            assert policy in (None, "noeviction"), f"{name}: {policy} would evict ledger keys"
    redis = compose_services("prod")["redis"]
    mounts = [v.split(":") for v in redis["volumes"]]
    assert any(
        target == "/data" and source in compose_raw()["volumes"] for source, target, *_ in mounts
    ), "production Redis keeps its AOF in a named volume at /data"


def test_compose_flower_is_published_behind_a_login() -> None:
    for profile in ("prod", "demo"):
        for name, service in compose_services(profile).items():
            argv = compose_argv(service) if compose_is_ours(service) else []
            if not any("flower" in arg for arg in argv):
                continue
            assert "celery flower" in check_invocation(argv, name), f"{name}: not Flower"
            assert service.get("ports"), f"{name}: Flower is not published"
            script = argv[2] if Path(argv[0]).name == "sh" else ""
            assert re.search(r'-z "\$\{?FLOWER_BASIC_AUTH[^"]*"', script) and "exit" in script, (
                f"{name}: Flower must refuse to start without FLOWER_BASIC_AUTH"
            )
            port = option_value(shell_commands(script)[-1], "--port")
            health = " ".join(healthcheck_argv(service["healthcheck"]["test"]) or [])
            assert f"127.0.0.1:{port}/healthcheck" in health, f"{name}: health via /healthcheck"


def test_compose_long_running_services_have_healthchecks() -> None:
    for profile in ("prod", "demo"):
        for name, service in compose_services(profile).items():
            if service.get("restart", "no") == "no":
                continue  # one-shot (seed)
            test = service.get("healthcheck", {}).get("test")
            assert test and healthcheck_argv(test), f"{name}: no healthcheck"
            assert not service["healthcheck"].get("disable"), f"{name}: healthcheck disabled"


def test_compose_worker_scales_and_shuts_down_warm() -> None:
    worker = compose_services("prod")["worker"]
    assert "container_name" not in worker and not worker.get("ports"), (
        "a fixed container name or host port would stop `docker compose up --scale worker=3`"
    )
    limit = int(env_example().get("MAILINGEST_TASK_TIME_LIMIT") or DEFAULT_TASK_TIME_LIMIT)
    grace = duration_seconds(worker["stop_grace_period"])
    assert grace > limit, f"stop_grace_period {grace}s must exceed the task time limit {limit}s"
    port = compose_environment("prod", worker).get("MAILINGEST_METRICS_PORT")
    assert port and port in [str(p) for p in worker.get("expose", [])], (
        "the worker's metrics port is exposed to the compose network"
    )
    beat = compose_services("prod")["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1, "exactly one beat"


def test_env_example_names_real_settings_and_everything_needed(tmp_path: Path) -> None:
    values = env_example()
    needed = {
        "COMPOSE_PROFILES",
        "FLOWER_BASIC_AUTH",
        "MAILINGEST_REDIS_URL",
        "MAILINGEST_IMAP_HOST",
        "MAILINGEST_IMAP_USER",
        "MAILINGEST_IMAP_PASSWORD",
        "MAILINGEST_TRUSTED_AUTHSERV_ID",
        "MAILINGEST_ALLOY_TOKEN",
        "MAILINGEST_ALLOY_SECRET",
        "MAILINGEST_AGENT_EMAIL",
        "MAILINGEST_STAGING_KEY",
    }
    needed |= {re.match(r"\w+", body).group(0) for body in compose_variables()}
    missing = needed - set(values)
    assert not missing, f".env.example lacks {sorted(missing)}"
    # Every MAILINGEST_ name is a setting: as top-level keys of a config file, mailingest
    # refuses any it does not know ("is not a mailingest setting").
    config = tmp_path / "env.toml"
    config.write_text(
        "".join(
            f"{k.removeprefix('MAILINGEST_').lower()} = {json.dumps(v)}\n"
            for k, v in values.items()
            if k.startswith("MAILINGEST_")
        ),
        encoding="utf-8",
    )
    load_settings({"MAILINGEST_CONFIG": str(config)}).require(*ALL_GROUPS)
    others = {k for k in values if not k.startswith("MAILINGEST_")}
    assert others <= {"COMPOSE_PROFILES", "FLOWER_BASIC_AUTH", "FLOWER_PUBLISH"}, others


# -- the image -------------------------------------------------------------------------


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a pattern also matches
    every path below what it matches."""
    excluded = False
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, part if part.startswith("[") and part.endswith("]") else re.escape(part)
            )
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    for path in (
        ".env",
        ".git/config",
        ".venv/bin/python",
        "build/lib/mailingest/cli.py",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".hypothesis/examples/x",
        "mailingest/__pycache__/cli.cpython-311.pyc",
        "mailingest.egg-info/PKG-INFO",
        "tests/test_deploy.py",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    copied = [
        part
        for stage in dockerfile_stages()
        for ins, rest in stage
        if ins == "COPY" and "--from=" not in rest
        for part in rest.split()[:-1]
    ]
    assert copied, "the Dockerfile copies nothing from the context"
    for source in copied:
        files = (
            [source]
            if (ROOT / source).is_file()
            else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
        )
        assert files, f"COPY {source}: no such file in the repository"
        for file in files:
            assert not dockerignored(file), f"COPY {source}: .dockerignore leaves out {file}"


def test_dockerfile_slim_non_root_hash_pinned() -> None:
    stages = dockerfile_stages()
    names = {rest.split()[-1] for stage in stages for ins, rest in stage[:1] if " AS " in rest}
    for stage in stages:
        base = stage[0][1].split()[0]
        assert base in names or re.fullmatch(r"python:3\.11-slim(-[a-z]+)?(@sha256:\w+)?", base), (
            f"FROM {base}: the image is built on python:3.11-slim"
        )
    final = final_stage()
    users = [rest for ins, rest in final if ins == "USER"]
    assert users, "the final stage runs as root (no USER)"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: numeric and not root"
    runs = [rest for stage in stages for ins, rest in stage if ins == "RUN"]
    assert any(
        "--require-hashes" in run and "--no-deps" in run and "-r deploy/requirements.lock" in run
        for run in runs
    ), "dependencies are installed from deploy/requirements.lock with --require-hashes"
    assert any(re.search(r"install --no-deps \S*mailingest-\S*\.whl", run) for run in runs), (
        "the project is installed as a wheel with --no-deps"
    )
    final_runs = " ".join(rest for ins, rest in final if ins == "RUN")
    assert not re.search(r"apt-get install|apk add|pip install|gcc|build-essential", final_runs)
    assert image_default("ENTRYPOINT") == ["mailingest"]


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile --generate-hashes file."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split(" --")
        hashes = [o.split("=", 1)[1] for o in options if o.startswith("hash=")]
        req = Requirement(requirement.strip())
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {requirement} is not pinned with =="
        assert hashes and all(h.startswith("sha256:") for h in hashes), f"{requirement}: hash"
        pins[canonicalize_name(req.name)] = (spec.version, hashes)
    return pins


def test_lock_file_pins_every_runtime_dependency_within_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    runtime = (
        project["project"]["dependencies"] + project["project"]["optional-dependencies"]["flower"]
    )
    # the image: Linux x86_64, CPython 3.11
    target = default_environment() | {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "python_version": "3.11",
        "implementation_name": "cpython",
    }
    for path, requirements in (
        (LOCK, runtime),
        (BUILD_LOCK, project["build-system"]["requires"]),
    ):
        pins = read_lock(path)
        for text in requirements:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(target):
                continue
            name = canonicalize_name(req.name)
            assert name in pins, f"{path.name} does not pin {req.name} ({text})"
            version = pins[name][0]
            assert req.specifier.contains(version, prereleases=True), (
                f"{path.name}: {req.name}=={version} is outside pyproject's {req.specifier}"
            )
        header = "".join(re.findall(r"^#.*\n", path.read_text(encoding="utf-8"), re.M)[:8])
        command = re.search(r"pip-compile .*--generate-hashes.*", header)
        assert command and f"--output-file=deploy/{path.name}" in command.group(0), (
            f"{path.name}: the header says how to regenerate it"
        )
        guide = (DEPLOY / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
        options = set(re.findall(r"--[\w-]+", command.group(0)))
        documented = [
            set(re.findall(r"--[\w-]+", line)) for line in re.findall(r"pip-compile.*", guide)
        ]
        assert options in documented, f"deploy/README.md gives the command of {path.name}"


# -- Kubernetes -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    for resource in listed:
        assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == manifests - {SECRET_EXAMPLE.name}, (
        "every manifest is listed, except the Secret example (applying it would overwrite "
        "the real credentials with placeholders)"
    )
    images = {image["name"] for image in kustomization.get("images", [])}
    assert "mailingest" in images, "kustomization sets the mailingest image's registry and tag"


def k8s_argv(container: dict[str, Any]) -> list[str]:
    command = container.get("command")
    args = container.get("args")
    if command is None:
        return image_default("ENTRYPOINT") + (args if args is not None else image_default("CMD"))
    return list(command) + list(args or [])


def probe_argvs(container: dict[str, Any]) -> list[list[str]]:
    return [
        container[probe]["exec"]["command"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        if "exec" in container.get(probe, {})
    ]


@pytest.mark.parametrize("where", [where for where, _, _ in k8s_our_containers()])
def test_k8s_commands_are_real_entry_points(where: str) -> None:
    (container,) = [c for w, _, c in k8s_our_containers() if w == where]
    assert check_invocation(k8s_argv(container), where), f"{where} runs nothing of ours"
    for argv in probe_argvs(container):
        check_invocation(argv, f"{where} probe")


def volume_files(
    workload: dict[str, Any], container: dict[str, Any]
) -> dict[str, dict[str, str] | None]:
    """mount path -> {file name: content} of each mounted Secret/ConfigMap (None: emptyDir)."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    mounted: dict[str, dict[str, str] | None] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "subPath" not in mount, "subPath mounts do not follow Secret/ConfigMap updates"
        if "secret" in volume:
            assert volume["secret"]["secretName"] == secret_name(), volume
            source = secret_example()
            items = volume["secret"].get("items")
        elif "configMap" in volume:
            name = volume["configMap"]["name"]
            assert name in configmaps(), f"no ConfigMap {name}"
            source = configmaps()[name]
            items = volume["configMap"].get("items")
        else:
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume, volume
            mounted[mount["mountPath"]] = None
            continue
        if items is None:
            files = dict(source)
        else:
            for item in items:
                assert item["key"] in source, f"volume {volume['name']}: no key {item['key']}"
            files = {item["path"]: source[item["key"]] for item in items}
        mounted[mount["mountPath"]] = files
    return mounted


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps(), f"envFrom: no ConfigMap {name}"
        env |= configmaps()[name]
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            assert key["name"] == secret_name() and key["key"] in secret_example(), key
            env[var["name"]] = secret_example()[key["key"]]
        else:
            key = ref["configMapKeyRef"]
            assert key["key"] in configmaps().get(key["name"], {}), key
            env[var["name"]] = configmaps()[key["name"]][key["key"]]
    return env


def file_references(env: Mapping[str, str], mounted: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(what, path) of every file a container is told to read: MAILINGEST_*_FILE and
    MAILINGEST_CONFIG, and the ``*_file`` keys of that config file."""
    refs = [(k, v) for k, v in env.items() if k.endswith("_FILE") or k == "MAILINGEST_CONFIG"]
    config = env.get("MAILINGEST_CONFIG")
    if config:
        directory, _, name = config.rpartition("/")
        files = mounted.get(directory)
        assert files and name in files, f"MAILINGEST_CONFIG {config} is not a mounted file"
        data = tomllib.loads(files[name])
        tables = [data, *data.get("inboxes", [])]
        refs += [
            (f"{Path(config).name}: {key}", value)
            for table in tables
            for key, value in table.items()
            if key.endswith("_file")
        ]
    return refs


@pytest.mark.parametrize("where", [where for where, _, _ in k8s_our_containers()])
def test_k8s_file_settings_point_into_mounted_volumes(where: str) -> None:
    ((workload, container),) = [(w, c) for n, w, c in k8s_our_containers() if n == where]
    mounted = volume_files(workload, container)
    env = container_env(container)
    for what, path in file_references(env, mounted):
        directory, _, name = path.rpartition("/")
        assert directory in mounted and mounted[directory] is not None, (
            f"{where}: {what}={path} is not inside a mounted Secret or ConfigMap"
        )
        assert name in mounted[directory], f"{where}: {what}={path}: the volume has no {name}"


@pytest.mark.parametrize("where", [where for where, _, _ in k8s_our_containers()])
def test_k8s_containers_get_the_settings_they_need(where: str, tmp_path: Path) -> None:
    """Lay the container's mounted files out under tmp_path, point its environment there,
    and load the settings as the container would."""
    ((workload, container),) = [(w, c) for n, w, c in k8s_our_containers() if n == where]
    mounted = volume_files(workload, container)
    moves = {path: str(tmp_path / f"volume{i}") for i, path in enumerate(sorted(mounted, key=len))}

    paths = re.compile("(" + "|".join(map(re.escape, sorted(moves, key=len)[::-1])) + ")/")

    def relocate(text: str) -> str:
        return paths.sub(lambda m: moves[m.group(1)] + "/", text)

    # The example's staging key is a placeholder that start-up refuses (a copy of the
    # example cannot reach production unchanged); a real key stands in for it here.
    real_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    for path, files in mounted.items():
        Path(moves[path]).mkdir()
        for name, content in (files or {}).items():
            if content == secret_example().get("staging-key"):
                content = real_key
            (Path(moves[path]) / name).write_text(relocate(content), encoding="utf-8")
    env = {k: relocate(v) for k, v in container_env(container).items()}
    invocations = check_invocation(k8s_argv(container), where)
    for argv in probe_argvs(container):
        invocations += check_invocation(argv, where)
    try:
        load_settings(env).require(*needs(invocations))
    except ConfigError as exc:
        pytest.fail(f"{where}: {' and '.join(invocations)}: {exc}")
    if any("flower" in invocation for invocation in invocations):
        assert env.get("FLOWER_BASIC_AUTH"), f"{where}: Flower without FLOWER_BASIC_AUTH"


def test_k8s_example_staging_key_is_refused() -> None:
    from mailingest.adapters.encryption import Sealer, SealingError
    from mailingest.config.settings import Secret

    with pytest.raises(SealingError):
        Sealer(Secret(secret_example()["staging-key"]))


def test_k8s_every_referenced_secret_and_configmap_key_exists() -> None:
    for _, workload, container in k8s_our_containers():
        volume_files(workload, container)  # volume names and items
        container_env(container)  # env refs and envFrom
    for workload in k8s_workloads():
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] == secret_name()
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret_example(), item
            if "configMap" in volume:
                items = volume["configMap"].get("items", [])
                data = configmaps()[volume["configMap"]["name"]]
                assert all(item["key"] in data for item in items), items


def deployment(name: str) -> dict[str, Any]:
    (found,) = [w for w in k8s_workloads() if w["metadata"]["name"] == name]
    return found


def test_k8s_one_beat_recreated() -> None:
    beat = deployment("mailingest-beat")
    assert beat["spec"]["replicas"] == 1, "exactly one beat"
    assert beat["spec"]["strategy"]["type"] == "Recreate", "the old beat stops first"
    assert k8s_argv(pod_spec(beat)["containers"][0])[:2] == ["mailingest", "beat"]


def test_k8s_worker_is_probed_scalable_and_shuts_down_warm() -> None:
    worker = deployment("mailingest-worker")
    spec = pod_spec(worker)
    assert worker["spec"]["replicas"] >= 2
    (main,) = [c for c in spec["containers"] if k8s_argv(c)[:2] == ["mailingest", "worker"]]
    assert "readinessProbe" in main and "livenessProbe" in main, "the worker has probes"
    checks = [k8s_argv(c) for c in spec.get("initContainers", [])]
    assert ["mailingest", "check-config"] in [argv[:2] for argv in checks], (
        "an init container runs mailingest check-config"
    )
    env = container_env(main)
    limit = int(env.get("MAILINGEST_TASK_TIME_LIMIT") or DEFAULT_TASK_TIME_LIMIT)
    assert spec["terminationGracePeriodSeconds"] > limit, "warm shutdown outlasts a task"
    port = int(env["MAILINGEST_METRICS_PORT"])
    assert port in [p["containerPort"] for p in main["ports"]]
    annotations = worker["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(port)
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], (
        "read-only root: /tmp (Prometheus multiprocess files) is an emptyDir"
    )


def test_k8s_pods_run_restricted() -> None:
    for workload in k8s_workloads():
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert pod.get("runAsUser", 1) != 0, f"{name}: runs as root"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in containers(workload):
            security = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert container.get("resources", {}).get("limits", {}).get("memory"), where


def test_k8s_flower_has_a_service_and_a_login() -> None:
    flower = deployment("mailingest-flower")
    (container,) = pod_spec(flower)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert option_value(k8s_argv(container), "--port") == str(ports["http"])
    (service,) = [s for s in k8s_kind("Service") if s["metadata"]["name"] == "mailingest-flower"]
    labels = flower["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert all(
        p["targetPort"] in ports or p["targetPort"] in ports.values()
        for p in service["spec"]["ports"]
    )
    refs = [v for v in container["env"] if v["name"] == "FLOWER_BASIC_AUTH"]
    assert refs and "secretKeyRef" in refs[0]["valueFrom"], "Flower's login from the Secret"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_k8s_redis_persists_with_aof() -> None:
    (redis,) = [w for w in k8s_kind("StatefulSet") if w["metadata"]["name"] == "redis"]
    assert redis["spec"]["replicas"] == 1
    (container,) = pod_spec(redis)["containers"]
    argv = k8s_argv(container)
    assert option_value(argv, "--appendonly") == "yes"
    assert option_value(argv, "--maxmemory-policy") == "noeviction"
    data = option_value(argv, "--dir")
    claims = [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]]
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}.get(data) in claims
    services = {s["metadata"]["name"]: s for s in k8s_kind("Service")}
    redis_url = secret_example()["redis-url"]
    assert host_of(redis_url) in services, "the example redis-url names the Redis Service"
    assert services[host_of(redis_url)]["spec"]["selector"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )


# -- the dashboard and the alert rules ----------------------------------------------------


def check_promql(expr: str, where: str) -> set[str]:
    """Every metric is one mailingest exports, used as its kind allows; returns them."""
    known = set(METRICS)
    assert set(METRIC_LABELS) <= known | HISTOGRAMS, "METRIC_LABELS names unknown metrics"
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in pairs:
            stack.append(pairs[char])
        elif char in pairs.values():
            assert stack and stack.pop() == char, f"{where}: unbalanced {char!r} in {expr}"
    assert not stack, f"{where}: unclosed brackets in {expr}"
    used: set[str] = set()
    for name in re.findall(r"\bmailingest_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in known:
            assert name not in HISTOGRAMS, f"{where}: histogram {name} without _bucket/_sum/_count"
            used.add(name)
        else:
            assert base in HISTOGRAMS and base in known, f"{where}: {name} is not a metric"
            used.add(base)
    for function, name in re.findall(r"\b(rate|irate|increase)\(\s*(mailingest_\w+)", expr):
        assert name.endswith(("_total", "_bucket", "_sum", "_count")), (
            f"{where}: {function}() of {name}, which is not a counter"
        )
    for name in re.findall(r"histogram_quantile\([^,]+,.*?\b(mailingest_\w+)", expr):
        assert name.endswith("_bucket"), f"{where}: histogram_quantile over {name}"
    for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (x.strip() for x in labels.split(","))):
            allowed = set().union(*(METRIC_LABELS.get(m, set()) for m in used)) | {"le"}
            assert label in allowed, f"{where}: no metric of {sorted(used)} has label {label}"
    for selector in re.findall(r"\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            allowed = set().union(*(METRIC_LABELS.get(m, set()) for m in used))
            assert label in allowed, f"{where}: no metric of {sorted(used)} has label {label}"
    assert used, f"{where}: {expr} uses no mailingest metric"
    return used


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [p for p in panels if p.get("type") != "row"]


def test_grafana_dashboard_uses_mailingest_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = [v for v in variables.values() if v["type"] == "datasource"]
    assert source and source[0]["query"] == "prometheus", "a Prometheus data source variable"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    used: set[str] = set()
    for panel in dashboard_panels():
        where = f"panel {panel['title']!r}"
        assert panel["datasource"]["uid"] == "${" + source[0]["name"] + "}", where
        assert panel["targets"], f"{where} has no query"
        for target in panel["targets"]:
            used |= check_promql(target["expr"], where)
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable in variables or variable.startswith("__"), (
                    f"{where}: ${variable} is not a dashboard variable"
                )
    wanted = {
        "mailingest_mails_processed_total",
        "mailingest_mails_quarantined_total",
        "mailingest_mails_failed_total",
        "mailingest_oldest_unprocessed_seconds",
        "mailingest_backlog_mails",
        "mailingest_alloy_request_seconds",
        "mailingest_alloy_responses_total",
        "mailingest_imap_poll_seconds",
        "mailingest_documents_uploaded_total",
        "mailingest_upload_bytes_total",
    }
    assert wanted <= used, f"no panel shows {sorted(wanted - used)}"
    quarantine = [
        t["expr"]
        for p in dashboard_panels()
        for t in p["targets"]
        if "mailingest_mails_quarantined_total" in t["expr"]
    ]
    assert any(re.search(r"by \([^)]*\breason\b", e) for e in quarantine), "quarantine by reason"
    latency = " ".join(
        t["expr"] for p in dashboard_panels() for t in p["targets"] if "alloy_request" in t["expr"]
    )
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.95," in latency


def test_alert_rules_are_valid_and_use_mailingest_metrics() -> None:
    rules_file = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(rules_file) == {"groups"}
    alerts: dict[str, dict[str, Any]] = {}
    for group in rules_file["groups"]:
        assert group["name"] and group["rules"], group
        for rule in group["rules"]:
            assert set(rule) <= {
                "alert",
                "expr",
                "for",
                "labels",
                "annotations",
                "keep_firing_for",
            }, rule
            assert rule["alert"] not in alerts, f"two alerts named {rule['alert']}"
            alerts[rule["alert"]] = rule
            check_promql(rule["expr"], rule["alert"])
            if "for" in rule:
                duration_seconds(rule["for"])
            annotations = rule.get("annotations", {})
            assert annotations.get("summary") and annotations.get("description"), rule["alert"]
            for text in annotations.values():
                assert text.count("{{") == text.count("}}"), f"{rule['alert']}: template"
                for label in re.findall(r"\$labels\.(\w+)", text):
                    by = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
                    assert any(label in b for b in by), f"{rule['alert']}: no label {label}"
    for name in ("MailingestOldestMailTooOld", "MailingestQuarantineRateHigh"):
        assert name in alerts and "for" in alerts[name], f"{name} with a `for`"
    assert "mailingest_oldest_unprocessed_seconds" in alerts["MailingestOldestMailTooOld"]["expr"]
    quarantine = alerts["MailingestQuarantineRateHigh"]["expr"]
    assert "mailingest_mails_quarantined_total" in quarantine
    assert "mailingest_mails_seen_total" in quarantine and ">=" in quarantine, (
        "the quarantine share needs a minimum volume"
    )
