"""Pod networks built by CNI plugins, invoked the way a container runtime does.

A :class:`PodNetwork` is one node of the lab: a node network namespace
(created here, ``lo`` up) standing in for the host, and a CNI network
configuration whose plugins run *in* that namespace, exactly as kubelet's
runtime runs them on a host: the plugin binary is executed with
``CNI_COMMAND``/``CNI_CONTAINERID``/``CNI_NETNS``/``CNI_IFNAME``/``CNI_ARGS``/
``CNI_PATH`` in its environment and the network configuration on stdin, and
its stdout is the JSON result.

"Runs in the node namespace" is done the way Go runtimes do it: one worker
thread enters the node namespace (``setns``) and stays there for the life of
the network; every plugin is exec'd from that thread, so the child starts in
the node namespace and nothing else in the process changes namespace. The
wall-clock time of an ADD or DEL (``perf_counter_ns``) is taken around the
exec of the plugin(s) only, not around namespace creation or result parsing.

Each network is a small strategy object (:class:`NetworkDef`): a name, and a
``prepare`` step that returns the plugin directory, the configuration (a
netconf or a conflist) and an optional cleanup. Definitions exist for the
reference plugins (``bridge``, ``bridge-nonf``, ``ptp``; Debian
``containernetworking-plugins``) and for ``ciliate``, whose set-up
(:data:`CiliateSetup`) starts the lab's agent in the node namespace by
default; a set-up that raises :class:`NotImplementedError` makes the network
skipped with a clear message.

Everything this module creates is named ``<prefix>-…`` with a per-run random
prefix (``cbn-<hex>``) and is removed by :meth:`PodNetwork.close`, also on
error and Ctrl-C. Nothing touches the root namespace: host-local keeps its
state in a private temporary directory, not ``/var/lib/cni``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REFERENCE_PLUGIN_DIR = Path("/usr/lib/cni")
NETNS_DIR = Path("/run/netns")
CNI_VERSION = "1.0.0"
PLUGIN_TIMEOUT_S = 60.0
CLONE_NEWNET = 0x40000000

Json = dict[str, Any]
_T = TypeVar("_T")

CiliateSetup = Callable[[str, Path, Sequence[str]], tuple[Path, Json, Callable[[], None]]]
"""``ciliate_setup(node_netns_path, workdir, agent_args) -> (bin_dir, netconf, cleanup)``.

Starts the agent in the node namespace at ``node_netns_path`` (state under
``workdir``, a private directory removed afterwards; ``agent_args`` added to
its command line) and returns the
directory holding ``ciliate-cni``, the network configuration to pass it (a
netconf or a conflist) and a callable that stops the agent and removes what
it made. Raise :class:`NotImplementedError` while not available: the
network is then skipped."""


class PodNetError(RuntimeError):
    """A pod network could not be set up or torn down."""


class NetworkSkipped(PodNetError):
    """The network is not available here; ``str()`` says why."""


class CniError(PodNetError):
    """A plugin exited non-zero; carries the CNI error object if it printed one."""

    def __init__(
        self, plugin: str, command: str, returncode: int, error: Json | None, stderr: str
    ) -> None:
        self.plugin = plugin
        self.command = command
        self.returncode = returncode
        self.error = error or {}
        self.stderr = stderr
        msg = self.error.get("msg") or stderr.strip() or "(no output)"
        details = self.error.get("details")
        code = self.error.get("code")
        super().__init__(
            f"{plugin} {command} failed (exit {returncode}"
            + (f", CNI code {code}" if code is not None else "")
            + f"): {msg}"
            + (f": {details}" if details else "")
        )


# --- namespaces ----------------------------------------------------------------------------


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise PodNetError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def netns_add(name: str) -> str:
    """Create netns ``name`` with ``lo`` up; return its path."""
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
    except BaseException:
        netns_del(name)
        raise
    return netns_path(name)


def netns_del(name: str) -> None:
    if Path(netns_path(name)).exists():
        _run(["ip", "netns", "del", name], check=False)


def netns_list(prefix: str = "") -> list[str]:
    """Names of the namespaces under /run/netns starting with ``prefix``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def netns_exec(name: str, *cmd: str) -> list[str]:
    """The argv that runs ``cmd`` in namespace ``name`` (``ip netns exec``)."""
    return ["ip", "netns", "exec", name, *cmd]


