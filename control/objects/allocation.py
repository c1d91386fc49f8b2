"""ClusterIP and NodePort allocation, inside the apply transaction, as the API
server's service registry does it (``pkg/registry/core/service/ipallocator`` and
``portallocator``).

Kubernetes' rules, kept here:

* the service range (``--service-cluster-ip-range``, default ``10.96.0.0/12``, at
  most 2^20 addresses as the API server allows) never hands out its network
  address nor, for IPv4, its broadcast address;
* the range's first address is the API server's (the ``kubernetes`` Service in
  ``default``): no other Service gets it, dynamically or by asking;
* dynamic allocation picks a random address of the *upper band* and takes the first
  free one from there (wrapping inside the band), and only when the upper band is
  full the lower one; the lower band (``min(max(16, size/16), 256)`` addresses)
  is left for Services that ask for a fixed address (KEP-3070), such as the DNS
  service's ``.10``. NodePorts do the same with ``min(max(16, size/32), 128)``;
* an update keeps what was allocated: an empty ``clusterIP`` (or ``nodePort: 0``
  on a port of the same number and protocol) takes the stored value; a different
  ``clusterIP`` is refused (immutable); NodePorts no longer used are freed;
* a LoadBalancer with ``externalTrafficPolicy: Local`` gets a
  ``healthCheckNodePort`` from the NodePort range, freed when no longer needed;
* deleting a Service (or its Namespace) frees its ClusterIP and NodePorts.

Allocations are bitmaps in the store, in blocks of 4096 addresses (or ports) with
a summary of how many are free in each block, so an allocation reads and writes
two small keys however many services exist, and two concurrent applies on etcd
conflict on the same keys (one retries) instead of both taking one address::

    objects-meta/service-cluster-ip-range              {"cidr": "10.96.0.0/12"}
    objects-meta/allocations/clusterip/<net>-<len>/summary   {"size", "free": [...]}
    objects-meta/allocations/clusterip/<net>-<len>/<block>   {"bits": base64}
    objects-meta/allocations/nodeport/30000-32767/...
"""

from __future__ import annotations

import base64
import ipaddress
import random
from collections.abc import Mapping
from typing import Any

from ciliate.control.objects.errors import FieldError, ObjectInvalidError, RangeFullError
from ciliate.control.objects.service_validation import NODE_PORT_RANGE
from ciliate.control.store import Store, StoreDataError, Txn

__all__ = [
    "API_SERVER_SERVICE",
    "DEFAULT_SERVICE_RANGE",
    "SERVICE_RANGE_KEY",
    "admit_service",
    "configure_service_range",
    "parse_service_range",
    "release_service",
    "service_range",
]

DEFAULT_SERVICE_RANGE = "10.96.0.0/12"
SERVICE_RANGE_KEY = "objects-meta/service-cluster-ip-range"
ALLOCATIONS = "objects-meta/allocations/"
API_SERVER_SERVICE = ("default", "kubernetes")
MAX_RANGE_BITS = 20  # the API server refuses a larger IPv4 service range
BLOCK_BITS = 4096

_random = random.SystemRandom()


