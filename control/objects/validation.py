"""Validation and defaulting of objects, as the Kubernetes API server does it.

``validate(raw)`` returns the object as it will be stored (defaults applied:
``policyTypes``, port protocols, the namespace's ``kubernetes.io/metadata.name``
label, its ``kubernetes`` finalizer and ``Active`` phase, ``metadata.namespace:
default``), or raises :class:`~ciliate.control.objects.errors.ObjectInvalidError`
naming every field at fault with its path (``spec.ingress[0].ports[1].port``), one
error per message the API server gives, in its words. The upstream cases these
checks follow are ported in ``tests/objects/test_upstream_*.py``.

Metadata as ``ValidateObjectMeta`` checks it, names per kind (Namespaces RFC 1123
labels, Services RFC 1035 labels, the rest RFC 1123 subdomains); a namespaced object
without a namespace goes to ``default`` (as kubectl fills it in), a cluster-scoped
object's namespace is cleared (as the API server clears it).

Policy specs are checked strictly (an unknown field is an error, as ``kubectl``'s
strict field validation reports it): a misspelt ``podSelecter`` would otherwise
silently open or close traffic. Pods and Namespaces keep fields ciliate does not
read (images, commands, ...) as they are.

CiliumNetworkPolicy is kept to L3/L4: L7 rules, FQDNs, services, groups, node
selectors and ICMP rules are refused by name, never ignored.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable
from typing import Any

from ciliate.control.objects.errors import FieldError, ObjectInvalidError
from ciliate.control.objects.fields import (
    CIDR_EXAMPLE,
    IP_EXAMPLE,
    PROTOCOLS,
    Errors,
    annotation_map,
    check_name,
    cidr_notation_ok,
    dns_label_problems,
    label_key_problems,
    label_map,
    label_value_problems,
    port_name_problems,
    protocol_of,
    qualified_name_problems,
)
from ciliate.control.objects.kinds import Kind, kind_for_document
from ciliate.control.objects.service_validation import validate_endpoint_slice, validate_service

__all__ = [
    "CILIUM_ENTITIES",
    "NAMESPACE_NAME_LABEL",
    "PROTOCOLS",
    "parse_cidr",
    "validate",
]

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
NAMESPACE_FINALIZER = "kubernetes"
CILIUM_PROTOCOLS = (*PROTOCOLS, "ANY")
# Cilium's entities (pkg/policy/api/entity.go); the engine maps each to identities.
CILIUM_ENTITIES = (
    "host",
    "remote-node",
    "kube-apiserver",
    "ingress",
    "cluster",
    "init",
    "health",
    "unmanaged",
    "world",
    "world-ipv4",
    "world-ipv6",
    "all",
    "none",
)
_CNP_MAX_PORTS = 40  # Cilium's maxPorts in one toPorts entry

MAX_OBJECT_BYTES = 1536 * 1024  # etcd's default --max-request-bytes, as the API server meets it
_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")

_NP_SPEC_FIELDS = {"podSelector", "policyTypes", "ingress", "egress"}
_SELECTOR_FIELDS = {"matchLabels", "matchExpressions"}
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_CNP_RULE_FIELDS = {
    "endpointSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "enableDefaultDeny",
}
_CNP_RULE_IGNORED = {"description", "labels"}
_CNP_UNSUPPORTED_RULE = {
    "nodeSelector": "node (host) policies",
}
_CNP_PEER = {
    "ingress": ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities"),
    "egress": ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities"),
}
_CNP_UNSUPPORTED_PEER = {
    "fromRequires": "fromRequires",
    "toRequires": "toRequires",
    "fromGroups": "fromGroups (cloud groups)",
    "toGroups": "toGroups (cloud groups)",
    "fromNodes": "fromNodes",
    "toNodes": "toNodes",
    "toServices": "toServices",
    "toFQDNs": "toFQDNs (DNS-based policy)",
    "icmps": "icmps (ICMP rules)",
    "authentication": "mutual authentication",
}
_CNP_PORT_RULE_UNSUPPORTED = {
    "rules": "L7 rules (ciliate enforces L3/L4 only)",
    "terminatingTLS": "TLS interception",
    "originatingTLS": "TLS interception",
    "serverNames": "serverNames (TLS SNI)",
    "listener": "Envoy listeners",
}


def validate(raw: object) -> dict[str, Any]:
    """The object as stored, or :class:`ObjectInvalidError` naming each bad field."""
    if not isinstance(raw, dict):
        raise ObjectInvalidError(
            kind="Object",
            name="",
            errors=[FieldError("<document>", "Invalid value", "must be an object", raw)],
        )
    kind = kind_for_document(kind=raw.get("kind"), api_version=raw.get("apiVersion"))
    raw = copy.deepcopy(raw)  # defaults are filled in place; the caller's document stays
    errs = Errors()
    metadata = _metadata(errs, kind, raw.get("metadata"))
    obj: dict[str, Any] = {
        key: value for key, value in raw.items() if key not in ("apiVersion", "kind", "metadata")
    }
    obj = {"apiVersion": kind.api_version, "kind": kind.name, "metadata": metadata, **obj}
    _VALIDATORS[kind.name](errs, obj)
    if not errs.items and (size := len(json.dumps(obj, default=str))) > MAX_OBJECT_BYTES:
        errs.items.append(
            FieldError(
                "<object>",
                "Too long",
                f"the object is {size} bytes as JSON; objects are kept up to"
                f" {MAX_OBJECT_BYTES} bytes (etcd's request limit)",
            )
        )
    if errs.items:
        raise ObjectInvalidError(
            kind=f"{kind.name}.{kind.group}" if kind.group else kind.name,
            name=str(metadata.get("name", "")),
            errors=errs.items,
        )
    return obj


_GENERATE_NAME_REFUSED = (
    "apply cannot use generateName (each apply would create another object, which is why"
    " kubectl apply refuses it too): set metadata.name"
)


_GENERATE_NAME_REFUSED = (
    "apply cannot use generateName (each apply would create another object, which is why"
    " kubectl apply refuses it too): set metadata.name"
)


def validate_update(obj: dict[str, Any], current: dict[str, Any]) -> None:
    """The rules an update adds to those of a create (``Validate*Update``): fields that
    may not change once stored. ``obj`` is validated, ``current`` the stored object."""
    if obj["kind"] == "EndpointSlice" and obj.get("addressType") != current.get("addressType"):
        raise ObjectInvalidError(
            kind="EndpointSlice.discovery.k8s.io",
            name=str(obj["metadata"]["name"]),
            errors=[
                FieldError("addressType", "Invalid value", "field is immutable", obj["addressType"])
            ],
        )


def _metadata(errs: Errors, kind: Kind, raw: object) -> dict[str, Any]:
    """``ValidateObjectMeta`` with the kind's name rule, and the namespace as kubectl
    and the API server settle it: a namespaced object without one goes to ``default``;
    a cluster-scoped object's namespace is cleared (the API server's
    ``EnsureObjectNamespaceMatchesRequestNamespace``), never an error."""
    meta = dict(errs.mapping("metadata", raw, required=True))
    for field in _SERVER_FIELDS:
        meta.pop(field, None)  # set by the store, never by the client
    is_namespace = kind.name == "Namespace"
    is_service = kind.name == "Service"
    generate_name = errs.string("metadata.generateName", meta.get("generateName"))
    if generate_name:
        # Checked as a prefix: a trailing '-' is fine (the random suffix follows it).
        prefix = generate_name[:-1] if generate_name.endswith("-") else generate_name
        if prefix:
            before = len(errs.items)
            check_name(
                errs, "metadata.generateName", prefix, dns_label=is_namespace, rfc1035=is_service
            )
            for i in range(before, len(errs.items)):
                item = errs.items[i]
                errs.items[i] = FieldError(item.path, item.kind, item.detail, generate_name)
    name = errs.string("metadata.name", meta.get("name"))
    if name is None or name == "":
        if generate_name:
            errs.invalid("metadata.generateName", generate_name, _GENERATE_NAME_REFUSED)
        else:
            errs.required("metadata.name", "name or generateName is required")
        name = None
    else:
        check_name(errs, "metadata.name", name, dns_label=is_namespace, rfc1035=is_service)
    if kind.namespaced:
        namespace = errs.string("metadata.namespace", meta.get("namespace")) or "default"
        check_name(errs, "metadata.namespace", namespace, dns_label=True)
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    labels = label_map(errs, "metadata.labels", meta.get("labels"))
    if is_namespace and name is not None:
        labels[NAMESPACE_NAME_LABEL] = name  # always set, as Kubernetes does
    meta["labels"] = labels
    annotations = annotation_map(errs, "metadata.annotations", meta.get("annotations"))
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    _finalizers(errs, meta.get("finalizers"))
    return meta


# Finalizers the API server knows without a domain prefix.
_STANDARD_FINALIZERS = ("kubernetes", "orphan", "foregroundDeletion")


def _finalizers(errs: Errors, raw: object) -> None:
    """``ValidateFinalizers``: qualified names, unprefixed ones only the standard ones,
    and never both ``orphan`` and ``foregroundDeletion`` (errors name the list)."""
    path = "metadata.finalizers"
    names = [
        name
        for i, item in enumerate(errs.sequence(path, raw))
        if (name := errs.string(f"{path}[{i}]", item)) is not None
    ]
    for name in names:
        if not errs.invalid_each(path, name, qualified_name_problems(name)) and (
            "/" not in name and name not in _STANDARD_FINALIZERS
        ):
            errs.invalid(
                path, name, "name is neither a standard finalizer name nor is it fully qualified"
            )
    if "orphan" in names and "foregroundDeletion" in names:
        errs.invalid(path, names, "finalizer orphan and foregroundDeletion cannot be both set")


def _selector(errs: Errors, path: str, raw: object, *, cilium: bool = False) -> dict[str, Any]:
    sel = errs.mapping(path, raw)
    errs.unknown_fields(path, sel, _SELECTOR_FIELDS)
    out: dict[str, Any] = {}
    match_labels = label_map(errs, f"{path}.matchLabels", sel.get("matchLabels"), cilium=cilium)
    if match_labels:
        out["matchLabels"] = match_labels
    expressions = []
    for i, expr in enumerate(
        errs.sequence(f"{path}.matchExpressions", sel.get("matchExpressions"))
    ):
        at = f"{path}.matchExpressions[{i}]"
        expr = errs.mapping(at, expr)
        errs.unknown_fields(at, expr, {"key", "operator", "values"})
        key = errs.string(f"{at}.key", expr.get("key"), required=True)
        if key is not None:
            errs.invalid_each(f"{at}.key", key, label_key_problems(key, cilium=cilium))
        operator = errs.string(f"{at}.operator", expr.get("operator"), required=True)
        values = []
        for j, v in enumerate(errs.sequence(f"{at}.values", expr.get("values"))):
            if (text := errs.string(f"{at}.values[{j}]", v)) is None:
                continue
            # ValidateLabelSelectorRequirement checks values as label values on create.
            errs.invalid_each(f"{at}.values[{j}]", text, label_value_problems(text))
            values.append(text)
        if operator is not None and operator not in _SELECTOR_OPERATORS:
            errs.invalid(f"{at}.operator", operator, "not a valid selector operator")
        elif operator in ("In", "NotIn") and not values:
            errs.required(f"{at}.values", "must be specified when `operator` is 'In' or 'NotIn'")
        elif operator in ("Exists", "DoesNotExist") and values:
            errs.forbidden(
                f"{at}.values", "may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
            )
        expressions.append({"key": key, "operator": operator, "values": values})
    if expressions:
        out["matchExpressions"] = expressions
    return out


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR as the API server reads it: host bits may be set (``10.0.0.7/24``)."""
    return ipaddress.ip_network(text.strip(), strict=False)


