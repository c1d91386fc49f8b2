"""The CNI protocol, spoken inside the agent.

The runtime executes ``ciliate-cni`` (a C relay, ``control/cni/shim``), which
posts the invocation (the ``CNI_*`` variables and the netconf from stdin) to
the agent; the agent calls :func:`handle` and sends back what the plugin
prints and its exit status. Everything the CNI specification asks of a
plugin happens here: validation of the environment and the netconf, the spec
versions (0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0), the result format of each version and
the error codes; the agent behind :class:`~.service.EndpointService` only
deals in endpoints.

Errors, and the CNI code each becomes (the message always says what
happened and what to do):

====  =====================================================================
code  when
====  =====================================================================
1     no ``cniVersion``, or one ciliate does not speak; CHECK before 0.4.0;
      GC and STATUS before 1.1.0
3     CHECK of a container the agent has no endpoint for
4     a variable the command needs is missing or invalid (``CNI_COMMAND``,
      ``CNI_CONTAINERID``, ``CNI_NETNS`` not a network namespace,
      ``CNI_IFNAME`` not a name the kernel takes, ``CNI_ARGS``, ``CNI_PATH``
      for CHECK and GC); a second ``CNI_IFNAME`` for a container that has a
      ciliate interface already
6     the netconf is not JSON (not UTF-8, not an object, nested too deeply),
      or its ``cniVersion`` is not a string
7     the netconf is invalid (``name``, ``type``, ``mtu``,
      ``args.cni.labels``, a malformed ``prevResult``, none on CHECK,
      malformed ``cni.dev/valid-attachments``, a malformed
      ``runtimeConfig.portMappings`` or one the agent cannot serve: SCTP, IPv6)
11    try again later: the agent's state store is busy, full, read-only or
      unreachable (nothing was changed); the node's pod IPs or identities
      are used up; the agent is not reachable (answered by the ``ciliate-cni``
      relay itself, which queues a DEL to replay later)
50    STATUS while the agent is still restoring its endpoints (the relay
      also answers 50 to STATUS when the agent is not reachable)
100   the pod's namespace has a link named ``CNI_IFNAME`` already (the spec:
      ADD must fail then: ciliate's own from an earlier ADD of the
      attachment, or another plugin's), or the kernel refused a device step
      (veth, address, route); ADD was rolled back
101   a BPF map write or program attachment failed; ADD was rolled back
102   a hostPort of ``runtimeConfig.portMappings`` (or of the Pod object) is
      held by another pod of the node; nothing was changed
999   a bug: an exception nothing above describes, with its text (the
      traceback goes to the agent's log, never to the runtime); CHECK of a
      damaged endpoint, or one that differs from ``prevResult``
====  =====================================================================

Codes 0-99 are the spec's; 100 and up are ciliate's own. Every error names
the ``cniVersion`` of the netconf (the spec: "the same value as provided by
the configuration"), also one ciliate does not speak; the latest when the
netconf has none.

In a chain, ciliate may come after another plugin: an ADD with a
``prevResult`` passes it through, with ciliate's interfaces, address and
routes appended (the spec: a plugin "MUST handle prevResult by either
passing it through, or modifying it appropriately"). CHECK compares the
``prevResult`` with the agent's endpoint and with what the pod's namespace
holds (interface, MAC, address, ciliate's routes); entries of other plugins
are left to them.

Codes from the agent arrive as :class:`~.service.ServiceError` subclasses
carrying their ``cni_code`` (the tree is in ``service``'s docstring).

The shim's HTTP contract (``POST /v1/cni``: ``{"env", "stdin"}`` in,
``{"exit_code", "stdout"}`` out) is served by the agent's API, which calls
:func:`handle`. The DELs the shim queued while the agent was down are read
with :func:`read_del_queue` (the same body, :func:`decode_request`) and
dropped with :func:`remove_from_queue`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from ciliate.control.identity import labels as identity
from ciliate.datapath import devices

from . import podnet
from .service import (
    AddRequest,
    AddResult,
    CheckFailedError,
    DeviceFailedError,
    EndpointService,
    InvalidNetnsError,
    PortMapping,
    ServiceError,
    UnknownContainerError,
)

__all__ = [
    "COMMANDS",
    "SUPPORTED_VERSIONS",
    "CniResponse",
    "QueuedDel",
    "decode_request",
    "handle",
    "read_del_queue",
    "remove_from_queue",
]

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")

# The variables each command cannot do without, as the spec (1.1.0, section 2)
# lists them: CNI_NETNS is optional for DEL (the netns may be gone already),
# CNI_PATH required for CHECK and GC only, STATUS and VERSION need none but
# CNI_COMMAND.
_REQUIRED_ENV: Mapping[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": ("CNI_PATH",),
    "STATUS": (),
}
# A cniVersion echoed back in errors and VERSION answers (the spec: the value
# the input gave), also one ciliate does not speak; anything else is not
# repeated to the runtime.
_VERSION_LIKE = re.compile(r"[0-9]{1,4}(\.[0-9]{1,4}){0,3}")
# Fields the spec added in 1.1.0, dropped from results of older versions.
_INTERFACE_FIELDS_1_1 = ("mtu", "socketPath", "pciID")
_ROUTE_FIELDS_1_1 = ("mtu", "advmss", "priority", "table", "scope")
# The first spec version that has each command.
_SINCE: Mapping[str, str] = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}

# CNI spec: container IDs and network names start with an alphanumeric, then
# alphanumerics, '_', '.', '-'.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_IFNAME_MAX = 15  # bytes: IFNAMSIZ - 1
MTU_MIN, MTU_MAX = 68, 65535
# CNI_ARGS keys kept as endpoint attributes (for display).
_ATTRIBUTE_KEYS = ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID")
_VALID_ATTACHMENTS = "cni.dev/valid-attachments"
# libcni also sends the name from a draft of the 1.1 spec, with the same value.
_VALID_ATTACHMENTS_DRAFT = "cni.dev/attachments"

CODE_INCOMPATIBLE_VERSION = 1
CODE_UNKNOWN_CONTAINER = 3
CODE_INVALID_ENV = 4
CODE_DECODING = 6
CODE_INVALID_NETCONF = 7
CODE_INTERNAL = 999


@dataclass(frozen=True)
class CniResponse:
    """What the plugin prints on stdout, and its exit status."""

    exit_code: int
    stdout: str


class _CniError(Exception):
    """A CNI error the handler itself detected."""

    def __init__(self, code: int, message: str, *, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class QueuedDel(TypedDict):
    """One DEL the shim queued while the agent was down: the request body it
    would have sent, and the file it came from."""

    path: str
    env: dict[str, str]
    stdin: str


# -- the protocol -----------------------------------------------------------


def handle(env: Mapping[str, str], stdin: bytes, service: EndpointService) -> CniResponse:
    """Run one CNI invocation (``CNI_*`` variables and stdin) against the agent.

    Never raises: every failure becomes a CNI error result (exit status 1).
    """
    version = LATEST_VERSION
    try:
        command = env.get("CNI_COMMAND", "")
        if not command:
            raise _CniError(
                CODE_INVALID_ENV,
                "CNI_COMMAND is not set",
                details="set CNI_COMMAND to one of " + ", ".join(COMMANDS),
            )
        if command not in COMMANDS:
            raise _CniError(
                CODE_INVALID_ENV,
                f"unknown CNI_COMMAND {command!r}; expected one of {', '.join(COMMANDS)}",
            )
        if command == "VERSION":
            return _version(stdin)
        try:
            netconf: dict[str, Any] | None = _parse_netconf(stdin)
        except _CniError as exc:
            netconf, unreadable = None, exc
        if netconf is not None:
            version = _echoed_version(netconf.get("cniVersion"))
        # The environment first, as libcni's skel checks it: a runtime that
        # leaves out a variable hears that before anything about stdin.
        _check_env(env, command)
        if netconf is None:
            raise unreadable
        spoken = _check_version(netconf, command)
        _check_netconf(netconf)
        return _COMMAND_HANDLERS[command](env, netconf, spoken, service)
    except _CniError as exc:
        return _error(version, exc.code, exc.message, exc.details)
    except ServiceError as exc:
        return _error(version, exc.cni_code, exc.message, exc.details)
    except Exception as exc:
        log.exception("CNI %s failed unexpectedly", env.get("CNI_COMMAND", "?"))
        return _error(version, CODE_INTERNAL, f"{type(exc).__name__}: {exc}")


def _add(
    env: Mapping[str, str], netconf: dict[str, Any], version: str, service: EndpointService
) -> CniResponse:
    # After another plugin of a chain: its result is passed on with ciliate's
    # appended (checked first, so a bad one changes nothing).
    prev = _PrevResult.parse(netconf["prevResult"]) if "prevResult" in netconf else None
    container_id, ifname = _attachment(env)
    netns = _check_netns(env["CNI_NETNS"])
    cni_args = env.get("CNI_ARGS", "")
    labels = _labels(cni_args, netconf)
    request = AddRequest(
        container_id=container_id,
        ifname=ifname,
        netns=netns,
        labels=labels,
        mtu=_mtu(netconf),
        attributes=_attributes(cni_args),
        port_mappings=_port_mappings(netconf),
        egress_rate=_egress_rate(netconf),
        network=netconf["name"],
    )
    # The spec: "If an interface of the requested name already exists in the
    # container, the CNI plugin MUST return with an error" -- here: ciliate's own
    # from an earlier ADD of this attachment (a runtime must DEL first). The pod
    # is looked at first (one ioctl); only a link of that name costs a question
    # to the agent, since it may also be a DELeted endpoint's veth the agent has
    # yet to remove (it does so before creating the new one) or a link of
    # another plugin (the agent's ADD fails on it and rolls back, code 100).
    if _pod_has_interface(netns, ifname) and _has_endpoint(
        service, container_id=container_id, ifname=ifname, netns=netns
    ):
        raise DeviceFailedError(
            f"CNI_IFNAME {ifname!r} exists already in CNI_NETNS {netns!r}: container "
            f"{container_id} has it from an earlier ADD; nothing was changed",
            details="a second ADD of an attachment needs a DEL of the first",
        )
    result = service.add(request)
    return CniResponse(0, _dump(format_result(result, version, prev=prev)))


def _delete(
    env: Mapping[str, str], netconf: dict[str, Any], version: str, service: EndpointService
) -> CniResponse:
    # Lenient on purpose: the netns may be gone, the netconf may have been
    # edited since ADD (so mtu and labels are not looked at), prevResult is
    # ignored; the endpoint being gone already is success (service.delete).
    container_id, ifname = _attachment(env)
    service.delete(container_id=container_id, ifname=ifname)
    return CniResponse(0, "")


def _check(
    env: Mapping[str, str], netconf: dict[str, Any], version: str, service: EndpointService
) -> CniResponse:
    container_id, ifname = _attachment(env)
    netns = _check_netns(env["CNI_NETNS"])
    prev = netconf.get("prevResult")
    if prev is None:
        raise _CniError(
            CODE_INVALID_NETCONF,
            "CHECK needs the prevResult of the ADD in the netconf",
            details="the runtime must pass the cached ADD result as prevResult",
        )
    expected = _PrevResult.parse(prev)
    # The agent checks its side (veth, map entries, programs) and says what it
    # made; the pod's namespace is read here for what prevResult lists in it.
    current = service.check(container_id=container_id, ifname=ifname, netns=netns)
    problems = expected.differences(current, pod=_read_pod_interface(netns, ifname), netns=netns)
    if problems:
        raise CheckFailedError(
            f"the endpoint of {container_id}/{ifname} differs from prevResult: "
            + "; ".join(problems)
        )
    return CniResponse(0, "")


def _gc(
    env: Mapping[str, str], netconf: dict[str, Any], version: str, service: EndpointService
) -> CniResponse:
    # The spec (1.1): the attachments listed are those of this network only.
    service.gc(network=netconf["name"], valid=_valid_attachments(netconf))
    return CniResponse(0, "")


def _status(
    env: Mapping[str, str], netconf: dict[str, Any], version: str, service: EndpointService
) -> CniResponse:
    service.ready()
    return CniResponse(0, "")


_COMMAND_HANDLERS: Mapping[
    str, Callable[[Mapping[str, str], dict[str, Any], str, EndpointService], CniResponse]
] = {"ADD": _add, "DEL": _delete, "CHECK": _check, "GC": _gc, "STATUS": _status}


def _version(stdin: bytes) -> CniResponse:
    """VERSION: the versions ciliate speaks, with the ``cniVersion`` stdin gave
    (the spec: "the value of cniVersion specified on input"); the latest when
    stdin names none."""
    try:
        given = json.loads(stdin).get("cniVersion") if stdin.strip() else None
    except (ValueError, AttributeError, RecursionError):
        given = None
    answer = {"cniVersion": _echoed_version(given), "supportedVersions": list(SUPPORTED_VERSIONS)}
    return CniResponse(0, _dump(answer))


def _echoed_version(given: object) -> str:
    """The cniVersion to answer with: the input's when it looks like a version."""
    if isinstance(given, str) and _VERSION_LIKE.fullmatch(given):
        return given
    return LATEST_VERSION


