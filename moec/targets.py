"""Target files: which machine to compile for, and the facts about it that scheduling needs.

A target is a TOML file (bundled ones live in ``targets/``; ``--target`` also takes a path).
The bundled target files and schedule tables ship in the wheel as the packages
``moec.bundled_targets`` and ``moec.bundled_schedules`` (``pyproject.toml`` maps the repo's
folders to them) and are read with ``importlib.resources``, so an installed moec finds them.
Every per-target choice lives in that file, not in code: the TVM target (and the host CPU
target of a GPU board), the cross toolchain and how to run its binaries here, the hardware
(architecture, cores, SIMD width, cache line and sizes, memory bandwidth, the precisions it
computes natively) and the name of the kernel schedule table in ``schedules/``.
``"detect"`` values are read from the machine moec runs on (``compute_precisions``: from what
LLVM knows of the target's CPU). ``targets/cortex-a76.toml`` is
the annotated example of adding a board.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from moec.cuda_device import CudaDevice, detect_device
from moec.errors import MoecError, first_line
from moec.schedule import SCHEDULE_KINDS, CpuSchedule, GpuSchedule

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    import tvm

TARGETS_PACKAGE = "moec.bundled_targets"  # the repo's targets/
SCHEDULES_PACKAGE = "moec.bundled_schedules"  # the repo's schedules/

PRECISIONS = ("fp32", "fp16", "int8")
DETECT = ("detect",)
"""``Hardware.compute_precisions`` of a target file that says ``"detect"``, until
:func:`load_target` replaces it with what the target's CPU computes."""
ARCHES = ("x86_64", "aarch64")
POWER_OF_TWO_FIELDS = ("lanes", "accumulators", "threads_per_row")
HARDWARE_BOUNDS = {
    "cores": (1, 4096),
    "simd_bits": (32, 4096),
    "cache_line_bytes": (16, 4096),
    "l1d_bytes": (0, 1 << 30),
    "l2_bytes": (0, 1 << 34),
    "memory_bandwidth_gbps": (0.0, 1e5),
}
"""What a ``[hardware]`` value may be: wide enough for any CPU or GPU there is (an H200 has 132
SMs and 4.8 TB/s), narrow enough that a typo (``cores = 1e9``) is refused here rather than
making the scheduler plan a billion threads."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """How binaries for the target are built here, and run here when the CPU differs.

    cxx: C++ compiler that links the model library and the runner.
    package: Debian package providing ``cxx`` (named in the error when it is missing).
    emulator: command prefix that runs the target's binaries on this machine (empty: native).
    emulator_package: Debian package providing the emulator.
    runtime_wheels: PyPI platform tag of the TVM wheels whose runtime libraries run on the
        target (empty: the wheels installed here).
    """

    cxx: str = "g++"
    package: str = "g++"
    emulator: tuple[str, ...] = ()
    emulator_package: str = ""
    runtime_wheels: str = ""


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Facts about the board that kernel schedules and memory layout depend on."""

    arch: str
    cores: int
    simd_bits: int
    cache_line_bytes: int
    l1d_bytes: int
    l2_bytes: int
    memory_bandwidth_gbps: float
    compute_precisions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CudaSpec:
    """The GPU side of a CUDA target: cubin architecture and the CUDA version the board runs."""

    arch: str
    version: str


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A resolved target file; ``path`` is the user's file, or the bundled one as a package resource."""

    name: str
    description: str
    path: Traversable
    tvm_config: dict[str, Any]
    host_config: dict[str, Any] | None
    hardware: Hardware
    toolchain: Toolchain
    cuda: CudaSpec | None
    schedule: CpuSchedule | GpuSchedule

    @property
    def tvm_target(self) -> tvm.target.Target:
        import tvm  # here, not at the top: reading a target's toolchain loads no compiler

        return tvm.target.Target(self.tvm_config, host=self.host_config)

    @property
    def runs_here(self) -> bool:
        """Whether artifacts for this target run on this machine without an emulator."""
        return self.cuda is None and self.hardware.arch == platform.machine()

    @property
    def cpu_fp16(self) -> bool:
        """Whether this is a CPU target with FP16 arithmetic (its fp16 experts multiply in FP16)."""
        return self.cuda is None and "fp16" in self.hardware.compute_precisions

    @property
    def int8_dot(self) -> str | None:
        """The INT8 dot-product instructions int8-dot experts use on this target
        (:data:`moec.kernels.int8_dot.INSTRUCTION_SETS`), None if it does not compute int8."""
        if "int8" not in self.hardware.compute_precisions:
            return None
        if self.cuda is not None:
            return "dp4a"
        return {"x86_64": "vnni", "aarch64": "sdot"}.get(self.hardware.arch)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "tvm": self.tvm_config,
            "host": self.host_config,
            "hardware": dataclasses.asdict(self.hardware),
            "toolchain": dataclasses.asdict(self.toolchain),
            "cuda": dataclasses.asdict(self.cuda) if self.cuda else None,
            "schedule": {"kind": type(self.schedule).kind, **dataclasses.asdict(self.schedule)},
        }