def _cidr(errs: Errors, path: str, raw: object, *, bare_ip: bool = False) -> str | None:
    """A CIDR as ``IsValidCIDR`` reads it (no surrounding blanks); ``bare_ip`` also
    takes an address, as Cilium's ``fromCIDR``/``toCIDR`` do."""
    text = errs.string(path, raw)
    if text is None or text == "":
        errs.required(path, "")
        return None
    if not cidr_notation_ok(text, bare_ip=bare_ip):
        errs.invalid(path, text, CIDR_EXAMPLE)
        return None
    try:
        return str(parse_cidr(text))
    except ValueError:
        errs.invalid(path, text, CIDR_EXAMPLE)
        return None


def _cidr_with_except(
    errs: Errors, path: str, raw: object, *, cilium: bool = False
) -> dict[str, Any]:
    """An ``ipBlock`` (or Cilium ``CIDRRule``). Kubernetes wants each ``except`` a
    strict subset of ``cidr``; Cilium only that ``cidr`` contains it."""
    cidr_field = "cidr"
    block = errs.mapping(path, raw, required=True)
    errs.unknown_fields(
        path, block, {cidr_field, "except"} | ({"cidrGroupRef"} if cilium else set())
    )
    if cilium and "cidrGroupRef" in block:
        errs.forbidden(f"{path}.cidrGroupRef", "CiliumCIDRGroup references are not supported")
    cidr = _cidr(errs, f"{path}.{cidr_field}", block.get(cidr_field))
    excepts: list[str] = []
    for i, item in enumerate(errs.sequence(f"{path}.except", block.get("except"))):
        at = f"{path}.except[{i}]"
        text = errs.string(at, item)
        if text is None:
            continue
        if not cidr_notation_ok(text):
            errs.invalid(at, text, CIDR_EXAMPLE)
            continue
        try:
            inner = parse_cidr(text)
        except ValueError:
            errs.invalid(at, text, CIDR_EXAMPLE)
            continue
        if cidr is None:
            continue
        outer = parse_cidr(cidr)
        same_family = inner.version == outer.version
        contained = same_family and inner.subnet_of(outer)  # type: ignore[arg-type]
        if cilium and not contained:
            errs.invalid(
                at, item, f"allow CIDR prefix {cidr} does not contain exclude CIDR prefix {text}"
            )
            continue
        if not cilium and (not contained or inner.prefixlen <= outer.prefixlen):
            errs.invalid(at, item, f"must be a strict subset of `{cidr_field}`")
            continue
        excepts.append(str(inner))
    out: dict[str, Any] = {cidr_field: cidr}
    if excepts:
        out["except"] = excepts
    return out


