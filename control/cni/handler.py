"""The CNI protocol, spoken inside the agent.

The runtime executes ``ciliate-cni`` (a C relay, ``control/cni/shim``), which
posts the invocation (the ``CNI_*`` variables and the netconf from stdin) to
the agent; the agent calls :func:`handle` and sends back what the plugin
prints and its exit status. Everything the CNI specification asks of a
plugin happens here: validation of the environment and the netconf, the spec
versions (0.3.1, 0.4.0, 1.0.0, 1.1.0), the result format of each version and
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
      ``CNI_IFNAME`` not a name the kernel takes, ``CNI_ARGS``); a second
      ``CNI_IFNAME`` for a container that has a ciliate interface already
6     the netconf is not JSON (not UTF-8, not an object, nested too deeply)
7     the netconf is invalid (``name``, ``type``, ``mtu``,
      ``args.cni.labels``, a ``prevResult`` on ADD, none on CHECK,
      malformed ``cni.dev/valid-attachments``)
11    try again later: the agent's state store is busy, full, read-only or
      unreachable (nothing was changed); the node's pod IPs or identities
      are used up; the agent is not reachable (answered by the ``ciliate-cni``
      relay itself, which queues a DEL to replay later)
50    STATUS while the agent is still restoring its endpoints (the relay
      also answers 50 to STATUS when the agent is not reachable)
100   the kernel refused a device step (veth, address, route), e.g. the
      pod's namespace has a link of that name; ADD was rolled back
101   a BPF map write or program attachment failed; ADD was rolled back
999   a bug: an exception nothing above describes, with its text (the
      traceback goes to the agent's log, never to the runtime); CHECK of a
      damaged endpoint
====  =====================================================================

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

from .service import (
    AddRequest,
    AddResult,
    CheckFailedError,
    EndpointService,
    InvalidNetnsError,
    ServiceError,
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

SUPPORTED_VERSIONS = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")

# The variables each command cannot do without. CNI_PATH is not among them:
# ciliate delegates to no other plugin.
_REQUIRED_ENV: Mapping[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),  # the netns may be gone already
    "GC": (),
    "STATUS": (),
}
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
        netconf = _parse_netconf(stdin)
        given = netconf.get("cniVersion")
        if isinstance(given, str) and given in SUPPORTED_VERSIONS:
            version = given
        _check_env(env, command)
        version = _check_version(netconf, command)
        _check_netconf(netconf)
        return _COMMAND_HANDLERS[command](env, netconf, version, service)
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
    if "prevResult" in netconf:
        raise _CniError(
            CODE_INVALID_NETCONF,
            "ciliate must be the first plugin in the chain",
            details="the ADD netconf has a prevResult: move ciliate-cni to the top of the "
            "conflist's plugins",
        )
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
    )
    result = service.add(request)
    return CniResponse(0, _dump(format_result(result, version)))


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
    current = service.check(container_id=container_id, ifname=ifname, netns=netns)
    problems = expected.differences(current)
    if problems:
        raise CheckFailedError(
            f"the endpoint of {container_id}/{ifname} differs from prevResult: "
            + "; ".join(problems)
        )
    return CniResponse(0, "")


def _gc(
    env: Mapping[str, str], netconf: dict[str, Any], version: str, service: EndpointService
) -> CniResponse:
    service.gc(valid=_valid_attachments(netconf))
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
    """VERSION: the versions ciliate speaks, in the format of the version asked
    for (the latest when stdin names none ciliate knows)."""
    version = LATEST_VERSION
    try:
        given = json.loads(stdin).get("cniVersion") if stdin.strip() else None
    except (ValueError, AttributeError, RecursionError):
        given = None
    if isinstance(given, str) and given in SUPPORTED_VERSIONS:
        version = given
    return CniResponse(
        0, _dump({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})
    )


# -- results ----------------------------------------------------------------


def format_result(result: AddResult, version: str) -> dict[str, Any]:
    """The ADD result in the format of spec ``version``.

    Interface 0 is the node-side veth, interface 1 the pod's (with its
    sandbox); the IP belongs to interface 1. Before 1.0.0 each IP carries
    ``"version": "4"``; from 1.1.0 interfaces carry their MTU.
    """
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
        "interface": 1,
    }
    if version in ("0.3.1", "0.4.0"):
        ip = {"version": "4", **ip}
    routes = [
        {"dst": str(dst)} if gw is None else {"dst": str(dst), "gw": str(gw)}
        for dst, gw in result.routes
    ]
    return {
        "cniVersion": version,
        "interfaces": [host, pod],
        "ips": [ip],
        "routes": routes,
        "dns": {},
    }


@dataclass(frozen=True)
class _PrevResult:
    """What CHECK compares: the addresses and interface names of a prevResult."""

    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]
    interface_names: tuple[str, ...]

    @classmethod
    def parse(cls, prev: object) -> _PrevResult:
        if not isinstance(prev, dict):
            raise _CniError(CODE_INVALID_NETCONF, "prevResult must be a JSON object")
        addresses = []
        for i, entry in enumerate(_list_field(prev, "ips")):
            address = entry.get("address") if isinstance(entry, dict) else None
            try:
                addresses.append(ipaddress.ip_interface(str(address)))
            except ValueError:
                raise _CniError(
                    CODE_INVALID_NETCONF,
                    f"prevResult.ips[{i}].address must be an address in CIDR notation, "
                    f"not {_show(address)}",
                ) from None
        names = []
        for i, entry in enumerate(_list_field(prev, "interfaces")):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise _CniError(
                    CODE_INVALID_NETCONF,
                    f"prevResult.interfaces[{i}].name must be a string, not {_show(name)}",
                )
            names.append(name)
        return cls(addresses=tuple(addresses), interface_names=tuple(names))

    def differences(self, current: AddResult) -> list[str]:
        problems = []
        if current.ip not in self.addresses:
            had = ", ".join(str(a) for a in self.addresses) or "no IP"
            problems.append(f"prevResult has {had}, the agent has {current.ip}")
        for role, name in (("pod", current.pod_ifname), ("node-side", current.host_ifname)):
            if name not in self.interface_names:
                problems.append(
                    f"the {role} interface {name!r} is not among prevResult's interfaces "
                    f"{list(self.interface_names)}"
                )
        return problems


def _list_field(prev: dict[str, Any], name: str) -> list[Any]:
    value = prev.get(name, [])
    if not isinstance(value, list):
        raise _CniError(CODE_INVALID_NETCONF, f"prevResult.{name} must be a list")
    return value


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
        raise _CniError(
            CODE_INCOMPATIBLE_VERSION,
            f"incompatible CNI version: the netconf has no cniVersion; set it to one of "
            f"{supported}",
        )
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
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
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise _CniError(
            CODE_INVALID_NETCONF,
            f"args.cni.labels must map label names to strings, not {_show(labels)}",
        )
    return labels


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
