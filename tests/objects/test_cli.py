"""``ciliate apply | get | delete | policy trace`` as a user runs them, against a real
etcd (a cluster: straight into the store every agent watches) and a real agent on a
node namespace (one node: through its API, into its SQLite store)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ciliate.control.lab.etcd_server import EtcdServer
from ciliate.control.objects import parse_key

from ..cluster import etcd_fixtures
from ..node.conftest import NodeLab, node_lab  # noqa: F401 - the fixture, for pytest

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server


def ciliate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ciliate.control.cli.main", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


def manifest(ns: str) -> str:
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {ns}, labels: {{team: blue}}}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {{name: a, namespace: {ns}, labels: {{pod: a}}}}
  spec: {{containers: [{{name: c, ports: [{{containerPort: 8080, name: http}}]}}]}}
  status: {{podIP: 10.244.7.10}}
- apiVersion: v1
  kind: Pod
  metadata: {{name: b, namespace: {ns}, labels: {{pod: b}}}}
  spec: {{containers: [{{name: c}}]}}
  status: {{podIP: 10.244.7.11}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: a-from-b, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  ingress: [{{from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}], ports: [{{port: http}}]}}]
"""


BAD = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: default}
spec: {ingress: [{ports: [{port: 80}, {port: 70000}]}]}
"""


def exercise(target: list[str], tmp_path: Path) -> None:
    """The same user session against either target."""
    ns = f"n{secrets.token_hex(3)}"
    path = tmp_path / "objects.yaml"
    path.write_text(manifest(ns))

    applied = ciliate("apply", "-f", str(path), *target)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == [
        f"namespace/{ns} created",
        "pod/a created",
        "pod/b created",
        "networkpolicy.networking.k8s.io/a-from-b created",
    ]
    again = ciliate("apply", "-f", "-", *target, stdin=manifest(ns))
    assert again.stdout.splitlines()[-1] == "networkpolicy.networking.k8s.io/a-from-b unchanged"

    table = ciliate("get", "pods", "-n", ns, *target)
    assert table.returncode == 0, table.stderr
    assert [line.split()[:2] for line in table.stdout.splitlines()] == [
        ["NAME", "IP"],
        ["a", "10.244.7.10"],
        ["b", "10.244.7.11"],
    ]
    listed = json.loads(ciliate("get", "netpol", "-A", "-o", "json", *target).stdout)
    assert listed["kind"] == "List"
    assert (ns, "a-from-b") in {
        (i["metadata"]["namespace"], i["metadata"]["name"]) for i in listed["items"]
    }
    one = yaml.safe_load(
        ciliate("get", "netpol", "a-from-b", "-n", ns, "-o", "yaml", *target).stdout
    )
    assert one["spec"]["policyTypes"] == ["Ingress"]  # defaulted as the API server does
    assert one["metadata"]["generation"] == 1 and one["metadata"]["resourceVersion"]
    namespace = json.loads(ciliate("get", "ns", ns, "-o", "json", *target).stdout)
    assert namespace["metadata"]["labels"]["kubernetes.io/metadata.name"] == ns

    allowed = ciliate(
        "policy", "trace", "--src", f"{ns}/b", "--dst", f"{ns}/a", "--dport", "8080/tcp", *target
    )
    assert allowed.returncode == 0, allowed.stderr
    assert f"NetworkPolicy {ns}/a-from-b spec.ingress[0]" in allowed.stdout
    assert allowed.stdout.rstrip().endswith("verdict: ALLOWED")
    denied = json.loads(
        ciliate(
            "policy",
            "trace",
            "--src",
            f"{ns}/b",
            "--dst",
            f"{ns}/a",
            "--dport",
            "80/tcp",
            "-o",
            "json",
            *target,
        ).stdout
    )
    assert denied["allowed"] is False
    assert "default deny" in denied["verdicts"][-1]["because"]

    refused = ciliate("apply", "-f", "-", *target, stdin=BAD)
    assert refused.returncode == 1
    assert (
        'NetworkPolicy.networking.k8s.io "bad" is invalid: spec.ingress[0].ports[1].port'
        in refused.stderr
    )
    unknown = ciliate("get", "deployments", *target)
    assert unknown.returncode == 1 and 'resource type "deployments"' in unknown.stderr

    deleted = ciliate("delete", "netpol", "a-from-b", "-n", ns, *target)
    assert deleted.stdout.strip() == "networkpolicy.networking.k8s.io/a-from-b deleted"
    missing = ciliate("delete", "netpol", "a-from-b", "-n", ns, *target)
    assert missing.returncode == 1 and "not found" in missing.stderr
    gone = ciliate("delete", "-f", str(path), "--ignore-not-found", *target)
    assert gone.returncode == 0, gone.stderr
    assert ciliate("get", "pods", "-n", ns, "-o", "json", *target).stdout.count('"name"') == 0


def test_objects_through_etcd(etcd_server: EtcdServer, tmp_path: Path) -> None:
    exercise(["--etcd-endpoint", etcd_server.endpoint], tmp_path)


def test_an_apply_through_etcd_is_seen_by_a_watcher(etcd_server: EtcdServer) -> None:
    from ciliate.control.store.etcd import EtcdStore

    ns = f"w{secrets.token_hex(3)}"
    with EtcdStore([etcd_server.endpoint]) as store, store.watch_prefix("objects/") as watch:
        applied = ciliate(
            "apply", "-f", "-", "--etcd-endpoint", etcd_server.endpoint, stdin=manifest(ns)
        )
        assert applied.returncode == 0, applied.stderr
        seen: set[Any] = set()
        while len(seen) < 4:
            event = watch.get(timeout=10)
            assert event is not None, f"only saw {seen}"
            ref = parse_key(event.key)
            if ref is not None and (ref.namespace == ns or ref.name == ns):
                seen.add((ref.kind.name, ref.name))
    assert seen == {("Namespace", ns), ("Pod", "a"), ("Pod", "b"), ("NetworkPolicy", "a-from-b")}


def test_objects_through_an_agent(node_lab: NodeLab, tmp_path: Path) -> None:  # noqa: F811
    exercise(["--socket", node_lab.node.socket], tmp_path)


@pytest.mark.parametrize("target", ["--socket", "--etcd-endpoint"])
def test_an_unreachable_target_is_a_clear_error(target: str, tmp_path: Path) -> None:
    where = str(tmp_path / "none.sock") if target == "--socket" else "http://127.0.0.1:9"
    proc = ciliate("get", "pods", target, where)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert ("no agent answers" in proc.stderr) if target == "--socket" else ("etcd" in proc.stderr)
