"""The house's rooms hold: the core is pure, the product carries no test bed.

* ``mailingest.core`` imports no I/O library and nothing from the adapters or the
  application (checked twice: by importing it in a fresh interpreter, and by reading
  every ``import`` statement, including those inside functions);
* ``mailingest`` never imports the test bed at module level (only the ``demo``,
  ``sandbox`` and ``seed`` commands reach for it, and say what to install if it is
  missing);
* ``pip install .`` into a fresh virtual environment brings no pymap and no
  test-bed module, and ``mailingest --help`` works there.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mailingest"
IO_LIBRARIES = ("redis", "imapclient", "httpx", "httpcore", "celery", "kombu", "imaplib", "smtplib")
ROOMS = ("core", "adapters", "application", "config", "console")


def imports_of(path: Path) -> set[str]:
    """Every module an ``import`` in this file names, absolute, wherever the statement is."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "mailingest" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ROOMS else "top"


def test_every_module_lives_in_a_room() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "celery.py"], top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        ROOMS
    )


def test_core_imports_nothing_from_the_edges_by_its_source() -> None:
    crossings = []
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for module in imports_of(path):
            top = module.split(".")[0]
            if top in IO_LIBRARIES or room_of(module) in ("adapters", "application"):
                crossings.append(f"{path.name} imports {module}")
    assert not crossings, "\n".join(crossings)


def test_core_imports_no_io_library_when_loaded() -> None:
    modules = [f"mailingest.core.{p.stem}" for p in sorted((PACKAGE / "core").glob("*.py"))]
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert "mailingest.core.screening" in loaded  # the script did import the core
    io = sorted(m for m in loaded if m.split(".")[0] in IO_LIBRARIES)
    assert io == [], f"importing mailingest.core loads {io}"
    edges = sorted(m for m in loaded if room_of(m) in ("adapters", "application"))
    assert edges == [], f"importing mailingest.core loads {edges}"


def test_the_product_never_imports_the_test_bed_at_module_level() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only: the commands import it lazily
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if "testbed" in n]
    assert offenders == []


@pytest.mark.slow
def test_pip_install_without_extras_has_no_test_bed(tmp_path: Path) -> None:
    """A fresh venv, ``pip install .`` as a user would (dependencies from the index)."""
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "mailingest"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, source / part)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "mailingest" in names
    assert not names & {"pymap", "mailingest-testbed", "pytest", "hypothesis"}, names
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('mailingest_testbed'))"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "None"
    mailingest = env_dir / "bin" / "mailingest"
    shown = subprocess.run(
        [str(mailingest), "--help"], capture_output=True, text=True, env={}, cwd=tmp_path
    )
    assert shown.returncode == 0 and "usage: mailingest" in shown.stdout, shown.stderr
    demo = subprocess.run(
        [str(mailingest), "demo"], capture_output=True, text=True, env={}, cwd=tmp_path
    )
    assert demo.returncode != 0
    (line,) = demo.stderr.strip().splitlines()
    assert "pip install ./testbed" in line and "Traceback" not in demo.stderr


def test_the_readme_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    modules = [
        *(p.relative_to(PACKAGE) for p in PACKAGE.glob("*/**/*.py")),
        *(p.relative_to(ROOT) for p in (ROOT / "testbed" / "mailingest_testbed").rglob("*.py")),
    ]
    missing = sorted(
        str(m) for m in modules if m.name != "__init__.py" and f"`{m.as_posix()}`" not in readme
    )
    assert not missing, f"the README's module table does not name {missing}"
