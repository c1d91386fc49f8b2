"""Pod egress bandwidth, Cilium's bandwidth manager: a rate per endpoint in
``ciliate_throttle`` (bytes per second, by endpoint slot), departure times
given to the pod's packets on the uplink's tc egress (``edt.h``), and the
``fq`` qdisc on the uplink that holds each packet until its time
(:attr:`Mode.PACED`). A kernel built without ``sch_fq`` ignores departure
times: there each limited pod gets a class of an ``htb`` qdisc on the
uplink, and the program puts its packets in it (:attr:`Mode.SHAPED`).
Dropping instead (a token bucket in BPF) was measured and left: TCP got
under half its rate through it (whole windows lost, then time-outs).

Rates are given as Kubernetes gives them (``kubernetes.io/egress-bandwidth``,
the CNI ``bandwidth`` capability's ``egressRate``): bits per second.
:func:`parse_rate` reads the annotation's quantity with kubelet's bounds.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import subprocess
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from ciliate.datapath import abi
from ciliate.datapath.maps import RawMap

THROTTLE = "ciliate_throttle"
# The Pod annotation Kubernetes defines for it (kubelet, Cilium).
EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"

# kubelet's bounds for a pod's bandwidth (pkg/util/bandwidth: "resource is
# unreasonably small (< 1kbit)" / "unreasonably large (> 1Pbit)").
MIN_RATE = 1_000
MAX_RATE = 1_000_000_000_000_000

# Kubernetes quantity suffixes (resource.Quantity): binary, decimal SI.
_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "m": Decimal("0.001"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|)$"
)


class Mode(enum.Enum):
    OFF = "off"  # rates recorded, not kept
    PACED = "paced"  # departure times kept by fq (Cilium's EDT)
    SHAPED = "shaped"  # no fq in the kernel: a class of htb per limited pod


# Paced: how far ahead a departure may be before the packet is dropped
# (Cilium's default drop horizon; fq is given the same).
PACED_HORIZON_NS = 2_000_000_000
# Shaped: the uplink's htb qdisc (unclassified traffic goes straight through:
# "default 0"), and each class's burst: 10 ms of its rate, at least 32 KiB.
HTB_HANDLE = 0x10000  # 1:
SHAPED_BURST_NS = 10_000_000
SHAPED_MIN_BURST_BYTES = 32 * 1024
HTB_QUANTUM = 60_000  # bytes a class sends per round; only matters between classes


class RateError(ValueError):
    """A bandwidth that is not a quantity, or out of kubelet's bounds."""


def check_rate(bits_per_second: int, *, what: str) -> int:
    """``bits_per_second`` if kubelet would accept it, else RateError naming ``what``."""
    if bits_per_second < MIN_RATE:
        raise RateError(f"{what} {bits_per_second} bit/s is unreasonably small (< 1kbit)")
    if bits_per_second > MAX_RATE:
        raise RateError(f"{what} {bits_per_second} bit/s is unreasonably large (> 1Pbit)")
    return bits_per_second


def parse_rate(text: str, *, what: str) -> int:
    """A Kubernetes quantity ("10M", "1Gi", "500k") as bits per second."""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        raise RateError(
            f"{what} {text!r} is not a quantity (a number with an optional suffix "
            "k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi or Ei, e.g. '10M')"
        )
    number, suffix = match.groups()
    try:
        value = Decimal(number)
        if suffix[:1] in ("e", "E") and suffix not in _SUFFIXES:
            value *= Decimal(10) ** int(suffix[1:])
        else:
            value *= Decimal(_SUFFIXES[suffix])
    except (InvalidOperation, OverflowError) as exc:
        raise RateError(f"{what} {text!r} is not a quantity: {exc}") from exc
    return check_rate(int(value.to_integral_value(rounding="ROUND_CEILING")), what=what)