def _bundled_tomls(package: str) -> dict[str, Traversable]:
    """The TOML files shipped in ``package``, by name without ``.toml``."""
    files = resources.files(package).iterdir()
    return {file.name.removesuffix(".toml"): file for file in files if file.name.endswith(".toml")}


def bundled_targets() -> list[str]:
    """Names of the target files shipped with moec."""
    return sorted(_bundled_tomls(TARGETS_PACKAGE))


def bundled_target_file(name: str) -> Traversable:
    """The bundled target file ``name`` (``targets/<name>.toml`` in the repo), for reading or copying."""
    files = _bundled_tomls(TARGETS_PACKAGE)
    if name not in files:
        raise MoecError(
            f"unknown target '{name}'; valid targets: "
            f"{', '.join(sorted(files))} (or the path of a .toml target file)"
        )
    return files[name]


class _Table:
    """One TOML table of a target file, read key by key with errors that name the key."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data, self.where, self.read = data, where, set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., detect: Any = None) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is ...:
                raise MoecError(f"{self.where}: missing key '{key}'")
            return default
        value = self.data[key]
        if value == "detect" and detect is not None:
            return detect()
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds) + (' or "detect"' if detect else "")
            raise MoecError(f"{self.where}: key '{key}' must be a {names}, got {value!r}")
        return value

    def table(self, key: str, required: bool = True) -> _Table | None:
        value = self.get(key, dict, ... if required else None)
        return None if value is None else _Table(value, f"{self.where} [{key}]")

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, list, default)
        if not all(isinstance(item, str) for item in value):
            raise MoecError(f"{self.where}: key '{key}' must be a list of strings, got {value!r}")
        return tuple(value)

    def check_no_unknown_keys(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise MoecError(
                f"{self.where}: unknown key '{unknown[0]}' (known keys: {', '.join(sorted(self.read))})"
            )


def _host_simd_bits() -> int:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 128
    if " avx512f" in flags:
        return 512
    if " avx2" in flags or " avx " in flags:
        return 256
    return 128


def _host_cache_bytes(level: int, kind: str) -> int:
    """Size of this machine's cache at ``level`` (``kind`` Data/Unified) from sysfs; 0 if unknown."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if int((index / "level").read_text()) == level and (index / "type").read_text().strip() == kind:
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * 1024 if size.endswith("K") else int(size)
        except (OSError, ValueError):
            continue
    return 0