def _validate_namespace(errs: Errors, obj: dict[str, Any]) -> None:
    """``ValidateNamespace``: the name (an RFC 1123 label, checked with the metadata)
    and ``spec.finalizers``, each a qualified name, and one without a ``/`` only the
    standard ``kubernetes``."""
    spec = errs.mapping("spec", obj.get("spec"))
    finalizers: list[str] = []
    for i, item in enumerate(errs.sequence("spec.finalizers", spec.get("finalizers"))):
        at = f"spec.finalizers[{i}]"
        if (name := errs.string(at, item)) is None:
            continue
        if errs.invalid_each(at, name, qualified_name_problems(name)):
            continue
        if "/" not in name and name != "kubernetes":
            errs.invalid(
                at, name, "name is neither a standard finalizer name nor is it fully qualified"
            )
        else:
            finalizers.append(name)
    # The namespace strategy's PrepareForCreate: the kubernetes finalizer is always
    # there, and a new namespace is Active (an update keeps the stored ones: see store).
    if NAMESPACE_FINALIZER not in finalizers:
        finalizers.append(NAMESPACE_FINALIZER)
    obj["spec"] = {**spec, "finalizers": finalizers}
    obj["status"] = {"phase": "Active"}


def _validate_pod(errs: Errors, obj: dict[str, Any]) -> None:
    # spec is a struct, not a pointer: a Pod without one has no containers.
    spec = errs.mapping("spec", obj.get("spec"))
    containers = errs.sequence("spec.containers", spec.get("containers"))
    if not containers:
        errs.required("spec.containers")
    names: set[str] = set()
    for i, raw_container in enumerate(containers):
        at = f"spec.containers[{i}]"
        container = errs.mapping(at, raw_container)
        name = errs.string(f"{at}.name", container.get("name"), required=True)
        if name is not None:
            bad_name = errs.invalid_each(f"{at}.name", name, dns_label_problems(name))
            if not bad_name and name in names:
                errs.duplicate(f"{at}.name", name)
            names.add(name)
        port_names: set[str] = set()
        ports = []
        for j, raw_port in enumerate(errs.sequence(f"{at}.ports", container.get("ports"))):
            pat = f"{at}.ports[{j}]"
            port = dict(errs.mapping(pat, raw_port))
            number = errs.integer(f"{pat}.containerPort", port.get("containerPort"))
            if number == 0 or (number is None and "containerPort" not in port):
                errs.required(f"{pat}.containerPort")  # validateContainerPorts: 0 is unset
            elif number is not None and not 1 <= number <= 65535:
                errs.invalid(
                    f"{pat}.containerPort", number, "must be between 1 and 65535, inclusive"
                )
            host_port = errs.integer(f"{pat}.hostPort", port.get("hostPort"))
            if host_port and not 1 <= host_port <= 65535:
                errs.invalid(f"{pat}.hostPort", host_port, "must be between 1 and 65535, inclusive")
            # SetDefaults_ContainerPort: an empty protocol is TCP.
            port["protocol"] = protocol_of(
                errs,
                f"{pat}.protocol",
                port.get("protocol") or None,
                allowed=PROTOCOLS,
                default="TCP",
            )
            port_name = errs.string(f"{pat}.name", port.get("name"))
            if port_name:
                bad_name = errs.invalid_each(
                    f"{pat}.name", port_name, port_name_problems(port_name)
                )
                if not bad_name and port_name in port_names:
                    errs.duplicate(f"{pat}.name", port_name)
                port_names.add(port_name)
            ports.append(port)
        if ports:
            container = {**container, "ports": ports}
        if isinstance(raw_container, dict):
            containers[i] = container
    status = errs.mapping("status", obj.get("status"))
    if (ip := errs.string("status.podIP", status.get("podIP"))) is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            errs.invalid("status.podIP", ip, IP_EXAMPLE)


