"""The artifact's weights file (``weights.bin``): written once by ``moec compile``, memory-mapped
and used in place by every runtime.

Layout (integers little-endian)::

    offset 0    8 bytes   magic b"MOECWTS\\0"
    offset 8    u32       format version (:data:`VERSION`)
    offset 12   u32       index length L, in bytes
    offset 16   L bytes   index: UTF-8 JSON {"tensors": [{"name", "dtype", "shape", "offset",
                          "nbytes"}, ...]}, in ``manifest["params"]`` order
    (zeros)
    offset D    data      D = 16 + L rounded up to a page (4096): each tensor's raw C-order,
                          little-endian bytes at D + its "offset", a multiple of 64

Why this and not TVM's param-dict format: a param dict must be parsed into freshly allocated
tensors, so loading held the weights twice for a moment and once for good in anonymous memory.
Here a runtime maps the whole file (``MAP_PRIVATE``) and hands the kernels views into the
mapping: nothing is copied, the pages are the page cache's (shared by every process running the
model, and reclaimable), and only the weights a call touches become resident. The Python
session (:mod:`moec.runtime.session`) and ``moec-runner`` (``moec/runtime/native/runner.cc``,
which parses the same layout) both do this; CUDA artifacts copy from the mapping to the GPU.

Why the alignment: 64-byte tensor offsets are cache-line aligned (TVM's ``from_dlpack`` also
refuses less), and a page-aligned data region keeps each tensor's place in its pages the same
in the file and in memory, so 2 MiB-aligned stretches of the file land in 2 MiB-aligned
memory. The mapping is advised ``MADV_HUGEPAGE``: expert weights are read once per token from
DRAM when the model is larger than the cache, and with 4 KiB pages every 4 KiB of weights costs
a TLB miss and a page walk (under virtualisation a nested one), which dominates a cold sparse
read of a few megabytes; huge pages remove most of those walks (measured on the benchmark
machine, then with weights copied into 2 MiB-aligned anonymous memory: the cold one-token expert
read went from 4.0 to 2.4 ms). On kernels whose file system keeps large folios in the page cache
(Linux 6.18 on ext4, checked) a private file mapping so advised is mapped with 2 MiB page-table
entries (``FilePmdMapped`` in ``/proc/self/smaps``); where the kernel has no transparent huge
pages the advice is ignored and nothing changes.

The module does not import TVM (as :mod:`moec.artifact`), so packaging loads no compiler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from moec.errors import MoecError

MAGIC = b"MOECWTS\0"
VERSION = 1
HEADER = struct.Struct("<8sII")
"""Magic, version, index length: the fixed start of the file."""
ALIGNMENT = 64
"""Every tensor's offset in the data region is a multiple of this (a cache line)."""
PAGE = 4096
"""The data region starts on a multiple of this."""
HUGE_PAGE = 2 * 1024 * 1024
"""The writer writes in pieces of this size, at multiples of it (see :class:`HugePageChunks`)."""
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
"""The element types a weights file holds: those ``moec-runner`` knows (numpy names)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor's index entry: ``offset`` counts from the start of the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def data_start(index_bytes: int) -> int:
    """Where the data region starts in a file whose index is ``index_bytes`` long."""
    return round_up(HEADER.size + index_bytes, PAGE)


def plan(tensors: Mapping[str, Any]) -> list[Entry]:
    """The index entries of ``tensors`` (name → anything with ``shape`` and ``dtype``: numpy
    arrays, TVM tensors), in order, each at the first 64-byte boundary after the one before."""
    entries, end = [], 0
    for name, tensor in tensors.items():
        try:
            dtype = np.dtype(str(tensor.dtype))
        except TypeError:
            dtype = None
        if dtype is None or dtype.name not in DTYPES:
            raise MoecError(f"weight '{name}' has dtype {tensor.dtype}, which a weights file cannot hold")
        shape = tuple(int(d) for d in tensor.shape)
        offset = round_up(end, ALIGNMENT)
        nbytes = math.prod(shape) * dtype.itemsize
        entries.append(Entry(name, dtype.name, shape, offset, nbytes))
        end = offset + nbytes
    return entries


def write_weights(
    path: str | Path, tensors: Mapping[str, Any], to_numpy: Callable[[Any], np.ndarray] = np.asarray
) -> None:
    """Write ``tensors`` (name → array, in ``manifest["params"]`` order) as a weights file at ``path``.

    Each tensor is converted with ``to_numpy`` (e.g. ``lambda t: t.numpy()`` for TVM tensors)
    only when its bytes are written and dropped right after, so a caller holding the tensors
    holds at most one more tensor's worth while writing. The file is written under a temporary
    name and renamed into place: a process that maps the old file keeps reading it intact (a
    mapped file truncated under a reader kills it with SIGBUS).
    """
    path = Path(path)
    entries = plan(tensors)
    index = json.dumps({"tensors": [dataclasses.asdict(e) for e in entries]}).encode()
    start = data_start(len(index))
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as raw:
            out = HugePageChunks(raw)
            out.write(HEADER.pack(MAGIC, VERSION, len(index)))
            out.write(index)
            out.write(bytes(start - out.tell()))
            for entry in entries:
                write_tensor(out, entry, np.asarray(to_numpy(tensors[entry.name])), start)
            out.flush()
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_tensor(out: HugePageChunks, entry: Entry, array: np.ndarray, start: int) -> None:
    """Write ``array`` at ``entry``'s place in the data region (which begins at ``start``)."""
    if array.shape != entry.shape or array.dtype.name != entry.dtype:
        raise ValueError(
            f"weight '{entry.name}' converted to {array.dtype}{list(array.shape)}, "
            f"expected {entry.dtype}{list(entry.shape)}"
        )
    out.write(bytes(start + entry.offset - out.tell()))
    little = np.ascontiguousarray(array).astype(little_endian(entry.dtype), copy=False)
    out.write(little.reshape(-1).view(np.uint8))


