"""The kinds of object ciliate keeps, and the names the command line knows
them by (``kubectl``'s: singular, plural, short names)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ciliate.control.objects.errors import UnknownKindError

__all__ = ["KINDS", "Kind", "kind_for_document", "resolve_kind"]


@dataclass(frozen=True)
class Kind:
    name: str  # "NetworkPolicy"
    api_version: str  # "networking.k8s.io/v1"
    namespaced: bool
    plural: str  # "networkpolicies"
    short_names: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The kind's segment in store keys (``objects/<key>/...``)."""
        return self.name.lower()

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def qualified(self) -> str:
        """``networkpolicy.networking.k8s.io`` as kubectl prints it (core kinds bare)."""
        return f"{self.key}.{self.group}" if self.group else self.key


_ALL = (
    Kind("Namespace", "v1", namespaced=False, plural="namespaces", short_names=("ns",)),
    Kind("Pod", "v1", namespaced=True, plural="pods", short_names=("po",)),
    Kind(
        "NetworkPolicy",
        "networking.k8s.io/v1",
        namespaced=True,
        plural="networkpolicies",
        short_names=("netpol",),
    ),
    Kind(
        "CiliumNetworkPolicy",
        "cilium.io/v2",
        namespaced=True,
        plural="ciliumnetworkpolicies",
        short_names=("cnp", "ciliumnp"),
    ),
    Kind(
        "CiliumClusterwideNetworkPolicy",
        "cilium.io/v2",
        namespaced=False,
        plural="ciliumclusterwidenetworkpolicies",
        short_names=("ccnp",),
    ),
    Kind("Service", "v1", namespaced=True, plural="services", short_names=("svc",)),
    Kind("EndpointSlice", "discovery.k8s.io/v1", namespaced=True, plural="endpointslices"),
)

KINDS: Mapping[str, Kind] = MappingProxyType({k.name: k for k in _ALL})

_BY_CLI_NAME: Mapping[str, Kind] = MappingProxyType(
    {
        alias: kind
        for kind in _ALL
        for alias in (kind.key, kind.plural, kind.qualified, *kind.short_names)
    }
)


def resolve_kind(name: str) -> Kind:
    """The kind a command-line name means (``netpol``, ``pods``, ``ccnp``, ...)."""
    kind = _BY_CLI_NAME.get(name.lower())
    if kind is None:
        known = ", ".join(sorted(k.key for k in _ALL))
        raise UnknownKindError(
            f'the server doesn\'t have a resource type "{name}" (known: {known})'
        )
    return kind


def kind_for_document(*, kind: object, api_version: object) -> Kind:
    """The kind of a document, checking that its apiVersion is the one kept."""
    found = KINDS.get(kind) if isinstance(kind, str) else None
    if found is None or api_version != found.api_version:
        if found is not None:
            raise UnknownKindError(
                f'no matches for kind "{kind}" in version "{api_version}": '
                f"use apiVersion {found.api_version}"
            )
        known = ", ".join(sorted(KINDS))
        raise UnknownKindError(
            f'no matches for kind "{kind}" in version "{api_version}" (kinds kept: {known})'
        )
    return found