def run_prefix() -> str:
    """A fresh per-run prefix for everything a benchmark creates: ``cbn-<hex>``."""
    return f"cbn-{secrets.token_hex(3)}"


_libc = ctypes.CDLL(None, use_errno=True)


def _setns_net(path: str) -> None:
    """Move the calling *thread* into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class _NetnsWorker:
    """One thread living in a network namespace; runs the callables given to it."""

    def __init__(self, path: str, name: str) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns-{name}",
            initializer=_setns_net,
            initargs=(path,),
        )

    def call(self, fn: Callable[[], _T]) -> _T:
        return self._pool.submit(fn).result()

    def close(self) -> None:
        # Waits for the thread to end, so that it no longer pins the namespace.
        self._pool.shutdown(wait=True, cancel_futures=True)


# --- network definitions (strategies) -------------------------------------------------------


@dataclass(frozen=True)
class NodeContext:
    """What a network's ``prepare`` step gets: the node it is set up on."""

    netns: str
    netns_path: str
    workdir: Path
    prefix: str


@dataclass(frozen=True)
class PreparedNetwork:
    """What a network's ``prepare`` step returns."""

    bin_dirs: tuple[Path, ...]
    """``CNI_PATH``: where the plugin binaries (and IPAM plugins they delegate to) are."""
    config: Json
    """A netconf (has ``type``) or a conflist (has ``plugins``)."""
    cleanup: Callable[[], None] | None = None


@dataclass(frozen=True)
class NetworkDef:
    """One kind of pod network: how to set it up on a node."""

    name: str
    description: str
    prepare: Callable[[NodeContext], PreparedNetwork]
    node_sysctls: Mapping[str, str] = field(default_factory=dict)
    """Set in the node namespace (only there) before ``prepare``."""


def _reference_plugins(*types: str) -> Path:
    missing = [t for t in types if not (REFERENCE_PLUGIN_DIR / t).is_file()]
    if missing:
        raise NetworkSkipped(
            f"reference CNI plugin(s) {', '.join(missing)} not in {REFERENCE_PLUGIN_DIR}"
            " (apt-get install containernetworking-plugins)"
        )
    return REFERENCE_PLUGIN_DIR


