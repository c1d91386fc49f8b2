"""``ciliate-cni``, the C relay, run as a runtime runs it (CNI_* variables,
netconf on stdin) against a fake agent on a UNIX socket: the relay both
ways, VERSION on its own, the DEL queue, the errors when the agent is away,
JSON escaping, and the scanner that finds ``agentSocket``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.cni import handler
from ciliate.control.cni.defaults import DEFAULT_AGENT_SOCKET

from .conftest import CONTAINER_ID, SHIM_DEFINES, SHIM_SOURCE, cni_env, netconf, run_shim
from .fakes import Canned, FakeAgent, FakeService


def conf_for(sock: Path, version: str = "1.0.0", **fields: Any) -> dict[str, Any]:
    return netconf(version, agentSocket=str(sock), **fields)


def cni_error(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert proc.returncode == 1, proc
    document: dict[str, Any] = json.loads(proc.stdout)
    assert set(document) <= {"cniVersion", "code", "msg", "details"}
    return document


# -- the relay --------------------------------------------------------------


def test_add_is_relayed_as_one_post_with_env_and_stdin(shim: Path, agent: FakeAgent) -> None:
    result = '{"cniVersion": "1.0.0", "ips": []}\n'
    agent.canned = Canned(body=json.dumps({"exit_code": 0, "stdout": result}).encode())
    env = cni_env("ADD")
    stdin = json.dumps(conf_for(agent.socket_path), indent=2)

    proc = run_shim(shim, env, stdin)

    assert (proc.returncode, proc.stdout.decode(), proc.stderr) == (0, result, b"")
    [request] = agent.requests
    assert (request.method, request.path) == ("POST", "/v1/cni")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["connection"] == "close"
    assert request.json() == {"env": env, "stdin": stdin}


def test_the_agents_exit_code_and_error_output_are_relayed(shim: Path, agent: FakeAgent) -> None:
    error = '{"cniVersion": "1.0.0", "code": 11, "msg": "no address left"}\n'
    agent.canned = Canned(body=json.dumps({"exit_code": 1, "stdout": error}).encode())
    proc = run_shim(shim, cni_env("ADD"), conf_for(agent.socket_path))
    assert (proc.returncode, proc.stdout.decode()) == (1, error)


def test_only_the_variables_that_are_set_are_sent(shim: Path, agent: FakeAgent) -> None:
    env = {"CNI_COMMAND": "STATUS", "CNI_ARGS": ""}
    run_shim(shim, {**env, "OTHER": "x"}, conf_for(agent.socket_path, "1.1.0"))
    assert agent.requests[0].json()["env"] == env


def test_a_chunked_answer_is_relayed(shim: Path, agent: FakeAgent) -> None:
    text = "a result long enough to span several chunks of seven bytes\n"
    agent.canned = Canned(body=json.dumps({"exit_code": 0, "stdout": text}).encode(), chunked=True)
    proc = run_shim(shim, cni_env("ADD"), conf_for(agent.socket_path))
    assert (proc.returncode, proc.stdout.decode()) == (0, text)


@pytest.mark.parametrize(
    "text",
    [
        'quotes " and backslashes \\ and \\" together',
        "newlines\nand\r\ntabs\tand a form feed\f and a bell \x07 and NUL \x00 inside",
        "unicode: é ü ß 日本語 and astral 😀 𝄞",
        "slashes / \\/ and a fake escape \\u0041 left as text",
    ],
    ids=["quotes", "control characters", "unicode", "escape lookalikes"],
)
def test_json_escaping_survives_the_round_trip(shim: Path, agent: FakeAgent, text: str) -> None:
    conf = conf_for(agent.socket_path, args={"cni": {"labels": {"note": text}}})
    stdin = json.dumps(conf, ensure_ascii=False)
    for ensure_ascii in (True, False):  # the agent may send \u escapes or raw UTF-8
        agent.requests.clear()
        answer = {"exit_code": 0, "stdout": text}
        agent.canned = Canned(body=json.dumps(answer, ensure_ascii=ensure_ascii).encode())

        proc = run_shim(shim, cni_env("ADD", CNI_ARGS=text.replace("\x00", "")), stdin)

        assert proc.returncode == 0, proc
        assert proc.stdout == text.encode()
        sent = agent.requests[0].json()
        assert sent["stdin"] == stdin
        assert sent["env"]["CNI_ARGS"] == text.replace("\x00", "")


def test_the_shim_and_the_real_handler_agree(shim: Path, agent: FakeAgent, pod_netns: str) -> None:
    service = FakeService()
    agent.answer_with(service)
    for version in handler.SUPPORTED_VERSIONS:
        proc = run_shim(
            shim, cni_env("ADD", CNI_NETNS=pod_netns), conf_for(agent.socket_path, version)
        )
        assert proc.returncode == 0, proc
        result = json.loads(proc.stdout)
        assert result["cniVersion"] == version
        assert result["interfaces"][1]["sandbox"] == pod_netns

    proc = run_shim(shim, cni_env("DEL"), conf_for(agent.socket_path))
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert service.calls[-1] == ("delete", (CONTAINER_ID, "eth0"))


# -- answers the shim does not relay ----------------------------------------


def test_an_http_error_becomes_cni_error_999_naming_the_status(
    shim: Path, agent: FakeAgent
) -> None:
    agent.canned = Canned(status=422, body=b'{"detail": "field required: stdin"}')
    error = cni_error(run_shim(shim, cni_env("ADD"), conf_for(agent.socket_path)))
    assert error["code"] == 999
    assert "HTTP status 422" in error["msg"]
    assert "field required" in error["details"]


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"stdout": "x"}', b'{"exit_code": 0}', b'{"exit_code": 300, "stdout": ""}'],
    ids=["not JSON", "no exit_code", "no stdout", "exit_code out of range"],
)
def test_a_malformed_answer_is_cni_error_999(shim: Path, agent: FakeAgent, body: bytes) -> None:
    agent.canned = Canned(body=body)
    error = cni_error(run_shim(shim, cni_env("ADD"), conf_for(agent.socket_path)))
    assert error["code"] == 999
    assert "exit_code" in error["msg"]


def test_an_agent_that_does_not_answer_is_try_again_after_the_timeout(
    shim: Path, agent: FakeAgent
) -> None:
    agent.canned = Canned(hang=True)
    env = {**cni_env("ADD"), "CILIATE_CNI_TIMEOUT_MS": "300"}
    error = cni_error(run_shim(shim, env, conf_for(agent.socket_path)))
    assert error["code"] == 11
    assert "did not answer ADD within 300 ms" in error["msg"]


def test_an_agent_that_hangs_up_is_try_again_and_del_is_not_queued(
    shim: Path, agent: FakeAgent
) -> None:
    agent.canned = Canned(close=True)
    error = cni_error(run_shim(shim, cni_env("DEL"), conf_for(agent.socket_path)))
    assert error["code"] == 11
    assert "closed the connection" in error["msg"]
    assert not (agent.socket_path.parent / "cni-del-queue").exists()


# -- without the agent ------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "answered_in"),
    [
        (b'{"cniVersion": "0.3.1"}', "0.3.1"),
        (b'{"cniVersion": "1.1.0", "name": "x"}', "1.1.0"),
        (b"", "1.1.0"),
        # The spec: "the value of cniVersion specified on input", known or not.
        (b'{"cniVersion": "0.1.0"}', "0.1.0"),
        (b'{"cniVersion": "10.20.30"}', "10.20.30"),
        (b'{"cniVersion": "1.0.0-rc1"}', "1.1.0"),
        (b'{"cniVersion": "12345.0.0"}', "1.1.0"),
        (b'{"cniVersion": 1}', "1.1.0"),
    ],
)
def test_version_is_answered_without_the_agent(
    shim: Path, sock_dir: Path, stdin: bytes, answered_in: str
) -> None:
    # As podman asks: every other variable "dummy".
    env = {
        "CNI_COMMAND": "VERSION",
        "CNI_CONTAINERID": "dummy",
        "CNI_NETNS": "dummy",
        "CNI_IFNAME": "dummy",
        "CNI_PATH": "dummy",
    }
    proc = run_shim(shim, env, stdin)
    assert proc.returncode == 0, proc
    assert json.loads(proc.stdout) == {
        "cniVersion": answered_in,
        "supportedVersions": list(handler.SUPPORTED_VERSIONS),
    }


@pytest.mark.parametrize("listening", [False, True], ids=["no socket", "socket refusing"])
def test_del_is_queued_when_the_agent_is_unreachable(
    shim: Path, sock_dir: Path, listening: bool
) -> None:
    sock = sock_dir / "agent.sock"
    if listening:  # bound but nobody accepting: ECONNREFUSED
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(sock))
        dead.close()
    env = cni_env("DEL", CNI_NETNS="")
    stdin = json.dumps(conf_for(sock, prevResult={"ips": []}))

    proc = run_shim(shim, env, stdin)

    assert (proc.returncode, proc.stdout) == (0, b"")
    queue = sock_dir / "cni-del-queue"
    assert stat.S_IMODE(queue.stat().st_mode) == 0o700
    [queued] = handler.read_del_queue(queue)
    path = Path(queued["path"])
    assert path == queue / f"{CONTAINER_ID}-eth0.json"
    assert json.loads(path.read_bytes()) == {"env": env, "stdin": stdin}
    assert (queued["env"], queued["stdin"]) == (env, stdin)
    assert os.listdir(queue) == [path.name]  # no temporary file left behind


def test_the_queued_del_replays_through_the_handler(shim: Path, sock_dir: Path) -> None:
    run_shim(shim, cni_env("DEL"), conf_for(sock_dir / "agent.sock"))
    service = FakeService()
    for queued in handler.read_del_queue(sock_dir / "cni-del-queue"):
        response = handler.handle(queued["env"], queued["stdin"].encode(), service)
        assert response.exit_code == 0
        handler.remove_from_queue(queued["path"])
    assert service.calls == [("delete", (CONTAINER_ID, "eth0"))]
    assert handler.read_del_queue(sock_dir / "cni-del-queue") == []


def test_the_del_queue_is_created_with_its_parents(shim: Path, sock_dir: Path) -> None:
    sock = sock_dir / "run" / "ciliate" / "agent.sock"  # as after a reboot: /run is empty
    proc = run_shim(shim, cni_env("DEL"), conf_for(sock))
    assert proc.returncode == 0
    assert (sock.parent / "cni-del-queue" / f"{CONTAINER_ID}-eth0.json").is_file()


def test_del_that_cannot_name_a_queue_file_is_refused(shim: Path, sock_dir: Path) -> None:
    env = cni_env("DEL", CNI_CONTAINERID="../../etc/passwd")
    error = cni_error(run_shim(shim, env, conf_for(sock_dir / "agent.sock")))
    assert error["code"] == 4
    assert not (sock_dir / "cni-del-queue").exists() or not os.listdir(sock_dir / "cni-del-queue")


@pytest.mark.parametrize(
    ("command", "version", "code"),
    [("STATUS", "1.1.0", 50), ("ADD", "1.0.0", 11), ("CHECK", "1.0.0", 11), ("GC", "1.1.0", 11)],
)
def test_other_commands_fail_when_the_agent_is_unreachable(
    shim: Path, sock_dir: Path, command: str, version: str, code: int
) -> None:
    sock = sock_dir / "agent.sock"
    error = cni_error(run_shim(shim, cni_env(command), conf_for(sock, version)))
    assert error == {
        "cniVersion": version,
        "code": code,
        "msg": f"the agent at {sock} is not reachable (No such file or directory): "
        "start ciliate-agent",
    }


def test_without_agent_socket_the_default_socket_is_used(shim: Path) -> None:
    # The default reaches the C relay from the Python constant, through CMake.
    if os.path.exists(DEFAULT_AGENT_SOCKET):
        pytest.skip("an agent runs on this machine")
    error = cni_error(run_shim(shim, cni_env("ADD"), netconf()))
    assert f"the agent at {DEFAULT_AGENT_SOCKET} is not reachable" in error["msg"]


# -- the netconf scanner ----------------------------------------------------


def test_only_a_top_level_agent_socket_counts(shim: Path, agent: FakeAgent, sock_dir: Path) -> None:
    decoy = str(sock_dir / "decoy.sock")
    stdin = (
        (
            '{"args": {"agentSocket": "DECOY", "x": ["agentSocket", {"agentSocket": "DECOY"}]},'
            ' "note": "\\"agentSocket\\": \\"DECOY\\"", "cniVersion": "1.0.0", "name": "n",'
            ' "type": "ciliate-cni", "agentSocket": "REAL"}'
        )
        .replace("DECOY", decoy)
        .replace("REAL", str(agent.socket_path))
    )
    proc = run_shim(shim, cni_env("DEL"), stdin)
    assert proc.returncode == 0
    assert len(agent.requests) == 1


def test_an_escaped_agent_socket_is_decoded(shim: Path, agent: FakeAgent) -> None:
    escaped = str(agent.socket_path).replace("/", "\\/").replace("a", "\\u0061")
    stdin = '{"cniVersion": "1.0.0", "agent\\u0053ocket": "PATH"}'.replace("PATH", escaped)
    proc = run_shim(shim, cni_env("DEL"), stdin)
    assert proc.returncode == 0
    assert len(agent.requests) == 1


def test_the_last_agent_socket_wins_as_in_python(
    shim: Path, agent: FakeAgent, sock_dir: Path
) -> None:
    first, last = sock_dir / "x.sock", agent.socket_path
    stdin = f'{{"agentSocket": "{first}", "agentSocket": "{last}"}}'
    run_shim(shim, cni_env("DEL"), stdin)
    assert len(agent.requests) == 1


@pytest.mark.parametrize(
    "value",
    ["5", '""', '"' + "x" * 108 + '"', '"a\\u0000b"'],
    ids=["number", "empty", "long", "NUL"],
)
def test_an_agent_socket_that_is_not_a_path_is_refused(shim: Path, value: str) -> None:
    error = cni_error(run_shim(shim, cni_env("ADD"), f'{{"agentSocket": {value}}}'))
    assert error["code"] == 7
    assert "agentSocket" in error["msg"]


def test_a_netconf_that_is_not_a_json_object_is_a_decoding_error(shim: Path) -> None:
    # Without a readable netconf there is no telling which agent to ask.
    error = cni_error(run_shim(shim, cni_env("ADD"), '{"agentSocket": "/tmp/x.sock"'))
    assert error["code"] == 6
    assert "not a JSON object" in error["msg"]


# -- input errors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "stdin", "code", "fragment"),
    [
        ({}, b"{}", 4, "CNI_COMMAND is not set"),
        ({"CNI_COMMAND": "ATTACH"}, b"{}", 4, "unknown CNI_COMMAND ATTACH"),
        ({"CNI_COMMAND": "ADD"}, b"{" + b" " * (1 << 20) + b"}", 6, "larger than 1 MiB"),
        ({"CNI_COMMAND": "ADD"}, b'{"name": "\xc3\x28"}', 6, "not valid UTF-8 (byte 10)"),
        ({"CNI_COMMAND": "ADD", "CNI_ARGS": "\udcff"}, b"{}", 4, "CNI_ARGS is not valid UTF-8"),
    ],
    ids=["no command", "unknown command", "stdin too large", "stdin not UTF-8", "env not UTF-8"],
)
def test_input_the_shim_cannot_relay_is_refused(
    shim: Path, env: dict[str, str], stdin: bytes, code: int, fragment: str
) -> None:
    error = cni_error(run_shim(shim, env, stdin))
    assert error["code"] == code
    assert fragment in error["msg"]


def test_errors_carry_the_netconf_version(shim: Path, sock_dir: Path) -> None:
    error = cni_error(run_shim(shim, cni_env("ADD"), conf_for(sock_dir / "no.sock", "0.4.0")))
    assert error["cniVersion"] == "0.4.0"


# -- memory -----------------------------------------------------------------


def test_a_relayed_add_is_clean_under_valgrind(
    agent: FakeAgent, tmp_path: Path, pod_netns: str
) -> None:
    valgrind, cc = shutil.which("valgrind"), shutil.which("cc")
    if valgrind is None or cc is None:
        pytest.skip("needs valgrind and cc")
    # Dynamically linked: valgrind cannot follow malloc in a static binary.
    binary = tmp_path / "ciliate-cni"
    subprocess.run(
        [
            cc,
            "-std=c11",
            "-O2",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            *SHIM_DEFINES,
            "-o",
            str(binary),
            str(SHIM_SOURCE),
        ],
        check=True,
    )
    agent.answer_with(FakeService())
    proc = run_shim(
        binary,
        cni_env("ADD", CNI_NETNS=pod_netns),
        conf_for(agent.socket_path),
        timeout=60,
        wrapper=[
            valgrind,
            "-q",
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=all",
        ],
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["ips"][0]["address"] == "10.244.1.5/32"
