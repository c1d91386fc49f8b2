"""``ciliate``: the command line of the project.

The parsers of every subcommand are registered here; the heavy parts (the
datapath and its loader, the benchmarks, the lab's demo) are imported only
when their subcommand runs, so ``ciliate --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ciliate.control.cli import objects as objects_cli
from ciliate.control.cli import services as services_cli
from ciliate.control.cli import show
from ciliate.control.cni import install as cni_install
from ciliate.control.lab import lab as lab_cli


def _bpf_build(args: argparse.Namespace) -> int:
    from ciliate.datapath import objects

    result = objects.build(verbose=args.verbose)
    rebuilt = ", ".join(result.rebuilt) or "nothing (up to date)"
    print(f"built in {result.seconds:.2f} s: {rebuilt}")
    print(f"objects: {objects.object_dir()}")
    if args.check:
        return _bpf_check(args)
    return 0


def _bpf_check(args: argparse.Namespace) -> int:
    """Load every object through the verifier, as the agent would."""
    import ipaddress

    from ciliate.datapath.programs import Datapath, NodeConfig
    from ciliate.loader import VerifierError

    config = NodeConfig(
        router_ip=ipaddress.IPv4Address("10.244.1.1"),
        node_ip=ipaddress.IPv4Address("192.168.200.2"),
        pod_cidrs=[ipaddress.IPv4Network("10.244.1.0/24")],
    )
    try:
        with Datapath.load(config) as dp:
            print("verifier accepted: " + ", ".join(sorted(dp.programs)))
    except VerifierError as exc:
        print(str(exc), file=sys.stderr)
        if args.verbose:
            print(exc.log, file=sys.stderr)
        else:
            print("(the whole verifier log: ciliate -v bpf check)", file=sys.stderr)
        return 1
    return 0


def _bench_datapath(args: argparse.Namespace) -> int:
    from ciliate.bench import datapath

    def progress(name: str) -> None:
        print(f"  measuring {name} ...", file=sys.stderr, flush=True)

    results = datapath.run(rounds=args.rounds, packets_per_round=args.packets, progress=progress)
    datapath.print_table(results)
    if args.json:
        datapath.write_json(results, Path(args.json))
        print(f"figures written to {args.json}")
    return 0


def _bench_cni(args: argparse.Namespace) -> int:
    from ciliate.bench import cni

    results = cni.run(pods=args.pods, networks=tuple(args.networks))
    cni.print_table(results)
    if args.json:
        cni.write_json(results, Path(args.json))
        print(f"figures written to {args.json}")
    return 0


def _bench_traffic(args: argparse.Namespace) -> int:
    from ciliate.bench import traffic

    results = traffic.run(
        networks=tuple(args.networks),
        seconds=args.seconds,
        repeats=args.repeats,
        profile_dir=Path(args.profile) if args.profile else None,
    )
    traffic.print_table(results)
    traffic.plot(results, Path(args.plot))
    print(f"plot written to {args.plot}")
    if args.json:
        traffic.write_json(results, Path(args.json))
        print(f"figures written to {args.json}")
    return 0


def _bench_cidr_alloc(args: argparse.Namespace) -> int:
    from ciliate.bench import cidr_alloc

    cidr_alloc.print_table(cidr_alloc.run(args.nodes))
    return 0


def _bench_identity(args: argparse.Namespace) -> int:
    from ciliate.bench import identity

    identity.print_table(
        identity.run(
            agents=args.agents,
            identities=args.identities,
            backend=identity.EtcdIdentityBenchBackend(),
        )
    )
    return 0


def _bench_cluster(args: argparse.Namespace) -> int:
    from ciliate.bench import cluster

    results = cluster.run_many(
        args.nodes,
        endpoints=args.endpoints,
        burst=args.burst,
        agents_per_process=args.agents_per_process,
    )
    cluster.print_table(results)
    if args.json:
        cluster.write_json(results, args.json)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ciliate.control.lab import demo

    return demo.run_datapath_demo()


def _bench_policy(args: argparse.Namespace) -> int:
    from ciliate.bench import policy

    enforce = (
        None
        if args.only == "peer"
        else policy.run_enforce(endpoints=args.endpoints, rounds=args.enforce_rounds)
    )
    peer = (
        None
        if args.only == "enforce"
        else policy.run_peer(rule_counts=args.rules, rounds=args.rounds, seconds=args.seconds)
    )
    policy.print_tables(enforce, peer)
    if args.json:
        policy.write_json(policy.to_dict(enforce, peer), Path(args.json))
        print(f"figures written to {args.json}")
    return 0


def _bench_services(args: argparse.Namespace) -> int:
    from ciliate.bench import services

    results = services.run(service_counts=args.services, rounds=args.rounds)
    services.print_table(results)
    if args.json:
        services.write_json(results, Path(args.json))
        print(f"figures written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ciliate", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", required=True)

    bpf = sub.add_parser("bpf", help="BPF objects and maps").add_subparsers(
        dest="bpf_command", required=True
    )
    build = bpf.add_parser("build", help="rebuild the BPF objects of this checkout (incremental)")
    build.add_argument(
        "--check", action="store_true", help="then load every program through the verifier"
    )
    build.set_defaults(func=_bpf_build)
    check = bpf.add_parser("check", help="load every program through the verifier")
    check.set_defaults(func=_bpf_check)
    show.register_bpf(bpf)
    show.register(sub)
    objects_cli.register(sub)
    services_cli.register(sub)

    cni_install.register(sub)

    lab = sub.add_parser("lab", help="a lab of node and pod namespaces").add_subparsers(
        dest="lab_command", required=True
    )
    lab_cli.register(lab)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    bench_dp = bench.add_parser("datapath", help="ns/packet of each datapath path")
    bench_dp.add_argument("--rounds", type=int, default=7)
    bench_dp.add_argument("--packets", type=int, default=100_000, help="packets per round and case")
    bench_dp.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench_dp.set_defaults(func=_bench_datapath)
    bench_cni = bench.add_parser("cni", help="CNI ADD/DEL latency: ciliate vs bridge+host-local")
    bench_cni.add_argument("--pods", type=int, default=50)
    bench_cni.add_argument("--networks", nargs="+", default=["bridge", "ciliate"])
    bench_cni.add_argument("--json", metavar="FILE")
    bench_cni.set_defaults(func=_bench_cni)
    bench_tr = bench.add_parser("traffic", help="pod-to-pod throughput and latency vs bridge, ptp")
    bench_tr.add_argument(
        "--networks",
        nargs="+",
        default=["bridge", "ptp", "ciliate-packet", "ciliate"],
        help="of: bridge, bridge-nonf, ptp, ciliate, ciliate-packet (ciliate without"
        " socket forwarding)",
    )
    # Many short rounds: more pairs for the median ratio on a machine that drifts.
    bench_tr.add_argument("--seconds", type=int, default=3)
    bench_tr.add_argument("--repeats", type=int, default=9)
    bench_tr.add_argument("--plot", default="bench-traffic.png", metavar="PNG")
    bench_tr.add_argument("--json", metavar="FILE")
    bench_tr.add_argument(
        "--profile",
        metavar="DIR",
        help="also sample one run per tool and network with perf (samples kept in DIR)"
        " and show where the CPU went",
    )
    bench_tr.set_defaults(func=_bench_traffic)
    bench_ca = bench.add_parser("cidr-alloc", help="pod CIDRs for N simulated nodes")
    bench_ca.add_argument("--nodes", type=int, default=10_000)
    bench_ca.set_defaults(func=_bench_cidr_alloc)
    bench_id = bench.add_parser("identity", help="identity allocations per second through etcd")
    bench_id.add_argument("--agents", type=int, default=3)
    bench_id.add_argument("--identities", type=int, default=300)
    bench_id.set_defaults(func=_bench_identity)
    bench_cl = bench.add_parser("cluster", help="endpoint propagation to N simulated agents")
    bench_cl.add_argument("--nodes", type=int, nargs="+", default=[10], help="one run per count")
    bench_cl.add_argument("--endpoints", type=int, default=30, help="published one at a time")
    bench_cl.add_argument("--burst", type=int, default=0, help="then this many at once")
    bench_cl.add_argument("--agents-per-process", type=int, default=50)
    bench_cl.add_argument("--json", metavar="FILE")
    bench_cl.set_defaults(func=_bench_cluster)

    bench_pol = bench.add_parser(
        "policy", help="policy: apply -> enforced, and ciliate against an iptables peer"
    )
    bench_pol.add_argument("--endpoints", type=int, default=100, help="for apply -> enforced")
    bench_pol.add_argument("--enforce-rounds", type=int, default=10)
    bench_pol.add_argument(
        "--rules", type=int, nargs="+", default=[10, 1000, 10000], help="rule counts to compare"
    )
    bench_pol.add_argument("--rounds", type=int, default=3)
    bench_pol.add_argument("--seconds", type=float, default=3)
    bench_pol.add_argument("--only", choices=("enforce", "peer"), help="run one of the two parts")
    bench_pol.add_argument("--json", metavar="FILE")
    bench_pol.set_defaults(func=_bench_policy)

    bench_svc = bench.add_parser(
        "services", help="ClusterIP latency vs pod IP and vs kube-proxy's iptables mode"
    )
    bench_svc.add_argument("--services", type=int, nargs="+", default=[1, 1000, 10000])
    bench_svc.add_argument("--rounds", type=int, default=3)
    bench_svc.add_argument("--json", metavar="FILE")
    bench_svc.set_defaults(func=_bench_services)

    demo = sub.add_parser("demo", help="load the datapath and show packets through it")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # libbpf prints a rejected program's whole log; VerifierError carries it.
        logging.getLogger("ciliate.loader.libbpf").setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
