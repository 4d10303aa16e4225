"""docker-compose.yml and .env.example, checked without Docker (nothing is started).

The file is valid against the Compose specification (the schema check-jsonschema ships);
every command a service runs is a real entry point; every service gets the settings its
command needs (its environment and env_file, with .env.example standing in for .env, and
the files it mounts, loaded by mailingest's own settings loader); the demo needs no .env;
what is published is published on loopback only.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from check_jsonschema.builtin_schemas import get_builtin_schema
from jsonschema.validators import validator_for

from mailingest.config.settings import load_settings
from mailingest.core.console_users import parse_users, user_line
from mailingest.core.errors import ConfigError

from .commands import ALL_GROUPS, check_invocation, healthcheck_argv, needs, shell_commands
from .helpers import (
    COMPOSE_FILE,
    DEFAULT_TASK_TIME_LIMIT,
    ROOT,
    as_argv,
    compose,
    compose_raw,
    compose_services,
    dockerignored,
    duration_seconds,
    env_example,
    host_of,
    image_default,
    is_loopback,
    is_ours,
    option_value,
)


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


def compose_binds(service: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """container path -> (host path, read-only) of the service's bind mounts (named volumes
    left out)."""
    binds: dict[str, tuple[Path, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *options = volume.split(":")
            read_only = "ro" in ",".join(options).split(",")
        else:
            if volume.get("type") != "bind":
                continue
            source, target = volume["source"], volume["target"]
            read_only = bool(volume.get("read_only"))
        if source.startswith((".", "/")):
            binds[target] = (ROOT / source, read_only)
    return binds


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each published port; "" for the host
    address means every interface."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            host = str(port.get("host_ip", ""))
            published.append((host, str(port.get("published", "")), str(port["target"])))
            continue
        text = str(port).split("/", 1)[0]
        parts = text.rsplit(":", 2)
        if len(parts) == 1:  # a container port alone: Docker publishes it everywhere
            parts = ["", "", parts[0]]
        elif len(parts) == 2:
            parts = ["", *parts]
        published.append((parts[0].strip("[]"), parts[1], parts[2]))
    return published


def with_mounted_files(
    service: dict[str, Any], env: dict[str, str], tmp_path: Path
) -> dict[str, str]:
    """``env`` with the paths into the service's bind mounts pointed at copies of their
    sources under tmp_path (a copy: the test writes there what an operator would)."""
    moves: dict[str, Path] = {}
    for i, (target, (source, _)) in enumerate(compose_binds(service).items()):
        copy = tmp_path / f"bind{i}"
        assert source.exists(), f"bind mount {source} is not in the repository"
        if source.is_dir():
            shutil.copytree(source, copy)
        else:
            shutil.copy(source, copy)
        moves[target] = copy
    relocated = dict(env)
    for key, value in env.items():
        for target, copy in moves.items():
            if value == target or value.startswith(target + "/"):
                relocated[key] = str(copy) + value[len(target) :]
    return relocated


# -- docker-compose.yml ----------------------------------------------------------------


@pytest.mark.parametrize("profile", ["prod", "demo"])
def test_compose_file_follows_the_compose_specification(profile: str) -> None:
    """The file as Compose reads it for each profile (after interpolation) is valid against
    the Compose specification's schema, the copy check-jsonschema ships (nothing is
    downloaded): a misspelt key or a wrong type fails here, not at `docker compose up`."""
    schema = get_builtin_schema("vendor.compose-spec")
    validator = validator_for(schema)(schema)
    problems = [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(compose(profile))
    ]
    assert not problems, f"{COMPOSE_FILE.name} ({profile}): " + "; ".join(problems)


def test_compose_profiles_keep_production_and_demo_apart() -> None:
    services = compose_raw()["services"]
    for name, service in services.items():
        profiles = service.get("profiles", [])
        assert len(profiles) == 1 and profiles[0] in ("prod", "demo"), (
            f"{name}: profiles {profiles}: every service is in prod or demo, so that "
            "`--profile demo` replaces the COMPOSE_PROFILES=prod of .env"
        )
    prod, demo = compose_services("prod"), compose_services("demo")
    assert {"redis", "worker", "beat", "flower", "console"} <= set(prod)
    assert {"dovecot", "sandbox", "seed"} <= set(demo)
    for kind in ("worker", "beat", "flower", "console"):
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
def test_compose_services_get_the_settings_they_need(
    profile: str, name: str, tmp_path: Path
) -> None:
    """The settings load as the container would load them, from its environment, .env
    (.env.example) and the files it mounts. The production console needs what only the
    operator can make (deploy/README.md): its secret in .env and the users file in
    secrets/. Without them it refuses to start, naming them; with them it starts."""
    service = compose(profile)["services"][name]
    invocations = check_invocation(compose_argv(service), name)
    health = service.get("healthcheck", {}).get("test")
    if health is not None and healthcheck_argv(health):
        invocations += check_invocation(healthcheck_argv(health), name)
    env = with_mounted_files(service, compose_environment(profile, service), tmp_path)
    if "console" in invocations and profile == "prod":
        users = Path(env.get("MAILINGEST_CONSOLE_USERS", ""))
        assert users.is_relative_to(tmp_path), (
            f"{name}: MAILINGEST_CONSOLE_USERS {users} is not inside a mounted directory"
        )
        assert not env.get("MAILINGEST_CONSOLE_SECRET"), ".env.example sets a console secret"
        users.unlink(missing_ok=True)  # a checkout may hold a real one
        with pytest.raises(ConfigError, match="MAILINGEST_CONSOLE_USERS"):
            load_settings(env).require(*needs(invocations))
        users.write_text(user_line("ops", "operator", "a-password-of-the-operator") + "\n")
        with pytest.raises(ConfigError, match="MAILINGEST_CONSOLE_SECRET"):
            load_settings(env).require(*needs(invocations))
        env["MAILINGEST_CONSOLE_SECRET"] = secrets.token_urlsafe(32)
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


def console_services() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (profile, name, service)
        for profile in ("prod", "demo")
        for name, service in compose_services(profile).items()
        if compose_is_ours(service) and "console" in check_invocation(compose_argv(service), name)
    ]


def test_compose_publishes_on_loopback_only() -> None:
    """Nothing is reachable from other machines as the file stands (.env.example's values):
    Flower and the console speak plain http, and belong behind a TLS proxy."""
    for profile in ("prod", "demo"):
        for name, service in compose_services(profile).items():
            for host, published, target in published_ports(service):
                assert is_loopback(host), (
                    f"{name} ({profile}): port {target} is published on "
                    f"{host or 'every interface'}:{published}, not on loopback"
                )


def test_compose_console_behind_its_login_with_a_healthcheck() -> None:
    """The console (production and demo): ``mailingest console`` itself, not a shell
    around it (it refuses to start without its settings, naming them); it listens on
    every address of its container and is published on loopback; its healthcheck asks
    /healthz; its users file is a read-only mount, whose production source directory
    neither git nor the image build ever takes; its secret is not written in this file."""
    consoles = console_services()
    assert {profile for profile, _, _ in consoles} == {"prod", "demo"}
    for profile, name, service in consoles:
        argv = compose_argv(service)
        assert argv[:2] == ["mailingest", "console"], f"{name}: runs {argv}"
        assert option_value(argv, "--host") == "0.0.0.0", (
            f"{name}: on the container's loopback the published port would reach nothing"
        )
        port = option_value(argv, "--port") or "8080"
        targets = [target for _, _, target in published_ports(service)]
        assert targets == [port], f"{name}: publishes {targets}, listens on {port}"
        health = " ".join(healthcheck_argv(service["healthcheck"]["test"]) or [])
        assert f"http://127.0.0.1:{port}/healthz" in health, f"{name}: health via /healthz"
        env = compose_environment(profile, service)
        users = env.get("MAILINGEST_CONSOLE_USERS", "")
        mounts = [
            (target, source, read_only)
            for target, (source, read_only) in compose_binds(service).items()
            if users == target or users.startswith(target + "/")
        ]
        assert mounts, f"{name}: MAILINGEST_CONSOLE_USERS {users!r} is not a mounted file"
        ((target, source, read_only),) = mounts
        assert read_only, f"{name}: the users file is mounted writable"
        written = service.get("environment", {})
        if profile == "prod":
            assert "MAILINGEST_CONSOLE_SECRET" not in written, (
                f"{name}: the console's secret belongs in .env, not in {COMPOSE_FILE.name}"
            )
            assert source.is_dir(), (
                f"{name}: mount a directory ({source}): a missing file would be made a "
                "directory by Docker, or stop `docker compose up`"
            )
            relative = (source / users[len(target) :].lstrip("/")).relative_to(ROOT)
            ignored = (source / ".gitignore").read_text(encoding="utf-8").split()
            assert "*" in ignored, f"{name}: git would take {relative}"
            assert dockerignored(str(relative)), f"{name}: the build context holds {relative}"
        else:
            people = parse_users(source.read_text(encoding="utf-8"), str(source))
            assert any(person.may_act for person in people.values()), (
                f"{name}: the demo's users file has no operator"
            )


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


def test_compose_serves_every_queue_cpu_on_prefork_and_io_on_threads() -> None:
    from mailingest.application.celery_config import CPU_QUEUE, IO_QUEUE, QUEUES

    prod = compose_services("prod")
    served: dict[str, list[str]] = {}
    for name in ("worker", "worker-io"):
        argv = prod[name]["command"]
        queues = argv[argv.index("--queues") + 1].split(",")
        pool = argv[argv.index("--pool") + 1] if "--pool" in argv else "prefork"
        for queue in queues:
            served.setdefault(queue, []).append(pool)
    assert served == {CPU_QUEUE: ["prefork"], IO_QUEUE: ["threads"]}
    assert set(served) == set(QUEUES), "a queue no worker serves would hold its tasks forever"
    demo = compose_services("demo")["demo-worker"]["command"]
    assert "--queues" not in demo, "the demo's one worker serves every queue"