# -- results ----------------------------------------------------------------


def format_result(
    result: AddResult, version: str, *, prev: _PrevResult | None = None
) -> dict[str, Any]:
    """The ADD result in the format of spec ``version``, after ``prev`` (the
    result of the plugins before ciliate in a chain) when there is one.

    ciliate's interfaces come after ``prev``'s: the node-side veth, then the
    pod's (with its sandbox), which the IP names. Before 1.0.0 each IP carries
    ``"version"``; from 1.1.0 interfaces carry their MTU. ``prev``'s entries
    are passed through, reshaped to ``version`` the same way.
    """
    before = prev if prev is not None else _PrevResult((), (), (), {})
    host: dict[str, Any] = {"name": result.host_ifname, "mac": result.host_mac}
    pod: dict[str, Any] = {
        "name": result.pod_ifname,
        "mac": result.pod_mac,
        "sandbox": result.netns,
    }
    if version == "1.1.0":
        host["mtu"] = result.mtu
        pod["mtu"] = result.mtu
    ip: dict[str, Any] = {
        "address": str(result.ip),
        "gateway": str(result.gateway),
        "interface": len(before.interfaces) + 1,
    }
    routes = [
        {"dst": str(dst)} if gw is None else {"dst": str(dst), "gw": str(gw)}
        for dst, gw in result.routes
    ]
    return {
        "cniVersion": version,
        "interfaces": [
            *(_without(i, _INTERFACE_FIELDS_1_1, version) for i in before.interfaces),
            host,
            pod,
        ],
        "ips": [_shaped_ip(i, version) for i in (*before.ips, ip)],
        "routes": [
            *(_without(r, _ROUTE_FIELDS_1_1, version) for r in before.routes),
            *routes,
        ],
        "dns": dict(before.dns),
    }


