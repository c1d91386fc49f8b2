"""Network policy in the datapath: what the control plane writes, per
endpoint, into ciliate_policy and ciliate_policy_state (see
bpf/include/ciliate/policy.h for how the programs read them).

An endpoint's policy is a set of :class:`PolicyEntry` per direction and
whether each direction is enforced. :meth:`Policy.replace` turns the
entries into LPM trie keys (a port range becomes aligned port blocks, "any
port" and "any protocol" shorter prefixes), resolves deny over allow where
the trie alone cannot (an allow inside a shorter deny is dropped; a deny
of any peer is copied into the entries of every identity, so the BPF side
stops at the first identity that has an entry), and switches the endpoint
to the new entries at once: they are written under the generation not in
use, the endpoint's state flips to it in one write, then the old
generation is deleted. A packet sees the old policy or the new one, never
a mix.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Concatenate, Literal, ParamSpec, TypeVar, cast

from ciliate.datapath import abi
from ciliate.datapath.maps import RawMap
from ciliate.datapath.tables import Direction

PREFIX_FIXED = abi.constant("CILIATE_POLICY_PREFIX_FIXED")
PREFIX_PROTO = abi.constant("CILIATE_POLICY_PREFIX_PROTO")
PREFIX_FULL = abi.constant("CILIATE_POLICY_PREFIX_FULL")
_DIR_GENERATION = abi.constant("CILIATE_POLICY_DIR_GENERATION")
_F_DENY = abi.constant("CILIATE_POLICY_F_DENY")
_INGRESS = abi.constant("CILIATE_POLICY_INGRESS")
_EGRESS = abi.constant("CILIATE_POLICY_EGRESS")
_GENERATION = abi.constant("CILIATE_POLICY_GENERATION")
IDENTITY_ANY = 0
_DIR_OFFSET = abi.offsetof("ciliate_policy_key", "direction")
_MAX_REVISION = 2**32 - 1
# The part of a key that may be wildcarded (protocol, port): 24 bits.
_L4_BITS = PREFIX_FULL - PREFIX_FIXED


class PolicyError(ValueError):
    """A policy the datapath cannot hold; the message says what to fix."""


@dataclass(frozen=True)
class PolicyEntry:
    """One rule of an endpoint's policy in one direction."""

    direction: Literal["ingress", "egress"]
    identity: int  # peer identity; 0 = any peer
    protocol: int  # 0 = any; 6 TCP, 17 UDP (132 SCTP)
    port: int = 0  # 0 = any port
    port_end: int = 0  # inclusive end of a range; 0 = just `port`
    deny: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("ingress", "egress"):
            raise PolicyError(f"direction {self.direction!r} must be 'ingress' or 'egress'")
        if not 0 <= self.identity < 2**32:
            raise PolicyError(f"identity {self.identity} is outside 0..2^32-1")
        if not 0 <= self.protocol < 256:
            raise PolicyError(f"protocol {self.protocol} is outside 0..255")
        if not 0 <= self.port < 65536 or not 0 <= self.port_end < 65536:
            raise PolicyError(f"port {self.port}..{self.port_end} is outside 0..65535")
        if self.protocol == 0 and (self.port or self.port_end):
            raise PolicyError(f"port {self.port} needs a protocol (6 TCP, 17 UDP, 132 SCTP)")
        if self.port_end and not self.port:
            raise PolicyError(f"port_end {self.port_end} needs a first port")
        if self.port_end and self.port_end < self.port:
            raise PolicyError(f"port range {self.port}-{self.port_end} ends before it starts")

    def blocks(self) -> Iterator[tuple[int, int]]:
        """(value, prefix length) over the 24 bits of protocol and port: one
        block for any protocol or any port, aligned blocks for a range."""
        if self.protocol == 0:
            yield 0, 0
            return
        if self.port == 0:
            yield self.protocol << 16, 8
            return
        first, last = self.port, self.port_end or self.port
        while first <= last:
            size = first & -first if first else 1 << 16
            while first + size - 1 > last:
                size >>= 1
            yield self.protocol << 16 | first, 8 + 16 - (size.bit_length() - 1)
            first += size


@dataclass(frozen=True)
class PolicyState:
    """An endpoint's entry in ciliate_policy_state."""

    ingress_enforced: bool
    egress_enforced: bool
    revision: int  # 0: never had a policy
    generation: int  # which generation of entries is live


