"""Input as an unlucky operator writes it: every bad manifest is refused with a clear
error that says what to fix, and stores nothing - checked on the parser, on the
store, and end to end through ``ciliate apply`` against a real etcd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ciliate.control.lab.etcd_server import EtcdServer
from ciliate.control.objects import (
    MAX_MANIFEST_BYTES,
    DocumentError,
    ObjectInvalidError,
    UnknownKindError,
    decode_manifest,
    load_documents,
    validate,
)

from ..cluster import etcd_fixtures

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"


def billion_laughs(levels: int = 10) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        refs = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return NAMESPACE + "\n".join(lines) + "\n"


# -- the parser ------------------------------------------------------------------------


def test_a_billion_laughs_is_refused_before_it_is_expanded() -> None:
    with pytest.raises(DocumentError, match="excessive aliasing"):
        load_documents(billion_laughs())


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(DocumentError, match="recursive alias"):
        load_documents(NAMESPACE + "loop: &loop [*loop]\n")


def test_modest_aliases_and_merge_keys_still_work() -> None:
    text = (
        "labels: &labels {app: web, tier: front}\n"
        "apiVersion: v1\nkind: Pod\n"
        "metadata: {name: a, labels: *labels, annotations: {<<: *labels, note: x}}\n"
    )
    [pod] = load_documents(text)
    assert pod["metadata"]["labels"] == {"app": "web", "tier": "front"}
    assert pod["metadata"]["annotations"]["note"] == "x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (NAMESPACE.replace("{name: x}", "{name: x, name: y}"), 'key "name" already set in map'),
        ("apiVersion: v1\nkind: Namespace\nkind: Pod\nmetadata: {name: x}\n", 'key "kind"'),
        ('{"apiVersion": "v1", "kind": "Namespace", "kind": "Pod"}', 'duplicate field "kind"'),
    ],
)
def test_a_key_given_twice_is_an_error_not_a_silent_overwrite(text: str, expected: str) -> None:
    with pytest.raises(DocumentError, match=expected):
        load_documents(text, source="m.yaml")


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # JSON
        "a: " + "[" * 100_000 + "]" * 100_000,  # YAML flow
        "[" * 100_000,  # and unterminated
    ],
)
def test_nesting_too_deep_is_an_error_not_a_crash(text: str) -> None:
    with pytest.raises(DocumentError, match="nested too deeply to read"):
        load_documents(text)


def test_a_manifest_over_the_request_limit_is_refused_unread() -> None:
    huge = NAMESPACE + "# " + "x" * MAX_MANIFEST_BYTES + "\n"
    with pytest.raises(DocumentError, match="request entity too large"):
        load_documents(huge, source="big.yaml")
    with pytest.raises(DocumentError, match="request entity too large"):
        decode_manifest(huge.encode(), source="big.yaml")


def test_bytes_that_are_not_utf8_are_refused_naming_the_offset() -> None:
    with pytest.raises(DocumentError, match=r"not UTF-8 text \(byte 0xff at offset 26\)"):
        decode_manifest(b"apiVersion: v1\nkind: Names\xffpace\n", source="m.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "document 1 is a list, not an object"),
        ("just text\n", "document 1 is a str"),
        ("apiVersion: v1\nmetadata: {name: x}\n", "Object 'kind' is missing"),
        ("kind: Pod\nmetadata: {name: x}\n", "Object 'apiVersion' is missing"),
        ("apiVersion: v1\nkind: List\nitems: [1, 2]\n", "List items must be objects"),
        ("a: [1,\n", "not valid YAML or JSON"),
    ],
)
def test_shapeless_documents_are_named(text: str, expected: str) -> None:
    with pytest.raises(DocumentError, match=expected):
        load_documents(text, source="m.yaml")


# -- kinds, names and namespaces -----------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
            'no matches for kind "Deployment" in version "apps/v1"',
        ),
        (
            {"apiVersion": "networking.k8s.io/v1beta1", "kind": "NetworkPolicy"},
            'no matches for kind "NetworkPolicy" in version "networking.k8s.io/v1beta1"',
        ),
        (
            {"apiVersion": "cilium.io/v1", "kind": "CiliumNetworkPolicy"},
            'no matches for kind "CiliumNetworkPolicy" in version "cilium.io/v1"',
        ),
        (
            {"apiVersion": "v1", "kind": "service"},
            'no matches for kind "service" in version "v1"',
        ),
    ],
)
def test_wrong_kinds_and_versions_use_the_api_servers_words(
    document: dict[str, Any], expected: str
) -> None:
    with pytest.raises(UnknownKindError, match=expected):
        validate(document)


def test_missing_name_namespaced_and_cluster_scoped_rules() -> None:
    with pytest.raises(ObjectInvalidError, match=r"metadata\.name: Required value"):
        validate({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {}})
    with pytest.raises(ObjectInvalidError, match="metadata: Required value"):
        validate({"apiVersion": "v1", "kind": "Namespace"})
    pod = validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c"}]},
        }
    )
    assert pod["metadata"]["namespace"] == "default"  # as kubectl fills it in
    ccnp = validate(
        {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": "c", "namespace": "x"},
            "spec": {"endpointSelector": {}},
        }
    )
    assert "namespace" not in ccnp["metadata"]  # cleared, as the API server clears it


def test_an_object_too_large_for_the_store_is_refused() -> None:
    cidrs = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}/32" for i in range(90_000)]
    document = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "big", "namespace": "x"},
        "spec": {"endpointSelector": {}, "egress": [{"toCIDR": cidrs}]},
    }
    with pytest.raises(ObjectInvalidError, match=r"<object>: Too long: the object is \d+ bytes"):
        validate(document)


# -- end to end: ciliate apply against a real etcd -------------------------------------------


def ciliate(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ciliate.control.cli.main", *args],
        capture_output=True,
        input=stdin,
        timeout=60,
        check=False,
    )


def stored_namespaces(endpoint: str) -> set[str]:
    proc = ciliate("get", "ns", "-o", "json", "--etcd-endpoint", endpoint)
    assert proc.returncode == 0, proc.stderr
    return {item["metadata"]["name"] for item in json.loads(proc.stdout)["items"]}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"apiVersion: v1\nkind: Namespace\nmetadata: {name: bad\xe9}\n", "not UTF-8 text"),
        (billion_laughs().encode(), "excessive aliasing"),
        (
            b"apiVersion: v1\nkind: Namespace\nmetadata: {name: bad1, name: bad2}\n",
            "already set in map",
        ),
        (NAMESPACE.encode() + b"#" * MAX_MANIFEST_BYTES, "request entity too large"),
        (
            NAMESPACE.replace("x", "bad3").encode()
            + b"---\napiVersion: v2\nkind: Namespace\nmetadata: {name: bad4}\n",
            'no matches for kind "Namespace" in version "v2"',
        ),
    ],
    ids=["non-utf8", "alias-bomb", "duplicate-key", "huge", "wrong-version"],
)
def test_apply_refuses_bad_input_clearly_and_stores_nothing(
    etcd_server: EtcdServer, tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_bytes(content)
    before = stored_namespaces(etcd_server.endpoint)
    for source, stdin in ((str(path), None), ("-", content)):
        proc = ciliate("apply", "-f", source, "--etcd-endpoint", etcd_server.endpoint, stdin=stdin)
        assert proc.returncode == 1
        message = proc.stderr.decode()
        assert expected in message and "Traceback" not in message, message
    assert stored_namespaces(etcd_server.endpoint) == before


def test_get_yaml_shows_the_defaulted_objects_as_kubectl_would(etcd_server: EtcdServer) -> None:
    manifest = (
        b"apiVersion: v1\nkind: Service\nmetadata: {name: dflt}\n"
        b"spec: {ports: [{port: 80}], sessionAffinity: ClientIP}\n"
    )
    applied = ciliate("apply", "-f", "-", "--etcd-endpoint", etcd_server.endpoint, stdin=manifest)
    assert applied.returncode == 0, applied.stderr
    shown = yaml.safe_load(
        ciliate("get", "svc", "dflt", "-o", "yaml", "--etcd-endpoint", etcd_server.endpoint).stdout
    )
    spec = shown["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"] == [{"protocol": "TCP", "port": 80, "targetPort": 80}]
    assert spec["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    assert spec["clusterIP"].startswith("10.") and spec["clusterIPs"] == [spec["clusterIP"]]
    assert spec["internalTrafficPolicy"] == "Cluster" and spec["ipFamilies"] == ["IPv4"]
    assert shown["metadata"]["namespace"] == "default" and shown["metadata"]["uid"]


def test_apply_namespace_flag_fills_in_and_never_moves_an_object(etcd_server: EtcdServer) -> None:
    target = ("--etcd-endpoint", etcd_server.endpoint)
    namespace = b"apiVersion: v1\nkind: Namespace\nmetadata: {name: flagged}\n"
    assert ciliate("apply", "-f", "-", *target, stdin=namespace).returncode == 0
    pod = b"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n"
    filled = ciliate("apply", "-f", "-", "-n", "flagged", *target, stdin=pod)
    assert filled.returncode == 0, filled.stderr
    shown = ciliate("get", "pod", "p", "-n", "flagged", "-o", "json", *target)
    assert json.loads(shown.stdout)["metadata"]["namespace"] == "flagged"
    elsewhere = pod.replace(b"{name: p}", b"{name: q, namespace: default}")
    refused = ciliate("apply", "-f", "-", "-n", "flagged", *target, stdin=elsewhere)
    assert refused.returncode == 1
    assert (
        'the namespace from the provided object "default" does not match the namespace'
        ' "flagged"' in refused.stderr.decode()
    )


def test_get_shows_an_external_name_service_as_kubectl_does(etcd_server: EtcdServer) -> None:
    target = ("--etcd-endpoint", etcd_server.endpoint)
    manifest = (
        b"apiVersion: v1\nkind: Service\nmetadata: {name: db}\n"
        b"spec: {type: ExternalName, externalName: db.example.com}\n"
    )
    assert ciliate("apply", "-f", "-", *target, stdin=manifest).returncode == 0
    rows = {
        line.split()[0]: line.split()
        for line in ciliate("get", "svc", *target).stdout.decode().splitlines()[1:]
    }
    assert rows["db"][1:5] == ["ExternalName", "<none>", "db.example.com", "<none>"]
