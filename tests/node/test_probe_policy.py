"""Policy probed as an unlucky operator meets it, on a real node: the first packet
of a new identity, and an address reused by a pod policy denies while the tracker
still holds the allowed pod's flow."""

from __future__ import annotations

import contextlib
import itertools
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from ciliate.control.lab import lab
from ciliate.loader import enter_netns

from .conftest import NodeLab, restart_agent
from .test_policy import apply, delete, deny_ingress, pod_object, settle

UDP_PORT = 7000
SOURCE_PORT = 5555
_NEW_IDENTITIES = 5
# Prints every datagram it gets, one line each, so the test sees what came.
_UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, _ = s.recvfrom(256)
    print(data.decode(), flush=True)
"""


@contextlib.contextmanager
def udp_sink(pod: lab.PodState) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [
            *("ip", "netns", "exec", pod.netns),
            *(sys.executable, "-c", _UDP_SINK, str(pod.ip), str(UDP_PORT)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def send_udp(pod: lab.PodState, address: str, payload: str) -> None:
    """From the same source port every time: the same tuple, the same tracker entry."""
    with enter_netns(f"/run/netns/{pod.netns}"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(pod.ip), SOURCE_PORT))
        sock.sendto(payload.encode(), (address, UDP_PORT))


def received(proc: subprocess.Popen[str], expected: str, *, wait: float = 1.0) -> bool:
    """Whether ``expected`` arrives at the sink (other lines are skipped)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                return False
            if proc.stdout.readline().strip() == expected:
                return True
    return False


def allow_udp_from(name: str, *, selector: dict[str, str], peer: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": peer}}],
                    "ports": [{"protocol": "UDP", "port": UDP_PORT}],
                }
            ],
        },
    }


def test_the_first_datagram_of_a_new_identity_to_a_pod_allowing_it_passes(
    node_lab: NodeLab,
) -> None:
    """c admits app=new-N on UDP 7000; each new-N pod is the first of its labels
    here, so c's policy held no entry for its identity: the ADD must give c that
    entry before the pod can send, not the policy loop's next pass (seen: the
    first datagram dropped as "policy denied", the second passed; for TCP the SYN
    is retried a second later). Several pods, each sending right after its ADD."""
    c = node_lab.pod()
    senders = [node_lab.pod() for _ in range(_NEW_IDENTITIES)]
    labels = [f"new-{i}" for i in range(_NEW_IDENTITIES)]
    allow = allow_udp_from("c-from-new", selector={"app": "c"}, peer={})
    allow["spec"]["ingress"][0]["from"][0]["podSelector"] = {
        "matchExpressions": [{"key": "app", "operator": "In", "values": labels}]
    }
    apply(
        node_lab,
        pod_object(c, app="c"),
        *(pod_object(pod, app=label) for pod, label in zip(senders, labels, strict=True)),
        allow,
    )
    try:
        node_lab.add(c)
        settle(node_lab)  # c's policy: no identity of app=new-N exists yet
        assert c.ip
        with udp_sink(c) as sink:
            for pod, label in zip(senders, labels, strict=True):
                node_lab.add(pod)
                send_udp(pod, c.ip, label)
                assert received(sink, label), label
    finally:
        for pod in (c, *senders):
            node_lab.cni(pod, "DEL")
        delete(node_lab, *(pod_object(pod) for pod in (c, *senders)), allow)


def test_an_address_reused_by_a_denied_pod_gets_nothing_of_the_allowed_pods_flow(
    tiny_lab: NodeLab,
) -> None:
    """Pod a (allowed to c) sends to c, is deleted, and pod b (denied) gets a's address
    (the /29 has no other left) and sends the very same tuple: the tracker's entry of
    a's flow must not carry b's datagram past c's policy."""
    node_lab = tiny_lab
    c, a = node_lab.pod("c"), node_lab.pod("a")
    fillers = [node_lab.pod(f"f{i}") for i in range(3)]
    b = node_lab.pod("b")
    apply(
        node_lab,
        pod_object(c, app="c"),
        pod_object(a, app="a"),
        pod_object(b, app="b"),
        *(pod_object(f, app="filler") for f in fillers),
        allow_udp_from("c-from-a", selector={"app": "c"}, peer={"app": "a"}),
    )
    for pod in (c, a, *fillers):
        node_lab.add(pod)
    settle(node_lab)
    assert c.ip and a.ip
    with udp_sink(c) as sink:
        send_udp(a, c.ip, "from-a")
        assert received(sink, "from-a")  # allowed: the tracker now holds a -> c
        reused = a.ip
        node_lab.cni(a, "DEL")
        node_lab.add(b)
        assert b.ip == reused  # the only address left
        send_udp(b, c.ip, "from-b")
        assert not received(sink, "from-b")
        settle(node_lab)  # and after the loop's pass
        send_udp(b, c.ip, "from-b-later")
        assert not received(sink, "from-b-later")
    for pod in (c, b, *fillers):
        node_lab.cni(pod, "DEL")


