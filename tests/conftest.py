"""Shared test set-up: the BPF objects are rebuilt (incrementally) once per
session when running from a checkout, so tests always run the sources."""

from __future__ import annotations

import os

import pytest

from ciliate.datapath import objects


@pytest.fixture(scope="session")
def bpf_objects() -> str:
    if objects.source_root() is not None and not os.environ.get("CILIATE_BPF_DIR"):
        objects.build()
    return str(objects.object_dir())
