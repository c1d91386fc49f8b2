"""Runs the e2e NetworkPolicy model through the real datapath: the nine pods are
real pods (network namespaces networked by ``ciliate-cni``) on one node or spread
over a cluster's nodes, each running ``netpol_pod.py`` (servers on TCP and UDP 80
and 81, and a prober); a stage's objects are applied where the agents read them and
the probes are real connections and datagrams. Pods a stage adds (``extra_pods``)
are created (CNI ADD) when it starts and removed (CNI DEL) when a later stage or the
next case no longer has them, where the cluster knows how (``Cluster.add_pod``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciliate.control.lab import lab
from ciliate.control.objects import store

from .model import NAMESPACES, PODS, Json, Probe, Stage, namespace_object, pod_object

POD_SCRIPT = Path(__file__).with_name("netpol_pod.py")
# A denied probe waits this long; an allowed one answers in well under a millisecond.
PROBE_TIMEOUT_S = 0.5


class ModelPods:
    """The model's pods (``x/a`` ... ``z/c``), each serving and probing."""

    def __init__(self, pods: Mapping[str, lab.PodState]) -> None:
        assert set(pods) == set(PODS)
        self.pods = dict(pods)
        self.ips = {ref: str(pod.ip) for ref, pod in pods.items()}
        # Where probes go instead of a pod's own address (its Service's ClusterIP, as
        # the upstream suite probes), while set.
        self.targets: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen[str]] = {}

    @property
    def extra(self) -> list[str]:
        """The pods a stage added beyond the model's nine."""
        return [ref for ref in self.pods if ref not in PODS]

    def start(self) -> None:
        for ref in self.pods:
            self._start(ref)

    def _start(self, ref: str) -> None:
        pod = self.pods[ref]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, str(POD_SCRIPT), str(pod.ip)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._procs[ref] = proc
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", ref

    def add(self, ref: str, pod: lab.PodState) -> None:
        """A pod networked after the others, serving and probing like them."""
        self.pods[ref] = pod
        self.ips[ref] = str(pod.ip)
        self._start(ref)

    def remove(self, ref: str) -> lab.PodState:
        """Stops the pod's servers and prober; the caller takes its network away."""
        proc = self._procs.pop(ref)
        proc.terminate()
        proc.wait(timeout=5)
        del self.ips[ref]
        return self.pods.pop(ref)

    def probe(self, protocol: str, port: int) -> dict[tuple[str, str], bool]:
        """Every ordered pair of the pods there are now, all sources at once."""
        refs = list(self.pods)
        address = {ref: self.targets.get(ref, self.ips[ref]) for ref in refs}
        targets = ",".join(address[dst] for dst in refs)
        for ref in refs:
            stdin = self._procs[ref].stdin
            assert stdin is not None
            stdin.write(f"probe {protocol} {port} {PROBE_TIMEOUT_S} {targets}\n")
            stdin.flush()
        observed = {}
        for src in refs:
            stdout = self._procs[src].stdout
            assert stdout is not None
            answers = json.loads(stdout.readline())
            for dst in refs:
                observed[(src, dst)] = bool(answers[address[dst]])
        return observed

    def close(self) -> None:
        for proc in self._procs.values():
            proc.terminate()
        for proc in self._procs.values():
            proc.wait(timeout=5)


def pod_objects(pod_ips: Mapping[str, str | None]) -> list[Json]:
    """The model's namespaces and pods without any stage's changes."""
    return [namespace_object(ns) for ns in NAMESPACES] + [
        pod_object(ref, ip=pod_ips.get(ref)) for ref in PODS
    ]


@dataclass
class Cluster:
    """Where the objects go and how to know every agent has caught up; how to network
    a pod a stage adds (``ns/name`` -> the pod, its address set) and take it away."""

    apply: Callable[[Sequence[Json]], None]
    delete: Callable[[Sequence[Json]], None]
    settled: Callable[[], bool]
    add_pod: Callable[[str], lab.PodState] | None = None
    remove_pod: Callable[[lab.PodState], None] | None = None
    get: Callable[[str], Any] | None = None  # an agent API path


def observer(pods: ModelPods, cluster: Cluster, *, settle_timeout: float = 20.0) -> Any:
    """An ``Observe`` for ``model.check_case``: puts each new stage in force (the
    previous stage's policies deleted, its objects applied, every agent caught up),
    then probes."""
    current: list[Stage] = []
    in_force: list[Json] = []
    extra_namespaces: list[str] = []

    def settle() -> None:
        deadline = time.monotonic() + settle_timeout
        while not cluster.settled():
            if time.monotonic() > deadline:
                raise AssertionError("the agents' policy loops did not catch up")
            time.sleep(0.02)

    def change_pods(stage: Stage | None) -> None:
        """Removes the added pods and namespaces ``stage`` lacks (their objects, then
        the pods), adds those it has (CNI ADD first: the Pod objects, applied next,
        carry the addresses)."""
        wanted = dict(stage.extra_pods) if stage is not None else {}
        gone = [ref for ref in pods.extra if ref not in wanted]
        # The API server refuses to delete ``default`` and kube-*: they stay.
        gone_namespaces = [
            ns
            for ns in extra_namespaces
            if (stage is None or ns not in stage.extra_namespaces)
            and ns not in store.IMMORTAL_NAMESPACES
        ]
        if gone or gone_namespaces:
            cluster.delete(
                [pod_object(ref, ip=None) for ref in gone]
                + [namespace_object(ns) for ns in gone_namespaces]
            )
        for ref in gone:
            removed = pods.remove(ref)
            assert cluster.remove_pod is not None
            cluster.remove_pod(removed)
        extra_namespaces[:] = [ns for ns in extra_namespaces if ns not in gone_namespaces]
        if stage is None:
            return
        extra_namespaces.extend(ns for ns in stage.extra_namespaces if ns not in extra_namespaces)
        for ref in wanted:
            if ref not in pods.pods:
                assert cluster.add_pod is not None, "this cluster cannot add pods"
                pods.add(ref, cluster.add_pod(ref))

    def put_in_force(stage: Stage) -> None:
        if in_force:
            cluster.delete(in_force)
        change_pods(stage)
        cluster.apply(stage.objects(pods.ips))
        in_force[:] = list(stage.policies)
        settle()

    def observe(stage: Stage, probe: Probe) -> dict[tuple[str, str], bool]:
        if not current or current[0] is not stage:
            put_in_force(stage)
            current[:] = [stage]
        return pods.probe(probe.protocol, probe.port)

    def reset() -> None:
        """Back to no policy and the model's labels (between cases)."""
        if in_force:
            cluster.delete(in_force)
            in_force.clear()
        change_pods(None)
        cluster.apply(pod_objects(pods.ips))
        current.clear()
        settle()

    observe.reset = reset  # type: ignore[attr-defined]
    observe.cluster = cluster  # type: ignore[attr-defined]
    return observe


def model_services() -> list[Json]:
    """A Service per pod, as the upstream suite creates (``s-<namespace>-<pod>``,
    selecting ``pod=<name>`` in its namespace, TCP and UDP on 80 and 81)."""
    services: list[Json] = []
    for ref in PODS:
        namespace, name = ref.split("/")
        ports = [
            {"name": f"service-port-{protocol.lower()}-{port}", "protocol": protocol, "port": port}
            for port in (80, 81)
            for protocol in ("TCP", "UDP")
        ]
        services.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"s-{namespace}-{name}", "namespace": namespace},
                "spec": {"selector": {"pod": name}, "ports": ports},
            }
        )
    return services
