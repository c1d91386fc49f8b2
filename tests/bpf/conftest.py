"""BPF test fixtures: one testbed (netns with veths, datapath loaded and
unpinned) per session; maps and events reset before every test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliate.datapath.testbed import Testbed

BPF_ROOT = Path(__file__).resolve().parents[2] / "bpf"


@pytest.fixture(scope="session")
def testbed_session(bpf_objects: str) -> Iterator[Testbed]:
    with Testbed(prefix="cbt") as tb:
        yield tb


@pytest.fixture
def tb(testbed_session: Testbed) -> Testbed:
    testbed_session.reset()
    return testbed_session


def drop_site(file: str, reason: str, occurrence: int = 1) -> int:
    """Line of the n-th `DROP(CILIATE_DROP_<reason>)` in a BPF source file
    (when the file has more than one, the test must say which)."""
    path = next(p for p in BPF_ROOT.rglob("*") if p.name in (file, file + ".j2"))
    lines = [
        number
        for number, text in enumerate(path.read_text().splitlines(), start=1)
        if f"DROP(CILIATE_DROP_{reason})" in text
    ]
    assert len(lines) == 1 or occurrence > 1 or lines, f"{file}: no drop site for {reason}"
    if occurrence == 1:
        assert len(lines) == 1, f"{file}: {reason} has drop sites {lines}: name the occurrence"
    return lines[occurrence - 1]