def _read_tvm_table(table: _Table) -> dict[str, Any]:
    """A ``[tvm]``/``[host]`` table as the dict ``tvm.target.Target`` takes (``mcpu = "detect"``)."""
    config = dict(table.data)
    table.read.update(config)
    table.get("kind", str)
    if config.get("mcpu") == "detect":
        import tvm

        config["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    return config


NATIVE_FEATURES: dict[str, dict[str, tuple[str, ...]]] = {
    "x86_64": {"fp16": ("avx512fp16",), "int8": ("avx512vnni", "avxvnni")},
    "aarch64": {"fp16": ("fullfp16",), "int8": ("dotprod",)},
}
"""The LLVM CPU features (any one suffices) with which a CPU computes a precision natively:
FP16 arithmetic, and INT8 dot products with INT32 accumulation (VNNI's ``vpdpbusd``, NEON's
``sdot``)."""


def _natively_computes(target: tvm.target.Target, arch: str, precision: str) -> tuple[bool, str]:
    """Whether ``target`` computes ``precision`` in hardware, and what it would need otherwise.

    CPU targets ask LLVM whether the target's CPU (``mcpu``) with its ``mattr`` has one of the
    :data:`NATIVE_FEATURES`, so a named CPU (``cascadelake``, ``znver4``, ``cortex-a76``) counts
    with no flags spelled out."""
    if precision == "fp32":
        return True, ""
    if target.kind.name == "cuda":
        major = int(str(target.attrs.get("arch", "sm_50"))[3:]) // 10
        needs = {"fp16": (5, "sm_53 or newer"), "int8": (6, "sm_61 or newer")}[precision]
        return major >= needs[0], needs[1]
    import tvm

    features = NATIVE_FEATURES.get(arch, {}).get(precision, ())
    needs = f"an mcpu with, or one of {', '.join('+' + f for f in features)} in [tvm] mattr"
    has = any(tvm.target.codegen.llvm_cpu_has_features([feature], target) for feature in features)
    return has, needs


def _detected_precisions(target: tvm.target.Target, arch: str) -> tuple[str, ...]:
    """``compute_precisions = "detect"``: fp32 and every precision ``target`` computes natively."""
    return tuple(p for p in PRECISIONS if _natively_computes(target, arch, p)[0])


def _read_target_file(name_or_path: str) -> tuple[Traversable, dict[str, Any]]:
    """The target file ``name_or_path`` names (a bundled name or a TOML path) and its contents."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        path: Traversable = Path(name_or_path)
        if not path.is_file():
            raise MoecError(f"{path}: target file not found")
    else:
        path = bundled_target_file(name_or_path)
    try:
        return path, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise MoecError(f"{path}: not valid TOML ({err})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise MoecError(f"{path}: cannot read target file ({err})") from err


def target_description(name_or_path: str) -> str:
    """A target file's ``description``, read without detecting anything (``moec targets`` on a
    machine where a detecting target cannot load)."""
    path, data = _read_target_file(name_or_path)
    return _Table(data, str(path)).get("description", str, "")


def target_toolchain(name_or_path: str) -> tuple[str, Toolchain]:
    """The target name and the toolchain (compiler, emulator) of a target file, read without
    loading TVM: what running and packaging an artifact need, taken from the target file and
    never from the artifact's manifest, so that nothing an artifact says is executed."""
    path, data = _read_target_file(name_or_path)
    root = _Table(data, str(path))
    return root.get("name", str), _read_toolchain(root.table("toolchain", required=False), str(path))


