"""The build-time shape of the datapath (``bpf/datapath.toml``) and the
rendering of the BPF C templates with it.

One table, two readers: CMake runs this file at build time (``python
render.py TEMPLATE OUTPUT --config bpf/datapath.toml``) to render every
template in ``bpf/src`` (feature conditionals, the map declarations of
maps.h, sizes), and ``ciliate.datapath.maps`` loads the same table through
:func:`load_shape` to know which maps exist and what they hold. It runs
before ciliate is installed, so it imports nothing from the package:
Jinja2 and the standard library only.

Templates shape structure (features, maps, array lengths); per-node values
are .rodata, written at load time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

# BPF_MAP_TYPE_<name> values a table may use, and BPF_F_<name> flags.
MAP_TYPES = frozenset(
    {
        "HASH",
        "ARRAY",
        "PERCPU_ARRAY",
        "LRU_HASH",
        "LPM_TRIE",
        "SOCKHASH",
        "SK_STORAGE",
        "RINGBUF",
    }
)
MAP_FLAGS = {"NO_PREALLOC": 1, "NO_COMMON_LRU": 2, "RDONLY_PROG": 1 << 7, "WRONLY_PROG": 1 << 8}
SCALAR_TYPES = {"__u32": 4, "__u64": 8, "int": 4}
_C_PRODUCT = re.compile(r"^\s*[A-Z_][A-Z0-9_]*(\s*\*\s*[A-Z_][A-Z0-9_]*)*\s*$")


class ShapeError(ValueError):
    """bpf/datapath.toml is malformed; the message names the entry to fix."""


@dataclass(frozen=True)
class MapSpec:
    """One ``[maps.<name>]`` table."""

    name: str
    type: str  # BPF_MAP_TYPE_<type>
    key: str | None  # struct name in abi.h or a scalar type; None for a ring buffer
    value: str | None
    max_entries: int | str  # a number, or a product of abi.h #defines (C text)
    flags: tuple[str, ...]
    feature: str | None  # built only when this feature is on
    doc: str

    def c_type(self, field: str) -> str:
        """The C spelling of the key or value type."""
        name = self.key if field == "key" else self.value
        assert name is not None
        return name if name in SCALAR_TYPES else f"struct {name}"

    @property
    def flag_bits(self) -> int:
        bits = 0
        for flag in self.flags:
            bits |= MAP_FLAGS[flag]
        return bits


@dataclass(frozen=True)
class Shape:
    features: dict[str, bool]
    node: dict[str, Any]
    sizes: dict[str, int]
    all_maps: tuple[MapSpec, ...]

    @property
    def maps(self) -> tuple[MapSpec, ...]:
        """The maps built with the enabled features."""
        return tuple(m for m in self.all_maps if m.feature is None or self.features[m.feature])

    def enabled(self, feature: str) -> bool:
        try:
            return self.features[feature]
        except KeyError:
            raise ShapeError(
                f"no feature {feature!r} in [features]; have {sorted(self.features)}"
            ) from None


def load_shape(config: Path) -> Shape:
    with config.open("rb") as f:
        doc = tomllib.load(f)
    where = str(config)
    features = doc.get("features", {})
    for name, on in features.items():
        if not isinstance(on, bool):
            raise ShapeError(f"{where}: features.{name} must be true or false, not {on!r}")
    sizes = doc.get("sizes", {})
    for name, size in sizes.items():
        if not isinstance(size, int) or size <= 0:
            raise ShapeError(f"{where}: sizes.{name} must be a positive integer, not {size!r}")
    maps = tuple(
        _map_spec(f"{where}: maps.{name}", name, table, features=features, sizes=sizes)
        for name, table in doc.get("maps", {}).items()
    )
    return Shape(features=features, node=doc.get("node", {}), sizes=sizes, all_maps=maps)


def _map_spec(
    where: str,
    name: str,
    table: dict[str, Any],
    *,
    features: dict[str, bool],
    sizes: dict[str, int],
) -> MapSpec:
    known = {"type", "key", "value", "max_entries", "flags", "feature", "doc"}
    if unknown := set(table) - known:
        raise ShapeError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    if not re.fullmatch(r"ciliate_[a-z0-9_]+", name):
        raise ShapeError(f"{where}: map names are ciliate_<thing> (lower case, digits, _)")
    map_type = table.get("type")
    if map_type not in MAP_TYPES:
        raise ShapeError(f"{where}: type {map_type!r} is not one of {sorted(MAP_TYPES)}")
    key, value = table.get("key"), table.get("value")
    if map_type == "RINGBUF":
        if key is not None or value is not None:
            raise ShapeError(f"{where}: a ring buffer has no key or value")
    elif not isinstance(key, str) or not isinstance(value, str):
        raise ShapeError(f"{where}: key and value (abi.h struct names or __u32/__u64) are needed")
    max_entries = table.get("max_entries")
    if isinstance(max_entries, str) and max_entries in sizes:
        max_entries = sizes[max_entries]
    elif isinstance(max_entries, str):
        if not _C_PRODUCT.match(max_entries):
            raise ShapeError(
                f"{where}: max_entries {max_entries!r} is neither a [sizes] name nor a "
                "product of abi.h #defines"
            )
    elif not isinstance(max_entries, int) or max_entries < 0:
        raise ShapeError(f"{where}: max_entries must be a number, a [sizes] name or a product")
    flags = tuple(table.get("flags", ()))
    if bad := [f for f in flags if f not in MAP_FLAGS]:
        raise ShapeError(f"{where}: unknown flag(s) {bad}; known: {sorted(MAP_FLAGS)}")
    feature = table.get("feature")
    if feature is not None and feature not in features:
        raise ShapeError(f"{where}: feature {feature!r} is not in [features]")
    return MapSpec(
        name=name,
        type=map_type,
        key=key,
        value=value,
        max_entries=max_entries,
        flags=flags,
        feature=feature,
        doc=str(table.get("doc", "")),
    )


def render(template: Path, config: Path) -> str:
    shape = load_shape(config)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template.parent),
        undefined=jinja2.StrictUndefined,  # a misspelt parameter is a build error
        keep_trailing_newline=True,
        # No trim_blocks: a line holding only a block tag renders as an empty
        # line, so compiler and verifier line numbers match the template.
    )
    return env.get_template(template.name).render(
        features=shape.features, node=shape.node, sizes=shape.sizes, maps=shape.maps
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        text = render(args.template, args.config)
    except (jinja2.TemplateError, ShapeError) as exc:
        print(f"{args.template}: {exc}", file=sys.stderr)
        return 1
    # Write only on change, so an unchanged render does not recompile.
    if args.output.exists() and args.output.read_text() == text:
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(args.output.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