# -- NetworkPolicy -----------------------------------------------------------------


def _np_ports(errs: Errors, path: str, raw: object) -> list[dict[str, Any]]:
    ports = []
    for i, item in enumerate(errs.sequence(path, raw)):
        at = f"{path}[{i}]"
        port = errs.mapping(at, item)
        errs.unknown_fields(at, port, {"protocol", "port", "endPort"})
        out: dict[str, Any] = {
            "protocol": protocol_of(
                errs, f"{at}.protocol", port.get("protocol"), allowed=PROTOCOLS, default="TCP"
            )
        }
        value = port.get("port")
        if isinstance(value, bool) or (value is not None and not isinstance(value, int | str)):
            errs.invalid(f"{at}.port", value, "must be a port number or a port name")
        elif isinstance(value, int):
            if not 1 <= value <= 65535:
                errs.invalid(f"{at}.port", value, "must be between 1 and 65535, inclusive")
            out["port"] = value
        elif isinstance(value, str):
            errs.invalid_each(f"{at}.port", value, port_name_problems(value))
            out["port"] = value
        end = errs.integer(f"{at}.endPort", port.get("endPort"))
        if end is not None:
            # ValidateNetworkPolicyPort: every endPort problem is an Invalid value.
            if value is None:
                errs.invalid(
                    f"{at}.endPort", end, "may not be specified when `port` is not specified"
                )
            elif isinstance(value, str):
                errs.invalid(
                    f"{at}.endPort", end, "may not be specified when `port` is non-numeric"
                )
            elif isinstance(value, int):
                if end < value:
                    errs.invalid(f"{at}.endPort", value, "must be greater than or equal to `port`")
                if not 1 <= end <= 65535:
                    errs.invalid(f"{at}.endPort", end, "must be between 1 and 65535, inclusive")
            out["endPort"] = end
        ports.append(out)
    return ports


