"""deploy/Dockerfile and .dockerignore: a slim base, a non-root user, only hash-pinned
dependencies, and a build context holding what the image copies and nothing else."""

from __future__ import annotations

import re

from .helpers import ROOT, dockerfile_stages, dockerignored, final_stage, image_default

# -- the image -------------------------------------------------------------------------


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    for path in (
        ".env",
        "secrets/console-users",
        ".git/config",
        ".venv/bin/python",
        "build/lib/mailingest/cli.py",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".hypothesis/examples/x",
        "mailingest/__pycache__/cli.cpython-311.pyc",
        "mailingest.egg-info/PKG-INFO",
        "tests/deploy/test_dockerfile.py",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    copied = [
        part
        for stage in dockerfile_stages()
        for ins, rest in stage.instructions
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
    names = {stage.name for stage in stages if stage.name}
    for stage in stages:
        base = stage.base
        assert base in names or re.fullmatch(r"python:3\.11-slim(-[a-z]+)?(@sha256:\w+)?", base), (
            f"FROM {base}: the image is built on python:3.11-slim"
        )
    final = final_stage()
    users = [rest for ins, rest in final if ins == "USER"]
    assert users, "the final stage runs as root (no USER)"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: numeric and not root"
    runs = [rest for stage in stages for ins, rest in stage.instructions if ins == "RUN"]
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