def _pinger(src: lab.PodState, dst: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *("ip", "netns", "exec", src.netns, "ping", "-q", "-i", "0.01"),
            *("-c", str(count), "-W", "1", dst),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_policy_holds_across_an_agent_killed_and_restarted(fresh_lab: NodeLab) -> None:
    """SIGKILL of the agent with a policy in force, then a start on the pinned maps:
    400 pings to the isolated pod across it, none answered; 400 to the open one,
    all answered (no window where a denied packet passes or an allowed one drops)."""
    node_lab = fresh_lab
    a, b, c = node_lab.pod("a"), node_lab.pod("b"), node_lab.pod("c")
    apply(
        node_lab,
        pod_object(a, app="a"),
        pod_object(b, app="b"),
        pod_object(c, app="c"),
        deny_ingress("deny-b", app="b"),
    )
    for pod in (a, b, c):
        node_lab.add(pod)
    settle(node_lab)
    assert b.ip and c.ip
    denied, allowed = _pinger(a, b.ip, 400), _pinger(a, c.ip, 400)
    time.sleep(0.5)
    restart_agent(node_lab, kill=True)
    denied_out, _ = denied.communicate(timeout=30)
    allowed_out, _ = allowed.communicate(timeout=30)
    assert " 0 received" in denied_out, denied_out
    assert " 400 received" in allowed_out, allowed_out
    settle(node_lab)  # the first pass after the start changes nothing either
    assert not node_lab.ping(a, b.ip) and node_lab.ping(a, c.ip)


# Prints "<port> <payload>" for every datagram on any of its ports; bound to the
# wildcard address so it can start before the pod has one (before its ADD).
_UDP_PORTS_SINK = """
import select, socket, sys
socks = []
for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, _ = s.recvfrom(256)
        print(s.getsockname()[1], data.decode(), flush=True)
"""


@contextlib.contextmanager
def udp_ports_sink(pod: lab.PodState, *ports: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [
            *("ip", "netns", "exec", pod.netns, sys.executable, "-c", _UDP_PORTS_SINK),
            *(str(p) for p in ports),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def send_udp_to(pod: lab.PodState, address: str, port: int, payload: str) -> None:
    with enter_netns(f"/run/netns/{pod.netns}"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.sendto(payload.encode(), (address, port))


def web_pod(pod: lab.PodState, *, http: int) -> dict[str, Any]:
    obj = pod_object(pod, app="named-web")
    obj["spec"]["containers"][0]["ports"] = [
        {"name": "http", "containerPort": http, "protocol": "UDP"}
    ]
    return obj


def test_a_new_pod_of_a_known_identity_gets_its_own_named_ports_from_the_start(
    node_lab: NodeLab,
) -> None:
    """Policy admits the client on the named port "http" of app=named-web pods.
    web0 names 8080 "http"; each later pod of the same labels names another port
    "http". Right after its ADD, the new pod must admit the client on its own
    "http" port and not on web0's (the ADD gave it web0's entries, port 8080, until
    the loop's next pass: a window where a denied datagram passes)."""
    client, web0 = node_lab.pod(), node_lab.pod()
    later = [node_lab.pod() for _ in range(_NEW_IDENTITIES)]
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "named-http", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "named-web"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "named-client"}}}],
                    "ports": [{"protocol": "UDP", "port": "http"}],
                }
            ],
        },
    }
    apply(
        node_lab,
        pod_object(client, app="named-client"),
        web_pod(web0, http=8080),
        *(web_pod(pod, http=9000 + i) for i, pod in enumerate(later)),
        policy,
    )
    try:
        node_lab.add(client)
        node_lab.add(web0)
        settle(node_lab)
        for i, pod in enumerate(later):
            with udp_ports_sink(pod, 8080, 9000 + i) as sink:
                node_lab.add(pod)
                assert pod.ip
                send_udp_to(client, pod.ip, 8080, f"web0-port-{i}")
                send_udp_to(client, pod.ip, 9000 + i, f"own-port-{i}")
                assert received(sink, f"{9000 + i} own-port-{i}")
                # The 8080 datagram was sent first: had it passed, it came first.
                assert not received(sink, f"8080 web0-port-{i}", wait=0.3)
    finally:
        for pod in (client, web0, *later):
            node_lab.cni(pod, "DEL")
        delete(node_lab, *(pod_object(pod) for pod in (client, web0, *later)), policy)