def _np_peers(errs: Errors, path: str, raw: object) -> list[dict[str, Any]]:
    peers = []
    for i, item in enumerate(errs.sequence(path, raw)):
        at = f"{path}[{i}]"
        peer = errs.mapping(at, item)
        errs.unknown_fields(at, peer, {"podSelector", "namespaceSelector", "ipBlock"})
        present = [
            k for k in ("podSelector", "namespaceSelector", "ipBlock") if peer.get(k) is not None
        ]
        if not present:
            errs.required(at, "must specify a peer")
        elif "ipBlock" in present and len(present) > 1:
            errs.forbidden(at, "may not specify both ipBlock and another peer")
        out: dict[str, Any] = {}
        for key in ("podSelector", "namespaceSelector"):
            if peer.get(key) is not None:
                out[key] = _selector(errs, f"{at}.{key}", peer[key])
        if peer.get("ipBlock") is not None:
            out["ipBlock"] = _cidr_with_except(errs, f"{at}.ipBlock", peer["ipBlock"])
        peers.append(out)
    return peers


def _validate_network_policy(errs: Errors, obj: dict[str, Any]) -> None:
    # No spec is the empty spec (it selects every pod for ingress), as upstream reads it.
    spec = errs.mapping("spec", obj.get("spec"))
    errs.unknown_fields("spec", spec, _NP_SPEC_FIELDS)
    out: dict[str, Any] = {
        "podSelector": _selector(errs, "spec.podSelector", spec.get("podSelector"))
    }
    ingress, egress = [], []
    for i, item in enumerate(errs.sequence("spec.ingress", spec.get("ingress"))):
        rule = errs.mapping(f"spec.ingress[{i}]", item)
        errs.unknown_fields(f"spec.ingress[{i}]", rule, {"from", "ports"})
        out_rule: dict[str, Any] = {}
        if rule.get("ports"):
            out_rule["ports"] = _np_ports(errs, f"spec.ingress[{i}].ports", rule["ports"])
        if rule.get("from"):
            out_rule["from"] = _np_peers(errs, f"spec.ingress[{i}].from", rule["from"])
        ingress.append(out_rule)
    for i, item in enumerate(errs.sequence("spec.egress", spec.get("egress"))):
        rule = errs.mapping(f"spec.egress[{i}]", item)
        errs.unknown_fields(f"spec.egress[{i}]", rule, {"to", "ports"})
        out_rule = {}
        if rule.get("ports"):
            out_rule["ports"] = _np_ports(errs, f"spec.egress[{i}].ports", rule["ports"])
        if rule.get("to"):
            out_rule["to"] = _np_peers(errs, f"spec.egress[{i}].to", rule["to"])
        egress.append(out_rule)
    raw_types = errs.sequence("spec.policyTypes", spec.get("policyTypes"))
    types: list[str] = []
    if len(raw_types) > 2:
        errs.invalid("spec.policyTypes", raw_types, "may not specify more than two policyTypes")
    else:
        for i, item in enumerate(raw_types):
            if item not in ("Ingress", "Egress"):
                errs.unsupported(f"spec.policyTypes[{i}]", item, ("Ingress", "Egress"))
            else:
                types.append(item)  # a repeated type is accepted and kept, as upstream
    if not raw_types:
        # The API server's defaulting: Ingress always, Egress when egress rules exist.
        types = ["Ingress", "Egress"] if egress else ["Ingress"]
    out["policyTypes"] = types
    # Absent and empty lists mean the same (deny all once isolated); keep them explicit.
    out["ingress"] = ingress
    out["egress"] = egress
    obj["spec"] = out


