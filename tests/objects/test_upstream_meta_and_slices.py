"""Upstream's cases for object metadata, Namespaces, Pod container ports and
EndpointSlices, ported as tables:

* apimachinery's ``ValidateObjectMeta``/``ValidateAnnotations`` (objectmeta_test.go)
  and ``ValidateLabels``/``IsQualifiedName``/``IsValidLabelValue`` cases;
* core ``TestValidateNamespace`` and the finalizer names of
  ``TestValidateNamespaceFinalizeUpdate``; core ``TestValidatePorts`` (containers);
* discovery ``TestValidateEndpointSlice``, ``...Create`` and ``...Update`` (the update
  through the store, where ``addressType`` is immutable).

ciliate serves IPv4 only: upstream's IPv6 and FQDN slices are refused with
``addressType`` named (SINGLE STACK), never stored and ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.objects import ObjectInvalidError, ObjectStore, validate
from ciliate.control.store import SqliteStore

from .upstream import Tweak, build, error_paths, errors_text

POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "abc", "namespace": "ns"},
    "spec": {"containers": [{"name": "ctr"}]},
}


def with_meta(**values: Any) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["metadata"].update(values)

    return tweak


# -- labels (meta/v1 validation_test TestValidateLabels) -------------------------------

VALID_LABEL_KEYS = [
    "simple",
    "now-with-dashes",
    "1-starts-with-num",
    "1234",
    "simple/simple",
    "now-with-dashes/simple",
    "now-with-dashes/now-with-dashes",
    "now.with.dots/simple",
    "now-with.dashes-and.dots/simple",
    "1-num.2-num/3-num",
    "1234/5678",
    "1.2.3.4/5678",
    "Uppercase_Is_OK_123",
    "example.com/Uppercase_Is_OK_123",
    "requests.storage-foo",
    "a" * 63,
    "a" * 253 + "/" + "b" * 63,
]
INVALID_LABEL_KEYS = [
    "nospecialchars^=@",
    "cantendwithadash-",
    "only/one/slash",
    "Example.com/abc",
    "example_com/abc",
    "example.com/",
    "/simple",
    "a" * 64,
    "a" * 254 + "/abc",
]
VALID_LABEL_VALUES = ["simple", "now-with-dashes", "1-starts-with-num", "end-with-num-1", "1234",
                      "-".join(["a"] * 32), "a" * 63, ""]  # fmt: skip
INVALID_LABEL_VALUES = [
    "nospecialchars%^=@",
    "Tama-nui-te-r\u0101.is.M\u0101ori.sun",
    "\\backslashes\\are\\bad",
    "-starts-with-dash",
    "ends-with-dash-",
    ".starts.with.dot",
    "ends.with.dot.",
    "a" * 64,
]


@pytest.mark.parametrize("key", VALID_LABEL_KEYS)
def test_valid_label_keys(key: str) -> None:
    assert error_paths(build(POD, with_meta(labels={key: "v"}))) == []


@pytest.mark.parametrize("key", INVALID_LABEL_KEYS)
def test_invalid_label_keys_name_metadata_labels(key: str) -> None:
    # One error per message upstream gives ("example.com/" has two: empty, and not a name).
    paths = error_paths(build(POD, with_meta(labels={key: "v"})))
    assert paths and set(paths) == {"metadata.labels"}


@pytest.mark.parametrize("value", VALID_LABEL_VALUES)
def test_valid_label_values(value: str) -> None:
    assert error_paths(build(POD, with_meta(labels={"k": value}))) == []


@pytest.mark.parametrize("value", INVALID_LABEL_VALUES)
def test_invalid_label_values_name_metadata_labels(value: str) -> None:
    assert error_paths(build(POD, with_meta(labels={"k": value}))) == ["metadata.labels"]


# -- annotations (apimachinery TestValidateAnnotations) ----------------------------------

VALID_ANNOTATION_KEYS = [
    "simple",
    "now-with-dashes",
    "1-starts-with-num",
    "1234",
    "simple/simple",
    "now-with-dashes/simple",
    "now-with-dashes/now-with-dashes",
    "now.with.dots/simple",
    "now-with.dashes-and.dots/simple",
    "1-num.2-num/3-num",
    "1234/5678",
    "1.2.3.4/5678",
    "UpperCase123",
    "a" * 63,
    "b" * 253 + "/" + "c" * 63,
]
INVALID_ANNOTATION_KEYS = ["nospecialchars^=@", "cantendwithadash-", "only/one/slash", "a" * 254]


@pytest.mark.parametrize("key", VALID_ANNOTATION_KEYS)
def test_valid_annotation_keys(key: str) -> None:
    assert error_paths(build(POD, with_meta(annotations={key: "bar"}))) == []


@pytest.mark.parametrize("key", INVALID_ANNOTATION_KEYS)
def test_invalid_annotation_keys(key: str) -> None:
    assert error_paths(build(POD, with_meta(annotations={key: "bar"}))) == ["metadata.annotations"]


def test_annotations_may_hold_256_kib_in_all_and_no_more() -> None:
    limit = 256 * 1024
    fits = {"a": "x" * (limit // 2 - 1), "b": "y" * (limit // 2 - 1)}
    assert error_paths(build(POD, with_meta(annotations=fits))) == []
    over = {"a": "x" * (limit // 2), "b": "y" * (limit // 2)}
    assert errors_text(build(POD, with_meta(annotations=over))) == [
        "metadata.annotations: Too long: may not be more than 262144 bytes"
    ]


# -- names, generateName, namespace (TestValidateObjectMeta*) ----------------------------


@pytest.mark.parametrize(
    ("kind_tweak", "name", "valid"),
    [
        # Pods, policies and slices: DNS-1123 subdomains (dots allowed, 253 long).
        ("Pod", "abc.def-123", True),
        ("Pod", "a" * 253, True),
        ("Pod", "a" * 254, False),
        ("Pod", "Abc", False),
        ("Pod", "abc_def", False),
        # Namespaces: DNS-1123 labels (no dots, 63 long).
        ("Namespace", "abc-123", True),
        ("Namespace", "abc.123", False),
        ("Namespace", "a" * 64, False),
        # Services: DNS-1035 labels (must start with a letter).
        ("Service", "abc-123", True),
        ("Service", "1abc", False),
        ("Service", "abc.def", False),
    ],
)
def test_names_follow_each_kinds_rule(kind_tweak: str, name: str, valid: bool) -> None:
    documents = {
        "Pod": build(POD, with_meta(name=name)),
        "Namespace": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        "Service": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"ports": [{"port": 80}]},
        },
    }
    assert error_paths(documents[kind_tweak]) == ([] if valid else ["metadata.name"])


def test_namespace_names_are_dns_labels_for_namespaced_objects() -> None:
    # TestValidateObjectMetaNamespaces: "foo.bar" and a 64-character namespace.
    assert error_paths(build(POD, with_meta(namespace="foo.bar"))) == ["metadata.namespace"]
    assert error_paths(build(POD, with_meta(namespace="a" * 64))) == ["metadata.namespace"]


def test_generate_name_is_checked_as_a_prefix_and_apply_needs_a_name() -> None:
    assert error_paths(build(POD, with_meta(generateName="abc-"))) == []  # name is set too
    assert error_paths(build(POD, with_meta(generateName="-abc"))) == ["metadata.generateName"]
    nameless = build(POD, with_meta(name=None, generateName="abc-"))
    assert errors_text(nameless) == [
        'metadata.generateName: Invalid value: "abc-": apply cannot use generateName (each'
        " apply would create another object, which is why kubectl apply refuses it too): set"
        " metadata.name"
    ]
    assert errors_text(build(POD, with_meta(name=None))) == [
        "metadata.name: Required value: name or generateName is required"
    ]


def test_a_cluster_scoped_objects_namespace_is_cleared_as_the_api_server_clears_it() -> None:
    namespace = validate(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "namespace": "y"}}
    )
    assert "namespace" not in namespace["metadata"]


# -- Namespace (TestValidateNamespace, finalizer names) ------------------------------------


@pytest.mark.parametrize(
    ("finalizer", "valid"),
    [
        ("kubernetes", True),
        ("example.com/foo", True),
        ("foo", False),
        ("Example.com/foo", False),
        ("example.com/", False),
    ],
)
def test_namespace_finalizers(finalizer: str, valid: bool) -> None:
    document = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "abc", "labels": {"foo": "bar"}},
        "spec": {"finalizers": [finalizer]},
    }
    paths = error_paths(document)
    assert (paths == []) if valid else (paths and set(paths) == {"spec.finalizers[0]"})


# -- container ports (TestValidatePorts) -----------------------------------------------


def pod_ports(*ports: dict[str, Any]) -> dict[str, Any]:
    return build(POD, lambda d: d["spec"]["containers"][0].update(ports=list(ports)))


@pytest.mark.parametrize(
    "ports",
    [
        [
            {"name": "easy", "containerPort": 82, "protocol": "TCP"},
            {"name": "as", "containerPort": 83, "protocol": "UDP"},
            {"name": "do-re-me", "containerPort": 84, "protocol": "SCTP"},
            {"containerPort": 85, "protocol": "TCP"},
        ],
        [{"containerPort": 80, "protocol": "TCP"}],
        [{"containerPort": 80}],  # protocol defaulted
        [{"name": "abcdefghijklmno", "containerPort": 80, "hostPort": 8080}],
    ],
)
def test_valid_container_ports(ports: list[dict[str, Any]]) -> None:
    assert error_paths(pod_ports(*ports)) == []


P0 = "spec.containers[0].ports[0]"


@pytest.mark.parametrize(
    ("ports", "paths"),
    [
        ([{"name": "a" * 16, "containerPort": 80}], [f"{P0}.name"]),  # name > 15 characters
        ([{"name": "a.b.c", "containerPort": 80}], [f"{P0}.name"]),  # invalid characters
        ([{"name": "80", "containerPort": 80}], [f"{P0}.name"]),  # name is a number
        (
            [{"name": "abc", "containerPort": 80}, {"name": "abc", "containerPort": 81}],
            ["spec.containers[0].ports[1].name"],
        ),  # name not unique
        ([{"name": "abc", "containerPort": 0}], [f"{P0}.containerPort"]),  # zero port
        ([{"name": "abc", "containerPort": 65536}], [f"{P0}.containerPort"]),
        ([{"name": "abc", "containerPort": 80, "hostPort": 65536}], [f"{P0}.hostPort"]),
        ([{"name": "abc", "containerPort": 80, "protocol": "tcp"}], [f"{P0}.protocol"]),
        ([{"name": "abc", "containerPort": 80, "protocol": "ICMP"}], [f"{P0}.protocol"]),
    ],
)
def test_invalid_container_ports(ports: list[dict[str, Any]], paths: list[str]) -> None:
    assert error_paths(pod_ports(*ports)) == paths


# -- EndpointSlice (discovery TestValidateEndpointSlice / Create / Update) ---------------

SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {"name": "hello", "namespace": "world"},
    "addressType": "IPv4",
    "ports": [{"name": "http", "protocol": "TCP"}],
    "endpoints": [{"addresses": ["10.1.2.0"], "hostname": "valid-123"}],
}


def slice_with(**fields: Any) -> dict[str, Any]:
    return build(SLICE, lambda d: d.update(fields))


def addresses(n: int) -> list[str]:
    return [f"10.1.2.{i % 255}" for i in range(n)]


def named_ports(n: int) -> list[dict[str, Any]]:
    return [{"name": f"http-{i}", "protocol": "TCP"} for i in range(n)]


def endpoints(n: int) -> list[dict[str, Any]]:
    return [{"addresses": [f"10.1.2.{i % 255}"]} for i in range(n)]


def topology(n: int) -> dict[str, str]:
    return {f"topology-{i}": "example" for i in range(n)}


SLICE_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "good-slice": (slice_with(), []),
    "all-protocols": (
        slice_with(
            ports=[
                {"name": "tcp", "protocol": "TCP"},
                {"name": "udp", "protocol": "UDP"},
                {"name": "sctp", "protocol": "SCTP"},
            ]
        ),
        [],
    ),
    "app-protocols": (
        slice_with(
            ports=[
                {"name": "one", "protocol": "TCP", "appProtocol": "HTTP"},
                {"name": "two", "protocol": "TCP", "appProtocol": "https"},
                {"name": "three", "protocol": "TCP", "appProtocol": "my-protocol"},
                {"name": "four", "protocol": "TCP", "appProtocol": "example.com/custom-protocol"},
            ]
        ),
        [],
    ),
    "empty-port-name": (
        slice_with(
            ports=[{"name": "", "protocol": "TCP"}, {"name": "http", "protocol": "TCP"}],
            endpoints=[{"addresses": addresses(1)}],
        ),
        [],
    ),
    "long-port-name": (slice_with(ports=[{"name": "a" * 63, "protocol": "TCP"}]), []),
    "empty-ports-and-endpoints": (slice_with(ports=[], endpoints=[]), []),
    "max-endpoints": (slice_with(ports=named_ports(1), endpoints=endpoints(1000)), []),
    "max-ports": (slice_with(ports=named_ports(100), endpoints=[]), []),
    "max-addresses": (slice_with(endpoints=[{"addresses": addresses(100)}]), []),
    "max-topology-keys": (
        slice_with(endpoints=[{"addresses": addresses(1), "deprecatedTopology": topology(16)}]),
        [],
    ),
    "valid-hints": (
        slice_with(
            endpoints=[{"addresses": addresses(1), "hints": {"forZones": [{"name": "zone-a"}]}}]
        ),
        [],
    ),
    "good-slice-node-name": (
        slice_with(endpoints=[{"addresses": addresses(1), "nodeName": "valid-node-name"}]),
        [],
    ),
    # expected failures
    "duplicate-port-name": (
        slice_with(
            ports=[{"name": "", "protocol": "TCP"}, {"name": "", "protocol": "TCP"}], endpoints=[]
        ),
        ["ports[1].name"],
    ),
    "bad-port-name-caps": (
        slice_with(ports=[{"name": "aCapital", "protocol": "TCP"}], endpoints=[]),
        ["ports[0].name"],
    ),
    "bad-port-name-chars": (
        slice_with(ports=[{"name": "almost_valid", "protocol": "TCP"}], endpoints=[]),
        ["ports[0].name"],
    ),
    "bad-port-name-length": (
        slice_with(ports=[{"name": "a" * 64, "protocol": "TCP"}], endpoints=[]),
        ["ports[0].name"],
    ),
    "invalid-port-protocol": (
        slice_with(ports=[{"name": "http", "protocol": "foo"}]),
        ["ports[0].protocol"],
    ),
    "too-many-ports": (slice_with(ports=named_ports(101), endpoints=[]), ["ports"]),
    "too-many-endpoints": (
        slice_with(ports=named_ports(1), endpoints=endpoints(1001)),
        ["endpoints"],
    ),
    "no-endpoint-addresses": (
        slice_with(endpoints=[{"addresses": []}]),
        ["endpoints[0].addresses"],
    ),
    "too-many-addresses": (
        slice_with(endpoints=[{"addresses": addresses(101)}]),
        ["endpoints[0].addresses"],
    ),
    "bad-topology-key": (
        slice_with(
            endpoints=[{"addresses": addresses(1), "deprecatedTopology": {"--INVALID": "example"}}]
        ),
        ["endpoints[0].deprecatedTopology"],
    ),
    "too-many-topology-keys": (
        slice_with(endpoints=[{"addresses": addresses(1), "deprecatedTopology": topology(17)}]),
        ["endpoints[0].deprecatedTopology"],
    ),
    "bad-hostname": (
        slice_with(endpoints=[{"addresses": addresses(1), "hostname": "--INVALID"}]),
        ["endpoints[0].hostname"],
    ),
    "bad-meta": (
        build(SLICE, lambda d: d["metadata"].update(name="*&^", namespace="foo")),
        ["metadata.name"],
    ),
    "bad-ip": (
        slice_with(endpoints=[{"addresses": ["123.456.789.012"], "hostname": "valid-123"}]),
        ["endpoints[0].addresses[0]"],
    ),
    "bad-ipv4": (
        slice_with(
            endpoints=[
                {"addresses": ["123.456.789.012", "2001:4860:4860::8888"], "hostname": "valid-123"}
            ]
        ),
        ["endpoints[0].addresses[0]", "endpoints[0].addresses[1]"],
    ),
    "bad-app-protocol": (
        slice_with(ports=[{"name": "http", "protocol": "TCP", "appProtocol": "--"}]),
        ["ports[0].appProtocol"],
    ),
    "invalid-hints": (
        slice_with(
            endpoints=[{"addresses": addresses(1), "hints": {"forZones": [{"name": "inv@lid"}]}}]
        ),
        ["endpoints[0].hints.forZones[0].name"],
    ),
    "overlapping-hints": (
        slice_with(
            endpoints=[
                {
                    "addresses": addresses(1),
                    "hints": {
                        "forZones": [{"name": "zone-a"}, {"name": "zone-b"}, {"name": "zone-a"}]
                    },
                }
            ]
        ),
        ["endpoints[0].hints.forZones[2].name"],
    ),
    "too-many-hints": (
        slice_with(
            endpoints=[
                {
                    "addresses": addresses(1),
                    "hints": {"forZones": [{"name": f"zone-{c}"} for c in "abcdefghi"]},
                }
            ]
        ),
        ["endpoints[0].hints.forZones"],
    ),
    "empty-everything (the namespace is kubectl's default here)": (
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {}},
        ["addressType", "metadata.name"],
    ),
    "zone-key-topology": (
        slice_with(
            endpoints=[
                {
                    "addresses": addresses(1),
                    "deprecatedTopology": {"topology.kubernetes.io/zone": "zone1"},
                }
            ]
        ),
        ["endpoints[0].deprecatedTopology"],
    ),
    "special-ipv4": (
        slice_with(endpoints=[{"addresses": ["127.0.0.1"], "hostname": "valid-123"}]),
        ["endpoints[0].addresses[0]"],
    ),
    "bad-node-name": (
        slice_with(endpoints=[{"addresses": addresses(1), "nodeName": "INvalid-node-name"}]),
        ["endpoints[0].nodeName"],
    ),
    "deprecated-address-type": (slice_with(addressType="IP"), ["addressType"]),
    "bad-address-type": (slice_with(addressType="other"), ["addressType"]),
    # SINGLE STACK: upstream's valid IPv6 and FQDN slices are refused by address type.
    "good-ipv6 (SINGLE STACK)": (
        slice_with(addressType="IPv6", endpoints=[{"addresses": ["a00:100::4"]}]),
        ["addressType", "endpoints[0].addresses[0]"],
    ),
    "good-fqdns (SINGLE STACK)": (
        slice_with(addressType="FQDN", endpoints=[]),
        ["addressType"],
    ),
}


@pytest.mark.parametrize("name", list(SLICE_CASES))
def test_validate_endpoint_slice(name: str) -> None:
    document, paths = SLICE_CASES[name]
    assert error_paths(document) == sorted(paths)


@pytest.fixture
def objects(tmp_path: Path) -> Iterator[ObjectStore]:
    with SqliteStore(tmp_path / "state.db") as store:
        yield ObjectStore(store)


def test_update_of_a_slice_is_validated_as_a_create(objects: ObjectStore) -> None:
    # TestValidateEndpointSliceUpdate: identical slices pass; an invalid update is refused
    # for its own field. (Its address-type change cases cannot arise here: IPv4 is the
    # only address type kept, so any other is refused before it could be a change.)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "world"}}
    good = slice_with(endpoints=[{"addresses": ["10.1.2.3"]}])
    objects.apply([namespace, good])
    assert [r.action for r in objects.apply([good])] == ["unchanged"]
    bad_node = slice_with(endpoints=[{"addresses": ["10.1.2.3"], "nodeName": "INVALID foo"}])
    with pytest.raises(ObjectInvalidError) as info:
        objects.apply([bad_node])
    assert [e.path for e in info.value.errors] == ["endpoints[0].nodeName"]
    with pytest.raises(ObjectInvalidError) as info:
        objects.apply([slice_with(ports=[{"name": "", "protocol": "invalid"}])])
    assert [e.path for e in info.value.errors] == ["ports[0].protocol"]
    with pytest.raises(ObjectInvalidError) as info:
        objects.apply([slice_with(addressType="FQDN", endpoints=[])])
    assert [e.path for e in info.value.errors] == ["addressType"]


def test_each_upstream_message_is_its_own_error() -> None:
    # IsDNS1123Label: a 64-character name with capitals breaks two rules, a subdomain
    # breaks the label rule only by its dots; IsValidPortName lists each broken rule.
    too_long = build(POD, with_meta(namespace="A" * 64))
    assert errors_text(too_long) == [
        'metadata.namespace: Invalid value: "' + "A" * 64 + '": must be no more than 63 characters',
        'metadata.namespace: Invalid value: "' + "A" * 64 + '": a lowercase RFC 1123 label must'
        " consist of lower case alphanumeric characters or '-', and must start and end with an"
        " alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is"
        " '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
    ]
    assert errors_text(build(POD, with_meta(namespace="foo.bar"))) == [
        'metadata.namespace: Invalid value: "foo.bar": must not contain dots'
    ]
    assert errors_text(pod_ports({"name": "-Bad--", "containerPort": 80})) == [
        f'{P0}.name: Invalid value: "-Bad--": must contain only alpha-numeric characters'
        " (a-z, 0-9), and hyphens (-)",
        f'{P0}.name: Invalid value: "-Bad--": must not contain consecutive hyphens',
        f'{P0}.name: Invalid value: "-Bad--": must not begin or end with a hyphen',
    ]


def test_too_many_items_print_as_field_too_many_does() -> None:
    assert errors_text(slice_with(ports=named_ports(101), endpoints=[])) == [
        "ports: Too many: 101: must have at most 100 items"
    ]


@pytest.mark.parametrize(
    ("finalizers", "valid"),
    [
        (["example.com/cleanup"], True),
        (["orphan"], True),
        (["foregroundDeletion"], True),
        (["cleanup"], False),  # neither standard nor qualified
        (["Example.com/x"], False),
        (["orphan", "foregroundDeletion"], False),  # TestValidateFinalizersPreventConflicting
    ],
)
def test_metadata_finalizers(finalizers: list[str], valid: bool) -> None:
    paths = error_paths(build(POD, with_meta(finalizers=finalizers)))
    assert (paths == []) if valid else (set(paths) == {"metadata.finalizers"})
