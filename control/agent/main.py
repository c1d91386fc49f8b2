"""``ciliate-agent``: run the node agent in the foreground until SIGTERM.

It refuses to run in the machine's root network namespace unless told this
machine *is* the node (``--i-am-the-node``): the agent adds devices, routes
and sysctls to the namespace it runs in, and the lab runs it inside a node
namespace (``nsenter --net=/run/netns/<node> ciliate-agent ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ciliate.control.agent.node import NodeAgent

log = logging.getLogger("ciliate.agent")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ciliate-agent", description=__doc__.splitlines()[0])
    p.add_argument("--node-name", required=True)
    p.add_argument(
        "--pod-cidr",
        action="append",
        default=[],
        type=ipaddress.IPv4Network,
        help="a pod CIDR of this node (repeatable); the router IP is the first "
        "usable address of the first. In cluster mode the operator gives them",
    )
    p.add_argument(
        "--etcd-endpoint",
        action="append",
        default=[],
        help="cluster mode: the etcd holding the cluster (repeatable)",
    )
    p.add_argument("--bgp-local-as", type=int, help="this node's AS number")
    p.add_argument(
        "--bgp-peer",
        action="append",
        default=[],
        type=_peer,
        help="IP:ASN of a BGP peer (the top-of-rack) to announce pod CIDRs to",
    )
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/ciliate"))
    p.add_argument("--socket", type=Path, default=Path("/run/ciliate/agent.sock"))
    p.add_argument("--bpffs-root", type=Path, default=Path("/sys/fs/bpf/ciliate"))
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument(
        "--node-ip",
        type=ipaddress.IPv4Address,
        help="this node's address on the fabric (default: the router IP)",
    )
    p.add_argument("--uplink", help="the node's uplink device (attach from_netdev to it)")
    p.add_argument(
        "--socket-forwarding",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="forward TCP between pods of this node socket to socket, past the packet"
        " path (sock_ops on the cgroup v2 root, sk_msg on a sockhash); default on",
    )
    p.add_argument(
        "--cgroup-root",
        type=Path,
        help="the cgroup v2 directory whose sockets socket forwarding watches (default:"
        " the root of the mounted cgroup v2 hierarchy)",
    )
    p.add_argument(
        "--i-am-the-node",
        action="store_true",
        help="allow running in the machine's root network namespace",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not 68 <= args.mtu <= 65535:
        p.error(f"--mtu {args.mtu}: must be between 68 and 65535")
    if not args.pod_cidr and not args.etcd_endpoint:
        p.error("give --pod-cidr (one node) or --etcd-endpoint (cluster mode)")
    if args.etcd_endpoint and args.pod_cidr:
        p.error(
            "--pod-cidr and --etcd-endpoint exclude each other: the operator gives "
            "pod CIDRs in cluster mode"
        )
    if args.etcd_endpoint and args.node_ip is None:
        p.error("cluster mode needs --node-ip")
    return args


def _peer(text: str) -> tuple[ipaddress.IPv4Address, int]:
    address, _, asn = text.rpartition(":")
    try:
        return ipaddress.IPv4Address(address), int(asn)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not IP:ASN (e.g. 192.168.100.1:65000)"
        ) from None


def _listen(path: Path) -> socket.socket:
    """The API socket, mode 0600 from the start (umask around bind)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from ciliate.datapath import devices

    if devices.in_root_netns() and not args.i_am_the_node:
        print(
            "ciliate-agent: refusing to configure the machine's root network namespace; "
            "run it inside the node's namespace (nsenter --net=...) or pass --i-am-the-node",
            file=sys.stderr,
        )
        return 2

    import uvicorn

    from ciliate.control.agent.api import create_app
    from ciliate.control.agent.node import AgentConfig, NodeAgent

    config = AgentConfig(
        node_name=args.node_name,
        pod_cidrs=list(args.pod_cidr),
        state_dir=args.state_dir,
        socket=args.socket,
        bpffs_root=args.bpffs_root,
        mtu=args.mtu,
        node_ip=args.node_ip,
        uplink=args.uplink,
        etcd_endpoints=list(args.etcd_endpoint),
        bgp_local_as=args.bgp_local_as,
        bgp_peers=list(args.bgp_peer),
        socket_forwarding=args.socket_forwarding,
        cgroup_root=args.cgroup_root,
    )
    agent = NodeAgent(config)
    try:
        sock = _listen(config.socket)
        # After listen: a relay that found no socket a moment ago has queued its
        # DEL by now, and new calls wait in the backlog while we replay.
        replay_del_queue(agent)
        log.info(
            "serving on %s (node %s, pod CIDRs %s)",
            config.socket,
            config.node_name,
            ", ".join(map(str, agent.pod_cidrs)),
        )
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(agent),
                fd=sock.fileno(),
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=5,
            )
        )
        server.run()
    finally:
        with contextlib.suppress(OSError):
            config.socket.unlink()
        agent.close()
    log.info("stopped; pods keep forwarding through the pinned programs and maps")
    return 0


def replay_del_queue(agent: NodeAgent) -> int:
    """DELs the CNI relay queued while the agent was down, through the same
    handler as a live call. An entry goes once it succeeded or can never
    succeed (a malformed call); a temporary failure keeps it for next time."""
    from ciliate.control.cni.handler import handle, read_del_queue, remove_from_queue

    replayed = 0
    for entry in read_del_queue(agent.config.del_queue_dir):
        response = handle(entry["env"], entry["stdin"].encode(), agent.endpoints)
        if response.exit_code == 0 or _permanent(response.stdout):
            remove_from_queue(entry["path"])
            replayed += 1
        else:
            log.warning(
                "queued DEL %s failed, kept for the next start: %s", entry["path"], response.stdout
            )
    if replayed:
        log.info("replayed %d queued CNI DEL(s)", replayed)
    return replayed


def _permanent(stdout: str) -> bool:
    import json

    try:
        code = json.loads(stdout).get("code")
    except (ValueError, AttributeError):
        return False
    return code in (1, 4, 6, 7)  # version, environment, decoding, netconf: retrying won't help


if __name__ == "__main__":
    sys.exit(main())