# -- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy ---------------------------


def _cnp_port(errs: Errors, path: str, raw: object) -> dict[str, Any]:
    port = errs.mapping(path, raw)
    errs.unknown_fields(path, port, {"port", "endPort", "protocol"})
    out: dict[str, Any] = {
        "protocol": protocol_of(
            errs, f"{path}.protocol", port.get("protocol"), allowed=CILIUM_PROTOCOLS, default="ANY"
        )
    }
    value = port.get("port")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or value == "":
        # The CRD's schema requires it, and Cilium's PortProtocol.Validate says so too.
        errs.required(f"{path}.port", 'port must be specified ("0" means every port)')
        value = "0"
    elif not isinstance(value, str):
        errs.invalid(f"{path}.port", value, "must be a port number or a port name")
        value = "0"
    if value.isdigit():
        number = int(value)
        if not 0 <= number <= 65535:
            errs.invalid(f"{path}.port", value, "must be between 0 and 65535, inclusive")
        out["port"] = str(number)
    else:
        named = value.lower()  # Cilium compares port names case-insensitively
        errs.invalid_each(f"{path}.port", value, port_name_problems(named))
        out["port"] = named
    end = errs.integer(f"{path}.endPort", port.get("endPort"))
    if end is not None:
        if not out["port"].isdigit():
            errs.forbidden(f"{path}.endPort", "may not be specified when `port` is a name")
        elif end < int(out["port"]) or end > 65535:
            errs.invalid(f"{path}.endPort", end, "must be between `port` and 65535, inclusive")
        out["endPort"] = end
    return out