def host_local(ctx: NodeContext, subnet: str) -> Json:
    """host-local IPAM on ``subnet`` with its state in the node's private workdir."""
    return {
        "type": "host-local",
        "ranges": [[{"subnet": subnet}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(ctx.workdir / "ipam"),
    }


def bridge(
    *,
    name: str = "bridge",
    subnet: str = "10.99.0.0/24",
    bridge_name: str = "cbr0",
    nf_call_iptables: bool | None = None,
) -> NetworkDef:
    """The reference ``bridge`` plugin: a Linux bridge in the node, the node is the gateway.

    ``nf_call_iptables`` sets ``net.bridge.bridge-nf-call-iptables`` in the node
    namespace (None: leave the namespace default, 1 on this kernel)."""

    def prepare(ctx: NodeContext) -> PreparedNetwork:
        bin_dir = _reference_plugins("bridge", "host-local")
        config: Json = {
            "cniVersion": CNI_VERSION,
            "name": f"bench-{name}",
            "type": "bridge",
            "bridge": bridge_name,
            "isGateway": True,
            "ipMasq": False,
            "ipam": host_local(ctx, subnet),
        }
        return PreparedNetwork(bin_dirs=(bin_dir,), config=config)

    sysctls = {}
    if nf_call_iptables is not None:
        sysctls["net.bridge.bridge-nf-call-iptables"] = "1" if nf_call_iptables else "0"
    nf = "" if nf_call_iptables is None else f", bridge-nf-call-iptables={int(nf_call_iptables)}"
    return NetworkDef(
        name=name,
        description=f"bridge {bridge_name} + host-local {subnet}, isGateway{nf}",
        prepare=prepare,
        node_sysctls=sysctls,
    )


def ptp(*, name: str = "ptp", subnet: str = "10.98.0.0/24") -> NetworkDef:
    """The reference ``ptp`` plugin: routed, one /32 route per pod on the node."""

    def prepare(ctx: NodeContext) -> PreparedNetwork:
        bin_dir = _reference_plugins("ptp", "host-local")
        config: Json = {
            "cniVersion": CNI_VERSION,
            "name": f"bench-{name}",
            "type": "ptp",
            "ipMasq": False,
            "ipam": host_local(ctx, subnet),
        }
        return PreparedNetwork(bin_dirs=(bin_dir,), config=config)

    return NetworkDef(
        name=name, description=f"ptp + host-local {subnet}, /32 routes", prepare=prepare
    )


def lab_ciliate_setup(
    node_netns_path: str, workdir: Path, agent_args: Sequence[str]
) -> tuple[Path, Json, Callable[[], None]]:
    """The default :data:`CiliateSetup`: the lab's agent in the node namespace
    (``ciliate.control.lab.lab.agent_in``), the CNI plugin and its conflist under
    ``workdir``."""
    from ciliate.control.lab import lab

    stack = contextlib.ExitStack()
    _, bin_dir, conf_dir = stack.enter_context(
        lab.agent_in(node_netns_path, workdir, pod_cidr="10.244.70.0/24", agent_args=agent_args)
    )
    conflist = json.loads((conf_dir / "05-ciliate.conflist").read_text())
    return bin_dir, conflist, stack.close


def ciliate(
    *,
    name: str = "ciliate",
    setup: CiliateSetup | None = None,
    agent_args: Sequence[str] = (),
    description: str = "ciliate-cni + agent",
) -> NetworkDef:
    """ciliate: its agent in the node namespace, ``ciliate-cni`` as the plugin.

    ``setup`` defaults to :func:`lab_ciliate_setup`."""

    def prepare(ctx: NodeContext) -> PreparedNetwork:
        hook = setup or lab_ciliate_setup
        try:
            bin_dir, config, cleanup = hook(ctx.netns_path, ctx.workdir, agent_args)
        except NotImplementedError as e:
            raise NetworkSkipped(f"ciliate set-up is not implemented yet: {e}") from e
        return PreparedNetwork(bin_dirs=(Path(bin_dir),), config=config, cleanup=cleanup)

    return NetworkDef(name=name, description=description, prepare=prepare)


CILIATE_VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "ciliate": ((), "ciliate-cni + agent: tc redirect_peer, TCP socket to socket"),
    "ciliate-packet": (
        ("--no-socket-forwarding",),
        "ciliate without socket forwarding: every byte on the packet path",
    ),
}
"""ciliate's networks by name: the agent's extra arguments and a description."""


def ciliate_variant(name: str, setup: CiliateSetup | None = None) -> NetworkDef:
    agent_args, description = CILIATE_VARIANTS[name]
    return ciliate(name=name, setup=setup, agent_args=agent_args, description=description)


NETWORKS: dict[str, Callable[[], NetworkDef]] = {
    "bridge": bridge,
    "bridge-nonf": lambda: bridge(
        name="bridge-nonf", subnet="10.97.0.0/24", nf_call_iptables=False
    ),
    "ptp": ptp,
    **{name: functools.partial(ciliate_variant, name) for name in CILIATE_VARIANTS},
}
"""The networks benchmarks know by name."""


def with_ciliate_setup(
    specs: Sequence[str | NetworkDef], setup: CiliateSetup | None
) -> list[str | NetworkDef]:
    """``specs`` with every ciliate network by name set up by ``setup`` (when given)
    instead of :func:`lab_ciliate_setup`."""
    return [
        ciliate_variant(s, setup)
        if setup is not None and isinstance(s, str) and s in CILIATE_VARIANTS
        else s
        for s in specs
    ]


def network(spec: str | NetworkDef) -> NetworkDef:
    if isinstance(spec, NetworkDef):
        return spec
    try:
        return NETWORKS[spec]()
    except KeyError:
        raise ValueError(f"unknown network {spec!r} (known: {', '.join(NETWORKS)})") from None


# --- pods -----------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    netns: str
    netns_path: str
    container_id: str
    ifname: str
    cni_args: str
    result: Json
    ip: str
    prefix_len: int
    gateway: str | None
    add_ns: int
    del_ns: int | None = None

    @property
    def host_interfaces(self) -> list[str]:
        """Interfaces of the result that are not in the pod (bridge, host veth)."""
        return [i["name"] for i in self.result.get("interfaces", []) if not i.get("sandbox")]


@dataclass(frozen=True)
class OpTiming:
    op: str
    pod: str
    ns: int


def parse_result(result: Json) -> tuple[str, int, str | None]:
    """(ip, prefix length, gateway) of the first IPv4 address of a CNI ADD result."""
    ips = result.get("ips")
    if ips is None and "ip4" in result:  # CNI 0.1/0.2
        ips = [{"address": result["ip4"]["ip"], "gateway": result["ip4"].get("gateway")}]
    for entry in ips or []:
        address = str(entry.get("address", ""))
        if "/" in address and ":" not in address:
            ip, plen = address.split("/", 1)
            gw = entry.get("gateway")
            return ip, int(plen), str(gw) if gw else None
    raise PodNetError(f"CNI result without an IPv4 address: {json.dumps(result)}")


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    try:
        return tuple(int(x) for x in version.split(".")) >= minimum
    except ValueError:
        return False


class PodNetwork:
    """A node namespace, a CNI network on it, and the pods added to it.

    >>> with PodNetwork("bridge") as net:
    ...     a, b = net.add_pod("a"), net.add_pod("b")
    ...     net.del_pod(a)
    """

    def __init__(
        self,
        spec: str | NetworkDef,
        *,
        prefix: str | None = None,
        ifname: str = "eth0",
        k8s_namespace: str = "bench",
    ) -> None:
        self.network = network(spec)
        self.prefix = prefix or run_prefix()
        self.ifname = ifname
        self.k8s_namespace = k8s_namespace
        self.node_netns = f"{self.prefix}-{self.network.name}-node"
        self.node_netns_path = netns_path(self.node_netns)
        self.timings: list[OpTiming] = []
        self.plugin_versions: dict[str, Json] = {}
        self._pods: dict[str, Pod] = {}
        self._workdir: Path | None = None
        self._worker: _NetnsWorker | None = None
        self._prepared: PreparedNetwork | None = None
        self._plugins: list[Json] = []
        self._cni_version = CNI_VERSION
        self._lock = threading.Lock()

    # lifecycle

    def __enter__(self) -> PodNetwork:
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # do not hide the exception on its way out
            print(f"podnet: while cleaning up {self.node_netns}: {e}", file=sys.stderr)

    def open(self) -> None:
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-{self.network.name}-"))
            netns_add(self.node_netns)
            for key, value in self.network.node_sysctls.items():
                _run(netns_exec(self.node_netns, "sysctl", "-qw", f"{key}={value}"))
            self._worker = _NetnsWorker(self.node_netns_path, self.node_netns)
            self._worker.call(lambda: None)  # surfaces a setns failure now
            ctx = NodeContext(
                netns=self.node_netns,
                netns_path=self.node_netns_path,
                workdir=self._workdir,
                prefix=self.prefix,
            )
            self._prepared = self.network.prepare(ctx)
            self._plugins = self._plugin_chain(self._prepared.config)
            for conf in self._plugins:
                self._check_version(conf)
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def close(self) -> None:
        """DEL every pod left, remove their namespaces, the network and the node."""
        errors: list[str] = []
        for pod in list(self._pods.values()):
            try:
                self.del_pod(pod)
            except Exception as e:
                errors.append(f"DEL {pod.name}: {e}")
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared.cleanup is not None:
            try:
                prepared.cleanup()
            except Exception as e:
                errors.append(f"{self.network.name} cleanup: {e}")
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()
        try:
            netns_del(self.node_netns)
        except Exception as e:
            errors.append(f"netns del {self.node_netns}: {e}")
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if errors:
            raise PodNetError("; ".join(errors))

    # pods

    @property
    def pods(self) -> list[Pod]:
        return list(self._pods.values())

    @property
    def config(self) -> Json:
        if self._prepared is None:
            raise PodNetError("the network is not open")
        return self._prepared.config

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise PodNetError("the network is not open")
        return self._workdir

    def pod_netns(self, name: str) -> str:
        return f"{self.prefix}-{self.network.name}-{name}"

    def add_pod(self, name: str) -> Pod:
        """Create the pod's namespace (lo up) and run ADD; the ADD alone is timed."""
        if name in self._pods:
            raise ValueError(f"pod {name!r} exists")
        ns = self.pod_netns(name)
        path = netns_add(ns)
        cid = secrets.token_hex(32)
        args = (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.k8s_namespace};K8S_POD_NAME={name};"
            f"K8S_POD_INFRA_CONTAINER_ID={cid}"
        )
        try:
            result, elapsed = self._chain("ADD", cid, path, args, None)
            if result is None:
                raise PodNetError(f"{self.network.name}: ADD {name} printed no result")
            ip, plen, gw = parse_result(result)
        except BaseException:
            # As a runtime does: a failed ADD is followed at once by DEL.
            with contextlib.suppress(Exception):
                self._chain("DEL", cid, path, args, None)
            netns_del(ns)
            raise
        pod = Pod(
            name=name,
            netns=ns,
            netns_path=path,
            container_id=cid,
            ifname=self.ifname,
            cni_args=args,
            result=result,
            ip=ip,
            prefix_len=plen,
            gateway=gw,
            add_ns=elapsed,
        )
        self._pods[name] = pod
        self.timings.append(OpTiming("ADD", name, elapsed))
        return pod

    def del_pod(self, pod: Pod) -> int:
        """Run DEL (timed), then remove the pod's namespace. Returns the DEL time in ns."""
        prev = pod.result if _version_at_least(self._cni_version, (0, 4, 0)) else None
        try:
            _, elapsed = self._chain("DEL", pod.container_id, pod.netns_path, pod.cni_args, prev)
        finally:
            self._pods.pop(pod.name, None)
            netns_del(pod.netns)
        pod.del_ns = elapsed
        self.timings.append(OpTiming("DEL", pod.name, elapsed))
        return elapsed

    # plugins

    def _plugin_chain(self, config: Json) -> list[Json]:
        """The plugin configurations in ADD order, each as it goes on stdin."""
        self._cni_version = str(config.get("cniVersion", CNI_VERSION))
        if "plugins" not in config:
            if "type" not in config:
                raise PodNetError(f"netconf without type or plugins: {config}")
            return [dict(config)]
        chain = []
        for entry in config["plugins"]:
            conf = dict(entry)
            conf["name"] = config["name"]
            conf["cniVersion"] = self._cni_version
            chain.append(conf)
        return chain

    def _binary(self, plugin_type: str) -> Path:
        assert self._prepared is not None
        for d in self._prepared.bin_dirs:
            candidate = Path(d) / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        dirs = ":".join(str(d) for d in self._prepared.bin_dirs)
        raise PodNetError(f"CNI plugin {plugin_type!r} not found in {dirs}")

    def _env(self, command: str, cid: str, netns: str, ifname: str, args: str) -> dict[str, str]:
        assert self._prepared is not None
        env = dict(os.environ)  # as libcni does: the runtime's environment plus CNI_*
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=cid,
            CNI_NETNS=netns,
            CNI_IFNAME=ifname,
            CNI_ARGS=args,
            CNI_PATH=":".join(str(d) for d in self._prepared.bin_dirs),
        )
        return env

    def _exec(
        self, plugin_type: str, env: Mapping[str, str], stdin: Json
    ) -> tuple[Json | None, int]:
        """Exec one plugin from the node-namespace thread; (parsed stdout, wall ns)."""
        if self._worker is None:
            raise PodNetError("the network is not open")
        binary = str(self._binary(plugin_type))
        data = json.dumps(stdin).encode()

        def call() -> tuple[subprocess.CompletedProcess[bytes], int]:
            t0 = time.perf_counter_ns()
            proc = subprocess.run(
                [binary],
                input=data,
                capture_output=True,
                env=dict(env),
                timeout=PLUGIN_TIMEOUT_S,
                check=False,
            )
            return proc, time.perf_counter_ns() - t0

        with self._lock:
            proc, elapsed = self._worker.call(call)
        out = proc.stdout.decode(errors="replace").strip()
        command = env["CNI_COMMAND"]
        if proc.returncode != 0:
            error: Json | None = None
            with contextlib.suppress(ValueError):
                error = json.loads(out) if out else None
            raise CniError(
                plugin_type,
                command,
                proc.returncode,
                error if isinstance(error, dict) else None,
                proc.stderr.decode(errors="replace") + ("" if error else out),
            )
        if not out:
            return None, elapsed
        try:
            parsed = json.loads(out)
        except ValueError as e:
            raise PodNetError(f"{plugin_type} {command}: stdout is not JSON: {out[:200]!r}") from e
        return (parsed if isinstance(parsed, dict) else None), elapsed

    def _chain(
        self, command: str, cid: str, netns: str, args: str, prev: Json | None
    ) -> tuple[Json | None, int]:
        plugins = self._plugins if command == "ADD" else list(reversed(self._plugins))
        env = self._env(command, cid, netns, self.ifname, args)
        total = 0
        result = prev
        for conf in plugins:
            stdin = dict(conf)
            if result is not None:
                stdin["prevResult"] = result
            out, elapsed = self._exec(str(conf["type"]), env, stdin)
            total += elapsed
            if command == "ADD":
                result = out
        return result, total

    def _check_version(self, conf: Json) -> None:
        env = self._env("VERSION", "dummy", "dummy", "dummy", "")
        env["CNI_PATH"] = "dummy"
        out, _ = self._exec(str(conf["type"]), env, {"cniVersion": self._cni_version})
        supported = (out or {}).get("supportedVersions", [])
        self.plugin_versions[str(conf["type"])] = out or {}
        if self._cni_version not in supported:
            raise PodNetError(
                f"{conf['type']} does not support CNI {self._cni_version} (supports {supported})"
            )

    # checks on pods

    def ping(self, src: Pod, dst_ip: str, *, wait_s: int = 2) -> bool:
        proc = subprocess.run(
            netns_exec(src.netns, "ping", "-n", "-q", "-c1", f"-W{wait_s}", dst_ip),
            capture_output=True,
            check=False,
            timeout=wait_s + 10,
        )
        return proc.returncode == 0

    def wait_reachable(self, a: Pod, b: Pod, *, timeout_s: float = 10.0) -> None:
        """Both pods up and pinging each other; PodNetError with the pods' state if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            ok_ab = self.ping(a, b.ip, wait_s=1)
            ok_ba = ok_ab and self.ping(b, a.ip, wait_s=1)
            if ok_ab and ok_ba:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        state = "\n".join(
            f"--- {p.name} ({p.netns}) ---\n"
            + _run(["ip", "-n", p.netns, "-br", "addr"], check=False)
            + _run(["ip", "-n", p.netns, "route"], check=False)
            for p in (a, b)
        )
        raise PodNetError(
            f"{self.network.name}: pods {a.name} ({a.ip}) and {b.name} ({b.ip}) cannot ping"
            f" each other ({'a->b ok' if ok_ab else 'a->b fails'}) after {timeout_s:.0f}s:\n"
            + state
        )

    def link(self, pod: Pod) -> Json:
        """``ip -j link show`` of the pod's interface (mtu, address, ...)."""
        out = _run(["ip", "-n", pod.netns, "-j", "link", "show", "dev", pod.ifname])
        links = json.loads(out)
        if not links:
            raise PodNetError(f"{pod.netns}: no {pod.ifname}")
        link: Json = links[0]
        return link

    def node_links(self) -> list[str]:
        """Names of the interfaces in the node namespace."""
        out = _run(["ip", "-n", self.node_netns, "-j", "link", "show"])
        return [str(link["ifname"]) for link in json.loads(out)]


@contextlib.contextmanager
def pod_networks(
    specs: Sequence[str | NetworkDef],
    *,
    prefix: str | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[dict[str, PodNetwork]]:
    """Open several networks side by side (one node namespace each), skipping those
    that are unavailable (``on_skip(name, reason)``); all closed on the way out."""
    prefix = prefix or run_prefix()
    with contextlib.ExitStack() as stack:
        nets: dict[str, PodNetwork] = {}
        for spec in specs:
            net = PodNetwork(spec, prefix=prefix)
            try:
                stack.enter_context(net)
            except NetworkSkipped as e:
                if on_skip is not None:
                    on_skip(net.network.name, str(e))
                continue
            nets[net.network.name] = net
        yield nets
