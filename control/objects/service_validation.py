"""Validation and defaulting of ``Service`` (v1) and ``EndpointSlice``
(discovery.k8s.io/v1), as the API server does them (``ValidateService``,
``SetDefaults_Service``, ``ValidateEndpointSlice``), with field paths in every
error.

What is checked here needs nothing but the object; what needs the cluster (the
ClusterIP inside the service CIDR and not taken, a NodePort not taken, values kept
from the stored object) is done in the apply transaction by
:mod:`ciliate.control.objects.allocation`.

Defaults, as the API server sets them: ``type: ClusterIP``, ``sessionAffinity:
None`` (``ClientIP`` gets ``timeoutSeconds: 10800``), port ``protocol: TCP`` and
``targetPort`` = ``port``, ``internalTrafficPolicy: Cluster``,
``externalTrafficPolicy: Cluster`` on externally reachable services,
``allocateLoadBalancerNodePorts: true`` on LoadBalancers, ``ipFamilies: [IPv4]``,
``ipFamilyPolicy: SingleStack`` (a given ``PreferDualStack`` is kept, with the IPv4
family only), ``clusterIPs`` mirroring ``clusterIP``. ``ExternalName`` Services (a DNS
alias) get no ClusterIP, IP families nor traffic policy.

Errors name the paths ``ValidateService`` names, including its quirks
(``spec.clusterIPs[0]`` for a bad ``clusterIP``, since the v1 defaulting copies it
there first; ``spec.LoadBalancerSourceRanges`` with its historical capital).

ciliate's cluster is IPv4 single-stack: IPv6 and dual-stack Services are refused as
such a cluster's API server refuses them, and ``loadBalancerSourceRanges`` (a filter
the datapath would not apply) is refused by name rather than stored and ignored.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ciliate.control.objects.fields import (
    CIDR_EXAMPLE,
    IP_EXAMPLE,
    PROTOCOLS,
    Errors,
    check_name,
    cidr_notation_ok,
    dns_label_problems,
    dns_subdomain_problems,
    label_map,
    label_value_problems,
    port_name_problems,
    protocol_of,
    qualified_name_problems,
)

__all__ = [
    "CLIENT_IP_TIMEOUT_DEFAULT",
    "CLIENT_IP_TIMEOUT_MAX",
    "NODE_PORT_RANGE",
    "SERVICE_NAME_LABEL",
    "SERVICE_TYPES",
    "externally_reachable",
    "validate_endpoint_slice",
    "validate_service",
]

SERVICE_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")
NODE_PORT_RANGE = (30000, 32767)  # the API server's --service-node-port-range default
CLIENT_IP_TIMEOUT_DEFAULT = 10800  # 3 hours, Kubernetes' DefaultClientIPServiceAffinitySeconds
CLIENT_IP_TIMEOUT_MAX = 86400
TRAFFIC_POLICIES = ("Cluster", "Local")
LB_IP_MODES = ("Proxy", "VIP")
TRAFFIC_DISTRIBUTIONS = ("PreferClose", "PreferSameNode", "PreferSameZone")
TOPOLOGY_HINTS_ANNOTATION = "service.kubernetes.io/topology-aware-hints"  # deprecated name
TOPOLOGY_MODE_ANNOTATION = "service.kubernetes.io/topology-mode"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
TOPOLOGY_ZONE_LABEL = "topology.kubernetes.io/zone"
MAX_TOPOLOGY_LABELS = 16
MAX_ZONE_HINTS = 8
MAX_SLICE_ENDPOINTS = 1000
MAX_SLICE_PORTS = 100
MAX_ENDPOINT_ADDRESSES = 100

_SERVICE_SPEC_FIELDS = {
    "ports",
    "selector",
    "clusterIP",
    "clusterIPs",
    "type",
    "externalIPs",
    "sessionAffinity",
    "sessionAffinityConfig",
    "loadBalancerIP",
    "loadBalancerSourceRanges",
    "loadBalancerClass",
    "externalName",
    "externalTrafficPolicy",
    "healthCheckNodePort",
    "publishNotReadyAddresses",
    "ipFamilies",
    "ipFamilyPolicy",
    "allocateLoadBalancerNodePorts",
    "internalTrafficPolicy",
    "trafficDistribution",
}
_SERVICE_PORT_FIELDS = {"name", "protocol", "appProtocol", "port", "targetPort", "nodePort"}
_SLICE_FIELDS = {"apiVersion", "kind", "metadata", "addressType", "endpoints", "ports"}
_SLICE_ENDPOINT_FIELDS = {
    "addresses",
    "conditions",
    "hostname",
    "targetRef",
    "nodeName",
    "zone",
    "hints",
    "deprecatedTopology",
}
_CONDITIONS = ("ready", "serving", "terminating")
_OBJECT_REFERENCE_FIELDS = {
    "kind",
    "namespace",
    "name",
    "uid",
    "apiVersion",
    "resourceVersion",
    "fieldPath",
}


def externally_reachable(spec: dict[str, Any]) -> bool:
    """Kubernetes' ``ExternallyAccessible``: reached from outside the cluster (so
    ``externalTrafficPolicy`` applies)."""
    kind = spec.get("type")
    return kind in ("NodePort", "LoadBalancer") or (
        kind == "ClusterIP" and bool(spec.get("externalIPs"))
    )


def _ipv4(errs: Errors, path: str, raw: object, *, special_ok: bool = True) -> str | None:
    text = errs.string(path, raw, required=True)
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        errs.invalid(path, text, IP_EXAMPLE)
        return None
    if not isinstance(address, ipaddress.IPv4Address):
        errs.invalid(path, text, "ciliate serves IPv4 only: use an IPv4 address")
        return None
    if not special_ok:
        # ValidateNonSpecialIP: these could never be a service's outside address.
        for test, what in (
            (address.is_unspecified, "unspecified (0.0.0.0)"),
            (address.is_loopback, "in the loopback range (127.0.0.0/8)"),
            (address.is_link_local, "in the link-local range (169.254.0.0/16)"),
            (
                address in ipaddress.IPv4Network("224.0.0.0/24"),
                "in the link-local multicast range (224.0.0.0/24)",
            ),
        ):
            if test:
                errs.invalid(path, text, f"may not be {what}")
                return None
    return str(address)


def _port_number(errs: Errors, path: str, raw: object, *, required: bool) -> int | None:
    if raw is None:
        if required:
            errs.required(path)
        return None
    number = errs.integer(path, raw)
    if number is not None and not 1 <= number <= 65535:
        errs.invalid(path, number, "must be between 1 and 65535, inclusive")
        return None
    return number


def _one_of(errs: Errors, path: str, raw: object, allowed: tuple[str, ...], default: str) -> str:
    value = errs.string(path, raw)
    if value is None or value == "":
        return default
    if value not in allowed:
        errs.unsupported(path, value, allowed)
        return default
    return value


# -- Service -------------------------------------------------------------------------


def validate_service(errs: Errors, obj: dict[str, Any]) -> None:
    # No spec is the empty spec, refused for what it lacks (spec.ports), as upstream.
    spec = dict(errs.mapping("spec", obj.get("spec")))
    errs.unknown_fields("spec", spec, _SERVICE_SPEC_FIELDS)
    kind = errs.string("spec.type", spec.get("type")) or "ClusterIP"
    if kind not in SERVICE_TYPES:
        errs.unsupported("spec.type", kind, SERVICE_TYPES)
    out: dict[str, Any] = {"type": kind}

    if kind == "ExternalName":
        _external_name(errs, spec, out)
        headless = True  # no ClusterIP, so no port is required
    else:
        _cluster_ips(errs, spec, out)
        headless = out["clusterIP"] == "None"
        if headless and kind in ("NodePort", "LoadBalancer"):
            errs.invalid(
                "spec.clusterIPs[0]", "None", f"may not be set to 'None' for {kind} services"
            )
    out["ports"] = _service_ports(errs, spec.get("ports"), kind=kind, headless=headless)

    selector = label_map(errs, "spec.selector", spec.get("selector"))
    if selector:
        out["selector"] = selector

    external_ips = [
        ip
        for i, raw in enumerate(errs.sequence("spec.externalIPs", spec.get("externalIPs")))
        if (ip := _ipv4(errs, f"spec.externalIPs[{i}]", raw, special_ok=False)) is not None
    ]
    if external_ips:
        out["externalIPs"] = external_ips

    _session_affinity(errs, spec, out)
    _traffic_policies(errs, spec, out)

    if kind == "LoadBalancer":
        allocate = spec.get("allocateLoadBalancerNodePorts", True)
        if not isinstance(allocate, bool):
            errs.invalid("spec.allocateLoadBalancerNodePorts", allocate, "must be a boolean")
            allocate = True
        out["allocateLoadBalancerNodePorts"] = allocate
        if (ip := spec.get("loadBalancerIP")) not in (None, ""):
            out["loadBalancerIP"] = _ipv4(errs, "spec.loadBalancerIP", ip, special_ok=False)
        if (
            cls := errs.string("spec.loadBalancerClass", spec.get("loadBalancerClass"))
        ) is not None:
            errs.invalid_each("spec.loadBalancerClass", cls, qualified_name_problems(cls))
            out["loadBalancerClass"] = cls
    else:
        for field in ("allocateLoadBalancerNodePorts", "loadBalancerIP", "loadBalancerClass"):
            if spec.get(field) not in (None, ""):
                errs.forbidden(f"spec.{field}", "may only be used when `type` is 'LoadBalancer'")
    _source_ranges(errs, obj, spec, kind=kind)
    if spec.get("healthCheckNodePort") not in (None, 0):
        number = _port_number(
            errs, "spec.healthCheckNodePort", spec["healthCheckNodePort"], required=False
        )
        if kind != "LoadBalancer" or out.get("externalTrafficPolicy") != "Local":
            errs.invalid(
                "spec.healthCheckNodePort",
                spec["healthCheckNodePort"],
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy`"
                " is 'Local'",
            )
        elif number is not None:
            low, high = NODE_PORT_RANGE
            if low <= number <= high:
                out["healthCheckNodePort"] = number
            else:
                errs.invalid(
                    "spec.healthCheckNodePort",
                    number,
                    f"provided port is not in the valid range. The range of valid ports"
                    f" is {low}-{high}",
                )
    publish = spec.get("publishNotReadyAddresses", False)
    if not isinstance(publish, bool):
        errs.invalid("spec.publishNotReadyAddresses", publish, "must be a boolean")
        publish = False
    if publish:
        out["publishNotReadyAddresses"] = True
    distribution = errs.string("spec.trafficDistribution", spec.get("trafficDistribution"))
    if distribution is not None:
        if distribution not in TRAFFIC_DISTRIBUTIONS:
            errs.unsupported("spec.trafficDistribution", distribution, TRAFFIC_DISTRIBUTIONS)
        out["trafficDistribution"] = distribution
    _topology_annotations(errs, obj)
    if kind != "ExternalName" and (name := spec.get("externalName")) not in (None, ""):
        out["externalName"] = name  # kept, unused, as the API server keeps it
    obj["spec"] = out
    _load_balancer_status(errs, obj)


def _external_name(errs: Errors, spec: dict[str, Any], out: dict[str, Any]) -> None:
    """An ``ExternalName`` Service is a DNS alias: no ClusterIP, no IP families, no
    NodePorts; ``externalName`` a DNS name (a trailing dot is allowed)."""
    name = errs.string("spec.externalName", spec.get("externalName"))
    cname = (name or "").removesuffix(".")
    if not cname:
        errs.required("spec.externalName", "")
    elif not errs.invalid_each("spec.externalName", name, dns_subdomain_problems(cname)):
        out["externalName"] = name
    cluster_ips = [spec.get("clusterIP"), *errs.sequence("spec.clusterIPs", spec.get("clusterIPs"))]
    if any(ip not in (None, "") for ip in cluster_ips):
        errs.forbidden("spec.clusterIPs", "may not be set for ExternalName services")
    for field in ("ipFamilies", "ipFamilyPolicy"):
        if spec.get(field):
            errs.forbidden(f"spec.{field}", "may not be set for ExternalName services")
    out["clusterIP"] = ""
    out["clusterIPs"] = []


def _cluster_ips(errs: Errors, spec: dict[str, Any], out: dict[str, Any]) -> None:
    """``clusterIP``/``clusterIPs`` and the IP families, as the API server defaults and
    checks them (errors name ``spec.clusterIPs[i]``: the v1 defaulting copies
    ``clusterIP`` into ``clusterIPs`` before validation). ciliate's cluster is IPv4
    single-stack: IPv6 is refused as the API server of such a cluster refuses it."""
    raw = spec.get("clusterIP")
    ips = errs.sequence("spec.clusterIPs", spec.get("clusterIPs"))
    if raw in (None, "") and ips:
        raw = ips[0]
    elif ips and ips[0] != raw:
        errs.invalid("spec.clusterIPs", ips, "first value must match `clusterIP`")
    if len(ips) > 2:
        errs.invalid("spec.clusterIPs", ips, "may only hold up to 2 values")
    elif len(ips) == 2:
        errs.invalid(
            "spec.clusterIPs[1]", ips[1], "this cluster is not configured for dual-stack services"
        )
    cluster_ip = ""
    if raw == "None":
        cluster_ip = "None"
    elif raw not in (None, ""):
        path = "spec.clusterIPs[0]"
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        if isinstance(raw, str):
            try:
                address = ipaddress.ip_address(raw)
            except ValueError:
                address = None
        if address is None:
            errs.invalid(path, raw, IP_EXAMPLE)
        elif not isinstance(address, ipaddress.IPv4Address):
            errs.invalid(path, raw, "IPv6 is not configured on this cluster (IPv4 only)")
        else:
            cluster_ip = str(address)
    out["clusterIP"] = cluster_ip  # "" until the apply allocates one
    out["clusterIPs"] = [cluster_ip] if cluster_ip else []
    policy = spec.get("ipFamilyPolicy")
    policies = ("SingleStack", "PreferDualStack", "RequireDualStack")
    if policy == "RequireDualStack":
        errs.invalid(
            "spec.ipFamilyPolicy", policy, "this cluster is not configured for dual-stack services"
        )
    elif policy not in (None, "", *policies):
        errs.unsupported("spec.ipFamilyPolicy", policy, policies)
    families = errs.sequence("spec.ipFamilies", spec.get("ipFamilies"))
    if len(families) > 2:
        errs.invalid("spec.ipFamilies", families, "may specify no more than two IP families")
    seen: set[object] = set()
    for i, family in enumerate(families):
        at = f"spec.ipFamilies[{i}]"
        if family not in ("IPv4", "IPv6"):
            errs.unsupported(at, family, ("IPv4", "IPv6"))
        elif family in seen:
            errs.duplicate(at, family)
        elif family == "IPv6" and not (i > 0 and policy == "PreferDualStack"):
            # A secondary family is dropped for PreferDualStack, as a single-stack
            # cluster's allocator does; asked for otherwise, it cannot be served.
            errs.invalid(at, family, "not configured on this cluster (IPv4 only)")
        seen.add(family)
    out["ipFamilies"] = ["IPv4"]
    out["ipFamilyPolicy"] = policy or "SingleStack"


def _source_ranges(errs: Errors, obj: dict[str, Any], spec: dict[str, Any], *, kind: str) -> None:
    """``loadBalancerSourceRanges`` (or, without it, its older annotation) as the API
    server checks them, on its own path spelling (``spec.LoadBalancerSourceRanges``, a
    historical capital it still names). Valid ranges on a LoadBalancer are then refused
    by ciliate, whose datapath does not filter by source: storing them would silently
    let everyone in."""
    ranges = errs.sequence("spec.loadBalancerSourceRanges", spec.get("loadBalancerSourceRanges"))
    annotation = (obj["metadata"].get("annotations") or {}).get(SOURCE_RANGES_ANNOTATION)
    before = len(errs.items)
    if ranges:
        path = "spec.LoadBalancerSourceRanges"
        if kind != "LoadBalancer":
            errs.forbidden(path, "may only be used when `type` is 'LoadBalancer'")
        for i, item in enumerate(ranges):
            # Space padding is allowed: a leftover of the move from the annotation.
            if not isinstance(item, str) or not cidr_notation_ok(item.strip()):
                errs.invalid(f"{path}[{i}]", item, CIDR_EXAMPLE)
    elif annotation is not None:
        path = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
        if kind != "LoadBalancer":
            errs.forbidden(path, "may only be used when `type` is 'LoadBalancer'")
        if annotation.strip():
            for part in annotation.strip().split(","):
                if not cidr_notation_ok(part.strip()):
                    errs.invalid(path, part.strip(), CIDR_EXAMPLE)
    asked = bool(ranges) or bool(annotation and annotation.strip())
    if asked and len(errs.items) == before:
        errs.forbidden(
            "spec.loadBalancerSourceRanges",
            "source ranges are not enforced by ciliate's datapath; filter with a network policy",
        )


def _topology_annotations(errs: Errors, obj: dict[str, Any]) -> None:
    """``validateServiceAnnotations``: the old and the new name of the topology
    annotation must agree when both are given."""
    annotations = obj["metadata"].get("annotations") or {}
    hints = annotations.get(TOPOLOGY_HINTS_ANNOTATION)
    mode = annotations.get(TOPOLOGY_MODE_ANNOTATION)
    if hints is not None and mode is not None and hints != mode:
        errs.invalid(
            f"metadata.annotations[{TOPOLOGY_MODE_ANNOTATION}]",
            mode,
            f"must match annotations[{TOPOLOGY_HINTS_ANNOTATION}] when both are specified",
        )


def _service_ports(errs: Errors, raw: object, *, kind: str, headless: bool) -> list[dict[str, Any]]:
    items = errs.sequence("spec.ports", raw)
    if not items and not headless:
        errs.required("spec.ports")
    names: set[str] = set()
    seen: set[tuple[int, str]] = set()
    node_ports: set[tuple[int, str]] = set()
    ports = []
    for i, item in enumerate(items):
        at = f"spec.ports[{i}]"
        port = errs.mapping(at, item)
        errs.unknown_fields(at, port, _SERVICE_PORT_FIELDS)
        out: dict[str, Any] = {}
        name = errs.string(f"{at}.name", port.get("name"))
        if name:
            bad_name = errs.invalid_each(f"{at}.name", name, dns_label_problems(name))
            if not bad_name and name in names:
                errs.duplicate(f"{at}.name", name)
            names.add(name)
            out["name"] = name
        elif len(items) > 1:
            errs.required(f"{at}.name", "names are required when a service has several ports")
        # SetDefaults_Service: an empty protocol is TCP (a string field, not a pointer).
        protocol = protocol_of(
            errs, f"{at}.protocol", port.get("protocol") or None, allowed=PROTOCOLS, default="TCP"
        )
        out["protocol"] = protocol
        if (app := errs.string(f"{at}.appProtocol", port.get("appProtocol"))) is not None:
            errs.invalid_each(f"{at}.appProtocol", app, qualified_name_problems(app))
            out["appProtocol"] = app
        # A missing port is the API's 0, refused by IsValidPortNum as an Invalid value.
        number = _port_number(errs, f"{at}.port", port.get("port", 0), required=True)
        out["port"] = number
        if number is not None:
            if (number, protocol) in seen:
                errs.duplicate(at, {"port": number, "protocol": protocol})
            seen.add((number, protocol))
        out["targetPort"] = _target_port(errs, f"{at}.targetPort", port.get("targetPort"), number)
        node_port = port.get("nodePort")
        if node_port not in (None, 0):
            if kind not in ("NodePort", "LoadBalancer"):
                errs.forbidden(f"{at}.nodePort", f"may not be used when `type` is '{kind}'")
            elif (value := errs.integer(f"{at}.nodePort", node_port)) is not None:
                low, high = NODE_PORT_RANGE
                if not low <= value <= high:
                    errs.invalid(
                        f"{at}.nodePort",
                        value,
                        f"provided port is not in the valid range. The range of valid ports"
                        f" is {low}-{high}",
                    )
                elif (value, protocol) in node_ports:
                    errs.duplicate(f"{at}.nodePort", value)
                node_ports.add((value, protocol))
                out["nodePort"] = value
        ports.append(out)
    return ports


def _target_port(errs: Errors, path: str, raw: object, port: int | None) -> int | str | None:
    if raw is None or raw == 0 or raw == "":
        return port  # defaulted to the port, as the API server does
    if isinstance(raw, str):
        errs.invalid_each(path, raw, port_name_problems(raw))
        return raw
    return _port_number(errs, path, raw, required=False)


def _session_affinity(errs: Errors, spec: dict[str, Any], out: dict[str, Any]) -> None:
    affinity = _one_of(
        errs, "spec.sessionAffinity", spec.get("sessionAffinity"), ("None", "ClientIP"), "None"
    )
    out["sessionAffinity"] = affinity
    config = errs.mapping("spec.sessionAffinityConfig", spec.get("sessionAffinityConfig"))
    if affinity == "None":
        if "sessionAffinityConfig" in spec and spec["sessionAffinityConfig"] is not None:
            errs.forbidden(
                "spec.sessionAffinityConfig", "must not be set when session affinity is None"
            )
        return
    client = errs.mapping("spec.sessionAffinityConfig.clientIP", config.get("clientIP"))
    path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    timeout = errs.integer(path, client.get("timeoutSeconds"))
    if timeout is None:
        timeout = CLIENT_IP_TIMEOUT_DEFAULT
    elif not 0 < timeout <= CLIENT_IP_TIMEOUT_MAX:
        errs.invalid(path, timeout, f"must be greater than 0 and less than {CLIENT_IP_TIMEOUT_MAX}")
    out["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": timeout}}


def _traffic_policies(errs: Errors, spec: dict[str, Any], out: dict[str, Any]) -> None:
    internal = spec.get("internalTrafficPolicy")
    if out["type"] != "ExternalName" or internal not in (None, ""):
        # Defaulted for every type but ExternalName (which has no endpoints to route).
        out["internalTrafficPolicy"] = _one_of(
            errs, "spec.internalTrafficPolicy", internal, TRAFFIC_POLICIES, "Cluster"
        )
    external = spec.get("externalTrafficPolicy")
    # Reachability is the manifest's: an invalid external IP must not turn the policy
    # into a second, misleading error.
    if externally_reachable({**out, "externalIPs": spec.get("externalIPs")}):
        out["externalTrafficPolicy"] = _one_of(
            errs, "spec.externalTrafficPolicy", external, TRAFFIC_POLICIES, "Cluster"
        )
    elif external not in (None, ""):
        errs.invalid(
            "spec.externalTrafficPolicy",
            external,
            "may only be set for externally-accessible services",
        )


def _load_balancer_status(errs: Errors, obj: dict[str, Any]) -> None:
    """``status.loadBalancer`` as ``ValidateLoadBalancerStatus`` checks a status update
    (ciliate has no load-balancer controller: the manifest may carry it). Ingress only
    on LoadBalancers; ``ipMode`` defaults to ``VIP`` where an ``ip`` is given, and may
    not be given without one; a hostname is a DNS name, never an IP address."""
    status = errs.mapping("status", obj.get("status"))
    load_balancer = errs.mapping("status.loadBalancer", status.get("loadBalancer"))
    path = "status.loadBalancer.ingress"
    entries = errs.sequence(path, load_balancer.get("ingress"))
    if entries and obj["spec"]["type"] != "LoadBalancer":
        errs.forbidden(path, "may only be used when `spec.type` is 'LoadBalancer'")
        entries = []
    ingress = []
    for i, raw in enumerate(entries):
        at = f"{path}[{i}]"
        entry = dict(errs.mapping(at, raw))
        has_ip = entry.get("ip") not in (None, "")
        if has_ip:
            entry["ip"] = _ipv4(errs, f"{at}.ip", entry["ip"], special_ok=False)
        mode = entry.get("ipMode")
        if mode is not None and not has_ip:
            errs.forbidden(f"{at}.ipMode", "may not be specified when `ip` is not set")
        elif mode is not None and mode not in LB_IP_MODES:
            errs.unsupported(f"{at}.ipMode", mode, LB_IP_MODES)
        elif has_ip:
            entry["ipMode"] = mode or "VIP"
        if entry.get("hostname") not in (None, ""):
            hostname = errs.string(f"{at}.hostname", entry["hostname"])
            if hostname is not None:
                check_name(errs, f"{at}.hostname", hostname, dns_label=False)
                if _is_ip(hostname):
                    errs.invalid(
                        f"{at}.hostname", hostname, "must be a DNS name, not an IP address"
                    )
        ingress.append(entry)
    obj["status"] = {"loadBalancer": {"ingress": ingress} if ingress else {}}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- EndpointSlice ----------------------------------------------------------------------


def validate_endpoint_slice(errs: Errors, obj: dict[str, Any]) -> None:
    errs.unknown_fields("", obj, _SLICE_FIELDS)
    address_type = errs.string("addressType", obj.get("addressType"), required=True)
    if address_type in ("IPv6", "FQDN"):
        errs.invalid("addressType", address_type, "ciliate serves IPv4 only")
    elif address_type is not None and address_type != "IPv4":
        errs.unsupported("addressType", address_type, ("IPv4", "IPv6", "FQDN"))
    endpoints = errs.sequence("endpoints", obj.get("endpoints"))
    if len(endpoints) > MAX_SLICE_ENDPOINTS:
        errs.too_many("endpoints", len(endpoints), MAX_SLICE_ENDPOINTS)
    obj["endpoints"] = [
        _slice_endpoint(errs, f"endpoints[{i}]", raw) for i, raw in enumerate(endpoints)
    ]
    ports = errs.sequence("ports", obj.get("ports"))
    if len(ports) > MAX_SLICE_PORTS:
        errs.too_many("ports", len(ports), MAX_SLICE_PORTS)
        return  # validatePorts stops there: the count is the one thing to fix
    names: set[str] = set()
    out_ports = []
    for i, raw in enumerate(ports):
        at = f"ports[{i}]"
        port = errs.mapping(at, raw)
        errs.unknown_fields(at, port, {"name", "protocol", "port", "appProtocol"})
        name = errs.string(f"{at}.name", port.get("name")) or ""
        bad_name = bool(name) and errs.invalid_each(f"{at}.name", name, dns_label_problems(name))
        if not bad_name and name in names:
            errs.duplicate(f"{at}.name", name)
        names.add(name)
        out: dict[str, Any] = {
            "name": name,
            "protocol": protocol_of(
                errs, f"{at}.protocol", port.get("protocol"), allowed=PROTOCOLS, default="TCP"
            ),
            "port": _port_number(errs, f"{at}.port", port.get("port"), required=False),
        }
        if (app := errs.string(f"{at}.appProtocol", port.get("appProtocol"))) is not None:
            errs.invalid_each(f"{at}.appProtocol", app, qualified_name_problems(app))
            out["appProtocol"] = app
        out_ports.append(out)
    obj["ports"] = out_ports


def _zone_hints(errs: Errors, path: str, raw: object) -> None:
    hints = errs.mapping(path, raw)
    zones = errs.sequence(f"{path}.forZones", hints.get("forZones"))
    if len(zones) > MAX_ZONE_HINTS:
        errs.too_many(f"{path}.forZones", len(zones), MAX_ZONE_HINTS)
        return  # as validateHints
    seen: set[str] = set()
    for i, item in enumerate(zones):
        at = f"{path}.forZones[{i}].name"
        zone = errs.string(at, errs.mapping(f"{path}.forZones[{i}]", item).get("name"))
        if zone is None:
            continue
        bad_zone = errs.invalid_each(at, zone, label_value_problems(zone))
        if not bad_zone and zone in seen:
            errs.duplicate(at, zone)
        seen.add(zone)


def _slice_endpoint(errs: Errors, path: str, raw: object) -> dict[str, Any]:
    endpoint = dict(errs.mapping(path, raw))
    errs.unknown_fields(path, endpoint, _SLICE_ENDPOINT_FIELDS)
    addresses = errs.sequence(f"{path}.addresses", endpoint.get("addresses"))
    if not addresses:
        errs.required(f"{path}.addresses", "must contain at least 1 address")
    elif len(addresses) > MAX_ENDPOINT_ADDRESSES:
        errs.too_many(f"{path}.addresses", len(addresses), MAX_ENDPOINT_ADDRESSES)
    # ValidateEndpointIP: an endpoint is never a loopback, link-local or unspecified address.
    endpoint["addresses"] = [
        _ipv4(errs, f"{path}.addresses[{i}]", address, special_ok=False)
        for i, address in enumerate(addresses)
    ]
    conditions = errs.mapping(f"{path}.conditions", endpoint.get("conditions"))
    errs.unknown_fields(f"{path}.conditions", conditions, set(_CONDITIONS))
    for name in _CONDITIONS:
        value = conditions.get(name)
        if value is not None and not isinstance(value, bool):
            errs.invalid(f"{path}.conditions.{name}", value, "must be true, false or null")
    endpoint["conditions"] = {k: v for k, v in conditions.items() if k in _CONDITIONS}
    if (node := errs.string(f"{path}.nodeName", endpoint.get("nodeName"))) is not None:
        check_name(errs, f"{path}.nodeName", node, dns_label=False)
    hostname = errs.string(f"{path}.hostname", endpoint.get("hostname"))
    if hostname is not None:
        errs.invalid_each(f"{path}.hostname", hostname, dns_label_problems(hostname))
    errs.string(f"{path}.zone", endpoint.get("zone"))
    topology_path = f"{path}.deprecatedTopology"
    topology = label_map(errs, topology_path, endpoint.get("deprecatedTopology"))
    if len(topology) > MAX_TOPOLOGY_LABELS:
        errs.too_many(topology_path, len(topology), MAX_TOPOLOGY_LABELS)
    if TOPOLOGY_ZONE_LABEL in topology:
        errs.invalid(
            topology_path,
            TOPOLOGY_ZONE_LABEL,
            f"may not use {TOPOLOGY_ZONE_LABEL} in deprecatedTopology, use zone instead",
        )
    _zone_hints(errs, f"{path}.hints", endpoint.get("hints"))
    target = errs.mapping(f"{path}.targetRef", endpoint.get("targetRef"))
    errs.unknown_fields(f"{path}.targetRef", target, _OBJECT_REFERENCE_FIELDS)
    for key, value in target.items():
        errs.string(f"{path}.targetRef.{key}", value)
    return endpoint