def _without(entry: Mapping[str, Any], fields: tuple[str, ...], version: str) -> dict[str, Any]:
    """``entry`` without the fields 1.1.0 added, for results of older versions."""
    if version == "1.1.0":
        return dict(entry)
    return {k: v for k, v in entry.items() if k not in fields}


def _shaped_ip(entry: Mapping[str, Any], version: str) -> dict[str, Any]:
    """An IP entry as ``version`` writes it: ``"version": "4"`` or ``"6"``
    first before 1.0.0, no such field from 1.0.0 on."""
    rest = {k: v for k, v in entry.items() if k != "version"}
    if _version_key(version) >= (1, 0, 0):
        return rest
    family = ipaddress.ip_interface(str(entry["address"])).version
    return {"version": str(family), **rest}


_Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class _PrevResult:
    """A ``prevResult`` (of any spec version ciliate speaks), checked: lists of
    objects, addresses in CIDR notation, interface indexes that exist."""

    interfaces: tuple[dict[str, Any], ...]
    ips: tuple[dict[str, Any], ...]
    routes: tuple[dict[str, Any], ...]
    dns: dict[str, Any]

    @classmethod
    def parse(cls, prev: object) -> _PrevResult:
        if not isinstance(prev, dict):
            raise _CniError(
                CODE_INVALID_NETCONF, f"prevResult must be a JSON object, not {_show(prev)}"
            )
        interfaces = _objects(prev, "interfaces")
        for i, entry in enumerate(interfaces):
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise _CniError(
                    CODE_INVALID_NETCONF,
                    f"prevResult.interfaces[{i}].name must be a string, not {_show(name)}",
                )
            for key in ("mac", "sandbox"):
                if not isinstance(entry.get(key, ""), str):
                    raise _CniError(
                        CODE_INVALID_NETCONF,
                        f"prevResult.interfaces[{i}].{key} must be a string, "
                        f"not {_show(entry[key])}",
                    )
        ips = _objects(prev, "ips")
        for i, entry in enumerate(ips):
            _address(entry.get("address"), f"prevResult.ips[{i}].address")
            index = entry.get("interface")
            if index is not None and (
                isinstance(index, bool)
                or not isinstance(index, int)
                or not 0 <= index < len(interfaces)
            ):
                raise _CniError(
                    CODE_INVALID_NETCONF,
                    f"prevResult.ips[{i}].interface must index prevResult.interfaces "
                    f"(0 to {len(interfaces) - 1}), not {_show(index)}",
                )
        routes = _objects(prev, "routes")
        for i, entry in enumerate(routes):
            _network(entry.get("dst"), f"prevResult.routes[{i}].dst")
            if "gw" in entry:
                _gateway(entry["gw"], f"prevResult.routes[{i}].gw")
        dns = prev.get("dns", {})
        if not isinstance(dns, dict):
            raise _CniError(
                CODE_INVALID_NETCONF, f"prevResult.dns must be a JSON object, not {_show(dns)}"
            )
        return cls(tuple(interfaces), tuple(ips), tuple(routes), dns)

    def differences(
        self, current: AddResult, *, pod: podnet.PodInterface | None, netns: str
    ) -> list[str]:
        """What differs between this prevResult and ciliate's endpoint: the agent's
        record (``current``) and the pod's interface as the kernel has it (``pod``,
        ``None`` when gone). Entries of other plugins are not looked at."""
        problems = []
        listed = {entry["name"]: (index, entry) for index, entry in enumerate(self.interfaces)}
        names = list(listed)
        pod_index = None
        for role, name, mac in (
            ("pod", current.pod_ifname, current.pod_mac),
            ("node-side", current.host_ifname, current.host_mac),
        ):
            if name not in listed:
                problems.append(
                    f"the {role} interface {name!r} is not among prevResult's interfaces {names}"
                )
                continue
            index, entry = listed[name]
            said = str(entry.get("mac", "")).lower()
            if said and said != mac.lower():
                problems.append(f"prevResult gives {name} the MAC {said}, the agent has {mac}")
            if role == "pod":
                pod_index = index
                sandbox = entry.get("sandbox")
                if sandbox and sandbox != netns:
                    problems.append(f"prevResult puts {name} in {sandbox}, CNI_NETNS is {netns}")
        if pod is None:
            problems.append(f"{current.pod_ifname} is gone from {netns}")
        else:
            if pod.mac != current.pod_mac.lower():
                problems.append(
                    f"{pod.name} in {netns} has the MAC {pod.mac}, not {current.pod_mac}"
                )
            if not pod.up:
                problems.append(f"{pod.name} in {netns} is down")
        addresses = [_address(entry["address"], "") for entry in self.ips]
        if current.ip not in addresses:
            had = ", ".join(str(a) for a in addresses) or "no IP"
            problems.append(f"prevResult has {had}, the agent has {current.ip}")
        else:
            entry = self.ips[addresses.index(current.ip)]
            named = entry.get("interface")
            if named is not None and pod_index is not None and named != pod_index:
                problems.append(
                    f"prevResult gives {current.ip} to interface {named} "
                    f"({self.interfaces[named]['name']}), not {current.pod_ifname}"
                )
            if pod is not None and current.ip not in pod.addresses:
                have = ", ".join(sorted(map(str, pod.addresses))) or "none"
                problems.append(f"{pod.name} in {netns} lacks {current.ip} (it has {have})")
        # ciliate's routes that prevResult lists must be in the pod; routes a later
        # plugin added or replaced are its own business (the spec allows it).
        ours = {dst for dst, _ in current.routes}
        for i, entry in enumerate(self.routes):
            dst = _network(entry["dst"], "")
            if dst not in ours or pod is None:
                continue
            gateway = _gateway(entry["gw"], "") if "gw" in entry else None
            present = any(
                have_dst == dst and (gateway is None or have_gw == gateway)
                for have_dst, have_gw in pod.routes
            )
            if not present:
                via = f" via {gateway}" if gateway is not None else ""
                problems.append(
                    f"the route to {dst}{via} (prevResult.routes[{i}]) is missing from "
                    f"{pod.name} in {netns}"
                )
        return problems


