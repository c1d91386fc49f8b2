"""Failures reaching the CNI handler: each typed error of the endpoint
service keeps its documented code, hostile ifnames and JSON get 4 and 6
before the service is asked, and the module docstring's table names every
code the service can send."""

from __future__ import annotations

import json
import re

import pytest

from ciliate.control.cni import handler, service
from ciliate.control.cni.service import ServiceError

from .conftest import cni_env, netconf
from .fakes import FakeService
from .test_handler import assert_error, call


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (service.StoreFailedError("the state store is full", details="retry"), 11),
        (service.DeviceFailedError("the pod already has eth0", details="fix it"), 100),
        (service.DatapathFailedError("a BPF map refused", details="restart"), 101),
        (service.SecondInterfaceError("CNI_IFNAME eth1", details="DEL eth0"), 4),
        (service.InvalidNetnsError("CNI_NETNS gone"), 4),
    ],
    ids=["store", "device", "datapath", "second interface", "netns"],
)
def test_each_typed_failure_keeps_its_code_message_and_advice(
    error: ServiceError, code: int, pod_netns: str
) -> None:
    response, parsed = call(
        cni_env("ADD", CNI_NETNS=pod_netns), netconf(), FakeService(error=error)
    )
    assert_error(response, parsed, code, error.message)
    assert parsed.get("details", "") == error.details


def test_a_del_refused_by_the_store_is_try_again() -> None:
    error = service.StoreFailedError("DEL: the state store is read-only")
    response, parsed = call(cni_env("DEL"), netconf(), FakeService(error=error))
    assert_error(response, parsed, 11, "read-only")


def _service_codes() -> set[int]:
    def walk(cls: type[ServiceError]) -> set[type[ServiceError]]:
        return {cls}.union(*(walk(sub) for sub in cls.__subclasses__()))

    return {cls.cni_code for cls in walk(ServiceError) if cls.__module__ == service.__name__}


def test_the_handler_docstring_documents_every_code_the_service_sends() -> None:
    assert handler.__doc__ is not None
    documented = {int(code) for code in re.findall(r"^(\d+)\s", handler.__doc__, re.MULTILINE)}
    assert _service_codes() <= documented, _service_codes() - documented


@pytest.mark.parametrize(
    "ifname",
    ["eth%d", "all", "default", "é" * 8, "a\x01b", "\ud800", "tab\tname"],
    ids=["template", "all", "default", "16 bytes", "control", "surrogate", "whitespace"],
)
def test_an_ifname_the_kernel_would_not_take_as_given_is_code_4(
    ifname: str, pod_netns: str
) -> None:
    fake = FakeService()
    response, parsed = call(cni_env("ADD", CNI_NETNS=pod_netns, CNI_IFNAME=ifname), netconf(), fake)
    assert_error(response, parsed, 4, "CNI_IFNAME")
    assert fake.calls == []


def test_an_ifname_of_15_bytes_in_utf8_is_taken(pod_netns: str) -> None:
    fake = FakeService()
    ifname = "é" * 7 + "x"  # 15 bytes
    response, _ = call(cni_env("ADD", CNI_NETNS=pod_netns, CNI_IFNAME=ifname), netconf(), fake)
    assert response.exit_code == 0, response
    assert fake.calls[0][1].ifname == ifname


DEEP = b'{"cniVersion": "1.0.0", "name": "n", "type": "ciliate-cni", "x": ' + (
    b"[" * 100_000 + b"]" * 100_000 + b"}"
)


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_a_netconf_nested_too_deeply_is_a_decoding_error(command: str, pod_netns: str) -> None:
    fake = FakeService()
    response, parsed = call(cni_env(command, CNI_NETNS=pod_netns), DEEP, fake)
    assert_error(response, parsed, 6, "too deeply")
    assert fake.calls == []


def test_version_answers_a_netconf_nested_too_deeply() -> None:
    response, parsed = call(cni_env("VERSION"), DEEP)
    assert response.exit_code == 0
    assert parsed["cniVersion"] == handler.LATEST_VERSION


def test_a_relayed_body_nested_too_deeply_is_refused_as_malformed() -> None:
    body = b'{"env": ' + b"[" * 100_000 + b"]" * 100_000 + b', "stdin": ""}'
    with pytest.raises(ValueError, match="too deeply"):
        handler.decode_request(body)


def test_the_netns_check_is_the_datapath_one(pod_netns: str) -> None:
    response, parsed = call(cni_env("ADD", CNI_NETNS="/proc/self/ns/net"), netconf(), FakeService())
    assert_error(response, parsed, 4, "the agent's own network namespace")
    response, parsed = call(cni_env("ADD", CNI_NETNS="/proc/self/ns/uts"), netconf())
    assert_error(response, parsed, 4, "not a network namespace")
    assert json.loads(call(cni_env("ADD", CNI_NETNS=pod_netns), netconf())[0].stdout)["ips"]
