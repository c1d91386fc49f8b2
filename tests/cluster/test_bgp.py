"""BGP between nodes and the top of rack, for real: a ToR namespace running
bird2 and two node namespaces running exabgp, each node linked to the ToR by a
veth (a /30 each), all in namespaces named ``cbg-<random>-*`` that are removed
at the end. Nothing is added to the root namespace."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from ciliate.control.cluster import bgp
from ciliate.control.lab import tor

TOR_AS = 65000
LINKS = IPv4Network("192.168.77.0/24")


@dataclass(frozen=True)
class Node:
    index: int
    netns: str
    ip: IPv4Address  # the node's end of its link to the ToR: its BGP next hop
    tor_ip: IPv4Address  # the ToR's end
    asn: int

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def pod_cidr(self) -> IPv4Network:
        return IPv4Network(f"10.244.{self.index}.0/24")

    @property
    def neighbor(self) -> tor.Neighbor:
        return tor.Neighbor(address=self.ip, asn=self.asn, name=self.name)


@dataclass
class Fabric:
    prefix: str
    tor_netns: str
    nodes: list[Node]
    workdir: Path
    tor: tor.TorRouter

    def tor_routes(self) -> set[tuple[IPv4Network, IPv4Address | None]]:
        return {(r.prefix, r.via) for r in self.tor.routes()}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _in_netns(netns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", *cmd], capture_output=True, text=True, check=False
    )


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Poll ``predicate`` every 20 ms; the seconds it took, or fail."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (our workdir): leftovers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for init (an orphan's parent died)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _require_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    try:
        tor.install_bird()
    except tor.BirdMissingError as exc:
        pytest.skip(f"no bird2 and it could not be installed: {exc}")
    try:
        bgp.exabgp_command()
    except bgp.ExabgpMissingError as exc:
        pytest.skip(str(exc))
    for tool in ("ip", "nsenter", "ping"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    _require_tools()
    prefix = f"cbg-{secrets.token_hex(3)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    tor_netns = f"{prefix}-tor"
    namespaces: list[str] = []
    router: tor.TorRouter | None = None
    try:
        for netns in (tor_netns, f"{prefix}-n1", f"{prefix}-n2"):
            _ip("netns", "add", netns)
            namespaces.append(netns)
            _ip("-n", netns, "link", "set", "lo", "up")
        nodes = []
        for index in (1, 2):
            link = list(LINKS.subnets(new_prefix=30))[index]
            tor_ip, node_ip = link[1], link[2]
            node = Node(index, f"{prefix}-n{index}", node_ip, tor_ip, TOR_AS + index)
            # Both ends are created inside the lab namespaces, never in the root one.
            _ip("-n", tor_netns, "link", "add", node.name, "type", "veth", "peer", "name", "eth0",
                "netns", node.netns)  # fmt: skip
            _ip("-n", tor_netns, "addr", "add", f"{tor_ip}/30", "dev", node.name)
            _ip("-n", tor_netns, "link", "set", node.name, "up")
            _ip("-n", node.netns, "addr", "add", f"{node_ip}/30", "dev", "eth0")
            _ip("-n", node.netns, "link", "set", "eth0", "up")
            _ip("-n", node.netns, "route", "add", "default", "via", str(tor_ip))
            nodes.append(node)
        # The ToR starts knowing node 1 only; node 2 comes through reconfiguration.
        router = tor.TorRouter(
            netns=tor_netns,
            router_id=IPv4Address("192.168.77.1"),
            local_as=TOR_AS,
            neighbors=[nodes[0].neighbor],
            workdir=workdir / "tor",
        )
        router.start()
        router.add_neighbor(nodes[1].neighbor)
        yield Fabric(prefix, tor_netns, nodes, workdir, router)
    finally:
        if router is not None:
            router.close()
        for netns in namespaces:
            # Anything still running in our namespaces is ours (a failed test's).
            pids = subprocess.run(
                ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    assert not [n for n in namespaces if Path(f"/run/netns/{n}").exists()]


SpeakerFactory = Callable[..., bgp.BgpSpeaker]


@pytest.fixture
def speaker(fabric: Fabric) -> Iterator[SpeakerFactory]:
    """Start a node's speaker (closed at the end; no process may be left)."""
    made: list[bgp.BgpSpeaker] = []
    workdir = fabric.workdir / f"t{secrets.token_hex(3)}"

    def make(
        node: Node, *, start: bool = True, graceful_restart: int = bgp.DEFAULT_RESTART_TIME
    ) -> bgp.BgpSpeaker:
        s = bgp.BgpSpeaker(
            router_id=node.ip,
            local_as=node.asn,
            peers=[bgp.Peer(address=node.tor_ip, asn=TOR_AS)],
            next_hop=node.ip,
            workdir=workdir / node.name,
            netns=node.netns,
            graceful_restart=graceful_restart,
        )
        made.append(s)
        if start:
            s.start()
        return s

    yield make
    for s in made:
        s.close()
    assert _processes_mentioning(str(workdir)) == []
    # The next test starts from an empty ToR table.
    wait_for("the ToR table empties", lambda: fabric.tor_routes() == set(), timeout=5)