class HugePageChunks:
    """Writes a file in whole 2 MiB pieces at 2 MiB offsets (the last one shorter).

    The page cache then holds the new file in 2 MiB folios, which a mapping advised
    ``MADV_HUGEPAGE`` maps with huge pages from the first read; writing tensor by tensor left small
    folios around each tensor's end (measured on a 210 MiB decoder: 82 % of it mapped with huge
    pages right after compiling, against all of it).
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pending = bytearray()
        self.written = 0

    def tell(self) -> int:
        """The file position the next byte goes to."""
        return self.written + len(self.pending)

    def write(self, data: bytes | np.ndarray) -> None:
        """Append ``data`` (bytes, or a contiguous byte array), writing out each completed piece."""
        view = memoryview(data).cast("B")
        while view:
            taken = view[: HUGE_PAGE - len(self.pending)]
            self.pending += taken
            view = view[len(taken) :]
            if len(self.pending) == HUGE_PAGE:
                self.flush()

    def flush(self) -> None:
        """Write out what is pending (a whole piece, or the file's end)."""
        self.out.write(self.pending)
        self.written += len(self.pending)
        self.pending.clear()


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of the weights file at ``path`` by name, in file order, as views into one
    private mapping of the whole file (advised ``MADV_HUGEPAGE``); the views keep it mapped.

    The views are writable (TVM's ``from_dlpack`` refuses read-only arrays), copy-on-write: a
    write stays in this process and nothing reaches the file. A missing, truncated or otherwise
    damaged file raises a one-line :class:`MoecError` that says to recompile.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = path.stat().st_size
            if size < HEADER.size:
                raise damaged(path, f"{size} bytes, shorter than its {HEADER.size}-byte header")
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError as err:
        raise MoecError(f"{path}: no weights file; recompile the model") from err
    except OSError as err:
        raise MoecError(f"{path}: cannot read weights ({err.strerror}); recompile the model") from err
    advise_huge_pages(mapping)
    start, entries = parse_index(path, mapping)
    return {
        e.name: np.ndarray(e.shape, little_endian(e.dtype), buffer=mapping, offset=start + e.offset)
        for e in entries
    }


def little_endian(dtype: str) -> np.dtype:
    """The little-endian numpy dtype called ``dtype``, as the file stores it."""
    return np.dtype(dtype).newbyteorder("<")


def advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask the kernel to back ``mapping`` with huge pages where it can (ignored where it cannot)."""
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # EINVAL: a kernel without transparent huge pages
            mapping.madvise(mmap.MADV_HUGEPAGE)


def damaged(path: Path, why: str) -> MoecError:
    """The error for a weights file that is not what :func:`write_weights` writes."""
    return MoecError(f"{path}: damaged weights ({why}); recompile the model")


def parse_index(path: Path, data: mmap.mmap) -> tuple[int, list[Entry]]:
    """The data region's start and the checked index entries of the weights file ``data``."""
    magic, version, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise damaged(path, f"bad magic {magic!r}, not a moec weights file")
    if version != VERSION:
        raise damaged(path, f"format version {version}; this moec reads {VERSION}")
    if HEADER.size + length > len(data):
        raise damaged(path, f"its {length}-byte index runs past the end of the file")
    try:
        tensors = json.loads(data[HEADER.size : HEADER.size + length].decode())["tensors"]
        entries = [Entry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"]) for t in tensors]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise damaged(path, f"unreadable index: {type(err).__name__}: {err}") from err
    start = data_start(length)
    names = set()
    for e in entries:
        check_entry(path, e, start, len(data))
        if e.name in names:
            raise damaged(path, f"tensor {e.name!r} twice")
        names.add(e.name)
    return start, entries


def check_entry(path: Path, entry: Entry, start: int, size: int) -> None:
    """Raise the damaged-weights error unless ``entry`` describes a tensor inside the file."""
    fields = (entry.offset, entry.nbytes, *entry.shape)
    if not isinstance(entry.name, str) or not all(isinstance(v, int) and v >= 0 for v in fields):
        raise damaged(path, f"bad index entry {dataclasses.asdict(entry)}")
    if entry.dtype not in DTYPES:
        raise damaged(path, f"tensor {entry.name!r} has unknown dtype {entry.dtype!r}")
    if entry.nbytes != math.prod(entry.shape) * np.dtype(entry.dtype).itemsize:
        shape = list(entry.shape)
        raise damaged(path, f"tensor {entry.name!r}: {entry.nbytes} bytes do not fit its shape {shape}")
    if entry.offset % ALIGNMENT:
        raise damaged(path, f"tensor {entry.name!r} at offset {entry.offset}, not a multiple of {ALIGNMENT}")
    if start + entry.offset + entry.nbytes > size:
        raise damaged(path, f"tensor {entry.name!r} ends past the end of the file ({size} bytes): truncated")
