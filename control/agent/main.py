"""``ciliate-agent``: run the node agent in the foreground until SIGTERM.

It refuses to run in the machine's root network namespace unless told this
machine *is* the node (``--i-am-the-node``): the agent adds devices, routes
and sysctls to the namespace it runs in, and the lab runs it inside a node
namespace (``nsenter --net=/run/netns/<node> ciliate-agent ...``).

Exit status: 0 when stopped by SIGTERM or SIGINT (after its own shutdown:
requests in flight answered, queued veth deletions done, the socket
removed); 2 for a configuration the node cannot run, including another
agent already on the same state directory, socket directory or bpffs root
(one line on stderr says what to fix); 1 for any other failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ciliate.control.cni import handler
from ciliate.control.cni.defaults import DEFAULT_AGENT_SOCKET, DEFAULT_MTU

if TYPE_CHECKING:
    from ciliate.control.agent.node import NodeAgent
    from ciliate.control.store import StoreError

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
    p.add_argument("--socket", type=Path, default=Path(DEFAULT_AGENT_SOCKET))
    p.add_argument("--bpffs-root", type=Path, default=Path("/sys/fs/bpf/ciliate"))
    p.add_argument("--mtu", type=int, default=DEFAULT_MTU)
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
        "--service-lb",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ciliate's own service load balancing; --no-service-lb leaves services to a"
        " kube-proxy on the node and sends replies the stack translated back through it",
    )
    p.add_argument(
        "--stack-nat-replies",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send replies of connections the node's stack NATed (a kube-proxy, a chained"
        " portmap, any iptables/nftables DNAT) back through the stack instead of straight"
        " to the pod; costs ~50 ns per packet delivered to a local pod. Default: on with"
        " --no-service-lb, off otherwise",
    )
    p.add_argument(
        "--bandwidth-manager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep pods' egress bandwidth (kubernetes.io/egress-bandwidth, or the CNI"
        " bandwidth capability) as Cilium's bandwidth manager does: departure times on"
        " the uplink's egress and an fq root qdisc there (replaces the uplink's). Needs"
        " --uplink. Off: a pod's limit is recorded and not kept",
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
    if not handler.MTU_MIN <= args.mtu <= handler.MTU_MAX:
        p.error(f"--mtu {args.mtu}: must be between {handler.MTU_MIN} and {handler.MTU_MAX}")
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


class _Stopped(BaseException):
    """SIGTERM or SIGINT arrived while the agent was starting: unwind
    start-up (it releases what it opened) and exit 0, as a stop would."""


class _StopSignals:
    """SIGTERM/SIGINT for the agent's whole life. While ``starting``: raise
    ``_Stopped``, so start-up unwinds. Afterwards: only log. uvicorn installs
    its own handlers while it runs and, after its graceful stop, raises the
    signal again; under the default handler that second delivery would kill
    the process before the agent's own shutdown (exit 143, a stale socket,
    queued work dropped)."""

    def __init__(self) -> None:
        self.starting = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.starting:
            log.info("%s during start-up: stopping", name)
            raise _Stopped(name)
        log.info("%s: shutting down", name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from ciliate.datapath import devices

    if devices.in_root_netns() and not args.i_am_the_node:
        return _refuse(
            "refusing to configure the machine's root network namespace; "
            "run it inside the node's namespace (nsenter --net=...) or pass --i-am-the-node"
        )

    from ciliate.control.agent.lock import AgentLockError
    from ciliate.control.agent.node import AgentConfig, AgentConfigError, NodeAgent
    from ciliate.control.store import StoreError

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
        service_lb=args.service_lb,
        stack_nat_replies=args.stack_nat_replies,
        bandwidth_manager=args.bandwidth_manager,
    )
    with _StopSignals() as signals:
        try:
            agent = NodeAgent(config)
        except (AgentLockError, AgentConfigError) as exc:
            return _refuse(str(exc))
        except StoreError as exc:
            return _refuse(_state_unreadable(exc, Path(config.state_dir)))
        except _Stopped:
            log.info("stopped before serving")
            return 0
        signals.starting = False
        try:
            serve(agent)
        finally:
            agent.close()
    log.info("stopped; pods keep forwarding through the attached programs and pinned maps")
    return 0


# Less free space than this where the state lives: the disk is full for SQLite.
_FULL_DISK_BYTES = 1 << 20


def _state_unreadable(exc: StoreError, state_dir: Path) -> str:
    """What to tell the operator when the node's state cannot be opened: most often
    a full disk (SQLite then says "disk I/O error"), which the free space shows."""
    message = f"the node's state cannot be opened: {exc}"
    try:
        free = shutil.disk_usage(state_dir).free
    except OSError:
        free = None
    if free is not None and free < _FULL_DISK_BYTES:
        message += f"; {state_dir} is on a full disk ({free} bytes free): free space there"
    return message + "; pods keep forwarding through the pinned datapath meanwhile"


def _refuse(message: str) -> int:
    print(f"ciliate-agent: {message}", file=sys.stderr)
    return 2


def serve(agent: NodeAgent) -> None:
    """Replay the queued DELs, then answer the API until SIGTERM/SIGINT;
    returns once requests in flight are answered."""
    import uvicorn

    from ciliate.control.agent.api import create_app

    # The socket listens already: a relay that found no socket a moment ago
    # has queued its DEL by now, and new calls wait in the backlog while we replay.
    replay_del_queue(agent)
    log.info(
        "serving on %s (node %s, pod CIDRs %s)",
        agent.config.socket,
        agent.config.node_name,
        ", ".join(map(str, agent.pod_cidrs)),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(agent),
            fd=agent.api_socket.fileno(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
    )
    server.run()


def replay_del_queue(agent: NodeAgent) -> int:
    """DELs the CNI relay queued while the agent was down, through the same
    handler as a live call. An entry goes once it succeeded or can never
    succeed (a malformed call); a temporary failure keeps it for next time."""
    replayed = 0
    for entry in handler.read_del_queue(agent.config.del_queue_dir):
        response = handler.handle(entry["env"], entry["stdin"].encode(), agent.endpoints)
        if response.exit_code == 0 or _permanent(response.stdout):
            handler.remove_from_queue(entry["path"])
            replayed += 1
        else:
            log.warning(
                "queued DEL %s failed, kept for the next start: %s", entry["path"], response.stdout
            )
    if replayed:
        log.info("replayed %d queued CNI DEL(s)", replayed)
    return replayed


# Failures no retry can mend: the queued call itself is malformed.
_PERMANENT_CODES = frozenset(
    {
        handler.CODE_INCOMPATIBLE_VERSION,
        handler.CODE_INVALID_ENV,
        handler.CODE_DECODING,
        handler.CODE_INVALID_NETCONF,
    }
)


def _permanent(stdout: str) -> bool:
    try:
        code = json.loads(stdout).get("code")
    except (ValueError, AttributeError):
        return False
    return code in _PERMANENT_CODES


if __name__ == "__main__":
    sys.exit(main())
