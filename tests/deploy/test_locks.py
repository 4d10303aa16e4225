"""The lock files the image installs from: every runtime and build dependency pinned
with hashes, within pyproject.toml's ranges, and regenerated as deploy/README.md says."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .helpers import BUILD_LOCK, DEPLOY, LOCK, ROOT


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
    # the image runs Flower and the console: their extras are in the lock
    extras = project["project"]["optional-dependencies"]
    runtime = project["project"]["dependencies"] + extras["flower"] + extras["console"]
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
        options = set(re.findall(r"--[\w-]+(?:=\S+)?", command.group(0)))
        documented = [
            set(re.findall(r"--[\w-]+(?:=\S+)?", line))
            for line in re.findall(r"pip-compile.*", guide)
        ]
        assert options in documented, f"deploy/README.md gives the command of {path.name}"