def _namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def test_a_namespace_relabelled_while_its_pods_come_and_go_ends_with_every_pod_right(
    node_lab: NodeLab,
) -> None:
    """The server admits pods of namespaces labelled team=blue. Namespace ``probe``
    flips red -> blue -> red while its pods are added and deleted: once the loop has
    caught up, every pod of the namespace is where its labels say (admitted while
    blue, refused while red), whichever the order of ADDs and relabels was."""
    server = node_lab.pod()
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "from-blue", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "ns-server"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}],
        },
    }
    apply(node_lab, _namespace("probe", team="red"), pod_object(server, app="ns-server"), policy)
    node_lab.add(server)
    assert server.ip
    pods: list[lab.PodState] = []
    names = (f"n{i}" for i in itertools.count())

    def add_some(count: int) -> None:
        for _ in range(count):
            pod = lab.add_pod_netns(node_lab.state, node_lab.node, next(names), namespace="probe")
            obj = pod_object(pod, app="member")
            obj["metadata"]["namespace"] = "probe"
            with node_lab.api as client:
                client.post("/v1/objects/apply", {"objects": [obj]})
            node_lab.add(pod)
            pods.append(pod)

    def relabel(team: str) -> threading.Thread:
        def run() -> None:
            for _ in range(5):  # while the ADDs go on
                with node_lab.api as client:
                    client.post("/v1/objects/apply", {"objects": [_namespace("probe", team=team)]})
                time.sleep(0.05)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    try:
        add_some(4)
        flip = relabel("blue")
        add_some(6)
        flip.join()
        settle(node_lab)
        reached = {p.name: node_lab.ping(p, server.ip) for p in pods}
        assert all(reached.values()), reached
        flip = relabel("red")
        for pod in pods[:3]:
            node_lab.cni(pod, "DEL")
        del pods[:3]
        add_some(3)
        flip.join()
        settle(node_lab)
        reached = {p.name: node_lab.ping(p, server.ip) for p in pods}
        assert not any(reached.values()), reached
    finally:
        for pod in (server, *pods):
            node_lab.cni(pod, "DEL")
        delete(node_lab, pod_object(server), policy, _namespace("probe"))


def test_a_policy_applied_deleted_and_applied_again_at_once_ends_as_the_last_call_says(
    node_lab: NodeLab,
) -> None:
    """apply, delete, apply of one policy with no pause (the loop sees any subset of
    the three): isolated at the end; one more delete: open again. Five rounds."""
    a, b = node_lab.pod(), node_lab.pod()
    apply(node_lab, pod_object(a, app="flip-a"), pod_object(b, app="flip-b"))
    node_lab.add(a)
    node_lab.add(b)
    assert b.ip
    policy = deny_ingress("flip", app="flip-b")
    try:
        for _ in range(5):
            with node_lab.api as client:
                for path in ("apply", "delete", "apply"):
                    body: dict[str, Any] = {"objects": [policy]}
                    if path == "delete":
                        body["ignore_missing"] = True
                    client.post(f"/v1/objects/{path}", body)
            settle(node_lab)
            assert not node_lab.ping(a, b.ip)
            delete(node_lab, policy)
            assert node_lab.ping(a, b.ip)
    finally:
        for pod in (a, b):
            node_lab.cni(pod, "DEL")
        delete(node_lab, pod_object(a), pod_object(b), policy)
