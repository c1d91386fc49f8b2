"""Label selectors, as Kubernetes and Cilium evaluate them.

Kubernetes selectors (``matchLabels``/``matchExpressions``) match plain label maps.
Cilium selectors match identity labels, whose keys carry a source (``k8s:app``): a
selector key with a source matches only that source, a bare key (or ``any:``) any
source, as in Cilium's label matching.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Selector"]

_SOURCES = ("k8s", "any", "reserved", "unspec", "container", "cidr")


@dataclass(frozen=True)
class _Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str]


@dataclass(frozen=True)
class Selector:
    """A validated selector (``matchLabels`` become ``In`` requirements)."""

    requirements: tuple[_Requirement, ...]
    cilium: bool = False

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, *, cilium: bool = False) -> Selector:
        raw = raw or {}
        requirements = [
            _Requirement(key, "In", frozenset([value]))
            for key, value in sorted((raw.get("matchLabels") or {}).items())
        ]
        requirements += [
            _Requirement(e["key"], e["operator"], frozenset(e.get("values") or ()))
            for e in raw.get("matchExpressions") or ()
        ]
        return cls(tuple(requirements), cilium)

    @property
    def empty(self) -> bool:
        """An empty selector selects everything."""
        return not self.requirements

    def label_keys(self) -> set[str]:
        return {r.key for r in self.requirements}

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(self._holds(r, labels) for r in self.requirements)

    def _holds(self, requirement: _Requirement, labels: Mapping[str, str]) -> bool:
        values = self._values(requirement.key, labels)
        if requirement.operator == "In":
            return any(v in requirement.values for v in values)
        if requirement.operator == "NotIn":
            return not any(v in requirement.values for v in values)
        if requirement.operator == "Exists":
            return bool(values)
        return not values  # DoesNotExist

    def _values(self, key: str, labels: Mapping[str, str]) -> list[str]:
        if not self.cilium:
            return [labels[key]] if key in labels else []
        source, colon, name = key.partition(":")
        if colon and source in _SOURCES and source != "any":
            return [labels[key]] if key in labels else []
        bare = name if colon and source == "any" else key
        # Any source: every label whose key is <source>:<bare>.
        return [
            value
            for label, value in labels.items()
            if label.partition(":")[2] == bare and label.partition(":")[0] in _SOURCES
        ]
