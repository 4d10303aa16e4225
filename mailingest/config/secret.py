"""A string that never shows itself: passwords, tokens, keys.

A module of its own (not in :mod:`mailingest.config.settings`) because both the settings
and the adapters that use secrets (:mod:`mailingest.adapters.encryption`,
:mod:`mailingest.adapters.alloy`) need it; here it depends on nothing, so the settings
may import the adapters that validate a value without an import cycle.
"""

from __future__ import annotations


class Secret:
    """A string that never shows itself in logs, reprs or exceptions."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)
