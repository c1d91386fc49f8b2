"""Runs the e2e model through the policy engine and the reference evaluator: the
decision the datapath would make for every pair, with no kernel."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from ciliate.control.objects import validate
from ciliate.control.policy.engine import compute
from ciliate.control.policy.evaluate import Ipcache, trace
from ciliate.control.policy.inputs import input_from_objects
from ciliate.control.policy.model import PROTOCOL_NUMBERS

from .model import Probe, Stage, default_pod_ips


def by_kind(documents: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    objects: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for document in documents:
        obj = validate(document)
        objects[obj["kind"]].append(obj)
    return objects


def observe_with_engine(pod_ips: Mapping[str, str]) -> Any:
    def observe(stage: Stage, probe: Probe) -> dict[tuple[str, str], bool]:
        # Pods a stage adds get addresses of their own (the given ones win).
        ips = {**default_pod_ips(stage.extra_pods), **pod_ips}
        inp = input_from_objects(by_kind(stage.objects(ips)))
        result = compute(inp)
        ipcache = Ipcache.build(pods=inp.pods, result=result)
        pods = {pod.ref: pod for pod in inp.pods}
        protocol = PROTOCOL_NUMBERS[probe.protocol]
        return {
            (src, dst): trace(
                result,
                src=pods[src],
                dst=pods[dst],
                protocol=protocol,
                port=probe.port,
                ipcache=ipcache,
            ).allowed
            for src in stage.pods
            for dst in stage.pods
        }

    return observe
