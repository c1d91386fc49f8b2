"""What the CNI protocol handler needs from the agent: the endpoint service.

The handler (``ciliate.control.cni.handler``) speaks CNI: environment,
netconf, spec versions, result formats, error codes. The agent implements
``EndpointService`` and speaks endpoints: IPs, veths, maps. Errors cross
this boundary as ``ServiceError`` subclasses that carry the CNI error code
the handler reports; the agent translates its own failures (store, netlink,
BPF maps) into them with ``raise ... from``::

    ServiceError (999: a bug; nothing else should reach the runtime as 999)
    +-- InvalidNetnsError (4)       CNI_NETNS is not a (or not the container's) netns
    +-- PortMappingError (7)        a portMappings entry ciliate cannot serve (SCTP, IPv6)
    +-- BandwidthError (7)          an egress bandwidth that is no valid rate
    +-- HostPortInUseError (102)    another pod of the node holds the hostPort
    +-- SecondInterfaceError (4)    CNI_IFNAME names a second interface of one container
    +-- UnknownContainerError (3)   CHECK of a container the agent does not know
    +-- TryAgainError (11)          temporary: retry the call later
    |   +-- PoolExhaustedError      no pod IP left (capacity may come back)
    |   +-- StoreFailedError        the state store is busy, full, read-only or down
    +-- NotReadyError (50)          the agent is still restoring its endpoints
    +-- DeviceFailedError (100)     the kernel refused a veth, address or route
    +-- DatapathFailedError (101)   a BPF map write or program attachment failed
    +-- CheckFailedError (999)      CHECK found the endpoint damaged
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class PortMapping:
    """One entry of the runtime's ``runtimeConfig.portMappings`` (the CNI
    ``portMappings`` capability), as the handler checked its shape."""

    host_port: int
    container_port: int
    protocol: str = ""  # as given ("tcp", "UDP"); "": left out
    host_ip: str = ""  # "": every address of the node


@dataclass(frozen=True)
class AddRequest:
    container_id: str
    ifname: str  # name of the interface inside the pod (CNI_IFNAME)
    netns: str  # path of the pod's network namespace (CNI_NETNS)
    labels: Mapping[str, str]  # identity labels (identity.labels.labels_from_cni)
    mtu: int | None = None  # netconf "mtu"; None: the agent's default
    attributes: Mapping[str, str] = field(default_factory=dict)  # e.g. K8S_POD_NAME, for display
    port_mappings: tuple[PortMapping, ...] = ()  # hostPorts the runtime asks for
    # runtimeConfig.bandwidth.egressRate (the ``bandwidth`` capability, which
    # kubelet fills from kubernetes.io/egress-bandwidth), bits/s; None: not given.
    egress_rate: int | None = None
    # The netconf's network name: with (container_id, ifname) it names the
    # attachment (the spec), and GC collects only its own network's.
    network: str = ""


@dataclass(frozen=True)
class AddResult:
    ip: ipaddress.IPv4Interface  # the pod's address, as configured (/32)
    gateway: ipaddress.IPv4Address  # the router IP
    routes: tuple[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address | None], ...]
    pod_ifname: str
    pod_mac: str
    host_ifname: str
    host_mac: str
    netns: str
    mtu: int


class ServiceError(Exception):
    """An endpoint operation failed; ``cni_code`` is what the plugin reports."""

    cni_code = 999

    def __init__(self, message: str, *, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidNetnsError(ServiceError):
    """CNI_NETNS is not a network namespace (or does not exist), or not the
    one the container's endpoint is in (code 4)."""

    cni_code = 4


class TryAgainError(ServiceError):
    """Temporary: the caller should retry (CNI code 11)."""

    cni_code = 11


class PoolExhaustedError(TryAgainError):
    """No address left in the node's pod CIDRs (the runtime retries; capacity
    may come back)."""


class StoreFailedError(TryAgainError):
    """The node's state store could not take the change (busy, full,
    read-only, unreachable): nothing was changed; retry once it is fixed."""


class PortMappingError(ServiceError):
    """A ``portMappings`` entry the agent cannot serve (a protocol other than
    TCP and UDP, an IPv6 ``hostIP``, two entries of one pod that overlap):
    invalid configuration (code 7); nothing was changed."""

    cni_code = 7


class BandwidthError(ServiceError):
    """The pod asks for an egress bandwidth (runtimeConfig, or its Pod's
    ``kubernetes.io/egress-bandwidth``) that is not a rate kubelet accepts:
    invalid configuration (code 7); nothing was changed."""

    cni_code = 7


class HostPortInUseError(ServiceError):
    """Another pod of this node holds the hostPort (plugin-specific code 102,
    as kubelet and portmap refuse it); nothing was changed."""

    cni_code = 102


class SecondInterfaceError(ServiceError):
    """ADD of another CNI_IFNAME for a container that has a ciliate interface
    already: ciliate gives a container one interface (code 4)."""

    cni_code = 4


class DeviceFailedError(ServiceError):
    """The kernel refused to create or configure the pod's veth, address or
    routes (plugin-specific code 100); nothing was left behind."""

    cni_code = 100


class DatapathFailedError(ServiceError):
    """Writing the endpoint into the BPF maps or attaching its programs failed
    (plugin-specific code 101); nothing was left behind."""

    cni_code = 101


class NotReadyError(ServiceError):
    """The agent cannot serve ADD now (CNI code 50)."""

    cni_code = 50


class CheckFailedError(ServiceError):
    """CHECK found the endpoint not as ADD left it."""

    cni_code = 999


class UnknownContainerError(ServiceError):
    """CHECK (or another lookup) names a container the agent does not know (code 3)."""

    cni_code = 3


class EndpointService(Protocol):
    def add(self, request: AddRequest) -> AddResult:
        """Create (or return the existing) endpoint for (container_id, ifname)."""
        ...

    def delete(self, *, container_id: str, ifname: str) -> None:
        """Remove the endpoint; succeeds when it is already gone."""
        ...

    def check(self, *, container_id: str, ifname: str, netns: str) -> AddResult:
        """Verify the endpoint is intact; raise CheckFailedError if not."""
        ...

    def gc(self, *, network: str, valid: set[tuple[str, str]]) -> int:
        """Remove the endpoints of ``network`` whose (container_id, ifname) is
        not in ``valid`` (GC is per network: another network served by the same
        agent keeps its own); return how many were removed."""
        ...

    def ready(self) -> None:
        """Raise NotReadyError if ADD cannot be served now."""
        ...
