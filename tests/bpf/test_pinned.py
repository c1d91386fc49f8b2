"""Datapath.load_pinned: the agent's restart on the maps it pinned, including
the pins of an older agent that had fewer maps (a feature turned on since)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliate.datapath import maps as dpmaps
from ciliate.datapath.programs import Datapath, NodeConfig
from ciliate.datapath.testbed import NODE_IP, POD_CIDR, ROUTER_IP
from ciliate.loader import MapError

BPFFS = Path("/sys/fs/bpf")
CONFIG = NodeConfig(router_ip=ROUTER_IP, node_ip=NODE_IP, pod_cidrs=[POD_CIDR])
NEW_IN_POLICY = {dpmaps.POLICY, dpmaps.POLICY_STATE, dpmaps.CONNTRACK}


@pytest.fixture
def maps_dir(bpf_objects: str) -> Iterator[Path]:
    if not os.path.ismount(BPFFS):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)
    path = BPFFS / f"cbt-pins-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_the_first_load_pins_every_map_and_the_next_reuses_them(maps_dir: Path) -> None:
    with Datapath.load_pinned(CONFIG, maps_dir).datapath as first:
        first.ipcache.upsert(dpmaps.IpcacheEntry(POD_CIDR, 0, None, dpmaps.IPCACHE_F_LOCAL))
        first.policy.replace(7, [], ingress_enforced=True, egress_enforced=False)
    assert {p.name for p in maps_dir.iterdir()} == set(dpmaps.ALL)

    loaded = Datapath.load_pinned(CONFIG, maps_dir)
    with loaded.datapath as again:
        assert (loaded.created, set(loaded.reused)) == ([], set(dpmaps.ALL))
        assert [e.prefix for e in again.ipcache.list()] == [POD_CIDR]
        assert again.policy.state(7).ingress_enforced


def test_pins_of_an_agent_without_policy_are_reused_and_the_new_maps_pinned(
    maps_dir: Path,
) -> None:
    with Datapath.load_pinned(CONFIG, maps_dir).datapath as old:
        old.ipcache.upsert(dpmaps.IpcacheEntry(POD_CIDR, 0, None, dpmaps.IPCACHE_F_LOCAL))
    for name in NEW_IN_POLICY:  # what an agent built before the policy feature left
        (maps_dir / name).unlink()

    loaded = Datapath.load_pinned(CONFIG, maps_dir)
    with loaded.datapath as new:
        assert set(loaded.created) == NEW_IN_POLICY
        assert set(loaded.reused) == set(dpmaps.ALL) - NEW_IN_POLICY
        assert [e.prefix for e in new.ipcache.list()] == [POD_CIDR]  # forwarding state kept
        assert new.policy.state(1).revision == 0
    assert {p.name for p in maps_dir.iterdir()} == set(dpmaps.ALL)


def test_a_pin_with_another_layout_is_refused_and_nothing_is_pinned(maps_dir: Path) -> None:
    with Datapath.load_pinned(CONFIG, maps_dir).datapath as old:
        # A ciliate_ct of another layout: the config map pinned under its name.
        (maps_dir / dpmaps.CONNTRACK).unlink()
        (maps_dir / dpmaps.POLICY).unlink()
        old.maps[dpmaps.CONFIG].pin(maps_dir / dpmaps.CONNTRACK)
    with pytest.raises(MapError, match=r"ciliate_ct_v2"):
        Datapath.load_pinned(CONFIG, maps_dir)
    assert not (maps_dir / dpmaps.POLICY).exists()
