"""Bad input through ciliate-cni, as a runtime would send it: the right CNI
error code, a message that says what to fix, and nothing created."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.lab import lab

from .conftest import NodeLab


def raw_call(node_lab: NodeLab, env: dict[str, str], stdin: str) -> tuple[int, dict[str, Any]]:
    shim = Path(node_lab.state.bin_dir) / "ciliate-cni"
    proc = subprocess.run(
        [str(shim)],
        input=stdin,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def netconf(node_lab: NodeLab, **overrides: Any) -> str:
    conflist = json.loads((Path(node_lab.node.conf_dir) / "05-ciliate.conflist").read_text())
    doc = {**conflist["plugins"][0], "name": conflist["name"], "cniVersion": "1.0.0"}
    doc.update(overrides)
    return json.dumps(doc)


def add_env(pod: lab.PodState, **overrides: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": f"/run/netns/{pod.netns}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad",
        "CNI_PATH": "/opt/cni/bin",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v != "<unset>"}


def nothing_created(node_lab: NodeLab, before: tuple[list[str], dict[str, str]]) -> bool:
    return (node_lab.pod_links(), node_lab.get("/v1/ipam")["allocations"]) == before


@pytest.mark.parametrize(
    ("case", "env", "stdin", "code", "message"),
    [
        ("no CNI_COMMAND", {"CNI_COMMAND": "<unset>"}, None, 4, "CNI_COMMAND"),
        ("no CNI_CONTAINERID", {"CNI_CONTAINERID": "<unset>"}, None, 4, "CNI_CONTAINERID"),
        ("no CNI_NETNS", {"CNI_NETNS": "<unset>"}, None, 4, "CNI_NETNS"),
        ("bad CNI_IFNAME", {"CNI_IFNAME": "a/b"}, None, 4, "CNI_IFNAME"),
        ("netns is a file", {"CNI_NETNS": "/etc/hostname"}, None, 4, "not a network namespace"),
        ("netns missing", {"CNI_NETNS": "/run/netns/nope-nope"}, None, 4, "CNI_NETNS"),
        ("malformed JSON", {}, "broken", 6, "JSON"),
        ("unknown cniVersion", {}, "version:9.9.9", 1, "9.9.9"),
        ("no cniVersion", {}, "version:", 1, "cniVersion"),
        ("mtu not a number", {}, "mtu:big", 7, "mtu"),
    ],
)
def test_bad_input_gets_its_code_and_creates_nothing(
    node_lab: NodeLab, case: str, env: dict[str, str], stdin: str | None, code: int, message: str
) -> None:
    pod = node_lab.pod()
    before = (node_lab.pod_links(), node_lab.get("/v1/ipam")["allocations"])
    if stdin is None:
        body = netconf(node_lab)
    elif stdin.startswith("version:"):
        version = stdin.removeprefix("version:")
        doc = json.loads(netconf(node_lab))
        if version:
            doc["cniVersion"] = version
        else:
            del doc["cniVersion"]
        body = json.dumps(doc)
    elif stdin == "broken":  # the relay still finds the socket; the agent decodes
        body = netconf(node_lab)[:-1] + ', "x": }'
    elif stdin.startswith("mtu:"):
        body = netconf(node_lab, mtu=stdin.removeprefix("mtu:"))
    else:
        body = stdin
    exit_code, error = raw_call(node_lab, add_env(pod, **env), body)
    assert exit_code != 0
    assert error["code"] == code, error
    assert message in error["msg"] + error.get("details", ""), error
    assert nothing_created(node_lab, before)


def test_with_the_agent_down_add_says_try_again_and_status_says_unavailable(
    fresh_lab: NodeLab,
) -> None:
    pod = fresh_lab.pod()
    lab.stop_agent(fresh_lab.node)
    exit_code, error = raw_call(fresh_lab, add_env(pod), netconf(fresh_lab))
    assert (exit_code, error["code"]) == (1, 11)
    assert fresh_lab.node.socket in error["msg"]
    exit_code, error = raw_call(
        fresh_lab, {"CNI_COMMAND": "STATUS"}, netconf(fresh_lab, cniVersion="1.1.0")
    )
    assert (exit_code, error["code"]) == (1, 50)
    assert fresh_lab.pod_links() == []


def test_an_exhausted_pool_is_a_clear_error_and_leaks_nothing(tiny_lab: NodeLab) -> None:
    pods = [tiny_lab.pod(f"t{i}") for i in range(5)]  # a /29 holds 5 pods beside the router
    for pod in pods:
        tiny_lab.add(pod)
    before = (tiny_lab.pod_links(), tiny_lab.get("/v1/ipam")["allocations"])
    extra = tiny_lab.pod("extra")
    with pytest.raises(lab.CniCallError) as caught:
        tiny_lab.add(extra)
    assert caught.value.code == 11
    assert "10.244.9.0/29" in str(caught.value)
    assert nothing_created(tiny_lab, before)
    tiny_lab.cni(pods[0], "DEL")
    tiny_lab.add(extra)  # room again
