"""Start-up failing half-way, seen from inside the agent's process; run in a
node namespace whose agent is stopped:
``python3 agent_start_retry.py '{"node_name": ..., "pod_cidr": ..., "state_dir": ...,
"socket": ..., "bpffs_root": ..., "workdir": ...}'``.

It starts and closes a good agent once (so that what libraries open once
per process is open before the baseline is taken), then tries each bad
configuration: every attempt must fail with a configuration error and leave
the process as it was (the same open file descriptors, no new thread, the
lock free, no socket file). Then a retry with the good configuration must
start and answer on its socket. Prints one JSON report.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from ciliate.control.agent.lock import AgentLock, Place
from ciliate.control.agent.node import AgentConfig, AgentConfigError, NodeAgent


def open_files() -> list[str]:
    """The process's descriptors and what each one is (maps, programs,
    links and sockets show as anon_inode:bpf-* and socket:[...])."""
    out = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            out.append(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return out


def lock_is_free(config: AgentConfig) -> bool:
    try:
        AgentLock(
            [
                Place("state directory", config.state_dir),
                Place("socket directory", config.socket.parent),
                Place("bpffs root", config.bpffs_root),
            ]
        ).release()
    except Exception:
        return False
    return True


def main() -> None:
    args = json.loads(sys.argv[1])
    good = AgentConfig(
        node_name=args["node_name"],
        pod_cidrs=[ipaddress.IPv4Network(args["pod_cidr"])],
        state_dir=Path(args["state_dir"]),
        socket=Path(args["socket"]),
        bpffs_root=Path(args["bpffs_root"]),
    )
    workdir = Path(args["workdir"])
    NodeAgent(good).close()

    taken_socket = workdir / "taken"
    (taken_socket / "something").mkdir(parents=True)
    long_dir = workdir / ("d" * 100)
    bad = {
        "missing uplink": dataclasses.replace(good, uplink="nosuch0"),
        "overlapping pod CIDRs": dataclasses.replace(
            good, pod_cidrs=[*good.pod_cidrs, next(good.pod_cidrs[0].subnets(1))]
        ),
        # Both fail at the last step, with everything else open.
        "socket path too long": dataclasses.replace(good, socket=long_dir / "agent.sock"),
        "socket path is a directory": dataclasses.replace(good, socket=taken_socket),
    }
    baseline_files = open_files()
    baseline_threads = sorted(t.name for t in threading.enumerate())
    report: dict[str, Any] = {"attempts": {}}
    for name, config in bad.items():
        attempt: dict[str, Any] = {}
        try:
            NodeAgent(config).close()
            attempt["error"] = None
        except AgentConfigError as exc:
            attempt["error"] = str(exc)
        attempt["leaked_files"] = sorted(set(open_files()) - set(baseline_files))
        attempt["new_threads"] = sorted(
            set(t.name for t in threading.enumerate()) - set(baseline_threads)
        )
        attempt["lock_free"] = lock_is_free(config)
        attempt["socket_left"] = config.socket.exists() and not config.socket.is_dir()
        report["attempts"][name] = attempt

    agent = NodeAgent(good)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(good.socket))
            client.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: agent\r\n\r\n")
        report["retry"] = {
            "listening": True,
            "endpoints": len(agent.endpoints.list()),
            "router_ip": str(agent.router_ip),
        }
    finally:
        agent.close()
    report["after_close"] = {
        "leaked_files": sorted(set(open_files()) - set(baseline_files)),
        "socket_left": good.socket.exists(),
        "lock_free": lock_is_free(good),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