def _relearned(fabric: Fabric, node: Node) -> bool:
    """bird's graceful restart of ``node`` is over (the new session sent its
    End-of-RIB, after which bird flushes every stale route not sent again) and the
    route is there."""
    return (
        fabric.tor.sessions()[node.neighbor] == "Established"
        and not fabric.tor.restarting(node.neighbor)
        and node.pod_cidr in fabric.tor.bird_routes()
    )


def _ping(netns: str, address: str) -> bool:
    return _in_netns(netns, "ping", "-c", "1", "-W", "1", address).returncode == 0


# -- announcing ----------------------------------------------------------------------


def test_each_node_announces_its_pod_cidr_and_the_tor_installs_it(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    for node in fabric.nodes:
        speaker(node).announce([node.pod_cidr])
    expected = {(node.pod_cidr, node.ip) for node in fabric.nodes}
    wait_for("both pod CIDRs at the ToR", lambda: fabric.tor_routes() == expected, timeout=5)
    shown = subprocess.run(
        ["ip", "-n", fabric.tor_netns, "route", "show"], capture_output=True, text=True, check=True
    ).stdout
    for node in fabric.nodes:
        assert f"{node.pod_cidr} via {node.ip} dev {node.name} proto bird" in shown


def test_sessions_are_reported_established_on_both_sides(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    speakers = [speaker(node) for node in fabric.nodes]
    for s in speakers:
        assert s.wait_established(timeout=10), s.sessions()
        assert s.sessions() == {
            bgp.Peer(address=s.peers[0].address, asn=TOR_AS): bgp.SessionState.ESTABLISHED
        }
    wait_for(
        "the ToR sees both sessions up",
        lambda: set(fabric.tor.sessions().values()) == {"Established"},
    )
    protocols = fabric.tor.protocols()
    assert all(protocols[node.name].established for node in fabric.nodes)
    assert protocols["kernel1"].state == "up"


def test_set_prefixes_announces_the_new_and_withdraws_the_gone(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    node = fabric.nodes[0]
    s = speaker(node)
    first = [IPv4Network("10.244.1.0/24"), IPv4Network("10.244.11.0/24")]
    second = [IPv4Network("10.244.11.0/24"), IPv4Network("10.245.1.0/26")]

    def at_tor() -> set[IPv4Network]:
        return {prefix for prefix, via in fabric.tor_routes() if via == node.ip}

    s.set_prefixes(first)
    wait_for("the first set", lambda: at_tor() == set(first), timeout=5)
    s.set_prefixes(second)
    assert s.prefixes == second
    wait_for("the second set", lambda: at_tor() == set(second), timeout=5)
    s.withdraw([IPv4Network("10.245.1.0/26"), IPv4Network("10.99.0.0/16")])  # one never announced
    wait_for("one withdrawn", lambda: at_tor() == {IPv4Network("10.244.11.0/24")}, timeout=5)
    s.set_prefixes([])
    wait_for("all withdrawn", lambda: at_tor() == set(), timeout=5)


def test_prefixes_announced_before_the_session_is_up_are_sent_when_it_comes_up(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    node = fabric.nodes[1]
    s = speaker(node)
    s.announce([node.pod_cidr])  # at once: exabgp is most likely still connecting
    wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)


# -- routes leaving ------------------------------------------------------------------


def test_a_closed_speakers_route_leaves_the_tor_within_5_s(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    stay, leave = fabric.nodes
    kept, closed = speaker(stay), speaker(leave)
    kept.announce([stay.pod_cidr])
    closed.announce([leave.pod_cidr])
    both = {(stay.pod_cidr, stay.ip), (leave.pod_cidr, leave.ip)}
    wait_for("both routes", lambda: fabric.tor_routes() == both, timeout=5)

    remaining = {(stay.pod_cidr, stay.ip)}
    left: list[float] = []
    watcher = threading.Thread(
        target=lambda: left.append(
            wait_for("route leaves", lambda: fabric.tor_routes() == remaining, 5)
        )
    )
    started = time.monotonic()
    watcher.start()
    closed.close()
    close_took = time.monotonic() - started
    watcher.join()
    assert left, "the closed node's route did not leave the ToR within 5 s"
    print(
        f"route gone {left[0] * 1000:.0f} ms after close() began; close() took "
        f"{close_took * 1000:.0f} ms"
    )
    assert left[0] <= 5 and close_took <= 6
    assert closed.pid is None
    assert kept.sessions()[kept.peers[0]] is bgp.SessionState.ESTABLISHED


def test_a_silent_speaker_is_dropped_by_the_hold_timer_within_5_s(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    node = fabric.nodes[0]
    s = speaker(node)
    s.announce([node.pod_cidr])
    wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
    assert s.pid is not None
    os.kill(s.pid, signal.SIGSTOP)  # alive, its TCP session open, but no keepalives
    try:
        gone = wait_for(
            "the silent node's route leaves",
            lambda: (node.pod_cidr, node.ip) not in fabric.tor_routes(),
            timeout=5,
        )
    finally:
        os.kill(s.pid, signal.SIGCONT)
    print(f"hold timer: route gone {gone:.2f} s after the speaker went silent")
    assert gone >= 1  # it was the hold timer, not a closed connection


_OWNER = """
import sys, time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from ciliate.control.cluster import bgp
s = bgp.BgpSpeaker(
    router_id=IPv4Address("{node.ip}"), local_as={node.asn},
    peers=[bgp.Peer(IPv4Address("{node.tor_ip}"), {tor_as})],
    next_hop=IPv4Address("{node.ip}"), workdir=Path("{workdir}"), netns="{node.netns}",
    graceful_restart={graceful_restart})
s.start([IPv4Network("{node.pod_cidr}")])
print(s.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("graceful_restart", [0, 3])
def test_a_speaker_whose_owner_dies_stops_and_its_route_leaves_after_the_restart_time(
    fabric: Fabric, graceful_restart: int
) -> None:
    """The agent killed with SIGKILL: exabgp follows (the relay loses our socket).
    Without graceful restart it sends a Cease and the route leaves at once; with it
    the session ends silently, so the ToR keeps the route (stale) until the restart
    time has passed with no speaker back."""
    node = fabric.nodes[0]
    workdir = fabric.workdir / f"owner-{secrets.token_hex(3)}"
    script = _OWNER.format(
        node=node, tor_as=TOR_AS, workdir=workdir, graceful_restart=graceful_restart
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        exabgp_pid = int(owner.stdout.readline())
        wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
        owner.kill()
        owner.wait()
        wait_for("exabgp exits", lambda: _exited(exabgp_pid), timeout=5)
        if graceful_restart:
            assert (node.pod_cidr, node.ip) in fabric.tor_routes()
            wait_for("bird holds it stale", lambda: fabric.tor.restarting(node.neighbor))
        gone = wait_for(
            "the orphan's route leaves",
            lambda: (node.pod_cidr, node.ip) not in fabric.tor_routes(),
            timeout=graceful_restart + 5,
        )
        print(f"owner killed, restart time {graceful_restart} s: route gone after {gone:.2f} s")
        wait_for("no process left", lambda: _processes_mentioning(str(workdir)) == [], timeout=5)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pid in _processes_mentioning(str(workdir)):
            os.kill(pid, signal.SIGKILL)


def test_a_new_speaker_stops_the_exabgp_its_killed_predecessor_left(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    """An agent killed hard leaves its exabgp running for a moment (it stops once
    its relay finds no one): the next agent's speaker, on the same workdir, kills
    it before starting its own, and the ToR keeps the route throughout."""
    node = fabric.nodes[0]
    first = speaker(node)
    workdir = first.workdir
    first.close()
    script = _OWNER.format(
        node=node, tor_as=TOR_AS, workdir=workdir, graceful_restart=bgp.DEFAULT_RESTART_TIME
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        orphan = int(owner.stdout.readline())
        wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
        with tor.RouteMonitor(fabric.tor_netns) as monitor:
            os.kill(orphan, signal.SIGSTOP)  # it cannot stop by itself before we start
            owner.kill()
            owner.wait()
            successor = speaker(node, start=False)
            assert successor.workdir == workdir
            successor.start([node.pod_cidr])
            assert _exited(orphan)
            assert successor.wait_established(timeout=10)
            wait_for("re-learned", lambda: _relearned(fabric, node))
        assert monitor.deleted(node.pod_cidr) == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_crashed_exabgps_route_stays_until_the_speaker_starts_again(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    node = fabric.nodes[0]
    s = speaker(node)
    s.announce([node.pod_cidr])
    wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
    assert s.pid is not None
    with tor.RouteMonitor(fabric.tor_netns) as monitor:
        os.kill(s.pid, signal.SIGKILL)
        wait_for("bird holds it stale", lambda: fabric.tor.restarting(node.neighbor))
        wait_for("exabgp gone", lambda: not s.running)  # reaped: a loaded machine is slow
        assert set(s.sessions().values()) == {bgp.SessionState.DOWN}
        with pytest.raises(bgp.SpeakerNotRunningError):
            s.announce([IPv4Network("10.244.21.0/24")])
        s.start([node.pod_cidr])
        wait_for("re-learned", lambda: _relearned(fabric, node))
        assert (node.pod_cidr, node.ip) in fabric.tor_routes()
    assert monitor.deleted(node.pod_cidr) == []


# -- restarts ------------------------------------------------------------------------


def test_a_speaker_starts_again_after_close_and_leaves_no_process(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    node = fabric.nodes[0]
    s = speaker(node)
    for _ in range(2):
        s.announce([node.pod_cidr])
        wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
        pid = s.pid
        s.close()
        assert s.pid is None and s.prefixes == []
        assert pid is not None and not Path(f"/proc/{pid}").exists()
        assert _processes_mentioning(str(s.workdir)) == []
        wait_for("withdrawn", lambda: fabric.tor_routes() == set(), timeout=5)
        started = time.monotonic()
        s.start()
        assert s.wait_established(timeout=10)
        print(f"restarted speaker established in {time.monotonic() - started:.2f} s")
    with pytest.raises(bgp.BgpError):
        s.start()  # already running


@pytest.mark.parametrize("stop", ["close(keep_routes=True)", "SIGKILL"])
def test_a_restarting_speaker_keeps_its_route_at_the_tor_throughout(
    fabric: Fabric, speaker: SpeakerFactory, stop: str
) -> None:
    """Graceful restart: the route is never deleted from the ToR's kernel table,
    and bird takes the new session's route in place of the stale one."""
    node = fabric.nodes[1]
    first = speaker(node)
    first.set_prefixes([node.pod_cidr])
    wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
    with tor.RouteMonitor(fabric.tor_netns) as monitor:
        if stop == "SIGKILL":
            assert first.pid is not None
            os.kill(first.pid, signal.SIGKILL)
        first.close(keep_routes=True)
        assert first.pid is None
        wait_for("bird holds it stale", lambda: fabric.tor.restarting(node.neighbor))
        second = speaker(node, start=False)
        second.start([node.pod_cidr])
        assert second.wait_established(timeout=10)
        wait_for("re-learned", lambda: _relearned(fabric, node))
    assert monitor.deleted(node.pod_cidr) == []
    assert (node.pod_cidr, node.ip) in fabric.tor_routes()


def test_a_restarting_speaker_that_never_comes_back_loses_its_route_after_the_restart_time(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    node = fabric.nodes[0]
    s = speaker(node, graceful_restart=3)
    s.set_prefixes([node.pod_cidr])
    wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
    s.close(keep_routes=True)
    wait_for("bird holds it stale", lambda: fabric.tor.restarting(node.neighbor))
    gone = wait_for("the route leaves", lambda: fabric.tor_routes() == set(), timeout=3 + 5)
    print(f"restart time 3 s: the stale route left {gone:.2f} s after the speaker stopped")


def test_the_tor_restarting_gets_the_routes_back(fabric: Fabric, speaker: SpeakerFactory) -> None:
    node = fabric.nodes[1]
    s = speaker(node)
    s.announce([node.pod_cidr])
    wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
    fabric.tor.close()
    assert fabric.tor_routes() == set()  # bird removes its kernel routes on the way out
    fabric.tor.start()
    back = wait_for(
        "the route is re-announced",
        lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(),
        timeout=10,
    )
    print(f"ToR restarted: route back after {back:.2f} s")


def test_removing_a_neighbor_at_the_tor_drops_its_routes(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    node = fabric.nodes[1]
    s = speaker(node)
    s.announce([node.pod_cidr])
    wait_for("the route", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes(), timeout=5)
    fabric.tor.remove_neighbor(node.ip)
    try:
        assert node.name not in fabric.tor.protocols()
        wait_for("the route leaves", lambda: fabric.tor_routes() == set(), timeout=5)
    finally:
        fabric.tor.add_neighbor(node.neighbor)
    wait_for("the route is back", lambda: (node.pod_cidr, node.ip) in fabric.tor_routes())


def test_a_config_bird_refuses_leaves_the_running_one(fabric: Fabric) -> None:
    before = fabric.tor.config_path.read_text()
    with pytest.raises(tor.BirdConfigError):
        # A protocol named like a keyword of bird's grammar.
        fabric.tor.add_neighbor(tor.Neighbor(IPv4Address("192.168.77.30"), 65009, name="bgp"))
    assert fabric.tor.config_path.read_text() == before
    assert [n.name for n in fabric.tor.neighbors] == ["node1", "node2"]


# -- traffic -------------------------------------------------------------------------


def test_traffic_to_a_pod_address_follows_the_announced_route(
    fabric: Fabric, speaker: SpeakerFactory
) -> None:
    """node1 -> ToR -> node2 for an address in node2's pod CIDR, only while node2
    announces it."""
    client, owner = fabric.nodes
    pod_ip = str(owner.pod_cidr[10])
    # A "pod" address on a veth inside node 2 (no dummy driver in this kernel).
    _ip("-n", owner.netns, "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p")
    _ip("-n", owner.netns, "addr", "add", f"{pod_ip}/32", "dev", "pod0")
    _ip("-n", owner.netns, "link", "set", "pod0", "up")
    _ip("-n", owner.netns, "link", "set", "pod0p", "up")
    try:
        assert not _ping(client.netns, pod_ip)  # the ToR has no route to it yet
        s = speaker(owner)
        s.announce([owner.pod_cidr])
        wait_for("the route", lambda: (owner.pod_cidr, owner.ip) in fabric.tor_routes(), 5)
        assert _ping(client.netns, pod_ip)
        s.close()
        wait_for("withdrawn", lambda: fabric.tor_routes() == set(), timeout=5)
        assert not _ping(client.netns, pod_ip)
    finally:
        _ip("-n", owner.netns, "link", "del", "pod0")


# -- configuration, no namespaces ----------------------------------------------------


def test_the_speaker_config_names_each_peer_and_the_relay(tmp_path: Path) -> None:
    s = bgp.BgpSpeaker(
        router_id=IPv4Address("192.168.77.6"),
        local_as=65001,
        peers=[bgp.Peer(IPv4Address("192.168.77.5"), 65000)],
        next_hop=IPv4Address("192.168.77.6"),
        workdir=tmp_path,
    )
    conf = s.render_config()
    assert "neighbor 192.168.77.5 {" in conf
    assert "local-address 192.168.77.6;" in conf
    assert "peer-as 65000;" in conf and "hold-time 3;" in conf
    assert f"-S {tmp_path}/api-relay.py {tmp_path}/api.sock;" in conf
    assert "neighbor-changes;" in conf
    assert f"capability {{ graceful-restart {bgp.DEFAULT_RESTART_TIME}; }}" in conf
    assert "static" not in conf
    routes = s.render_config([IPv4Network("10.244.1.0/24")])
    assert "route 10.244.1.0/24 next-hop 192.168.77.6;" in routes


def test_graceful_restart_0_leaves_the_capability_out(tmp_path: Path) -> None:
    s = bgp.BgpSpeaker(
        router_id=IPv4Address("192.168.77.6"),
        local_as=65001,
        peers=[bgp.Peer(IPv4Address("192.168.77.5"), 65000)],
        next_hop=IPv4Address("192.168.77.6"),
        workdir=tmp_path,
        graceful_restart=0,
    )
    assert "graceful-restart" not in s.render_config()


@pytest.mark.parametrize(
    "change",
    [
        {"hold_time": 1},
        {"graceful_restart": -1},
        {"graceful_restart": 4096},
        {"local_as": 0},
        {"peers": []},
        {"peers": [bgp.Peer(IPv4Address("192.168.77.5"), 65000)] * 2},
    ],
)
def test_a_speaker_refuses_bad_parameters(tmp_path: Path, change: dict[str, object]) -> None:
    args: dict[str, object] = {
        "router_id": IPv4Address("192.168.77.6"),
        "local_as": 65001,
        "peers": [bgp.Peer(IPv4Address("192.168.77.5"), 65000)],
        "next_hop": IPv4Address("192.168.77.6"),
        "workdir": tmp_path,
        **change,
    }
    with pytest.raises(ValueError):
        bgp.BgpSpeaker(**args)  # type: ignore[arg-type]


def test_commands_to_a_speaker_that_is_not_running_fail(tmp_path: Path) -> None:
    s = bgp.BgpSpeaker(
        router_id=IPv4Address("192.168.77.6"),
        local_as=65001,
        peers=[bgp.Peer(IPv4Address("192.168.77.5"), 65000)],
        next_hop=IPv4Address("192.168.77.6"),
        workdir=tmp_path,
    )
    with pytest.raises(bgp.SpeakerNotRunningError):
        s.announce([IPv4Network("10.244.1.0/24")])
    s.close()  # closing what never ran is fine
    assert s.sessions() == {bgp.Peer(IPv4Address("192.168.77.5"), 65000): bgp.SessionState.IDLE}


def test_the_tor_never_runs_in_the_root_namespace(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        tor.TorRouter(
            netns="", router_id=IPv4Address("10.0.0.1"), local_as=1, neighbors=[], workdir=tmp_path
        )