def _cnp_to_ports(errs: Errors, path: str, raw: object) -> list[dict[str, Any]]:
    rules = []
    for i, item in enumerate(errs.sequence(path, raw)):
        at = f"{path}[{i}]"
        rule = errs.mapping(at, item)
        for key, what in _CNP_PORT_RULE_UNSUPPORTED.items():
            if key in rule:
                errs.forbidden(f"{at}.{key}", f"{what} are not supported by ciliate")
        errs.unknown_fields(at, rule, {"ports", *_CNP_PORT_RULE_UNSUPPORTED})
        raw_ports = errs.sequence(f"{at}.ports", rule.get("ports"))
        if len(raw_ports) > _CNP_MAX_PORTS:
            errs.invalid(
                f"{at}.ports", len(raw_ports), f"too many ports, the max is {_CNP_MAX_PORTS}"
            )
        ports = [_cnp_port(errs, f"{at}.ports[{j}]", p) for j, p in enumerate(raw_ports)]
        rules.append({"ports": ports})
    return rules


def _cnp_direction(errs: Errors, path: str, raw: object, *, direction: str) -> list[dict[str, Any]]:
    peers = _CNP_PEER[direction]
    rules = []
    for i, item in enumerate(errs.sequence(path, raw)):
        at = f"{path}[{i}]"
        rule = errs.mapping(at, item)
        for key, what in _CNP_UNSUPPORTED_PEER.items():
            if key in rule:
                errs.forbidden(f"{at}.{key}", f"{what} is not supported by ciliate (L3/L4 only)")
        errs.unknown_fields(at, rule, {*peers, "toPorts", *_CNP_UNSUPPORTED_PEER})
        endpoints_key, cidr_key, cidrset_key, entities_key = peers
        # Cilium's IngressCommonRule/EgressCommonRule.Validate: one kind of L3 peer per
        # rule (several peers of one kind are fine; write one rule per kind).
        used = [key for key in peers if isinstance(rule.get(key), list) and rule[key]]
        if len(used) > 1:
            errs.forbidden(at, f"combining {used[0]} and {used[1]} is not supported yet")
        out: dict[str, Any] = {}
        if endpoints_key in rule:
            out[endpoints_key] = [
                _selector(errs, f"{at}.{endpoints_key}[{j}]", sel, cilium=True)
                for j, sel in enumerate(errs.sequence(f"{at}.{endpoints_key}", rule[endpoints_key]))
            ]
        if cidr_key in rule:
            out[cidr_key] = [
                c
                for j, item2 in enumerate(errs.sequence(f"{at}.{cidr_key}", rule[cidr_key]))
                if (c := _cidr(errs, f"{at}.{cidr_key}[{j}]", item2, bare_ip=True)) is not None
            ]
        if cidrset_key in rule:
            out[cidrset_key] = [
                _cidr_with_except(errs, f"{at}.{cidrset_key}[{j}]", block, cilium=True)
                for j, block in enumerate(errs.sequence(f"{at}.{cidrset_key}", rule[cidrset_key]))
            ]
        if entities_key in rule:
            entities = []
            for j, entity in enumerate(errs.sequence(f"{at}.{entities_key}", rule[entities_key])):
                if entity not in CILIUM_ENTITIES:
                    errs.unsupported(f"{at}.{entities_key}[{j}]", entity, CILIUM_ENTITIES)
                else:
                    entities.append(entity)
            out[entities_key] = entities
        if "toPorts" in rule:
            out["toPorts"] = _cnp_to_ports(errs, f"{at}.toPorts", rule["toPorts"])
        rules.append(out)
    return rules


