"""Reading the deployment files as their tools do, for the tests of tests/deploy.

docker-compose.yml with Compose's interpolation (.env.example standing in for .env), the
Dockerfile's stages (dockerfile-parse), the Kubernetes manifests, the example Secret and
the ConfigMaps, and the small parsers (durations, options of an argv) the checks share.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import ipaddress
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
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


@dataclass(frozen=True)
class Stage:
    """One ``FROM`` of the Dockerfile and what follows it, until the next ``FROM``."""

    base: str  # the image or earlier stage it starts from, ARGs applied
    name: str  # its ``AS`` name, "" when it has none
    instructions: tuple[tuple[str, str], ...]  # (INSTRUCTION, value), comments left out


@functools.cache
def dockerfile_stages() -> tuple[Stage, ...]:
    """The Dockerfile's stages as Docker reads them: dockerfile-parse joins continuation
    lines, drops comments and applies the global ARGs to each FROM (``parent_images``)."""
    parser = DockerfileParser(str(DOCKERFILE), cache_content=True)
    bases = iter(parser.parent_images)
    stages: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            alias = re.search(r"\s+AS\s+(\S+)\s*$", value, re.IGNORECASE)
            stages.append(Stage(next(bases), alias.group(1) if alias else "", ()))
            continue
        assert stages or instruction == "ARG", f"{instruction} {value!r} before the first FROM"
        if stages:
            last = stages[-1]
            stages[-1] = Stage(last.base, last.name, (*last.instructions, (instruction, value)))
    return tuple(stages)


def final_stage() -> list[tuple[str, str]]:
    """The default target's instructions (the last stage), with those of the stages it is
    built FROM first: what the image that ``docker build`` makes without --target runs."""
    stages = dockerfile_stages()
    named = {stage.name: stage for stage in stages if stage.name}
    chain: list[tuple[str, str]] = []
    stage = stages[-1]
    while True:
        chain[:0] = stage.instructions
        if stage.base not in named:
            return chain
        stage = named[stage.base]


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
    name = image.rsplit("/", 1)[-1].split("@", maxsplit=1)[0].split(":", maxsplit=1)[0]
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


def as_argv(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


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
