"""The CNI ``bandwidth`` capability (CONVENTIONS.md: ``runtimeConfig.bandwidth``
with ``ingressRate``/``ingressBurst``/``egressRate``/``egressBurst``, rates in
bits per second), as kubelet's runtime passes the pod's
kubernetes.io/egress-bandwidth to a plugin that declares it: the handler hands
the egress rate to the agent, refuses malformed ones (code 7, naming the
field) and leaves out what ciliate does not keep (bursts, ingress)."""

from __future__ import annotations

from typing import Any

import pytest

from ciliate.control.cni.service import AddRequest

from .conftest import cni_env, netconf
from .fakes import FakeService
from .test_handler import assert_error, call


def _add(pod_netns: str, bandwidth: Any) -> tuple[FakeService, Any, Any]:
    service = FakeService()
    conf = netconf("1.0.0", runtimeConfig={"bandwidth": bandwidth})
    response, parsed = call(cni_env("ADD", CNI_NETNS=pod_netns), conf, service)
    return service, response, parsed


def _request(service: FakeService) -> AddRequest:
    [(name, request)] = service.calls
    assert name == "add" and isinstance(request, AddRequest)
    return request


def test_the_egress_rate_reaches_the_agent_in_bits_per_second(pod_netns: str) -> None:
    # containerd's shape: the burst set to the largest value, the rate from the annotation.
    bandwidth = {"egressRate": 10_000_000, "egressBurst": 2**32 - 1, "ingressRate": 5_000_000}
    service, response, _ = _add(pod_netns, bandwidth)
    assert response.exit_code == 0
    assert _request(service).egress_rate == 10_000_000


@pytest.mark.parametrize("bandwidth", [{}, {"egressRate": 0}, {"ingressRate": 1_000_000}])
def test_no_egress_rate_is_no_limit(pod_netns: str, bandwidth: dict[str, int]) -> None:
    service, response, _ = _add(pod_netns, bandwidth)
    assert response.exit_code == 0
    assert _request(service).egress_rate is None


@pytest.mark.parametrize(
    ("bandwidth", "fragment"),
    [
        ("10M", "runtimeConfig.bandwidth must be an object"),
        ({"egressRate": "10M"}, "egressRate must be a non-negative integer"),
        ({"egressRate": -1}, "egressRate must be a non-negative integer"),
        ({"egressRate": True}, "egressRate must be a non-negative integer"),
        ({"egressRate": 1.5e6}, "egressRate must be a non-negative integer"),
    ],
)
def test_a_malformed_bandwidth_is_refused_before_the_agent_is_asked(
    pod_netns: str, bandwidth: Any, fragment: str
) -> None:
    service, response, parsed = _add(pod_netns, bandwidth)
    assert_error(response, parsed, 7, fragment)
    assert service.calls == []