def load_target(name_or_path: str) -> TargetSpec:
    """Resolve ``--target``: a bundled name or the path of a user's TOML file."""
    import tvm

    path, data = _read_target_file(name_or_path)
    root = _Table(data, str(path))
    name = root.get("name", str)
    description = root.get("description", str, "")
    schedule_name = root.get("schedule", str)
    tvm_config = _read_tvm_table(root.table("tvm"))
    host_table = root.table("host", required=False)
    host_config = _read_tvm_table(host_table) if host_table else None
    cuda_table = root.table("cuda", required=False)
    # [cuda] arch = "detect": this machine's GPU, whose driver also gives the [hardware] sizes
    gpu = detect_device() if cuda_table and cuda_table.data.get("arch") == "detect" else None
    hardware = _read_hardware(root.table("hardware"), gpu, cuda_table is not None)
    toolchain = _read_toolchain(root.table("toolchain", required=False), str(path))
    cuda = None
    if cuda_table:
        arch = gpu.arch if gpu else cuda_table.get("arch", str)
        cuda_table.read.add("arch")
        cuda = CudaSpec(arch=arch, version=cuda_table.get("version", str))
        cuda_table.check_no_unknown_keys()
    root.check_no_unknown_keys()

    if tvm_config["kind"] == "llvm":
        tvm_config.setdefault("num-cores", hardware.cores)
    if tvm_config["kind"] == "cuda" and cuda is None:
        raise MoecError(f"{path}: a cuda [tvm] target needs a [cuda] table (arch, version)")
    if cuda is not None:
        if tvm_config.get("arch", cuda.arch) != cuda.arch:
            raise MoecError(
                f"{path}: [tvm] arch {tvm_config['arch']!r} differs from [cuda] arch {cuda.arch!r}"
            )
        tvm_config["arch"] = cuda.arch
        if host_config is None:
            raise MoecError(
                f"{path}: a cuda target needs a [host] table: the board's CPU as a TVM llvm target"
            )
    try:  # a bad [tvm] table is the user's file to fix, not an internal error at codegen time
        target = tvm.target.Target(tvm_config, host=host_config)
    except Exception as err:
        raise MoecError(f"{path}: [tvm] is not a valid TVM target ({first_line(err)})") from err
    if hardware.compute_precisions == DETECT:
        detected = _detected_precisions(target, hardware.arch)
        hardware = dataclasses.replace(hardware, compute_precisions=detected)
    for precision in hardware.compute_precisions:
        computes, needs = _natively_computes(target, hardware.arch, precision)
        if not computes:
            raise MoecError(
                f"{path}: [hardware] compute_precisions lists '{precision}' but {name}'s TVM target cannot "
                f"compute it natively (needs {needs}); remove it or fix [tvm]"
            )
    return TargetSpec(
        name=name,
        description=description,
        path=path,
        tvm_config=tvm_config,
        host_config=host_config,
        hardware=hardware,
        toolchain=toolchain,
        cuda=cuda,
        schedule=load_schedule(schedule_name, hardware, str(path)),
    )


def _read_hardware(table: _Table, gpu: CudaDevice | None = None, cuda: bool = False) -> Hardware:
    """The ``[hardware]`` table; ``"detect"`` reads this machine's CPU, or for a ``cuda`` target its
    GPU ``gpu`` (streaming multiprocessors as cores, a warp as the SIMD width, the shared memory
    per block as L1); a CUDA target that names its GPU instead (``cuda`` without ``gpu``) must
    give those sizes."""
    if cuda and gpu is None:
        for key in ("cores", "l1d_bytes", "l2_bytes", "memory_bandwidth_gbps"):
            if table.data.get(key) == "detect":
                raise MoecError(
                    f"{table.where}: key '{key}' is \"detect\", but this target names its GPU's arch "
                    "instead of detecting it: give the GPU's value"
                )
    arch = table.get("arch", str, detect=platform.machine)
    if arch not in ARCHES:
        raise MoecError(f"{table.where}: key 'arch' must be one of {', '.join(ARCHES)}, got {arch!r}")
    # "detect": decided once the TVM target is built (load_target), from its CPU's features
    detected = table.get("compute_precisions", (list, str)) == "detect"
    precisions = DETECT if detected else table.strings("compute_precisions")
    for precision in () if detected else precisions:
        if precision not in PRECISIONS:
            raise MoecError(
                f"{table.where}: key 'compute_precisions' has unknown precision {precision!r} "
                f"(known: {', '.join(PRECISIONS)})"
            )
    if not detected and "fp32" not in precisions:
        raise MoecError(f"{table.where}: key 'compute_precisions' must include 'fp32'")
    hardware = Hardware(
        arch=arch,
        cores=table.get("cores", int, detect=lambda: gpu.multiprocessors if gpu else os.cpu_count() or 1),
        simd_bits=table.get("simd_bits", int, detect=lambda: 32 * 32 if cuda else _host_simd_bits()),
        cache_line_bytes=table.get("cache_line_bytes", int),
        l1d_bytes=table.get(
            "l1d_bytes",
            int,
            detect=lambda: gpu.max_shared_memory_per_block if gpu else _host_cache_bytes(1, "Data"),
        ),
        l2_bytes=table.get(
            "l2_bytes", int, detect=lambda: gpu.l2_bytes if gpu else _host_cache_bytes(2, "Unified")
        ),
        memory_bandwidth_gbps=float(
            table.get(
                "memory_bandwidth_gbps",
                (int, float),
                detect=lambda: gpu.memory_bandwidth_gbps if gpu else 0.0,
            )
        ),
        compute_precisions=precisions,
    )
    table.check_no_unknown_keys()
    for key, (low, high) in HARDWARE_BOUNDS.items():
        value = getattr(hardware, key)
        if not low <= value <= high:
            raise MoecError(f"{table.where}: key '{key}' must be between {low} and {high}, got {value}")
    return hardware


