"""runtimeConfig.portMappings (the ``portMappings`` capability) reaches the
agent's ADD as the runtime wrote it, and a malformed list is code 7 naming the
entry and field, with nothing asked of the agent."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ciliate.control.cni import handler
from ciliate.control.cni.service import PortMapping

from .conftest import cni_env, netconf
from .fakes import FakeService


def _add(pod_netns: str, runtime_config: Any) -> tuple[handler.CniResponse, FakeService]:
    service = FakeService()
    conf = netconf(runtimeConfig=runtime_config)
    response = handler.handle(
        cni_env("ADD", CNI_NETNS=pod_netns), json.dumps(conf).encode(), service
    )
    return response, service


def test_port_mappings_are_passed_to_the_agent(pod_netns: str) -> None:
    # As podman and containerd write them (CONVENTIONS.md).
    mappings = [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.168.1.5"},
    ]
    response, service = _add(pod_netns, {"portMappings": mappings})
    assert response.exit_code == 0, response
    request = service.calls[0][1]
    assert request.port_mappings == (
        PortMapping(8080, 80, protocol="tcp"),
        PortMapping(5353, 53, protocol="udp", host_ip="192.168.1.5"),
    )


@pytest.mark.parametrize("runtime_config", [{}, {"portMappings": []}, {"bandwidth": {}}])
def test_no_port_mappings_is_none(pod_netns: str, runtime_config: Any) -> None:
    response, service = _add(pod_netns, runtime_config)
    assert response.exit_code == 0
    assert service.calls[0][1].port_mappings == ()


@pytest.mark.parametrize(
    ("runtime_config", "fragment"),
    [
        ([], "runtimeConfig must be an object"),
        ({"portMappings": {"hostPort": 1}}, "runtimeConfig.portMappings must be a list"),
        ({"portMappings": [8080]}, "portMappings[0] must be an object"),
        ({"portMappings": [{"containerPort": 80}]}, "portMappings[0].hostPort must be an integer"),
        (
            {"portMappings": [{"hostPort": 8080, "containerPort": 0}]},
            "portMappings[0].containerPort must be an integer from 1 to 65535",
        ),
        (
            {"portMappings": [{"hostPort": True, "containerPort": 80}]},
            "portMappings[0].hostPort must be an integer",
        ),
        (
            {"portMappings": [{"hostPort": 1, "containerPort": 80, "protocol": 6}]},
            "portMappings[0].protocol must be a string",
        ),
        (
            {"portMappings": [{"hostPort": 1, "containerPort": 80, "hostIP": None}]},
            "portMappings[0].hostIP must be a string",
        ),
    ],
)
def test_malformed_port_mappings_are_code_7_and_ask_nothing(
    pod_netns: str, runtime_config: Any, fragment: str
) -> None:
    response, service = _add(pod_netns, runtime_config)
    parsed = json.loads(response.stdout)
    assert (response.exit_code, parsed["code"]) == (1, 7), parsed
    assert fragment in parsed["msg"], parsed
    assert service.calls == []