def _objects(prev: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    value = prev.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"prevResult.{name} must be a list of JSON objects, not {_show(value)}",
        )
    return value


def _address(value: object, where: str) -> _Address:
    try:
        if not isinstance(value, str) or "/" not in value:
            raise ValueError(value)
        return ipaddress.ip_interface(value)
    except ValueError:
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"{where} must be an address in CIDR notation, not {_show(value)}",
        ) from None


def _network(value: object, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _CniError(
            CODE_INVALID_NETCONF, f"{where} must be a network in CIDR notation, not {_show(value)}"
        ) from None


def _gateway(value: object, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return ipaddress.ip_address(value)
    except ValueError:
        raise _CniError(
            CODE_INVALID_NETCONF, f"{where} must be an IP address, not {_show(value)}"
        ) from None


def _pod_has_interface(netns: str, ifname: str) -> bool:
    try:
        return podnet.has_interface(netns, ifname)
    except podnet.PodNetError as exc:
        raise InvalidNetnsError(f"CNI_NETNS {netns!r}: {exc}") from None


def _has_endpoint(service: EndpointService, *, container_id: str, ifname: str, netns: str) -> bool:
    """Whether the agent has an endpoint for the attachment (intact or not)."""
    try:
        service.check(container_id=container_id, ifname=ifname, netns=netns)
    except UnknownContainerError:
        return False
    except CheckFailedError:
        return True
    return True


def _read_pod_interface(netns: str, ifname: str) -> podnet.PodInterface | None:
    try:
        return podnet.read_interface(netns, ifname)
    except podnet.PodNetError as exc:
        raise InvalidNetnsError(f"CNI_NETNS {netns!r}: {exc}") from None


def _error(version: str, code: int, message: str, details: str = "") -> CniResponse:
    body: dict[str, Any] = {"cniVersion": version, "code": code, "msg": message}
    if details:
        body["details"] = details
    return CniResponse(1, _dump(body))


def _dump(document: Mapping[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False) + "\n"


def _show(value: object) -> str:
    """A netconf value as the user wrote it (JSON), shortened for a message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    except RecursionError:
        text = "<nested too deeply to show>"
    return text if len(text) <= 80 else text[:77] + "..."


# -- validation -------------------------------------------------------------


def _parse_netconf(stdin: bytes) -> dict[str, Any]:
    try:
        netconf = json.loads(stdin.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _CniError(
            CODE_DECODING, f"the netconf on stdin is not UTF-8 (byte {exc.start})"
        ) from None
    except json.JSONDecodeError as exc:
        raise _CniError(
            CODE_DECODING,
            f"the netconf on stdin is not valid JSON: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})",
        ) from None
    except RecursionError:
        raise _CniError(
            CODE_DECODING,
            "the netconf on stdin nests arrays or objects too deeply to decode; a netconf "
            "needs a few levels",
        ) from None
    if not isinstance(netconf, dict):
        raise _CniError(
            CODE_DECODING,
            f"the netconf on stdin must be a JSON object, not {type(netconf).__name__}",
        )
    return netconf


def _check_env(env: Mapping[str, str], command: str) -> None:
    missing = [name for name in _REQUIRED_ENV[command] if not env.get(name)]
    if missing:
        raise _CniError(
            CODE_INVALID_ENV,
            f"{command} needs {', '.join(missing)}; the runtime did not set "
            + ("it" if len(missing) == 1 else "them"),
        )


def _check_version(netconf: Mapping[str, Any], command: str) -> str:
    supported = ", ".join(SUPPORTED_VERSIONS)
    version = netconf.get("cniVersion")
    if version is None or version == "":
        # libcni reads a missing cniVersion as 0.1.0, which ciliate does not speak.
        raise _CniError(
            CODE_INCOMPATIBLE_VERSION,
            f"incompatible CNI version: the netconf has no cniVersion; set it to one of "
            f"{supported}",
        )
    if not isinstance(version, str):
        # libcni cannot decode it either (code 6: "failed to decode version info").
        raise _CniError(
            CODE_DECODING,
            f'the netconf\'s cniVersion must be a string such as "{LATEST_VERSION}", '
            f"not {_show(version)}",
        )
    if version not in SUPPORTED_VERSIONS:
        raise _CniError(
            CODE_INCOMPATIBLE_VERSION,
            f"incompatible CNI version: the netconf's cniVersion is {_show(version)}; ciliate "
            f"supports {supported}",
        )
    since = _SINCE.get(command)
    if since is not None and _version_key(version) < _version_key(since):
        raise _CniError(
            CODE_INCOMPATIBLE_VERSION,
            f"incompatible CNI version: cniVersion {version} does not have {command} "
            f"(it came with {since}); raise the netconf's cniVersion",
        )
    return version


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _check_netconf(netconf: Mapping[str, Any]) -> None:
    name = netconf.get("name")
    if not isinstance(name, str) or not name:
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"the netconf needs a network name: 'name' is {_show(name)}",
        )
    if not _NAME.fullmatch(name):
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"the network name {_show(name)} may only hold letters, digits, '_', '.' and '-', "
            "starting with a letter or digit",
        )
    plugin_type = netconf.get("type")
    if not isinstance(plugin_type, str) or not plugin_type:
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"the netconf needs the plugin type: 'type' is {_show(plugin_type)} "
            '(expected "ciliate-cni")',
        )
    socket = netconf.get("agentSocket")
    if socket is not None and (not isinstance(socket, str) or not socket):
        raise _CniError(
            CODE_INVALID_NETCONF, f"agentSocket must be a socket path, not {_show(socket)}"
        )


def _attachment(env: Mapping[str, str]) -> tuple[str, str]:
    container_id, ifname = env["CNI_CONTAINERID"], env["CNI_IFNAME"]
    if not _NAME.fullmatch(container_id):
        raise _CniError(
            CODE_INVALID_ENV,
            f"CNI_CONTAINERID {container_id!r} has invalid characters: it may only hold "
            "letters, digits, '_', '.' and '-', starting with a letter or digit",
        )
    # The kernel's rules (dev_valid_name), plus '%' (a name template the
    # kernel would fill in: "eth%d" becomes eth0) and the names of the
    # sysctl directories it refuses.
    if (
        not ifname.isprintable()  # also rules out lone surrogates, which have no UTF-8
        or len(ifname.encode()) > _IFNAME_MAX
        or ifname in (".", "..", *devices.RESERVED_IFNAMES)
        or any(c in "/:%" or c.isspace() for c in ifname)
    ):
        raise _CniError(
            CODE_INVALID_ENV,
            f"CNI_IFNAME {ifname!r} is not a valid interface name: at most {_IFNAME_MAX} "
            "bytes in UTF-8, not '.', '..', 'all' or 'default', without '/', ':', '%', "
            "whitespace or control characters",
        )
    return container_id, ifname


def _check_netns(path: str) -> str:
    """CNI_NETNS must name a network namespace other than the agent's own."""
    try:
        devices.check_pod_netns(path)
    except devices.NetnsError as exc:
        raise InvalidNetnsError(f"CNI_NETNS {path!r} {exc}") from None
    return path


def _labels(cni_args: str, netconf: Mapping[str, Any]) -> dict[str, str]:
    netconf_labels = _netconf_labels(netconf)
    try:
        return identity.labels_from_cni(cni_args=cni_args, netconf_labels=netconf_labels)
    except identity.IdentityLabelsError as exc:
        # Which input is wrong decides the code: CNI_ARGS is environment (4),
        # args.cni.labels is netconf (7).
        try:
            identity.labels_from_cni(cni_args=cni_args, netconf_labels=None)
        except identity.IdentityLabelsError:
            message = str(exc)
            if not message.startswith("CNI_ARGS"):
                message = f"CNI_ARGS: {message}"
            raise _CniError(CODE_INVALID_ENV, message) from None
        raise _CniError(CODE_INVALID_NETCONF, f"args.cni.labels: {exc}") from None


def _netconf_labels(netconf: Mapping[str, Any]) -> dict[str, str] | None:
    args = netconf.get("args")
    if args is None:
        return None
    if not isinstance(args, dict):
        raise _CniError(CODE_INVALID_NETCONF, f"args must be a JSON object, not {_show(args)}")
    cni = args.get("cni")
    if cni is None:
        return None
    if not isinstance(cni, dict):
        raise _CniError(CODE_INVALID_NETCONF, f"args.cni must be a JSON object, not {_show(cni)}")
    labels = cni.get("labels")
    if labels is None:
        return None
    if isinstance(labels, list):
        return _labels_list(labels)
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise _CniError(
            CODE_INVALID_NETCONF,
            'args.cni.labels must be a list of {"key": ..., "value": ...} objects (the CNI '
            "conventions) or an object mapping label names to strings, "
            f"not {_show(labels)}",
        )
    return labels


def _labels_list(labels: list[Any]) -> dict[str, str]:
    """``args.cni.labels`` as CONVENTIONS.md writes it: ``[{"key": "app", "value":
    "web"}, ...]``; a key given twice is refused (which one would count?)."""
    out: dict[str, str] = {}
    for i, entry in enumerate(labels):
        key = entry.get("key") if isinstance(entry, dict) else None
        value = entry.get("value") if isinstance(entry, dict) else None
        if not isinstance(key, str) or not isinstance(value, str):
            raise _CniError(
                CODE_INVALID_NETCONF,
                f'args.cni.labels[{i}] must be {{"key": "<name>", "value": "<string>"}}, '
                f"not {_show(entry)}",
            )
        if key in out:
            raise _CniError(
                CODE_INVALID_NETCONF, f"args.cni.labels[{i}]: the label {key!r} is given twice"
            )
        out[key] = value
    return out


def _mtu(netconf: Mapping[str, Any]) -> int | None:
    mtu = netconf.get("mtu")
    if mtu is None:
        return None
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MTU_MIN <= mtu <= MTU_MAX:
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"mtu must be an integer from {MTU_MIN} to {MTU_MAX}, not {_show(mtu)}",
        )
    return mtu


def _egress_rate(netconf: Mapping[str, Any]) -> int | None:
    """``runtimeConfig.bandwidth.egressRate`` (the ``bandwidth`` capability,
    CONVENTIONS.md: bits per second; 0 or absent: no limit), shape checked
    here, its bounds by the agent. ``egressBurst`` has no meaning for ciliate's
    pacing (departure times, no token bucket); ingress limits are not
    enforced by ciliate (as in Cilium's bandwidth manager)."""
    runtime_config = netconf.get("runtimeConfig")
    if not isinstance(runtime_config, dict) or runtime_config.get("bandwidth") is None:
        return None  # a runtimeConfig that is not an object: _port_mappings says so
    bandwidth = runtime_config["bandwidth"]
    if not isinstance(bandwidth, dict):
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"runtimeConfig.bandwidth must be an object, not {_show(bandwidth)}",
        )
    rate = bandwidth.get("egressRate")
    if rate is None or rate == 0:
        return None
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
        raise _CniError(
            CODE_INVALID_NETCONF,
            "runtimeConfig.bandwidth.egressRate must be a non-negative integer (bits per "
            f"second), not {_show(rate)}",
        )
    return rate


def _port_mappings(netconf: Mapping[str, Any]) -> tuple[PortMapping, ...]:
    """``runtimeConfig.portMappings`` (the ``portMappings`` capability, CONVENTIONS.md:
    ``hostPort``, ``containerPort``, ``protocol``, ``hostIP``), shape checked here;
    what the agent can serve (TCP and UDP, IPv4) it checks itself."""
    runtime_config = netconf.get("runtimeConfig")
    if runtime_config is None:
        return ()
    if not isinstance(runtime_config, dict):
        raise _CniError(
            CODE_INVALID_NETCONF, f"runtimeConfig must be an object, not {_show(runtime_config)}"
        )
    entries = runtime_config.get("portMappings")
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"runtimeConfig.portMappings must be a list, not {_show(entries)}",
        )
    mappings = []
    for i, entry in enumerate(entries):
        where = f"runtimeConfig.portMappings[{i}]"
        if not isinstance(entry, dict):
            raise _CniError(CODE_INVALID_NETCONF, f"{where} must be an object, not {_show(entry)}")
        ports = []
        for name in ("hostPort", "containerPort"):
            port = entry.get(name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
                raise _CniError(
                    CODE_INVALID_NETCONF,
                    f"{where}.{name} must be an integer from 1 to 65535, not {_show(port)}",
                )
            ports.append(port)
        texts = []
        for name in ("protocol", "hostIP"):
            value = entry.get(name, "")
            if not isinstance(value, str):
                raise _CniError(
                    CODE_INVALID_NETCONF, f"{where}.{name} must be a string, not {_show(value)}"
                )
            texts.append(value)
        mappings.append(PortMapping(ports[0], ports[1], protocol=texts[0], host_ip=texts[1]))
    return tuple(mappings)


def _attributes(cni_args: str) -> dict[str, str]:
    # labels_from_cni has already checked the syntax.
    attributes = {}
    for pair in cni_args.split(";"):
        key, _, value = pair.partition("=")
        if key.strip() in _ATTRIBUTE_KEYS:
            attributes[key.strip()] = value
    return attributes


def _valid_attachments(netconf: Mapping[str, Any]) -> set[tuple[str, str]]:
    key = _VALID_ATTACHMENTS if _VALID_ATTACHMENTS in netconf else _VALID_ATTACHMENTS_DRAFT
    attachments = netconf.get(key)
    if attachments is None:
        # An absent list is not an empty one: GC would remove every endpoint.
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"GC needs {_VALID_ATTACHMENTS} in the netconf (the attachments to keep)",
        )
    if not isinstance(attachments, list):
        raise _CniError(CODE_INVALID_NETCONF, f"{key} must be a list")
    valid = set()
    for i, entry in enumerate(attachments):
        container_id = entry.get("containerID") if isinstance(entry, dict) else None
        ifname = entry.get("ifname") if isinstance(entry, dict) else None
        if not isinstance(container_id, str) or not isinstance(ifname, str):
            raise _CniError(
                CODE_INVALID_NETCONF,
                f"{key}[{i}] must be an object with string containerID and ifname, "
                f"not {_show(entry)}",
            )
        valid.add((container_id, ifname))
    return valid


