"""Building CUDA model libraries on a machine with no GPU and no driver.

Three things stand between ``tvm.compile`` and an ``.so`` with cubins here:

1. **The driver library.** TVM's CUDA runtime (``libtvm_runtime_cuda.so``, loaded when ``tvm``
   is imported) links ``libcuda.so.1``. Without a driver it fails to load, silently, and the
   CUDA codegen then embeds CUDA *source* instead of cubins. :func:`load_cuda_runtime`
   compiles a tiny stub ``libcuda.so.1`` (every ``cu*`` entry point returns an error), loads
   it ``RTLD_GLOBAL`` so the dynamic loader resolves the soname to it, then loads TVM's CUDA
   runtime. Setting ``LD_LIBRARY_PATH`` would not work: the loader reads it at process start.
   The stub lives in a temporary directory for this process only; it never enters an
   artifact. (``MOEC_CUDA_STUB=0`` skips it, to reproduce the fallback in tests.)
2. **The CUDA version.** The board runs the CUDA version in the target file's ``[cuda]``
   table (Orin, JetPack 6: 12.6); cubins from a newer major toolkit (CUDA 13 writes ELF ABI
   version 8) do not load on older drivers. The kernels are compiled by NVRTC 12.6, NVIDIA's
   runtime compilation library, from the PyPI wheels pinned by the extra ``moec[cuda]``
   (installed by ``scripts/setup.sh``): ``nvidia-cuda-nvrtc-cu12`` (``libnvrtc.so.12``, loaded
   with ``ctypes``) and the CUDA 12.6 headers that TVM's generated code includes and NVRTC 12.6
   does not have built in: libcu++'s ``<cuda/std/cstdint>`` and ``<cuda/std/type_traits>``
   (``nvidia-cuda-cccl-cu12``), ``cuda_fp16.h`` and ``math_constants.h``
   (``nvidia-cuda-runtime-cu12``). No system CUDA toolkit is used.

   NVRTC compiles the CUDA C **straight to a cubin** for the real architecture
   (``--gpu-architecture=sm_87``, then ``nvrtcGetCUBIN``): NVRTC 12.6 carries the PTX assembler
   of its own release, so the cubin is a CUDA 12.6 one (ELF ABI version 7, ``e_version`` 126),
   made by one supported compiler of one CUDA release from source to machine code. Going
   through PTX and the pinned ``ptxas`` 12.6 (``nvidia-cuda-nvcc-cu12``) would assemble the same
   PTX with the same release's assembler, for a second wheel, a subprocess and temporary files.
   The options are those nvcc had: ``-U__CUDA_NO_HALF_OPERATORS__``,
   ``-U__CUDA_NO_HALF_CONVERSIONS__`` as they were; nvcc's ``-O3`` is NVRTC's default (it has no
   ``-O`` option: it optimizes fully unless asked for debug code, and its assembler's default is
   ``-O3``); nvcc's ``--expt-relaxed-constexpr`` has no NVRTC spelling, and ``-default-device``
   (TVM's own NVRTC path passes it too) makes functions without an execution space, constexpr
   ones included, device functions; ``--device-int128`` gives the 128-bit integers nvcc has by
   default on Linux. No fast math, as before. A compile error is one :class:`MoecError` quoting
   the first error line of NVRTC's log.
3. **The compiler callback.** TVM compiles generated CUDA through the global function
   ``tvm_callback_cuda_compile``; :func:`cuda_build` replaces it for the duration of the
   build with :func:`compile_cuda_source`, which returns a plain cubin for the target's arch.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi

from moec.compiler.inspect_library import EM_AARCH64, EM_X86_64, Cubin, check_cuda_library
from moec.errors import MoecError, first_line
from moec.kernels import kernel_kind
from moec.targets import TargetSpec

NVRTC_RELEASE = "12.6"
"""The CUDA release of the pinned NVRTC (pyproject.toml's extra ``cuda``)."""
NVRTC_LIBRARY = ("nvidia-cuda-nvrtc-cu12", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
CUDA_HEADERS = (
    ("nvidia-cuda-cccl-cu12", "nvidia/cuda_cccl/include", "cuda/std/cstdint"),
    ("nvidia-cuda-runtime-cu12", "nvidia/cuda_runtime/include", "cuda_fp16.h"),
)
"""(distribution, include folder in it, a header it must hold) for each ``-I`` NVRTC gets."""
TVM_CUDA_RUNTIME = ("nvidia-cuda-runtime", "nvidia/cu13/lib/libcudart.so.13")
"""The CUDA runtime that TVM's CUDA library from PyPI links (CUDA 13), pinned so that a build
needs no CUDA installation: loaded by :func:`load_cuda_runtime` in the build process only, never
shipped (moec-runner drives a GPU through the driver alone)."""
CUDA_INSTALL = "pip install 'moec[cuda]' (scripts/setup.sh does this)"
_CALLBACK = "tvm_callback_cuda_compile"
_STUB_SYMBOLS = (
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuCtxGetCurrent",
    "cuFuncSetAttribute",
    "cuFuncGetAttribute",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cuModuleGetFunction",
    "cuModuleGetGlobal",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)
_STUB_SOURCE = (
    "/* moec build-time stand-in for the CUDA driver: lets TVM's CUDA runtime load; never shipped. */\n"
    "typedef int CUresult;\n"
    "#define NO_DEVICE 100 /* CUDA_ERROR_NO_DEVICE */\n"
    + "".join(f"CUresult {name}(void) {{ return NO_DEVICE; }}\n" for name in _STUB_SYMBOLS)
    + 'CUresult cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_NO_DEVICE";'
    " return 0; }\n"
    'CUresult cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = "no CUDA driver '
    '(moec build stub)"; return 0; }\n'
)


@dataclasses.dataclass(frozen=True)
class CudaToolchain:
    """What turns TVM's CUDA source into a cubin: NVRTC and the header folders it is given."""

    nvrtc: str
    nvrtc_version: str
    include_dirs: tuple[str, ...]
    packages: dict[str, str]
    """The exact version of each Python distribution the files come from."""

    def describe(self) -> dict[str, Any]:
        """What the manifest records: NVRTC assembles the cubin, so its CUDA version is NVRTC's.
        Files are named by their package (``distribution:path``), not by where this machine
        installed it, so the same build on another machine writes the same record."""
        return {
            "compiler": "nvrtc",
            "nvrtc": ":".join(NVRTC_LIBRARY),
            "nvrtc_version": self.nvrtc_version,
            "include_dirs": [f"{distribution}:{folder}" for distribution, folder, _ in CUDA_HEADERS],
            "packages": dict(self.packages),
            "cubin_cuda_version": self.nvrtc_version,
        }


def installed_file(distribution: str, path: str) -> Path | None:
    """``path`` inside the installed Python distribution ``distribution``; None if either is missing."""
    try:
        found = Path(str(importlib.metadata.distribution(distribution).locate_file(path)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return found if found.exists() else None


def missing_cuda_packages() -> str | None:
    """The first distribution of the extra ``cuda`` that is not installed, or None if all are."""
    for distribution, path in (NVRTC_LIBRARY, TVM_CUDA_RUNTIME):
        if installed_file(distribution, path) is None:
            return distribution
    for distribution, folder, header in CUDA_HEADERS:
        if installed_file(distribution, f"{folder}/{header}") is None:
            return distribution
    return None


@functools.cache
def _nvrtc(path: str) -> ctypes.CDLL:
    """``libnvrtc`` at ``path``, loaded once, with the signatures moec calls."""
    lib = ctypes.CDLL(path)
    program, size = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)
    signatures = {
        "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
        "nvrtcCreateProgram": [
            program,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ],
        "nvrtcCompileProgram": [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcGetProgramLogSize": [ctypes.c_void_p, size],
        "nvrtcGetProgramLog": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcGetCUBINSize": [ctypes.c_void_p, size],
        "nvrtcGetCUBIN": [ctypes.c_void_p, ctypes.c_char_p],
        "nvrtcDestroyProgram": [program],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int  # nvrtcResult; 0 is NVRTC_SUCCESS
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def find_toolchain() -> CudaToolchain:
    """The pinned NVRTC and CUDA headers (extra ``cuda``); one clear error if any is missing."""
    missing = missing_cuda_packages()
    if missing is not None:
        raise MoecError(
            f"CUDA targets need NVRTC {NVRTC_RELEASE}, its CUDA headers and the CUDA runtime TVM's "
            f"CUDA library links ({missing} is not installed): {CUDA_INSTALL}"
        )
    library = installed_file(*NVRTC_LIBRARY)
    try:
        lib = _nvrtc(str(library))
    except OSError as err:
        raise MoecError(
            f"{library}: does not load ({first_line(err)}); reinstall it: {CUDA_INSTALL}"
        ) from err
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    includes = tuple(str(installed_file(distribution, folder)) for distribution, folder, _ in CUDA_HEADERS)
    distributions = [NVRTC_LIBRARY[0], *(distribution for distribution, _, _ in CUDA_HEADERS)]
    packages = {name: importlib.metadata.version(name) for name in distributions}
    return CudaToolchain(str(library), f"{major.value}.{minor.value}", includes, packages)


def nvrtc_options(arch: str, toolchain: CudaToolchain) -> list[str]:
    """NVRTC's options for a cubin of ``arch`` (``sm_87``): nvcc's of before, in NVRTC's terms
    (see the module's docstring)."""
    return [
        f"--gpu-architecture={arch}",
        "-default-device",
        "--device-int128",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        *(f"--include-path={folder}" for folder in toolchain.include_dirs),
    ]


def first_error(log: str) -> str | None:
    """The first error line of a compiler log (``kernels.cu(3): error: ...``), else its first line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return next((line for line in lines if re.search(r"\berror\b", line)), lines[0] if lines else None)


def compile_cuda_source(code: str, arch: str, toolchain: CudaToolchain) -> bytes:
    """The cubin for ``arch`` (``sm_87``) of the CUDA C ``code`` TVM generated, by NVRTC."""
    lib = _nvrtc(toolchain.nvrtc)
    what = f"NVRTC {toolchain.nvrtc_version} (CUDA C to {arch} cubin)"

    def check(result: int, step: str) -> None:
        if result != 0:
            raise MoecError(f"{what} failed in {step}: {lib.nvrtcGetErrorString(result).decode()}")

    program = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(program), code.encode(), b"kernels.cu", 0, None, None), "setup")
    try:
        options = [option.encode() for option in nvrtc_options(arch, toolchain)]
        result = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        if result != 0:
            size = ctypes.c_size_t()
            check(lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "reading the log")
            log = ctypes.create_string_buffer(size.value)
            check(lib.nvrtcGetProgramLog(program, log), "reading the log")
            detail = first_error(log.value.decode(errors="replace"))
            raise MoecError(f"{what} failed: {detail or lib.nvrtcGetErrorString(result).decode()}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "reading the cubin")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(program, cubin), "reading the cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _run(command: list[str], what: str) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = first_line(proc.stderr or proc.stdout, f"exit code {proc.returncode}")
        raise MoecError(f"{what} failed: {detail}")


def _build_stub(directory: Path) -> Path:
    """Compile the stub ``libcuda.so.1`` into ``directory`` with the host C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise MoecError("cc: not installed; it builds a stub CUDA driver for GPU builds. Install 'gcc'")
    source, library = directory / "libcuda_stub.c", directory / "libcuda.so.1"
    source.write_text(_STUB_SOURCE)
    _run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(library), str(source)], "cc (stub)")
    return library


def load_cuda_runtime() -> None:
    """Make sure TVM's CUDA runtime library is loaded, via the stub driver if there is no driver,
    and with the pinned CUDA runtime it links (:data:`TVM_CUDA_RUNTIME`) if that is installed.

    Without it TVM embeds CUDA source instead of cubins. Once loaded it stays loaded (the
    process cannot unload it); that only affects this build process.
    """
    from tvm.base import _LOADED_LIBS  # noqa: PLC0415
    from tvm_ffi.libinfo import load_lib_ctypes  # noqa: PLC0415

    if "tvm_runtime_cuda" in _LOADED_LIBS or os.environ.get("MOEC_CUDA_STUB", "1") == "0":
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent

    def load() -> None:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )

    cudart = installed_file(*TVM_CUDA_RUNTIME)
    if cudart is not None:  # the pinned copy, loaded first: the library's NEEDED soname then resolves to it
        ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
    with contextlib.suppress(OSError, RuntimeError):
        load()  # a real driver appeared since tvm was imported
        return
    with tempfile.TemporaryDirectory(prefix="moec-libcuda-") as tmp:
        ctypes.CDLL(str(_build_stub(Path(tmp))), mode=ctypes.RTLD_GLOBAL)
        try:
            load()
        except (OSError, RuntimeError) as err:
            raise MoecError(
                f"TVM's CUDA runtime library does not load ({first_line(err)}); it needs the CUDA runtime "
                f"(libcudart) of the CUDA version TVM was built with: {CUDA_INSTALL}"
            ) from err


@contextlib.contextmanager
def cuda_build(target: TargetSpec, log: Callable[[str], None]) -> Iterator[dict[str, Any] | None]:
    """Around ``tvm.compile`` for ``target``: for CUDA targets, load TVM's CUDA runtime (stub
    driver) and compile kernels with :func:`compile_cuda_source`; yields what the manifest
    records about the CUDA build (None for CPU targets)."""
    if target.cuda is None:
        yield None
        return
    toolchain = find_toolchain()
    if toolchain.nvrtc_version != target.cuda.version:
        log(
            f"warning: building {target.cuda.arch} cubins with NVRTC {toolchain.nvrtc_version}, but "
            f"{target.name} runs CUDA {target.cuda.version}; they may not load there. Install the pinned "
            f"NVRTC {NVRTC_RELEASE}: {CUDA_INSTALL}"
        )
    load_cuda_runtime()
    previous = tvm_ffi.get_global_func(_CALLBACK, allow_missing=True)
    arch = target.cuda.arch

    failures: list[MoecError] = []

    def callback(code: str) -> bytes:
        try:
            return compile_cuda_source(str(code), arch, toolchain)
        except MoecError as err:
            failures.append(err)
            raise

    tvm_ffi.register_global_func(_CALLBACK, callback, override=True)
    try:
        yield {"board_cuda_version": target.cuda.version, **toolchain.describe()}
    except Exception as err:
        # TVM hands an error raised in the callback back as a RuntimeError: raise moec's own again
        if failures and not isinstance(err, MoecError):
            raise MoecError(str(failures[0])) from err
        raise
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(_CALLBACK, previous, override=True)


def moe_kernel_names(mod: tvm.IRModule) -> list[str]:
    """The names of moec's kernels in ``mod`` (each must be in the cubin)."""
    return sorted(gvar.name_hint for gvar, func in mod.functions_items() if kernel_kind(func))


def verify_cuda_library(path: Path, target: TargetSpec, mod: tvm.IRModule) -> list[Cubin]:
    """For CUDA targets: check the exported library (machine, cubin arch, kernels); else nothing."""
    if target.cuda is None:
        return []
    machine = EM_AARCH64 if target.hardware.arch == "aarch64" else EM_X86_64
    return check_cuda_library(path, target.cuda.arch, moe_kernel_names(mod), machine)
