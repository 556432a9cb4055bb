"""This machine's NVIDIA GPU, as its driver describes it: what the ``cuda`` target detects.

The bundled ``cuda`` target compiles for the GPU of the machine moec runs on (``arch =
"detect"`` in its ``[cuda]`` table, ``"detect"`` for its ``[hardware]`` sizes), the way ``host``
compiles for this machine's CPU. The facts come from the driver API (``libcuda.so.1``, which
every NVIDIA driver installs) through ``ctypes``: compute capability, streaming
multiprocessors, L2 size, shared memory per block, memory bus width and clock. No CUDA toolkit
and no TVM are needed to ask. Without a driver or a GPU, :func:`detect_device` raises a one-line
:class:`MoecError` saying how to name the GPU instead.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

from moec.errors import MoecError

ATTRIBUTES = {
    "max_threads_per_block": 1,
    "max_shared_memory_per_block": 8,
    "multiprocessors": 16,
    "memory_clock_khz": 36,
    "memory_bus_bits": 37,
    "l2_bytes": 38,
    "major": 75,
    "minor": 76,
}
"""``CUdevice_attribute`` values (cuda.h) of what the target needs."""
CUDA_ERROR_NO_DEVICE = 100
DETECTING = "the cuda target detects this machine's GPU, but"
NAME_THE_GPU = (
    'name the GPU\'s architecture instead: copy targets/cuda.toml and set [cuda] arch = "sm_90" '
    "(and the [hardware] sizes), then pass --target my-gpu.toml"
)


@dataclasses.dataclass(frozen=True)
class CudaDevice:
    """One GPU: its name, its architecture (``sm_90``) and the sizes a schedule uses."""

    name: str
    arch: str
    multiprocessors: int
    l2_bytes: int
    max_threads_per_block: int
    max_shared_memory_per_block: int
    memory_bandwidth_gbps: float


@functools.cache
def detect_device(ordinal: int = 0) -> CudaDevice:
    """GPU ``ordinal`` of this machine, from its driver; a one-line :class:`MoecError` when there
    is no driver or no such GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise MoecError(f"{DETECTING} there is no NVIDIA driver ({err}); {NAME_THE_GPU}") from err

    def check(status: int, call: str) -> None:
        if status == CUDA_ERROR_NO_DEVICE:
            raise MoecError(f"{DETECTING} the NVIDIA driver reports no GPU ({call}); {NAME_THE_GPU}")
        if status != 0:
            raise MoecError(
                f"{DETECTING} the NVIDIA driver's {call} failed "
                f"(CUresult {status}: no usable GPU?); {NAME_THE_GPU}"
            )

    check(cuda.cuInit(0), "cuInit")
    count = ctypes.c_int(0)
    check(cuda.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if ordinal >= count.value:
        raise MoecError(f"{DETECTING} the driver reports {count.value} GPU(s); {NAME_THE_GPU}")
    device = ctypes.c_int(0)
    check(cuda.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
    values = {}
    for field, attribute in ATTRIBUTES.items():
        value = ctypes.c_int(0)
        check(cuda.cuDeviceGetAttribute(ctypes.byref(value), attribute, device), "cuDeviceGetAttribute")
        values[field] = value.value
    name = ctypes.create_string_buffer(256)
    check(cuda.cuDeviceGetName(name, len(name), device), "cuDeviceGetName")
    return CudaDevice(
        name=name.value.decode(errors="replace"),
        arch=f"sm_{values['major']}{values['minor']}",
        multiprocessors=values["multiprocessors"],
        l2_bytes=values["l2_bytes"],
        max_threads_per_block=values["max_threads_per_block"],
        max_shared_memory_per_block=values["max_shared_memory_per_block"],
        # double data rate: two transfers per clock over the bus
        memory_bandwidth_gbps=2 * values["memory_clock_khz"] * 1e3 * values["memory_bus_bits"] / 8 / 1e9,
    )