def _cnp_rule(errs: Errors, path: str, raw: object) -> dict[str, Any]:
    rule = errs.mapping(path, raw, required=True)
    for key, what in _CNP_UNSUPPORTED_RULE.items():
        if key in rule:
            errs.forbidden(f"{path}.{key}", f"{what} is not supported by ciliate")
    errs.unknown_fields(
        path, rule, _CNP_RULE_FIELDS | _CNP_RULE_IGNORED | set(_CNP_UNSUPPORTED_RULE)
    )
    if "endpointSelector" not in rule and "nodeSelector" not in rule:
        errs.required(f"{path}.endpointSelector", "a rule selects the endpoints it applies to")
    out: dict[str, Any] = {
        "endpointSelector": _selector(
            errs, f"{path}.endpointSelector", rule.get("endpointSelector"), cilium=True
        )
    }
    for key in ("ingress", "ingressDeny", "egress", "egressDeny"):
        if key in rule:
            direction = "ingress" if key.startswith("ingress") else "egress"
            out[key] = _cnp_direction(errs, f"{path}.{key}", rule[key], direction=direction)
    if "enableDefaultDeny" in rule:
        out["enableDefaultDeny"] = _default_deny(
            errs, f"{path}.enableDefaultDeny", rule["enableDefaultDeny"]
        )
    if isinstance(rule.get("description"), str):
        out["description"] = rule["description"]
    return out


def _default_deny(errs: Errors, path: str, raw: object) -> dict[str, bool]:
    """``enableDefaultDeny: {ingress, egress}`` (Cilium 1.15): booleans, each optional."""
    given = errs.mapping(path, raw)
    errs.unknown_fields(path, given, {"ingress", "egress"})
    out = {}
    for direction in ("ingress", "egress"):
        value = given.get(direction)
        if value is None:
            continue
        if not isinstance(value, bool):
            errs.invalid(f"{path}.{direction}", value, "must be a boolean")
            continue
        out[direction] = value
    return out


def _validate_cilium_policy(errs: Errors, obj: dict[str, Any]) -> None:
    if obj.get("spec") is None and obj.get("specs") is None:
        errs.required("spec", "a Cilium policy needs `spec` or `specs`")
        return
    if obj.get("spec") is not None:
        obj["spec"] = _cnp_rule(errs, "spec", obj["spec"])
    if obj.get("specs") is not None:
        obj["specs"] = [
            _cnp_rule(errs, f"specs[{i}]", rule)
            for i, rule in enumerate(errs.sequence("specs", obj["specs"]))
        ]
    obj.pop("status", None)


_VALIDATORS: dict[str, Callable[[Errors, dict[str, Any]], None]] = {
    "Namespace": _validate_namespace,
    "Pod": _validate_pod,
    "NetworkPolicy": _validate_network_policy,
    "CiliumNetworkPolicy": _validate_cilium_policy,
    "CiliumClusterwideNetworkPolicy": _validate_cilium_policy,
    "Service": validate_service,
    "EndpointSlice": validate_endpoint_slice,
}
