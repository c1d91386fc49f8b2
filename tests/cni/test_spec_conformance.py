"""CNI spec 1.1 (SPEC.md, sections 2 and 5; libcni's skel for what the spec leaves
open), point by point, through the real ``ciliate-cni`` binary as a runtime runs
it: against the real handler over a fake endpoint service for the protocol
(variables per command, version negotiation, result shapes, error documents,
stdout and exit status), and against a real agent in a lab node for what the
agent decides (DEL of unknown containers and after a failed ADD, a second ADD,
GC of what the runtime no longer lists, STATUS)."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.cni import handler
from ciliate.control.lab import lab

from .conftest import CONTAINER_ID, ConfiguredPod, cni_env, netconf, run_shim
from .fakes import FakeAgent, FakeService, add_result

VERSIONS = handler.SUPPORTED_VERSIONS
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}


def conf_for(agent: FakeAgent, version: str = "1.1.0", **fields: Any) -> dict[str, Any]:
    return netconf(version, agentSocket=str(agent.socket_path), **fields)


def outcome(proc: subprocess.CompletedProcess[bytes]) -> tuple[int, Any]:
    """(exit status, the one JSON document on stdout or None): stdout carries the
    result or the error and nothing else (no log lines, one trailing newline)."""
    out = proc.stdout.decode()
    if not out:
        return proc.returncode, None
    assert out.endswith("\n") and out.count("\n") == 1, f"stdout is not one document: {out!r}"
    document = json.loads(out)
    if proc.returncode != 0:
        assert proc.returncode == 1, proc
        assert set(document) <= ERROR_KEYS and {"code", "msg"} <= set(document), document
        assert isinstance(document["code"], int) and isinstance(document["msg"], str)
        assert document["msg"], "an error says what happened"
    return proc.returncode, document


@pytest.fixture
def served(agent: FakeAgent, pod_netns: str) -> FakeService:
    """The fake agent answers with the real handler over a fake endpoint service."""
    service = FakeService(result=add_result(netns=pod_netns))
    agent.answer_with(service)
    return service


# -- section 2: the variables each command needs ----------------------------

# (command, variable left out, the code that follows: 0 = success). Required:
# ADD: CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME; DEL: CNI_COMMAND,
# CNI_CONTAINERID, CNI_IFNAME; CHECK: those of ADD and CNI_PATH; GC:
# CNI_COMMAND, CNI_PATH; STATUS and VERSION: CNI_COMMAND. The rest is optional.
ENV_CASES = [
    ("ADD", "CNI_CONTAINERID", 4),
    ("ADD", "CNI_NETNS", 4),
    ("ADD", "CNI_IFNAME", 4),
    ("ADD", "CNI_ARGS", 0),
    ("ADD", "CNI_PATH", 0),
    ("DEL", "CNI_CONTAINERID", 4),
    ("DEL", "CNI_IFNAME", 4),
    ("DEL", "CNI_NETNS", 0),
    ("DEL", "CNI_ARGS", 0),
    ("DEL", "CNI_PATH", 0),
    ("CHECK", "CNI_CONTAINERID", 4),
    ("CHECK", "CNI_NETNS", 4),
    ("CHECK", "CNI_IFNAME", 4),
    ("CHECK", "CNI_PATH", 4),
    ("CHECK", "CNI_ARGS", 0),
    ("GC", "CNI_PATH", 4),
    ("STATUS", "CNI_PATH", 0),
    ("VERSION", "CNI_PATH", 0),
]


@pytest.mark.parametrize(
    ("command", "left_out", "code"), ENV_CASES, ids=[f"{c}-{v}" for c, v, _ in ENV_CASES]
)
def test_each_command_needs_exactly_the_variables_the_spec_lists(
    shim: Path,
    agent: FakeAgent,
    configured_pod: ConfiguredPod,
    command: str,
    left_out: str,
    code: int,
) -> None:
    service = FakeService(result=add_result(netns=configured_pod.netns))
    agent.answer_with(service)
    env = cni_env(command, CNI_NETNS=configured_pod.netns)
    if command == "ADD":  # a pod without eth0 yet
        configured_pod.ip("link", "del", "eth0")
    env.pop(left_out, None)
    fields: dict[str, Any] = {}
    if command == "CHECK":
        fields["prevResult"] = handler.format_result(service.result, "1.1.0")
    if command == "GC":
        fields["cni.dev/valid-attachments"] = []

    status, document = outcome(run_shim(shim, env, conf_for(agent, **fields)))

    if code == 0:
        assert status == 0, document
    else:
        assert (status, document["code"]) == (1, code), document
        assert left_out in document["msg"], "the message names the variable"
        assert [c for c in service.calls if c[0] not in ("check", "ready")] == []


def test_an_empty_variable_is_a_missing_one(shim: Path, agent: FakeAgent, served: Any) -> None:
    status, document = outcome(run_shim(shim, cni_env("DEL", CNI_CONTAINERID=""), conf_for(agent)))
    assert (status, document["code"]) == (1, 4)
    assert "CNI_CONTAINERID" in document["msg"]


# -- section 1 and 5: versions ------------------------------------------------

# The first version that has each command (skel: CHECK from 0.4.0, GC and
# STATUS from 1.1.0); ADD, DEL and VERSION are in all.
SINCE = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
@pytest.mark.parametrize("version", [*VERSIONS, "0.1.0", "0.2.0", "1.2.0"])
def test_each_command_in_each_version(
    shim: Path,
    agent: FakeAgent,
    configured_pod: ConfiguredPod,
    command: str,
    version: str,
) -> None:
    service = FakeService(result=add_result(netns=configured_pod.netns))
    agent.answer_with(service)
    if command == "ADD":
        configured_pod.ip("link", "del", "eth0")
    fields: dict[str, Any] = {}
    if command == "CHECK":
        fields["prevResult"] = handler.format_result(service.result, version)
    if command == "GC":
        fields["cni.dev/valid-attachments"] = [{"containerID": CONTAINER_ID, "ifname": "eth0"}]
    env = cni_env(command, CNI_NETNS=configured_pod.netns)

    status, document = outcome(run_shim(shim, env, conf_for(agent, version, **fields)))

    spoken = version in VERSIONS
    has_command = spoken and _key(version) >= _key(SINCE.get(command, "0.0.0"))
    if has_command:
        assert status == 0, document
        if command == "ADD":
            assert document["cniVersion"] == version
        else:
            assert document is None, "only ADD prints a result"
        return
    assert (status, document["code"]) == (1, 1), document
    assert document["cniVersion"] == version, "errors repeat the netconf's version"
    if not spoken:
        assert ", ".join(VERSIONS) in document["msg"], "code 1 names the versions ciliate speaks"
    else:
        assert f"does not have {command}" in document["msg"]
    assert [c for c in service.calls if c[0] != "ready"] == []


@pytest.mark.parametrize("command", ["ADD", "CHECK", "GC", "STATUS"])
@pytest.mark.parametrize("version", [*VERSIONS, "0.2.0", "1.2.0"])
def test_with_the_agent_down_a_version_error_is_still_code_1(
    shim: Path, sock_dir: Path, command: str, version: str
) -> None:
    """The relay answers for an unreachable agent as the agent would have about the
    version (code 1), and only then says "try again" (11; STATUS: 50)."""
    conf = netconf(version, agentSocket=str(sock_dir / "nobody.sock"))
    status, document = outcome(run_shim(shim, cni_env(command), conf))
    has_command = version in VERSIONS and _key(version) >= _key(SINCE.get(command, "0.0.0"))
    expected = (50 if command == "STATUS" else 11) if has_command else 1
    assert (status, document["code"], document["cniVersion"]) == (1, expected, version)


def test_version_prints_the_supported_versions_in_the_version_asked(shim: Path) -> None:
    for given, answered in (("0.4.0", "0.4.0"), ("1.1.0", "1.1.0"), ("0.2.0", "0.2.0")):
        proc = run_shim(shim, {"CNI_COMMAND": "VERSION"}, {"cniVersion": given})
        assert outcome(proc) == (
            0,
            {"cniVersion": answered, "supportedVersions": list(VERSIONS)},
        )


# Section 5, per version: what a result holds and what it must not.
RESULT_SHAPES = {
    "0.3.0": {"ip_version": True, "mtu": False},
    "0.3.1": {"ip_version": True, "mtu": False},
    "0.4.0": {"ip_version": True, "mtu": False},
    "1.0.0": {"ip_version": False, "mtu": False},
    "1.1.0": {"ip_version": False, "mtu": True},
}


@pytest.mark.parametrize("version", VERSIONS)
def test_add_results_have_the_shape_of_their_version(
    shim: Path, agent: FakeAgent, served: FakeService, pod_netns: str, version: str
) -> None:
    shape = RESULT_SHAPES[version]
    status, result = outcome(
        run_shim(shim, cni_env("ADD", CNI_NETNS=pod_netns), conf_for(agent, version))
    )
    assert status == 0
    assert set(result) == {"cniVersion", "interfaces", "ips", "routes", "dns"}
    for interface in result["interfaces"]:
        assert set(interface) <= {"name", "mac", "sandbox", "mtu"}
        assert ("mtu" in interface) == shape["mtu"]
    host, pod = result["interfaces"]
    assert "sandbox" not in host and pod["sandbox"] == pod_netns
    for ip in result["ips"]:
        assert ("version" in ip) == shape["ip_version"]
        if shape["ip_version"]:
            assert ip["version"] == "4"
        assert result["interfaces"][ip["interface"]]["name"] == "eth0"
    for route in result["routes"]:
        assert set(route) <= {"dst", "gw"}


# -- error documents, codes, stdout -------------------------------------------

ERROR_CASES = [
    # reason, command, env changes, stdin, code
    ("unknown command", "ADD", {"CNI_COMMAND": "FROB"}, None, 4),
    ("stdin not JSON", "ADD", {}, b"{", 6),
    ("stdin a JSON list", "ADD", {}, b"[1]", 6),
    ("cniVersion a number", "ADD", {}, {"cniVersion": 1, "name": "n", "type": "t"}, 6),
    ("no network name", "DEL", {}, {"cniVersion": "1.0.0", "type": "t"}, 7),
    ("a network name with a slash", "ADD", {}, {"cniVersion": "1.0.0", "name": "a/b"}, 7),
    ("container ID starting with a dot", "DEL", {"CNI_CONTAINERID": ".x"}, None, 4),
    ("interface name of 16 bytes", "ADD", {"CNI_IFNAME": "x" * 16}, None, 4),
    ("a netns that is no namespace", "ADD", {"CNI_NETNS": "/etc/hostname"}, None, 4),
]


@pytest.mark.parametrize(
    ("reason", "command", "env", "stdin", "code"),
    ERROR_CASES,
    ids=[c[0] for c in ERROR_CASES],
)
def test_errors_are_one_document_with_a_well_known_code_and_exit_status_1(
    shim: Path,
    agent: FakeAgent,
    served: FakeService,
    pod_netns: str,
    reason: str,
    command: str,
    env: dict[str, str],
    stdin: Any,
    code: int,
) -> None:
    if stdin is None:
        stdin = conf_for(agent, "1.0.0")
    elif isinstance(stdin, dict):
        stdin = {**stdin, "agentSocket": str(agent.socket_path)}
    proc = run_shim(shim, {**cni_env(command, CNI_NETNS=pod_netns), **env}, stdin)
    status, document = outcome(proc)
    assert (status, document["code"]) == (1, code), f"{reason}: {document}"
    assert served.calls == [], reason


def test_a_failure_the_agent_reports_keeps_its_code_and_details(
    shim: Path, agent: FakeAgent, served: FakeService, pod_netns: str
) -> None:
    from ciliate.control.cni.service import PoolExhaustedError

    served.error = PoolExhaustedError("no address left in 10.244.1.0/24", details="free some")
    status, document = outcome(
        run_shim(shim, cni_env("ADD", CNI_NETNS=pod_netns), conf_for(agent, "0.4.0"))
    )
    assert (status, document) == (
        1,
        {
            "cniVersion": "0.4.0",
            "code": 11,
            "msg": "no address left in 10.244.1.0/24",
            "details": "free some",
        },
    )


# -- STATUS ---------------------------------------------------------------------


def test_status_is_0_when_ready_and_50_when_the_agent_is_down_or_restoring(
    shim: Path, agent: FakeAgent, served: FakeService, sock_dir: Path
) -> None:
    from ciliate.control.cni.service import NotReadyError

    assert outcome(run_shim(shim, cni_env("STATUS"), conf_for(agent))) == (0, None)
    served.error = NotReadyError("the agent is still restoring its endpoints")
    status, document = outcome(run_shim(shim, cni_env("STATUS"), conf_for(agent)))
    assert (status, document["code"]) == (1, 50)
    down = netconf("1.1.0", agentSocket=str(sock_dir / "nobody.sock"))
    status, document = outcome(run_shim(shim, cni_env("STATUS"), down))
    assert (status, document["code"]) == (1, 50)
    assert "not reachable" in document["msg"]


# -- a real agent -------------------------------------------------------------


@pytest.fixture(scope="module")
def node(bpf_objects: str) -> Iterator[tuple[lab.LabState, lab.NodeState]]:
    name = f"t{secrets.token_hex(3)}"
    try:
        yield lab.create(name=name)
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _endpoints(node: lab.NodeState) -> list[str]:
    with AgentClient(node.socket) as client:
        return [e["container_id"] for e in client.get("/v1/endpoints")]


def _allocations(node: lab.NodeState) -> dict[str, str]:
    with AgentClient(node.socket) as client:
        allocations: dict[str, str] = client.get("/v1/ipam")["allocations"]
    return allocations


def test_del_of_a_container_the_agent_never_saw_succeeds(
    node: tuple[lab.LabState, lab.NodeState],
) -> None:
    state, node_state = node
    pod = lab.add_pod_netns(state, node_state, f"u{secrets.token_hex(2)}")
    for _ in range(2):
        assert lab.cni_call(state, node_state, pod, "DEL") == {}
    lab._run("ip", "netns", "del", pod.netns)
    assert lab.cni_call(state, node_state, pod, "DEL") == {}, "the netns gone too"


def test_del_after_an_add_that_failed_half_way_succeeds_and_leaves_nothing(
    node: tuple[lab.LabState, lab.NodeState],
) -> None:
    """ADD takes an IP and an identity, then the node side of the veth cannot be
    created (a link of its name is in the way): it rolls back, and the DEL a runtime
    sends after a failed ADD succeeds."""
    from ciliate.datapath import devices

    state, node_state = node
    pod = lab.add_pod_netns(state, node_state, f"h{secrets.token_hex(2)}")
    blocker = devices.host_ifname(pod.container_id, "eth0")
    lab._run("ip", "-n", node_state.netns, "link", "add", blocker, "type", "veth")
    try:
        before = _allocations(node_state)
        with pytest.raises(lab.CniCallError) as failed:
            lab.cni_call(state, node_state, pod, "ADD")
        assert failed.value.code == 100, failed.value.error
        assert _allocations(node_state) == before
        assert lab.cni_call(state, node_state, pod, "DEL") == {}
        assert pod.container_id not in _endpoints(node_state)
    finally:
        lab._run("ip", "-n", node_state.netns, "link", "del", blocker)
    # With the way clear, the runtime's retry works.
    result = lab.cni_call(state, node_state, pod, "ADD")
    assert result["interfaces"][1]["name"] == "eth0"
    lab.cni_call(state, node_state, pod, "DEL", prev_result=result)


def test_gc_removes_exactly_the_attachments_the_runtime_no_longer_lists(
    node: tuple[lab.LabState, lab.NodeState], shim: Path
) -> None:
    state, node_state = node
    keep = lab.add_pod_netns(state, node_state, f"k{secrets.token_hex(2)}")
    stale = lab.add_pod_netns(state, node_state, f"s{secrets.token_hex(2)}")
    for pod in (keep, stale):
        lab.cni_call(state, node_state, pod, "ADD", cni_version="1.1.0")
    others = [c for c in _endpoints(node_state) if c not in (keep.container_id, stale.container_id)]
    valid = [{"containerID": c, "ifname": "eth0"} for c in (keep.container_id, *others)]
    conf = {
        "cniVersion": "1.1.0",
        "name": "ciliate",
        "type": "ciliate-cni",
        "agentSocket": node_state.socket,
        "cni.dev/valid-attachments": valid,
        "cni.dev/attachments": valid,  # libcni sends both names
    }
    status, document = outcome(run_shim(Path(state.bin_dir) / "ciliate-cni", cni_env("GC"), conf))
    assert (status, document) == (0, None)
    endpoints = _endpoints(node_state)
    assert keep.container_id in endpoints and stale.container_id not in endpoints
    assert all(c in endpoints for c in others)
    lab.cni_call(state, node_state, keep, "DEL")


def test_status_of_a_running_agent_is_0(node: tuple[lab.LabState, lab.NodeState]) -> None:
    state, node_state = node
    conf = {
        "cniVersion": "1.1.0",
        "name": "ciliate",
        "type": "ciliate-cni",
        "agentSocket": node_state.socket,
    }
    proc = run_shim(Path(state.bin_dir) / "ciliate-cni", {"CNI_COMMAND": "STATUS"}, conf)
    assert outcome(proc) == (0, None)
