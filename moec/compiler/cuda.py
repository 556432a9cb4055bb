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
   version 8) do not load on older drivers. The CUDA C front end is the system ``nvcc``
   (PyPI has no CUDA 12 ``nvcc``); the cubin is assembled by the ``ptxas`` of the board's
   CUDA version when one is installed — the pinned ``nvidia-cuda-nvcc-cu12`` wheel (extra
   ``moec[cuda12]``, installed by ``scripts/setup.sh``) ships ``ptxas`` 12.6. The PTX is
   compiled for ``compute_XY`` and its ``.version`` lowered to what that ``ptxas`` reads;
   PTX using newer instructions then fails in ``ptxas`` with an error, never silently.
   Otherwise the system toolkit's ``ptxas`` is used, with a warning, and the manifest
   records the version actually used.
3. **The compiler callback.** TVM compiles generated CUDA through the global function
   ``tvm_callback_cuda_compile``; :func:`cuda_build` replaces it for the duration of the
   build with :func:`compile_cuda_source`, which returns a plain cubin for the target's arch.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
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
from moec.targets import CudaSpec, TargetSpec

PTXAS_PACKAGE = "nvidia-cuda-nvcc-cu12==12.6.85"
NVCC_FALLBACKS = ("/usr/local/cuda/bin/nvcc",)  # where the CUDA toolkit puts nvcc off PATH
# Newest PTX ISA each CUDA release's ptxas reads (PTX ISA release notes).
PTX_ISA = {
    "12.0": "8.0",
    "12.1": "8.1",
    "12.2": "8.2",
    "12.3": "8.3",
    "12.4": "8.4",
    "12.5": "8.5",
    "12.6": "8.5",
    "12.8": "8.7",
    "12.9": "8.8",
    "13.0": "9.0",
}
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
    """The tools that turn TVM's CUDA source into a cubin, and their CUDA versions."""

    nvcc: str
    nvcc_version: str
    ptxas: str
    ptxas_version: str

    def describe(self) -> dict[str, Any]:
        """What the manifest records: the cubin's CUDA version is that of ``ptxas``."""
        return {
            "nvcc": self.nvcc,
            "nvcc_version": self.nvcc_version,
            "ptxas": self.ptxas,
            "ptxas_version": self.ptxas_version,
            "cubin_cuda_version": self.ptxas_version,
        }


def tool_version(path: str) -> str:
    """The CUDA release (``"12.6"``) that a CUDA tool reports with ``--version``."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if not match:
        raise MoecError(f"{path}: cannot read its CUDA version from '{path} --version'")
    return match.group(1)


def pinned_ptxas() -> str | None:
    """``ptxas`` from the ``nvidia-cuda-nvcc-cu12`` wheel, if that wheel is installed."""
    try:
        import nvidia.cuda_nvcc  # type: ignore[import-not-found]  # noqa: PLC0415
    except ImportError:
        return None
    for root in getattr(nvidia.cuda_nvcc, "__path__", []):
        path = Path(root) / "bin" / "ptxas"
        if path.exists():
            return str(path)
    return None


def find_toolchain(cuda: CudaSpec) -> CudaToolchain:
    """nvcc (CUDA C → PTX) and the ptxas (PTX → cubin) closest to the board's CUDA version."""
    nvcc = shutil.which("nvcc") or next((p for p in NVCC_FALLBACKS if os.access(p, os.X_OK)), None)
    if nvcc is None:
        raise MoecError(
            "nvcc: not installed; it compiles the CUDA kernels of GPU targets. Install the CUDA toolkit "
            "(e.g. 'apt-get install nvidia-cuda-toolkit' or NVIDIA's cuda-nvcc package) and put nvcc on PATH"
        )
    nvcc_version = tool_version(nvcc)
    candidates = [
        p for p in (pinned_ptxas(), str(Path(nvcc).parent / "ptxas")) if p and os.access(p, os.X_OK)
    ]
    if not candidates:
        raise MoecError(f"ptxas: not found next to {nvcc}; reinstall the CUDA toolkit")
    versions = {path: tool_version(path) for path in candidates}
    ptxas = next((p for p in candidates if versions[p] == cuda.version), candidates[-1])
    return CudaToolchain(nvcc, nvcc_version, ptxas, versions[ptxas])


def _run(command: list[str], what: str) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = first_line(proc.stderr or proc.stdout, f"exit code {proc.returncode}")
        raise MoecError(f"{what} failed: {detail}")


def lower_ptx_version(ptx: str, isa: str) -> str:
    """``ptx`` with its ``.version`` directive lowered to ``isa`` if it is newer."""

    def lower(match: re.Match[str]) -> str:
        found = tuple(int(x) for x in match.group(1).split("."))
        return f".version {isa}" if found > tuple(int(x) for x in isa.split(".")) else match.group(0)

    return re.sub(r"^\.version (\d+\.\d+)", lower, ptx, count=1, flags=re.MULTILINE)


def compile_cuda_source(code: str, arch: str, toolchain: CudaToolchain) -> bytes:
    """The cubin for ``arch`` (``sm_87``) of the CUDA C ``code`` TVM generated."""
    sm = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="moec-cuda-") as tmp:
        source, ptx, cubin = (Path(tmp) / f"kernels.{ext}" for ext in ("cu", "ptx", "cubin"))
        source.write_text(code)
        _run(
            [
                toolchain.nvcc,
                "--ptx",
                "-O3",
                f"-arch=compute_{sm}",
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "--expt-relaxed-constexpr",
                "-o",
                str(ptx),
                str(source),
            ],
            f"nvcc {toolchain.nvcc_version} (CUDA C to PTX)",
        )
        isa = PTX_ISA.get(toolchain.ptxas_version)
        if toolchain.ptxas_version != toolchain.nvcc_version and isa:
            ptx.write_text(lower_ptx_version(ptx.read_text(), isa))
        _run(
            [toolchain.ptxas, f"-arch=sm_{sm}", "-O3", "-o", str(cubin), str(ptx)],
            f"ptxas {toolchain.ptxas_version} (PTX to {arch} cubin)",
        )
        return cubin.read_bytes()


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
    """Make sure TVM's CUDA runtime library is loaded, via the stub driver if there is no driver.

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
                "(libcudart) of the CUDA version TVM was built with"
            ) from err


@contextlib.contextmanager
def cuda_build(target: TargetSpec, log: Callable[[str], None]) -> Iterator[dict[str, Any] | None]:
    """Around ``tvm.compile`` for ``target``: for CUDA targets, load TVM's CUDA runtime (stub
    driver) and compile kernels with :func:`compile_cuda_source`; yields what the manifest
    records about the CUDA build (None for CPU targets)."""
    if target.cuda is None:
        yield None
        return
    toolchain = find_toolchain(target.cuda)
    if toolchain.ptxas_version != target.cuda.version:
        log(
            f"warning: building {target.cuda.arch} cubins with CUDA {toolchain.ptxas_version}, but "
            f"{target.name} runs CUDA {target.cuda.version}; they may not load there. Install the "
            f"matching assembler: pip install '{PTXAS_PACKAGE}' (scripts/setup.sh does this)"
        )
    load_cuda_runtime()
    previous = tvm_ffi.get_global_func(_CALLBACK, allow_missing=True)
    arch = target.cuda.arch

    def callback(code: str) -> bytes:
        return compile_cuda_source(str(code), arch, toolchain)

    tvm_ffi.register_global_func(_CALLBACK, callback, override=True)
    try:
        yield {"board_cuda_version": target.cuda.version, **toolchain.describe()}
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