class Throttle:
    """``ciliate_throttle``: the egress rate of each endpoint slot."""

    def __init__(
        self, raw: RawMap, *, slot_of: Callable[[ipaddress.IPv4Address], int | None]
    ) -> None:
        self._raw = raw
        self._slot_of = slot_of

    def slot(self, addr: ipaddress.IPv4Address) -> int:
        slot = self._slot_of(addr)
        if slot is None:
            raise ValueError(f"{addr} is not in this node's pod CIDRs")
        return slot

    def _key(self, addr: ipaddress.IPv4Address) -> bytes:
        return self.slot(addr).to_bytes(4, "little")

    def set(
        self, addr: ipaddress.IPv4Address, bits_per_second: int, *, mode: Mode = Mode.PACED
    ) -> None:
        """Limit what the pod at ``addr`` sends out of the node (0 or
        :attr:`Mode.OFF`: no limit); shaped, its packets go to its htb class
        (:func:`classid`, made by :class:`Shaper`). Written for every new
        endpoint: its slot may hold a previous pod's."""
        rate = -(-bits_per_second // 8)  # bytes per second, never rounded to 0
        if mode is Mode.OFF or not rate:
            fields = {"rate": 0, "horizon": 0, "classid": 0}
        elif mode is Mode.PACED:
            fields = {"rate": rate, "horizon": PACED_HORIZON_NS, "classid": 0}
        else:
            fields = {"rate": rate, "horizon": 0, "classid": classid(self.slot(addr))}
        self._raw.update(self._key(addr), abi.pack("ciliate_throttle", t_last=0, **fields))

    def get(self, addr: ipaddress.IPv4Address) -> int:
        """The pod's limit in bits per second (0: none)."""
        raw = self._raw.lookup(self._key(addr))
        if raw is None:
            return 0
        value = raw if isinstance(raw, bytes) else raw[0]
        return int(abi.unpack("ciliate_throttle", value)["rate"]) * 8

    def entry(self, addr: ipaddress.IPv4Address) -> dict[str, int]:
        """The pod's entry as the program reads it."""
        raw = self._raw.lookup(self._key(addr))
        value = bytes(abi.sizeof("ciliate_throttle")) if raw is None else raw
        return dict(abi.unpack("ciliate_throttle", value if isinstance(value, bytes) else value[0]))

    def clear(self, addr: ipaddress.IPv4Address) -> None:
        self.set(addr, 0)


class QdiscError(RuntimeError):
    """The uplink's fq qdisc could not be set up."""


def classid(slot: int) -> int:
    """The htb class (1:<slot>) of an endpoint slot. Slot 0 is the first pod
    CIDR's network address, never a pod's, so minor 0 (the qdisc) is free."""
    if not 0 < slot <= 0xFFFF:
        raise ValueError(f"endpoint slot {slot} has no htb class (1..65535)")
    return HTB_HANDLE | slot


def _tc(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise QdiscError("the bandwidth manager needs iproute2's tc") from exc


def _checked(*args: str) -> str:
    proc = _tc(*args)
    if proc.returncode != 0:
        raise QdiscError(f"tc {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def install(device: str) -> Mode:
    """Make ``fq`` the root qdisc of ``device`` (the node's uplink), as
    Cilium's bandwidth manager does: it keeps the departure times edt.h
    gives, and drops what is beyond the same horizon (:attr:`Mode.PACED`).
    A kernel without fq: an ``htb`` root whose unclassified traffic goes
    straight through, classes added per limited pod (:attr:`Mode.SHAPED`;
    an htb root left by an earlier agent is kept with its classes).
    Idempotent; QdiscError when tc fails otherwise."""
    horizon = f"{PACED_HORIZON_NS // 1_000_000}ms"
    proc = _tc("qdisc", "replace", "dev", device, "root", "fq", "horizon", horizon, "horizon_drop")
    if proc.returncode == 0:
        return Mode.PACED
    if "qdisc kind is unknown" not in proc.stderr:
        raise QdiscError(f"tc qdisc replace dev {device} root fq: {proc.stderr.strip()}")
    root = _checked("qdisc", "show", "dev", device, "root")
    if not root.startswith("qdisc htb 1: "):
        _checked("qdisc", "replace", "dev", device, "root", "handle", "1:", "htb", "default", "0")
    return Mode.SHAPED


class Shaper:
    """The htb classes of limited pods on the uplink (:attr:`Mode.SHAPED`).
    Which slots have one is read from the kernel once, then kept: an ADD of
    a pod without a limit runs no tc at all."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._known: set[int] | None = None

    def _classes(self) -> set[int]:
        if self._known is None:
            self._known = self.slots()
        return self._known

    def shape(self, slot: int, bits_per_second: int) -> None:
        rate_bytes = -(-bits_per_second // 8)
        burst = max(SHAPED_MIN_BURST_BYTES, rate_bytes * SHAPED_BURST_NS // 1_000_000_000)
        rate = f"{bits_per_second}bit"
        classes = self._classes()
        _checked(
            *("class", "replace", "dev", self.device, "parent", "1:"),
            *("classid", f"1:{classid(slot) & 0xFFFF:x}", "htb", "rate", rate, "ceil", rate),
            *("burst", f"{burst}b", "cburst", f"{burst}b", "quantum", str(HTB_QUANTUM)),
        )
        classes.add(slot)

    def remove(self, slot: int) -> None:
        """Idempotent: a class already gone is fine."""
        classes = self._classes()
        if slot not in classes:
            return
        proc = _tc("class", "del", "dev", self.device, "classid", f"1:{slot:x}")
        if proc.returncode != 0 and slot in self.slots():
            raise QdiscError(f"tc class del dev {self.device} classid 1:{slot:x}: {proc.stderr}")
        classes.discard(slot)

    def slots(self) -> set[int]:
        """Slots that have a class, as the kernel says (and kept from now)."""
        out = _checked("class", "show", "dev", self.device)
        self._known = {
            int(line.split()[2].split(":")[1], 16)
            for line in out.splitlines()
            if line.startswith("class htb 1:")
        }
        return set(self._known)


class Manager:
    """Pods' egress bandwidth on one node: the map entry, and the htb class
    when shaped. ``mode`` OFF: every pod written without a limit."""

    def __init__(self, throttle: Throttle, *, mode: Mode, device: str | None) -> None:
        if mode is Mode.SHAPED and device is None:
            raise ValueError("shaping needs the uplink device")
        self.mode = mode
        self._throttle = throttle
        self._shaper = Shaper(device) if mode is Mode.SHAPED and device else None

    def limit(self, addr: ipaddress.IPv4Address, bits_per_second: int) -> None:
        """Write the pod's limit (0: none): its class first, then the entry
        that sends packets to it (so no packet names a missing class)."""
        slot = self._throttle.slot(addr)
        if self._shaper is not None:
            if bits_per_second:
                self._shaper.shape(slot, bits_per_second)
            else:
                self._shaper.remove(slot)
        self._throttle.set(addr, bits_per_second, mode=self.mode)

    def unlimit(self, addr: ipaddress.IPv4Address) -> None:
        """The entry first (its packets go straight through), then the class."""
        self._throttle.set(addr, 0, mode=self.mode)
        if self._shaper is not None:
            self._shaper.remove(self._throttle.slot(addr))

    def prune(self, keep: set[ipaddress.IPv4Address]) -> int:
        """Remove the classes of slots no limited pod holds (pods deleted
        while no agent ran); returns how many."""
        if self._shaper is None:
            return 0
        wanted = {self._throttle.slot(a) for a in keep}
        stale = self._shaper.slots() - wanted
        for slot in stale:
            self._shaper.remove(slot)
        return len(stale)