def parse_service_range(text: str) -> ipaddress.IPv4Network:
    """``--service-cluster-ip-range`` as the API server accepts it, or ValueError
    saying what to fix."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"service CIDR {text!r} is not a network address: {exc}") from exc
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"service CIDR {text!r}: ciliate serves IPv4 only")
    if network.prefixlen < 32 - MAX_RANGE_BITS:
        raise ValueError(
            f"service CIDR {text!r} is too large; the mask must be >= /{32 - MAX_RANGE_BITS}"
        )
    if network.num_addresses < 4:
        raise ValueError(f"service CIDR {text!r} is too small; use a /30 or larger")
    return network


def configure_service_range(store: Store, cidr: str) -> ipaddress.IPv4Network:
    """Record the cluster's service range (the agent or operator does it at start from
    its ``--service-cluster-ip-range``), so every writer allocates from it. Addresses
    given out from a former range stay with their Services."""
    network = parse_service_range(cidr)
    with store.transaction() as txn:
        if txn.get_json(SERVICE_RANGE_KEY) != {"cidr": str(network)}:
            txn.put_json(SERVICE_RANGE_KEY, {"cidr": str(network)})
    return network


def service_range(txn: Txn) -> ipaddress.IPv4Network:
    """The range recorded in the store, or the default."""
    doc = txn.get_json(SERVICE_RANGE_KEY)
    if doc is None:
        return ipaddress.IPv4Network(DEFAULT_SERVICE_RANGE)
    cidr = doc.get("cidr") if isinstance(doc, dict) else None
    if not isinstance(cidr, str):
        raise StoreDataError(f"{SERVICE_RANGE_KEY} holds {doc!r}, not {{'cidr': ...}}")
    return parse_service_range(cidr)


def _band_offset(size: int, *, step: int, top: int) -> int:
    """Kubernetes' ``calculateRangeOffset``: how many of the lowest values are kept
    for static allocation (``min(max(16, size/step), top)``; none when ``size`` is 16
    or less)."""
    if size <= 16:
        return 0
    return min(max(16, size // step), top)


class _Bitmap:
    """One allocation range in the store (values 0..size-1)."""

    def __init__(self, txn: Txn, *, prefix: str, size: int) -> None:
        self._txn = txn
        self._prefix = prefix
        self.size = size
        doc = txn.get_json(f"{prefix}summary")
        blocks = (size + BLOCK_BITS - 1) // BLOCK_BITS
        if doc is None:
            self._free = [min(BLOCK_BITS, size - b * BLOCK_BITS) for b in range(blocks)]
        elif (
            isinstance(doc, dict)
            and doc.get("size") == size
            and isinstance(free := doc.get("free"), list)
        ):
            self._free = [n for n in free if isinstance(n, int)]
        else:
            raise StoreDataError(f"{prefix}summary holds {doc!r}, not a range of {size}")
        self._bits: dict[int, bytearray] = {}

    def _block(self, index: int) -> bytearray:
        if index not in self._bits:
            doc = self._txn.get_json(f"{self._prefix}{index}")
            if doc is None:
                self._bits[index] = bytearray(BLOCK_BITS // 8)
            elif isinstance(doc, dict) and isinstance(bits := doc.get("bits"), str):
                self._bits[index] = bytearray(base64.b64decode(bits))
            else:
                raise StoreDataError(f"{self._prefix}{index} holds {doc!r}, not a bitmap")
        return self._bits[index]

    def taken(self, value: int) -> bool:
        block, bit = divmod(value, BLOCK_BITS)
        return bool(self._block(block)[bit // 8] & (1 << (bit % 8)))

    def _set(self, value: int, *, taken: bool) -> None:
        block, bit = divmod(value, BLOCK_BITS)
        bits = self._block(block)
        if taken:
            bits[bit // 8] |= 1 << (bit % 8)
        else:
            bits[bit // 8] &= ~(1 << (bit % 8)) & 0xFF
        self._free[block] += -1 if taken else 1
        self._txn.put_json(
            f"{self._prefix}{block}", {"bits": base64.b64encode(bytes(bits)).decode()}
        )
        self._txn.put_json(f"{self._prefix}summary", {"size": self.size, "free": self._free})

    def take(self, value: int) -> bool:
        """Take ``value``; False if it was taken already."""
        if self.taken(value):
            return False
        self._set(value, taken=True)
        return True

    def release(self, value: int) -> None:
        if 0 <= value < self.size and self.taken(value):
            self._set(value, taken=False)

    def _first_free(self, start: int, end: int) -> int | None:
        value = start
        while value < end:
            block = value // BLOCK_BITS
            block_end = min(end, (block + 1) * BLOCK_BITS)
            if self._free[block] > 0:
                bits = self._block(block)
                for candidate in range(value, block_end):
                    bit = candidate - block * BLOCK_BITS
                    if not bits[bit // 8] & (1 << (bit % 8)):
                        return candidate
            value = block_end
        return None

    def take_next(self, *, low: int, offset: int) -> int | None:
        """Kubernetes' random scan with offset: from a random point of the upper band
        [offset, size) to its end, then from its start; then the lower band
        [low, offset) the same way. None when all are taken."""
        for band_start, band_end in ((max(low, offset), self.size), (low, offset)):
            if band_start >= band_end:
                continue
            pivot = _random.randrange(band_start, band_end)
            found = self._first_free(pivot, band_end)
            if found is None:
                found = self._first_free(band_start, pivot)
            if found is not None:
                self._set(found, taken=True)
                return found
        return None


def _ip_bitmap(txn: Txn, network: ipaddress.IPv4Network) -> _Bitmap:
    # Value i is the address network + 1 + i; the broadcast address is left out.
    prefix = f"{ALLOCATIONS}clusterip/{network.network_address}-{network.prefixlen}/"
    return _Bitmap(txn, prefix=prefix, size=network.num_addresses - 2)


def _port_bitmap(txn: Txn) -> _Bitmap:
    low, high = NODE_PORT_RANGE
    return _Bitmap(txn, prefix=f"{ALLOCATIONS}nodeport/{low}-{high}/", size=high - low + 1)


def _invalid(obj: Mapping[str, Any], path: str, value: object, detail: str) -> ObjectInvalidError:
    return ObjectInvalidError(
        kind="Service",
        name=str(obj["metadata"]["name"]),
        errors=[FieldError(path, "Invalid value", detail, value)],
    )


def _needs_node_ports(spec: Mapping[str, Any]) -> bool:
    return spec["type"] == "NodePort" or (
        spec["type"] == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is not False
    )


def _needs_health_check_port(spec: Mapping[str, Any]) -> bool:
    """A LoadBalancer with ``externalTrafficPolicy: Local`` gets a port on every node
    that tells the load balancer whether the node has a local backend."""
    return spec["type"] == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def _node_ports(spec: Mapping[str, Any]) -> set[int]:
    ports = {p["nodePort"] for p in spec.get("ports", []) if p.get("nodePort")}
    if spec.get("healthCheckNodePort"):
        ports.add(spec["healthCheckNodePort"])
    return ports


def admit_service(txn: Txn, obj: dict[str, Any], current: Mapping[str, Any] | None) -> None:
    """Fill in ``obj``'s ClusterIP and NodePorts (kept from ``current``, the stored
    Service, or allocated) and free what ``current`` held that ``obj`` drops."""
    old_spec: Mapping[str, Any] = current["spec"] if current is not None else {}
    _admit_cluster_ip(txn, obj, old_spec.get("clusterIP") or "")
    _admit_node_ports(txn, obj, old_spec)
    if current is not None and not obj["status"].get("loadBalancer"):
        # The API server keeps status across spec updates (it is a subresource, written
        # by the load balancer's controller); here a manifest that carries no status
        # keeps the stored one, and one that carries it sets it.
        obj["status"] = current.get("status") or obj["status"]


def _admit_cluster_ip(txn: Txn, obj: dict[str, Any], old: str) -> None:
    """Keep, check or allocate the ClusterIP. ``old`` is the stored Service's ("" when
    new, headless or ExternalName). The address is immutable, except that a change to
    ExternalName gives it back and a change from ExternalName allocates afresh, as
    ``validateUpgradeDowngradeClusterIPs`` allows."""
    spec = obj["spec"]
    wanted: str = spec["clusterIP"]
    if spec["type"] == "ExternalName":
        if old and old != "None":
            _release_cluster_ip(txn, old)
        return
    if old:
        if wanted and wanted != old:
            # validateUpgradeDowngradeClusterIPs's words; the value is the new list.
            raise _invalid(obj, "spec.clusterIPs[0]", [wanted], "may not change once set")
        spec["clusterIP"], spec["clusterIPs"] = old, [old]
        return
    if wanted == "None":
        return
    network = service_range(txn)
    bitmap = _ip_bitmap(txn, network)
    meta = obj["metadata"]
    is_api_server = (meta["namespace"], meta["name"]) == API_SERVER_SERVICE
    if wanted:
        address = ipaddress.IPv4Address(wanted)
        value = int(address) - int(network.network_address) - 1
        # The registry names the whole list: spec.clusterIPs: Invalid value: ["..."]: ...
        if not 0 <= value < bitmap.size:
            raise _invalid(
                obj,
                "spec.clusterIPs",
                [wanted],
                f"failed to allocate IP {wanted}: the provided IP ({wanted}) is not in the"
                f" valid range. The range of valid IPs is {network}",
            )
        if value == 0 and not is_api_server:
            raise _invalid(
                obj,
                "spec.clusterIPs",
                [wanted],
                f"failed to allocate IP {wanted}: the range's first address is the API"
                ' server\'s (Service "kubernetes" in "default")',
            )
        if not bitmap.take(value):
            raise _invalid(
                obj,
                "spec.clusterIPs",
                [wanted],
                f"failed to allocate IP {wanted}: provided IP is already allocated",
            )
        return
    low = 0 if is_api_server else 1
    # Kubernetes sizes the band by the whole CIDR, network and broadcast included.
    offset = _band_offset(network.num_addresses, step=16, top=256)
    value_or_none = bitmap.take_next(low=low, offset=offset)
    if value_or_none is None:
        raise RangeFullError(
            f"failed to allocate a serviceIP for Service {meta['namespace']}/{meta['name']}:"
            f" range is full ({network} holds {bitmap.size - 1} service addresses, all in"
            " use): delete a Service or widen --service-cluster-ip-range"
        )
    address = network.network_address + 1 + value_or_none
    spec["clusterIP"], spec["clusterIPs"] = str(address), [str(address)]


def _admit_node_ports(txn: Txn, obj: dict[str, Any], old_spec: Mapping[str, Any]) -> None:
    spec = obj["spec"]
    old_ports = _node_ports(old_spec) if old_spec else set()
    low, high = NODE_PORT_RANGE
    if spec["type"] in ("NodePort", "LoadBalancer") and old_spec and _needs_node_ports(old_spec):
        kept = {
            (p["port"], p["protocol"]): p["nodePort"]
            for p in old_spec.get("ports", [])
            if p.get("nodePort")
        }
        for port in spec["ports"]:
            if not port.get("nodePort") and (port["port"], port["protocol"]) in kept:
                port["nodePort"] = kept[(port["port"], port["protocol"])]
    needs_health_check = _needs_health_check_port(spec)
    old_health_check = old_spec.get("healthCheckNodePort") if old_spec else None
    if needs_health_check and old_health_check and _needs_health_check_port(old_spec):
        asked = spec.get("healthCheckNodePort")
        if asked and asked != old_health_check:
            # validateServiceExternalTrafficFieldsUpdate: kept while both need one.
            raise ObjectInvalidError(
                kind="Service",
                name=str(obj["metadata"]["name"]),
                errors=[FieldError("spec.healthCheckNodePort", "Forbidden", "field is immutable")],
            )
    if needs_health_check and not spec.get("healthCheckNodePort") and old_health_check:
        spec["healthCheckNodePort"] = old_health_check
    missing = [p for p in spec["ports"] if not p.get("nodePort")] if _needs_node_ports(spec) else []
    missing_health_check = needs_health_check and not spec.get("healthCheckNodePort")
    wanted = _node_ports(spec)
    if wanted == old_ports and not missing and not missing_health_check:
        return
    bitmap = _port_bitmap(txn)
    for number in old_ports - wanted:
        bitmap.release(number - low)
    requested = [
        (f"spec.ports[{i}].nodePort", p.get("nodePort")) for i, p in enumerate(spec["ports"])
    ]
    requested.append(("spec.healthCheckNodePort", spec.get("healthCheckNodePort")))
    taken_here: set[int] = set()
    for path, number in requested:
        if not number or number in old_ports:
            continue
        # One Service may use one NodePort for two protocols (DNS on TCP and UDP).
        if number in taken_here and path != "spec.healthCheckNodePort":
            continue
        if not bitmap.take(number - low):
            raise _invalid(obj, path, number, "provided port is already allocated")
        taken_here.add(number)

    def next_port() -> int:
        value = bitmap.take_next(low=0, offset=_band_offset(bitmap.size, step=32, top=128))
        if value is None:
            meta = obj["metadata"]
            raise RangeFullError(
                f"failed to allocate a nodePort for Service {meta['namespace']}/{meta['name']}:"
                f" range is full ({low}-{high} all in use): delete a NodePort Service"
            )
        return low + value

    for port in missing:
        port["nodePort"] = next_port()
    if missing_health_check:
        spec["healthCheckNodePort"] = next_port()


def _release_cluster_ip(txn: Txn, cluster_ip: str) -> None:
    network = service_range(txn)
    value = int(ipaddress.IPv4Address(cluster_ip)) - int(network.network_address) - 1
    _ip_bitmap(txn, network).release(value)  # outside the range: nothing to free


def release_service(txn: Txn, service: Mapping[str, Any]) -> None:
    """Free a deleted Service's ClusterIP and NodePorts."""
    spec = service.get("spec") or {}
    cluster_ip = spec.get("clusterIP") or ""
    if cluster_ip and cluster_ip != "None":
        _release_cluster_ip(txn, cluster_ip)
    ports = _node_ports(spec)
    if ports:
        bitmap = _port_bitmap(txn)
        for number in ports:
            bitmap.release(number - NODE_PORT_RANGE[0])