# -- the shim's HTTP contract -----------------------------------------------


def decode_request(body: bytes) -> tuple[dict[str, str], bytes]:
    """The ``CNI_*`` variables and stdin from the body of ``POST /v1/cni``:
    ``{"env": {name: value}, "stdin": "<netconf>"}``. Raises ``ValueError``
    (answer 400) when the body is not that."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("the body nests too deeply to decode") from None
    if not isinstance(document, dict):
        raise ValueError("the body must be a JSON object")
    env, stdin = document.get("env"), document.get("stdin")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError('"env" must map variable names to strings')
    if not isinstance(stdin, str):
        raise ValueError('"stdin" must be a string')
    try:
        return env, stdin.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError('"stdin" holds a lone surrogate') from None


# -- the DEL queue ----------------------------------------------------------


def read_del_queue(directory: str | os.PathLike[str]) -> list[QueuedDel]:
    """The DELs the shim queued while the agent was unreachable, oldest first.

    Each is the request body the shim would have sent (``env``, ``stdin``)
    plus the ``path`` of its file, to hand to :func:`remove_from_queue` once
    replayed (``handle(q["env"], q["stdin"].encode(), service)``). A missing
    directory is an empty queue. Files that do not hold such a body are
    skipped with a warning and left in place for inspection.
    """
    directory = Path(directory)
    try:
        entries = [p for p in directory.iterdir() if p.suffix == ".json" and p.name[0] != "."]
    except FileNotFoundError:
        return []
    queued: list[tuple[int, str, QueuedDel]] = []
    for path in entries:
        try:
            mtime = path.stat().st_mtime_ns
            env, stdin = decode_request(path.read_bytes())
        except FileNotFoundError:
            continue  # replayed and removed meanwhile
        except (OSError, ValueError) as exc:
            log.warning("skipping DEL queue file %s: %s", path, exc)
            continue
        queued.append((mtime, path.name, QueuedDel(path=str(path), env=env, stdin=stdin.decode())))
    queued.sort(key=lambda item: (item[0], item[1]))
    return [entry for _, _, entry in queued]


def remove_from_queue(path: str | os.PathLike[str]) -> None:
    """Drop a replayed DEL from the queue; already gone is fine."""
    Path(path).unlink(missing_ok=True)
