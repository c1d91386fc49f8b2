"""``BpfObject`` (open, set read-only globals, load, close) and ``Program``."""

from __future__ import annotations

import contextlib
import ctypes
import errno as E
import os
import re
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import NamedTuple

from . import _libbpf as C
from ._libbpf import LIBBPF_WARN, lib
from ._print import Message, capture
from .btf import Btf
from .errors import (
    LibbpfError,
    LoaderError,
    MapError,
    ObjectOpenError,
    VerifierError,
    ptr_errno,
    strerror,
)
from .maps import Map
from .testrun import TestRunResult, test_run

__all__ = ["BpfObject", "ProgInfo", "Program", "prog_info"]

_PROG_LOG_RE = re.compile(
    r"^prog '(?P<prog>[^']+)': -- BEGIN PROG LOAD LOG --\n(?P<log>.*?)-- END PROG LOAD LOG --",
    re.DOTALL,
)
_PROG_FAIL_RE = re.compile(r"^prog '(?P<prog>[^']+)': (BPF program load failed|failed to load)")
_INTERNAL_SECTIONS = (".rodata", ".data", ".bss", ".kconfig")


class ProgInfo(NamedTuple):
    id: int
    type: int
    name: str
    tag: str  # hex


def _prog_info_from_fd(fd: int) -> ProgInfo:
    info = C.bpf_prog_info()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = int(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)))
    if ret < 0:
        raise LibbpfError("bpf_obj_get_info_by_fd", -ret, f"fd {fd}")
    return ProgInfo(
        id=int(info.id),
        type=int(info.type),
        name=info.name.decode(errors="replace"),
        tag=bytes(info.tag).hex(),
    )


def prog_info(prog_id: int) -> ProgInfo:
    """Id, type, name and tag of a loaded program, by id (e.g. from :func:`tc_links`)."""
    fd = int(lib.bpf_prog_get_fd_by_id(prog_id))
    if fd < 0:
        raise LibbpfError("bpf_prog_get_fd_by_id", -fd, f"program id {prog_id}")
    try:
        return _prog_info_from_fd(fd)
    finally:
        os.close(fd)


def _int_bytes(name: str, value: int, size: int) -> bytes:
    try:
        return value.to_bytes(size, "little", signed=value < 0)
    except OverflowError as exc:
        raise LoaderError(f"value {value} for {name!r} does not fit in {size} bytes") from exc


class Program:
    """A program of a :class:`BpfObject`; valid while the object is open."""

    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name: str = lib.bpf_program__name(ptr).decode()
        self.section: str = lib.bpf_program__section_name(ptr).decode()

    @property
    def fd(self) -> int:
        self._obj._check_open()
        fd = int(lib.bpf_program__fd(self._ptr))
        if fd < 0:
            raise LoaderError(f"program {self.name!r} is not loaded", errno=-fd)
        return fd

    @property
    def type(self) -> int:
        """``enum bpf_prog_type`` (known after open, from the section name)."""
        self._obj._check_open()
        return int(lib.bpf_program__type(self._ptr))

    def info(self) -> ProgInfo:
        return _prog_info_from_fd(self.fd)

    @property
    def id(self) -> int:
        """Kernel program id (what ``bpftool prog`` and :func:`tc_links` show)."""
        return self.info().id

    def test_run(
        self,
        data: bytes,
        *,
        repeat: int = 1,
        ctx: bytes | None = None,
        data_out_size: int | None = None,
        ctx_out_size: int | None = None,
    ) -> TestRunResult:
        """Run the program once (or ``repeat`` times) on ``data`` with ``BPF_PROG_TEST_RUN``."""
        return test_run(
            self.fd,
            data,
            repeat=repeat,
            ctx=ctx,
            data_out_size=data_out_size,
            ctx_out_size=ctx_out_size,
        )

    def __repr__(self) -> str:
        return f"<Program {self.name!r} section={self.section!r}>"