def resolve(entries: Iterable[PolicyEntry]) -> dict[tuple[str, int, int, int], bool]:
    """The trie entries for a set of rules: (direction, identity, l4 value,
    l4 prefix length) -> deny, with deny winning over allow wherever the
    longest-prefix match and the "first identity with an entry" lookup of
    policy.h would otherwise let an allow through."""
    spaces: dict[tuple[str, int], dict[tuple[int, int], bool]] = {}
    for entry in entries:
        space = spaces.setdefault((entry.direction, entry.identity), {})
        for block in entry.blocks():
            space[block] = space.get(block, False) or entry.deny
    # A deny of any peer applies to every identity that has its own entries.
    for (direction, identity), space in spaces.items():
        if identity == IDENTITY_ANY:
            continue
        for block, deny in spaces.get((direction, IDENTITY_ANY), {}).items():
            if deny:
                space[block] = True
    out: dict[tuple[str, int, int, int], bool] = {}
    for (direction, identity), space in spaces.items():
        denies = {block for block, deny in space.items() if deny}
        for (value, length), deny in space.items():
            # An allow under a shorter (or equal) deny would win the
            # longest-prefix match: leave it out, the deny decides.
            if not deny and any(
                (value >> (_L4_BITS - n) << (_L4_BITS - n), n) in denies for n in range(length)
            ):
                continue
            out[(direction, identity, value, length)] = deny
    return out


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    method: Callable[Concatenate[Policy, _P], _R],
) -> Callable[Concatenate[Policy, _P], _R]:
    """One writer or reader of the key bookkeeping at a time (the agent's
    policy loop writes while its API reads)."""

    @functools.wraps(method)
    def wrapper(self: Policy, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Policy:
    """ciliate_policy and ciliate_policy_state: the policy of each endpoint.
    Safe to share between threads."""

    def __init__(self, entries: RawMap, states: RawMap) -> None:
        self._entries = entries
        self._states = states
        self._lock = threading.RLock()
        # Keys written per endpoint (both generations), read from the map on
        # first use: replace() deletes the old generation without a scan.
        self._written: dict[int, set[bytes]] | None = None

    # -- keys ------------------------------------------------------------------
    @staticmethod
    def _key(
        endpoint_id: int,
        *,
        direction: str,
        generation: int,
        identity: int,
        l4_value: int,
        l4_length: int,
    ) -> bytes:
        dir_byte = Direction[direction.upper()] | (_DIR_GENERATION if generation else 0)
        return abi.pack(
            "ciliate_policy_key",
            prefixlen=PREFIX_FIXED + l4_length,
            identity=int.from_bytes(identity.to_bytes(4, "big"), "little"),
            endpoint_id=int.from_bytes(endpoint_id.to_bytes(2, "big"), "little"),
            direction=dir_byte,
            protocol=l4_value >> 16,
            dport=int.from_bytes((l4_value & 0xFFFF).to_bytes(2, "big"), "little"),
        )

    @staticmethod
    def _decode(key: bytes) -> tuple[int, int, str, int, int, int]:
        """(endpoint id, generation, direction, identity, l4 value, l4 length)."""
        f = abi.unpack("ciliate_policy_key", key)
        port = int.from_bytes(f["dport"].to_bytes(2, "little"), "big")
        return (
            int.from_bytes(f["endpoint_id"].to_bytes(2, "little"), "big"),
            1 if f["direction"] & _DIR_GENERATION else 0,
            Direction(f["direction"] & ~_DIR_GENERATION).name.lower(),
            int.from_bytes(f["identity"].to_bytes(4, "little"), "big"),
            f["protocol"] << 16 | port,
            f["prefixlen"] - PREFIX_FIXED,
        )

    def _check_endpoint(self, endpoint_id: int) -> bytes:
        # The keys hold the id in 16 bits, as struct ciliate_endpoint does.
        limit = min(self._states.max_entries, 1 << 16)
        if not 0 <= endpoint_id < limit:
            raise PolicyError(
                f"endpoint id {endpoint_id} is outside 0..{limit - 1} "
                "(bpf/datapath.toml sizes.endpoint_slots)"
            )
        return endpoint_id.to_bytes(4, "little")

    def _written_keys(self, endpoint_id: int) -> set[bytes]:
        if self._written is None:
            self._written = {}
            keys = self._entries.keys()  # (LPM tries have no batch lookup)
            for key in keys:
                self._written.setdefault(self._decode(key)[0], set()).add(key)
        return self._written.setdefault(endpoint_id, set())

    # -- state -----------------------------------------------------------------
    def state(self, endpoint_id: int) -> PolicyState:
        raw = self._states.lookup(self._check_endpoint(endpoint_id))
        f = abi.unpack("ciliate_policy_state", raw if isinstance(raw, bytes) else bytes(8))
        return PolicyState(
            ingress_enforced=bool(f["flags"] & _INGRESS),
            egress_enforced=bool(f["flags"] & _EGRESS),
            revision=f["revision"],
            generation=1 if f["flags"] & _GENERATION else 0,
        )

    def _write_state(
        self, endpoint_id: int, *, ingress: bool, egress: bool, generation: int
    ) -> int:
        revision = self.state(endpoint_id).revision % _MAX_REVISION + 1  # never 0 again
        flags = (
            (_INGRESS if ingress else 0)
            | (_EGRESS if egress else 0)
            | (_GENERATION if generation else 0)
        )
        self._states.update(
            self._check_endpoint(endpoint_id),
            abi.pack("ciliate_policy_state", flags=flags, revision=revision),
        )
        return revision

    # -- the interface of the control plane -------------------------------------
    @_locked
    def replace(
        self,
        endpoint_id: int,
        entries: Iterable[PolicyEntry],
        *,
        ingress_enforced: bool,
        egress_enforced: bool,
    ) -> int:
        """Make ``entries`` the endpoint's policy; returns its new revision.
        Connections of the endpoint are judged again on their next packet."""
        self._check_endpoint(endpoint_id)
        resolved = resolve(entries)
        written = self._written_keys(endpoint_id)
        live = self.state(endpoint_id).generation
        target = 1 - live
        # Left-overs of the generation about to be written (an earlier
        # replace that failed half-way) would mix into the new policy.
        self._delete(written, generation=target)
        keys = [
            self._key(
                endpoint_id,
                direction=direction,
                generation=target,
                identity=identity,
                l4_value=value,
                l4_length=length,
            )
            for direction, identity, value, length in resolved
        ]
        values = [
            abi.pack("ciliate_policy_value", flags=_F_DENY if deny else 0)
            for deny in resolved.values()
        ]
        try:
            self._entries.update_batch(keys, values)
        except Exception:
            for key in keys:  # the live generation was never touched
                self._entries.delete(key)
            raise
        written.update(keys)
        revision = self._write_state(
            endpoint_id, ingress=ingress_enforced, egress=egress_enforced, generation=target
        )
        self._delete(written, generation=live)
        return revision

    @_locked
    def set_enforcement(
        self, endpoint_id: int, *, ingress_enforced: bool, egress_enforced: bool
    ) -> int:
        """Switch enforcement without touching the entries; returns the new
        revision (connections are judged again)."""
        return self._write_state(
            endpoint_id,
            ingress=ingress_enforced,
            egress=egress_enforced,
            generation=self.state(endpoint_id).generation,
        )

    @_locked
    def clear(self, endpoint_id: int) -> None:
        """No policy: both directions unenforced, no entries (an endpoint
        that goes away, or whose slot is reused, starts from here)."""
        self.set_enforcement(endpoint_id, ingress_enforced=False, egress_enforced=False)
        written = self._written_keys(endpoint_id)
        self._delete(written, generation=0)
        self._delete(written, generation=1)

    @_locked
    def entries(self, endpoint_id: int) -> list[PolicyEntry]:
        """The entries in force (after deny resolution), port blocks joined
        back into ranges."""
        live = self.state(endpoint_id).generation
        rows: list[_Row] = []
        for key in self._written_keys(endpoint_id):
            raw = self._entries.lookup(key)
            if raw is None:
                continue
            _, generation, direction, identity, value, length = self._decode(key)
            if generation != live:
                continue
            deny = bool(abi.unpack("ciliate_policy_value", _plain(raw))["flags"] & _F_DENY)
            first = value & 0xFFFF
            last = first + (1 << (_L4_BITS - length)) - 1 if length > 8 else 0
            rows.append((direction, identity, value >> 16, first, deny, last))
        return _join(rows)

    def _delete(self, written: set[bytes], *, generation: int) -> None:
        bit = _DIR_GENERATION if generation else 0
        for key in [k for k in written if k[_DIR_OFFSET] & _DIR_GENERATION == bit]:
            self._entries.delete(key)
            written.discard(key)

    @_locked
    def clear_all(self) -> None:
        """Every endpoint back to no policy (tests, a reset datapath)."""
        self._entries.clear()
        # The state array has a slot per endpoint: zero only the used ones,
        # found by one batch scan.
        size = abi.sizeof("ciliate_policy_state")
        empty = bytes(size)
        for keys, values, count in self._states.lookup_batch_raw():
            for i in range(count):
                if values[i * size : (i + 1) * size] != empty:
                    self._states.update(keys[i * 4 : i * 4 + 4], empty)
        self._written = {}


def _plain(value: bytes | list[bytes]) -> bytes:
    if isinstance(value, list):
        raise TypeError("ciliate_policy values are not per-CPU")
    return value


# (direction, identity, protocol, first port, deny, last port) of one trie block.
_Row = tuple[str, int, int, int, bool, int]


def _join(rows: list[_Row]) -> list[PolicyEntry]:
    """PolicyEntry rows from trie blocks, adjacent blocks of one kind joined."""
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[4], r[3]))
    out: list[PolicyEntry] = []
    for direction, identity, protocol, first, deny, last in rows:
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.port
            and first
            and (prev.direction, prev.identity, prev.protocol, prev.deny)
            == (direction, identity, protocol, deny)
            and (prev.port_end or prev.port) + 1 == first
        ):
            out[-1] = PolicyEntry(
                direction=prev.direction,
                identity=identity,
                protocol=protocol,
                port=prev.port,
                port_end=last,
                deny=deny,
            )
            continue
        out.append(
            PolicyEntry(
                direction=cast(Literal["ingress", "egress"], direction),
                identity=identity,
                protocol=protocol,
                port=first,
                port_end=last if last != first else 0,
                deny=deny,
            )
        )
    return out
