"""Reads a compiled model library's ELF file: its machine, and the CUDA cubins embedded in it.

A CUDA build is only usable on the board if TVM embedded real cubins. Without a CUDA driver
library at build time TVM silently falls back to embedding CUDA *source*, which the board
cannot load without NVRTC. :func:`check_cuda_library` turns that into a clear error.

The parsing is deliberately minimal (ELF64 little-endian headers, section headers, the symbol
table) so it needs no binutils or CUDA tools. A cubin is an ELF file with ``e_machine`` 190
(``EM_CUDA``); its SM architecture sits in ``e_flags`` (bits 0-7 up to ELF ABI version 7,
the CUDA 12 format; bits 8-15 from ABI version 8, the CUDA 13 format).
"""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path

from moec.errors import MoecError

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
EM_AARCH64 = 183
EM_CUDA = 190
MACHINE_NAMES = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64", EM_CUDA: "cuda"}
_SHT_SYMTAB = 2
_SHT_NOTE = 7
_STT_FUNC = 2


@dataclasses.dataclass(frozen=True)
class ElfHeader:
    """The fields of an ELF64 header that these checks use."""

    offset: int
    machine: int
    abi_version: int
    version: int
    flags: int
    section_offset: int
    section_entry_size: int
    section_count: int

    @property
    def machine_name(self) -> str:
        return MACHINE_NAMES.get(self.machine, f"machine {self.machine}")


@dataclasses.dataclass(frozen=True)
class Cubin:
    """A CUDA ELF image found inside a library."""

    offset: int
    arch: str
    abi_version: int
    toolkit: str | None
    functions: tuple[str, ...]


def read_elf_header(data: bytes, offset: int = 0) -> ElfHeader | None:
    """The ELF64 little-endian header at ``offset`` of ``data``, or None if there is none."""
    if data[offset : offset + 4] != ELF_MAGIC or len(data) < offset + 64:
        return None
    if data[offset + 4] != 2 or data[offset + 5] != 1:  # ELFCLASS64, little-endian
        return None
    machine, version = struct.unpack_from("<HI", data, offset + 18)
    (section_offset,) = struct.unpack_from("<Q", data, offset + 40)
    (flags,) = struct.unpack_from("<I", data, offset + 48)
    entry_size, count = struct.unpack_from("<HH", data, offset + 58)
    return ElfHeader(offset, machine, data[offset + 8], version, flags, section_offset, entry_size, count)


def cubin_arch(header: ElfHeader) -> str:
    """The ``sm_XY`` architecture a cubin was built for."""
    sm = (header.flags >> 8) & 0xFF if header.abi_version >= 8 else header.flags & 0xFF
    return f"sm_{sm}"


def _sections(data: bytes, header: ElfHeader) -> list[tuple[int, int, int, int, int]]:
    """``(type, offset, size, link, entry size)`` of each section of the ELF image."""
    sections = []
    for index in range(header.section_count):
        at = header.offset + header.section_offset + index * header.section_entry_size
        if at + 64 > len(data):
            return []
        _name, kind, _flags, _addr, offset, size, link, _info, _align, entry = struct.unpack_from(
            "<IIQQQQIIQQ", data, at
        )
        sections.append((kind, offset, size, link, entry))
    return sections


def cubin_toolkit(data: bytes, header: ElfHeader) -> str | None:
    """The CUDA version whose ptxas wrote the cubin: ``e_version`` in the CUDA 12 format (126
    is 12.6), the ``.note.nv.tkinfo`` note in the CUDA 13 one; None if neither says."""
    if header.abi_version <= 7 and header.version >= 10:
        return f"{header.version // 10}.{header.version % 10}"
    for kind, offset, size, _link, _entry in _sections(data, header):
        if kind == _SHT_NOTE:
            note = data[header.offset + offset : header.offset + offset + size]
            match = re.search(rb"release (\d+\.\d+)", note)
            if match:
                return match.group(1).decode()
    return None


def _function_symbols(data: bytes, header: ElfHeader) -> tuple[str, ...]:
    """Names of the function symbols in the ELF image's symbol table."""
    base = header.offset
    sections = _sections(data, header)
    names = []
    for kind, offset, size, link, entry in sections:
        if kind != _SHT_SYMTAB or not entry or link >= len(sections):
            continue
        strings_at = base + sections[link][1]
        for at in range(base + offset, base + offset + size, entry):
            name_at, info = struct.unpack_from("<IB", data, at)
            if info & 0xF == _STT_FUNC:
                end = data.index(b"\0", strings_at + name_at)
                names.append(data[strings_at + name_at : end].decode("ascii", "replace"))
    return tuple(names)


def embedded_cubins(data: bytes) -> list[Cubin]:
    """Every cubin (ELF with ``EM_CUDA``) embedded anywhere in ``data``."""
    found = []
    at = data.find(ELF_MAGIC, 1)
    while at >= 0:
        header = read_elf_header(data, at)
        if header is not None and header.machine == EM_CUDA:
            found.append(
                Cubin(
                    offset=at,
                    arch=cubin_arch(header),
                    abi_version=header.abi_version,
                    toolkit=cubin_toolkit(data, header),
                    functions=_function_symbols(data, header),
                )
            )
        at = data.find(ELF_MAGIC, at + 1)
    return found


def check_cuda_library(path: Path, arch: str, kernels: list[str], machine: int = EM_AARCH64) -> list[Cubin]:
    """Check that ``path`` is a ``machine`` shared library embedding ``arch`` cubins that define
    every kernel in ``kernels`` (TVM names a PrimFunc's CUDA kernel ``<name>_kernel``).

    Returns the cubins; raises a one-line :class:`MoecError` naming what is wrong.
    """
    data = Path(path).read_bytes()
    header = read_elf_header(data)
    if header is None:
        raise MoecError(f"{path}: not an ELF64 shared library")
    if header.machine != machine:
        raise MoecError(
            f"{path}: built for {header.machine_name}, expected {MACHINE_NAMES.get(machine, machine)}"
        )
    cubins = embedded_cubins(data)
    if not cubins:
        raise MoecError(
            f"{path}: no CUDA cubin embedded (TVM fell back to CUDA source, which happens when its CUDA "
            "runtime library could not load libcuda.so.1 at build time); it would not run on the board"
        )
    wrong = sorted({c.arch for c in cubins if c.arch != arch})
    if wrong:
        raise MoecError(f"{path}: embedded cubin is for {', '.join(wrong)}, expected {arch}")
    defined = [f for c in cubins for f in c.functions]
    missing = [k for k in kernels if not any(f.startswith(f"{k}_kernel") for f in defined)]
    if missing:
        raise MoecError(f"{path}: the {arch} cubin lacks the kernels {', '.join(missing)}")
    return cubins
