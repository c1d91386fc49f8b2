"""Read struct layouts and data-section variables from BTF."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from types import TracebackType
from typing import NamedTuple

from . import _libbpf as C
from ._libbpf import lib
from .errors import LoaderError, check_ptr

__all__ = ["Btf", "StructLayout", "StructMember"]


class StructMember(NamedTuple):
    offset: int  # byte offset of the member (of the containing byte for bitfields)
    size: int  # byte size (bitfields: bytes spanned by the bits)
    bit_offset: int  # offset in bits from the start of the struct
    bit_size: int  # 0 unless the member is a bitfield


class StructLayout(NamedTuple):
    name: str
    size: int
    members: dict[str, tuple[int, int]]  # name -> (byte offset, byte size)
    detail: dict[str, StructMember]

    def offset(self, member: str) -> int:
        return self.members[member][0]


def _kind(info: int) -> int:
    return (info >> 24) & 0x1F


def _vlen(info: int) -> int:
    return info & 0xFFFF


def _kind_flag(info: int) -> bool:
    return bool(info >> 31)


class Btf:
    """A view of a ``struct btf``.

    Obtained from :attr:`BpfObject.btf` (owned by the object, valid while it is open) or from
    :meth:`Btf.parse` (owned by this instance: close it or use it as a context manager).
    """

    def __init__(self, ptr: int, *, owned: bool, alive: Callable[[], object] | None = None) -> None:
        self._ptr: int | None = ptr
        self._owned = owned
        self._alive = alive

    @classmethod
    def parse(cls, path: str | os.PathLike[str]) -> Btf:
        """Parse BTF from an ELF object or a raw BTF file (e.g. ``/sys/kernel/btf/vmlinux``)."""
        raw = os.fsencode(path)
        ptr = check_ptr(lib.btf__parse(raw, None), "btf__parse", os.fsdecode(raw))
        return cls(ptr, owned=True)

    def close(self) -> None:
        if self._ptr is not None and self._owned:
            lib.btf__free(self._ptr)
        self._ptr = None

    def __enter__(self) -> Btf:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def ptr(self) -> int:
        if self._alive is not None:
            self._alive()
        if self._ptr is None:
            raise LoaderError("BTF is closed")
        return self._ptr

    # ------------------------------------------------------------------ raw access

    def _type(self, type_id: int) -> C.btf_type:
        addr = lib.btf__type_by_id(self.ptr, type_id)
        if not addr:
            raise LoaderError(f"BTF type id {type_id} does not exist")
        return C.btf_type.from_address(addr)

    def _name(self, name_off: int) -> str:
        raw: bytes | None = lib.btf__name_by_offset(self.ptr, name_off)
        return raw.decode() if raw else ""

    def _find(self, name: str, kind: int) -> int:
        return int(lib.btf__find_by_name_kind(self.ptr, name.encode(), kind))

    def _resolve_size(self, type_id: int) -> int:
        size = int(lib.btf__resolve_size(self.ptr, type_id))
        if size < 0:
            raise LoaderError(f"cannot resolve the size of BTF type id {type_id}", errno=-size)
        return size

    def _names_of_kind(self, kinds: tuple[int, ...]) -> list[str]:
        names = []
        for type_id in range(1, int(lib.btf__type_cnt(self.ptr))):
            t = self._type(type_id)
            if _kind(t.info) in kinds and t.name_off:
                names.append(self._name(t.name_off))
        return sorted(set(names))

    # ------------------------------------------------------------------ public

    def struct_layout(self, name: str) -> StructLayout:
        """Size and member offsets/sizes of struct (or union, or typedef of one) ``name``.

        Members of anonymous nested structs/unions are flattened into the result with their
        offsets relative to the outer struct. Sizes resolve typedefs, modifiers and arrays.
        """
        type_id = self._find(name, C.BTF_KIND_STRUCT)
        if type_id < 0:
            type_id = self._find(name, C.BTF_KIND_UNION)
        if type_id < 0:
            typedef = self._find(name, C.BTF_KIND_TYPEDEF)
            if typedef > 0:
                type_id = int(lib.btf__resolve_type(self.ptr, typedef))
        if type_id <= 0 or _kind(self._type(type_id).info) not in (
            C.BTF_KIND_STRUCT,
            C.BTF_KIND_UNION,
        ):
            known = ", ".join(self._names_of_kind((C.BTF_KIND_STRUCT, C.BTF_KIND_UNION)))
            raise LoaderError(f"no struct or union {name!r} in BTF; known: {known or '(none)'}")
        detail: dict[str, StructMember] = {}
        self._collect_members(type_id, 0, detail)
        return StructLayout(
            name=name,
            size=self._resolve_size(type_id),
            members={k: (m.offset, m.size) for k, m in detail.items()},
            detail=detail,
        )

    def _collect_members(self, type_id: int, base_bits: int, out: dict[str, StructMember]) -> None:
        t = self._type(type_id)
        addr = lib.btf__type_by_id(self.ptr, type_id) + ctypes.sizeof(C.btf_type)
        members = (C.btf_member * _vlen(t.info)).from_address(addr)
        for m in members:
            if _kind_flag(t.info):
                bit_off, bit_size = m.offset & 0xFFFFFF, m.offset >> 24
            else:
                bit_off, bit_size = m.offset, 0
            bit_off += base_bits
            name = self._name(m.name_off)
            if not name:
                resolved = int(lib.btf__resolve_type(self.ptr, m.type))
                if resolved > 0 and _kind(self._type(resolved).info) in (
                    C.BTF_KIND_STRUCT,
                    C.BTF_KIND_UNION,
                ):
                    self._collect_members(resolved, bit_off, out)
                continue
            if bit_size:
                first, last = bit_off // 8, (bit_off + bit_size - 1) // 8
                out[name] = StructMember(first, last - first + 1, bit_off, bit_size)
            else:
                out[name] = StructMember(bit_off // 8, self._resolve_size(m.type), bit_off, 0)

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """Variables of data section ``section`` (``.rodata``, ``.data``, ``.bss``...):
        name -> (offset, size) within the section."""
        type_id = self._find(section, C.BTF_KIND_DATASEC)
        if type_id < 0:
            known = ", ".join(self._names_of_kind((C.BTF_KIND_DATASEC,)))
            raise LoaderError(f"no data section {section!r} in BTF; known: {known or '(none)'}")
        t = self._type(type_id)
        addr = lib.btf__type_by_id(self.ptr, type_id) + ctypes.sizeof(C.btf_type)
        result: dict[str, tuple[int, int]] = {}
        for info in (C.btf_var_secinfo * _vlen(t.info)).from_address(addr):
            var = self._type(info.type)
            if _kind(var.info) != C.BTF_KIND_VAR:
                continue
            result[self._name(var.name_off)] = (int(info.offset), int(info.size))
        return result

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else ("owned" if self._owned else "borrowed")
        return f"<Btf {state}>"
