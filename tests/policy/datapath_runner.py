"""Runs the e2e NetworkPolicy model through the real datapath: the nine pods are
real pods (network namespaces networked by ``ciliate-cni``) on one node or spread
over a cluster's nodes, each running ``netpol_pod.py`` (servers on TCP and UDP 80
and 81, and a prober); a stage's objects are applied where the agents read them and
the probes are real connections and datagrams."""

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
        self._procs: dict[str, subprocess.Popen[str]] = {}

    def start(self) -> None:
        for ref, pod in self.pods.items():
            proc = subprocess.Popen(
                ["ip", "netns", "exec", pod.netns, sys.executable, str(POD_SCRIPT), str(pod.ip)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self._procs[ref] = proc
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", ref

    def probe(self, protocol: str, port: int) -> dict[tuple[str, str], bool]:
        """Every ordered pair, all sources at once."""
        targets = ",".join(self.ips[dst] for dst in PODS)
        for proc in self._procs.values():
            assert proc.stdin is not None
            proc.stdin.write(f"probe {protocol} {port} {PROBE_TIMEOUT_S} {targets}\n")
            proc.stdin.flush()
        observed = {}
        for src, proc in self._procs.items():
            assert proc.stdout is not None
            answers = json.loads(proc.stdout.readline())
            for dst in PODS:
                observed[(src, dst)] = bool(answers[self.ips[dst]])
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
    """Where the objects go and how to know every agent has caught up."""

    apply: Callable[[Sequence[Json]], None]
    delete: Callable[[Sequence[Json]], None]
    settled: Callable[[], bool]


def observer(pods: ModelPods, cluster: Cluster, *, settle_timeout: float = 20.0) -> Any:
    """An ``Observe`` for ``model.check_case``: puts each new stage in force (the
    previous stage's policies deleted, its objects applied, every agent caught up),
    then probes."""
    current: list[Stage] = []
    in_force: list[Json] = []

    def settle() -> None:
        deadline = time.monotonic() + settle_timeout
        while not cluster.settled():
            if time.monotonic() > deadline:
                raise AssertionError("the agents' policy loops did not catch up")
            time.sleep(0.02)

    def put_in_force(stage: Stage) -> None:
        if in_force:
            cluster.delete(in_force)
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
        cluster.apply(pod_objects(pods.ips))
        current.clear()
        settle()

    observe.reset = reset  # type: ignore[attr-defined]
    return observe
