"""Every YAML deployment file, through yamllint's correctness rules.

PyYAML (and so every other test here) reads a repeated key silently, the last one winning:
a second ``env:`` of a container would drop the first without a word. yamllint reports it,
and the YAML 1.1 truthy words (``yes``, ``on``) that PyYAML and Kubernetes read as booleans.
Its style rules (line length, indentation, document start) are left out: they say nothing
about what the files do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from .helpers import ALERTS, COMPOSE_FILE, K8S, ROOT

CONFIG = YamlLintConfig(
    """
rules:
  key-duplicates: enable
  truthy:
    allowed-values: ["true", "false"]
    check-keys: false
  anchors: enable
"""
)


def yaml_files() -> list[Path]:
    return [COMPOSE_FILE, *sorted(K8S.glob("*.yaml")), ALERTS]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_has_no_repeated_keys_or_yes_no_booleans(path: Path) -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{p.line}:{p.column}: {p.message} ({p.rule})"
        for p in linter.run(path.read_text(encoding="utf-8"), CONFIG, str(path))
    ]
    assert not problems, "\n".join(problems)