def _read_toolchain(table: _Table | None, where: str) -> Toolchain:
    if table is None:
        return Toolchain()
    toolchain = Toolchain(
        cxx=table.get("cxx", str),
        package=table.get("package", str),
        emulator=table.strings("emulator", ()),
        emulator_package=table.get("emulator_package", str, ""),
        runtime_wheels=table.get("runtime_wheels", str, ""),
    )
    table.check_no_unknown_keys()
    if toolchain.emulator and not toolchain.emulator_package:
        raise MoecError(f"{where} [toolchain]: key 'emulator_package' is needed with 'emulator'")
    return toolchain


def load_schedule(name: str, hardware: Hardware, where: str = "") -> CpuSchedule | GpuSchedule:
    """The kernel schedule table ``schedules/<name>.toml`` (or a ``.toml`` path relative to the
    target file ``where``) resolved for ``hardware``.

    The table's ``kind`` picks the schedule class; its other keys are that class's fields.
    ``lanes = "simd"`` means as many float32 lanes as the target's SIMD registers hold.
    """
    if name.endswith(".toml"):
        path: Traversable = Path(where).parent / name
        if not path.is_file():
            raise MoecError(f"{where}: schedule file {path} not found")
    else:
        bundled = _bundled_tomls(SCHEDULES_PACKAGE)
        if name not in bundled:
            known = ", ".join(sorted(bundled))
            raise MoecError(f"{where}: schedule '{name}' is not a bundled schedule (known: {known})")
        path = bundled[name]
    try:
        table = _Table(tomllib.loads(path.read_text()), str(path))
    except tomllib.TOMLDecodeError as err:
        raise MoecError(f"{path}: not valid TOML ({err})") from err
    kind = table.get("kind", str)
    if kind not in SCHEDULE_KINDS:
        raise MoecError(f"{path}: key 'kind' must be one of {', '.join(SCHEDULE_KINDS)}, got {kind!r}")
    cls = SCHEDULE_KINDS[kind]
    if table.data.get("lanes") == "simd":
        table.data["lanes"] = hardware.simd_bits // 32
    values = {field.name: table.get(field.name, int, field.default) for field in dataclasses.fields(cls)}
    table.check_no_unknown_keys()
    for key, value in values.items():
        if value <= 0 or (key in POWER_OF_TWO_FIELDS and value & (value - 1)):
            rule = "a positive power of two" if key in POWER_OF_TWO_FIELDS else "positive"
            raise MoecError(f"{path}: key '{key}' must be {rule}, got {value}")
    return cls(**values)