class BpfObject:
    """A BPF ELF object: ``open`` -> ``set_rodata`` -> ``load`` -> use -> ``close``.

    ``close()`` (or leaving the ``with`` block) destroys the ``bpf_object`` and with it every
    program and map fd it created; pins made on request stay.
    """

    def __init__(self, ptr: int, path: str, pin_root: str | None) -> None:
        self._ptr: int | None = ptr
        self.path = path
        self.pin_root = pin_root
        self._loaded = False
        self._load_failed = False
        self._programs: dict[str, Program] = {}
        self._maps: dict[str, Map] = {}
        self._map_ptrs: dict[str, int] = {}
        self._btf: Btf | None = None
        try:
            self._index()
        except BaseException:
            self._ptr = None  # the caller closes the pointer; __del__ must not
            raise

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, pin_root: str | os.PathLike[str] | None = None
    ) -> BpfObject:
        """Open (parse, not load) a BPF ELF object with ``bpf_object__open_file``.

        With ``pin_root``, maps declared ``__uint(pinning, LIBBPF_PIN_BY_NAME)`` are pinned at
        ``<pin_root>/<map name>`` on load, or reused if a compatible map is already pinned
        there. Without it nothing is pinned (libbpf's default root is not used).
        """
        text = os.fsdecode(path)
        if not os.path.isfile(text):
            raise ObjectOpenError(f"BPF object {text}: no such file", errno=E.ENOENT)
        root = os.fsencode(pin_root) if pin_root is not None else None
        opts = C.bpf_object_open_opts(sz=ctypes.sizeof(C.bpf_object_open_opts))
        opts.pin_root_path = root
        with capture() as messages:
            ptr = lib.bpf_object__open_file(os.fsencode(text), ctypes.byref(opts))
        if not ptr:
            err = ptr_errno(ptr)
            detail = _last_warnings(messages)
            raise ObjectOpenError(
                f"cannot open BPF object {text}: [Errno {err}] {strerror(err)}"
                + (f": {detail}" if detail else ""),
                errno=err,
                op="bpf_object__open_file",
            )
        try:
            obj = cls(ptr, text, os.fsdecode(root) if root is not None else None)
        except BaseException:
            lib.bpf_object__close(ptr)  # __init__ left obj without the pointer
            raise
        try:
            if root is None:
                obj._disable_auto_pinning()
        except BaseException:
            obj.close()
            raise
        return obj

    def _disable_auto_pinning(self) -> None:
        for name, mptr in self._map_ptrs.items():
            if lib.bpf_map__pin_path(mptr):
                ret = int(lib.bpf_map__set_pin_path(mptr, None))
                if ret < 0:
                    raise LibbpfError("bpf_map__set_pin_path", -ret, f"map {name!r}")

    def _index(self) -> None:
        assert self._ptr is not None
        prog = lib.bpf_object__next_program(self._ptr, None)
        while prog:
            p = Program(self, prog)
            self._programs[p.name] = p
            prog = lib.bpf_object__next_program(self._ptr, prog)
        mptr = lib.bpf_object__next_map(self._ptr, None)
        while mptr:
            name = self._map_key(mptr)
            self._map_ptrs[name] = mptr
            mptr = lib.bpf_object__next_map(self._ptr, mptr)

    def _map_key(self, mptr: int) -> str:
        """The dict key for a map: its name, or the ELF section (``.rodata``...) for an internal
        map, whose libbpf name is a truncated ``<object>.<section>``."""
        name: str = lib.bpf_map__name(mptr).decode()
        if lib.bpf_map__is_internal(mptr) and "." in name:
            candidates = [name[name.index(".") :], *_INTERNAL_SECTIONS]
            for section in candidates:
                if lib.bpf_object__find_map_by_name(self._ptr, section.encode()) == mptr:
                    return section
        return name

    def load(self) -> None:
        """Create the maps and load every program (``bpf_object__load``).

        A program rejected by the verifier raises :class:`VerifierError` with the complete
        verifier log (libbpf retries a failed load at log level 1 and prints the log, which
        is captured from the print callback). Other failures raise :class:`LibbpfError`.
        """
        ptr = self._check_open()
        if self._loaded or self._load_failed:
            raise LoaderError(f"BPF object {self.path} was already loaded (libbpf loads once)")
        with capture() as messages:
            ret = int(lib.bpf_object__load(ptr))
        if ret == 0:
            self._loaded = True
            return
        self._load_failed = True
        err = -ret
        for msg in messages:
            m = _PROG_LOG_RE.match(msg.text)
            if m:
                raise VerifierError(m["prog"], m["log"], errno=err)
        for msg in messages:
            m = _PROG_FAIL_RE.match(msg.text)
            if m:
                raise VerifierError(m["prog"], "", errno=err)
        raise LibbpfError("bpf_object__load", err, _last_warnings(messages) or None)

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Destroy the ``bpf_object`` (``bpf_object__close``): closes every program and map fd
        it created. Idempotent. Pins made on request are left in place."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._programs.clear()
            self._maps.clear()
            self._map_ptrs.clear()
            self._btf = None
            lib.bpf_object__close(ptr)

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            with contextlib.suppress(Exception):
                self.close()

    def _check_open(self) -> int:
        if self._ptr is None:
            raise LoaderError(f"BPF object {self.path} is closed")
        return self._ptr

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else ("loaded" if self._loaded else "opened")
        return f"<BpfObject {self.path} {state}>"

    # ------------------------------------------------------------------ programs / maps / BTF

    @property
    def programs(self) -> dict[str, Program]:
        self._check_open()
        return dict(self._programs)

    def program(self, name: str) -> Program:
        self._check_open()
        try:
            return self._programs[name]
        except KeyError:
            known = ", ".join(sorted(self._programs)) or "(none)"
            raise LoaderError(f"no program {name!r} in {self.path}; programs: {known}") from None

    @property
    def maps(self) -> dict[str, Map]:
        self._check_open()
        return {name: self.map(name) for name in self._map_ptrs}

    def map(self, name: str) -> Map:
        """A map by name; internal maps by section name (``.rodata``, ``.data``, ``.bss``)."""
        ptr = self._check_open()
        if name in self._maps:
            return self._maps[name]
        mptr = self._map_ptrs.get(name)
        if mptr is None:
            found = lib.bpf_object__find_map_by_name(ptr, name.encode())
            mptr = found if found else None
        if mptr is None:
            known = ", ".join(sorted(self._map_ptrs)) or "(none)"
            raise LoaderError(f"no map {name!r} in {self.path}; maps: {known}")

        def fd_getter(mptr: int = mptr, name: str = name) -> int:
            if self._ptr is None:
                raise MapError(f"map {name!r}: its BPF object {self.path} is closed")
            fd = int(lib.bpf_map__fd(mptr))
            if fd < 0:
                raise MapError(f"map {name!r} is not created yet: load the object first")
            return fd

        m = Map(
            name=name,
            map_type=int(lib.bpf_map__type(mptr)),
            key_size=int(lib.bpf_map__key_size(mptr)),
            value_size=int(lib.bpf_map__value_size(mptr)),
            max_entries=int(lib.bpf_map__max_entries(mptr)),
            fd_getter=fd_getter,
        )
        self._maps[name] = m
        return m

    def reuse_map(self, name: str, existing: Map) -> None:
        """Before load: make this object use ``existing`` (another object's map, or one
        re-opened from a pin) instead of creating its own map ``name``
        (``bpf_map__reuse_fd``, which dups the fd: each object owns its copy)."""
        self._check_open()
        if self._loaded:
            raise LoaderError(f"map {name!r}: reuse must be set before {self.path} is loaded")
        mptr = self._map_ptrs.get(name)
        if mptr is None:
            known = ", ".join(sorted(self._map_ptrs)) or "(none)"
            raise LoaderError(f"no map {name!r} in {self.path}; maps: {known}")
        ret = int(lib.bpf_map__reuse_fd(mptr, existing.fd))
        if ret < 0:
            raise LibbpfError("bpf_map__reuse_fd", -ret, f"map {name!r}")

    @property
    def btf(self) -> Btf:
        ptr = self._check_open()
        if self._btf is None:
            bptr = lib.bpf_object__btf(ptr)
            if not bptr:
                raise LoaderError(f"BPF object {self.path} has no BTF (compile with -g)")
            self._btf = Btf(bptr, owned=False, alive=self._check_open)
        return self._btf

    def unpin_maps(self) -> None:
        """Unpin the maps libbpf pinned by name under ``pin_root`` (``bpf_object__unpin_maps``)."""
        ptr = self._check_open()
        ret = int(lib.bpf_object__unpin_maps(ptr, None))
        if ret < 0:
            raise LibbpfError("bpf_object__unpin_maps", -ret)

    # ------------------------------------------------------------------ global variables

    def _section(self, section: str) -> tuple[int, dict[str, tuple[int, int]]]:
        ptr = self._check_open()
        mptr = lib.bpf_object__find_map_by_name(ptr, section.encode())
        if not mptr:
            raise LoaderError(f"BPF object {self.path} has no {section} section")
        return mptr, self.btf.datasec_vars(section)

    def _encode_vars(
        self,
        section: str,
        layout: dict[str, tuple[int, int]],
        values: Mapping[str, int | bytes],
    ) -> list[tuple[int, bytes]]:
        out = []
        for name, value in values.items():
            if name not in layout:
                known = ", ".join(sorted(layout)) or "(none)"
                raise LoaderError(
                    f"no variable {name!r} in {section} of {self.path}; known: {known}"
                )
            offset, size = layout[name]
            if isinstance(value, int):
                raw = _int_bytes(name, value, size)
            else:
                raw = bytes(value)
                if len(raw) != size:
                    raise LoaderError(
                        f"{section} variable {name!r} is {size} bytes, got {len(raw)}"
                    )
            out.append((offset, raw))
        return out

    def _write_initial(self, section: str, values: Mapping[str, int | bytes]) -> None:
        mptr, layout = self._section(section)
        patches = self._encode_vars(section, layout, values)
        size = ctypes.c_size_t()
        base = lib.bpf_map__initial_value(mptr, ctypes.byref(size))
        if not base:
            raise LoaderError(f"{section} of {self.path} has no initial value image")
        for offset, raw in patches:
            if offset + len(raw) > size.value:
                raise LoaderError(f"{section} variable at {offset} lies outside the section")
            ctypes.memmove(base + offset, raw, len(raw))

    def set_rodata(self, values: Mapping[str, int | bytes], section: str = ".rodata") -> None:
        """Before :meth:`load`: set ``const volatile`` globals by name.

        Offsets and sizes come from the BTF ``DATASEC``; ints are written little-endian in the
        variable's size, bytes must match it exactly. The kernel freezes .rodata at load, so
        the verifier sees these values as constants (dead branches are pruned).
        """
        self._check_open()
        if self._loaded or self._load_failed:
            raise LoaderError("set_rodata must be called before load()")
        self._write_initial(section, values)

    def set_data(self, values: Mapping[str, int | bytes], section: str = ".data") -> None:
        """Set globals of ``.data``/``.bss``: the initial image before load, the live map after."""
        self._check_open()
        if not self._loaded:
            if self._load_failed:
                raise LoaderError(f"BPF object {self.path} failed to load")
            self._write_initial(section, values)
            return
        _, layout = self._section(section)
        patches = self._encode_vars(section, layout, values)
        m = self.map(section)
        key = bytes(m.key_size)
        current = m.lookup(key)
        assert isinstance(current, bytes)
        image = bytearray(current)
        for offset, raw in patches:
            image[offset : offset + len(raw)] = raw
        m.update(key, bytes(image))

    def read_data(self, section: str = ".data") -> dict[str, bytes]:
        """Current raw bytes of each global in ``section`` (the live map once loaded)."""
        mptr, layout = self._section(section)
        if self._loaded:
            m = self.map(section)
            value = m.lookup(bytes(m.key_size))
            assert isinstance(value, bytes)
            image = value
        else:
            size = ctypes.c_size_t()
            base = lib.bpf_map__initial_value(mptr, ctypes.byref(size))
            image = ctypes.string_at(base, size.value) if base else b""
        return {name: image[off : off + size] for name, (off, size) in layout.items()}


def _last_warnings(messages: list[Message], limit: int = 5) -> str:
    warns = [m.text for m in messages if m.level == LIBBPF_WARN]
    return "; ".join(warns[-limit:])
