"""The datapath ABI in Python, read from ``bpf/include/ciliate/abi.h``.

The header is the single declaration of every map key and value, event
record and numbered table; cffi parses it here, so Python packs and unpacks
exactly the layout clang compiled (a test holds it against the objects'
BTF). Enumerator comments become the human-readable texts.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path
from typing import Any

import cffi

from ciliate.datapath import objects

# Kernel fixed-width types as the BPF side spells them.
_PRELUDE = """
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;
"""
_DEFINE = re.compile(r"^#define\s+\w+\s+\d+\s*(/\*.*\*/)?\s*$")
_ENUMERATOR = re.compile(r"^\s*(CILIATE_\w+)\s*=\s*(\d+)\s*,?\s*(?:/\*\s*(.*?)\s*\*/)?", re.M)


def header_path() -> Path:
    """abi.h from the checkout when running from one, else the installed copy."""
    root = objects.source_root()
    if root is not None:
        return root / "bpf" / "include" / "ciliate" / "abi.h"
    installed = importlib.resources.files("ciliate.datapath") / "include" / "ciliate" / "abi.h"
    return Path(str(installed))


def _cdef_source(text: str) -> str:
    # cffi takes integer #defines but no other preprocessor lines.
    lines = [
        line
        for line in text.splitlines()
        if not line.lstrip().startswith("#") or _DEFINE.match(line.strip())
    ]
    return _PRELUDE + "\n".join(lines)


@functools.cache
def _load() -> tuple[cffi.FFI, dict[str, str]]:
    text = header_path().read_text()
    ffi = cffi.FFI()
    ffi.cdef(_cdef_source(text))
    descriptions = {m.group(1): m.group(3) or "" for m in _ENUMERATOR.finditer(text)}
    return ffi, descriptions


def ffi() -> cffi.FFI:
    return _load()[0]


def description(enumerator: str) -> str:
    """The comment beside an enumerator in abi.h ('' if none)."""
    return _load()[1].get(enumerator, "")


def enum_members(enum: str) -> dict[str, int]:
    """Enumerator name -> value of ``enum <name>``, in value order."""
    ctype = ffi().typeof(f"enum {enum}")
    return dict(sorted(ctype.relements.items(), key=lambda kv: kv[1]))


def constant(name: str) -> int:
    value = getattr(_lib(), name)
    assert isinstance(value, int)
    return value


@functools.cache
def _lib() -> Any:
    return ffi().dlopen(None)


def sizeof(struct: str) -> int:
    return int(ffi().sizeof(f"struct {struct}"))


def offsetof(struct: str, field: str) -> int:
    return int(ffi().offsetof(f"struct {struct}", field))


def field_names(struct: str) -> list[str]:
    return [name for name, _ in ffi().typeof(f"struct {struct}").fields]


def pack(struct: str, **fields: Any) -> bytes:
    """Bytes of ``struct <name>`` with the given fields (others zero)."""
    f = ffi()
    value = f.new(f"struct {struct} *")
    for name, field_value in fields.items():
        if isinstance(field_value, bytes | bytearray):
            f.memmove(getattr(value, name), field_value, len(field_value))
        else:
            setattr(value, name, field_value)
    return bytes(f.buffer(value))


def unpack(struct: str, data: bytes) -> dict[str, Any]:
    """Fields of ``struct <name>`` from bytes; arrays come back as bytes."""
    f = ffi()
    size = sizeof(struct)
    if len(data) < size:
        raise ValueError(f"struct {struct} needs {size} bytes, got {len(data)}")
    value = f.from_buffer(f"struct {struct} *", bytearray(data[:size]))
    out: dict[str, Any] = {}
    for name, field in f.typeof(f"struct {struct}").fields:
        item = getattr(value, name)
        out[name] = bytes(f.buffer(item)) if field.type.kind == "array" else item
    return out
