"""Target files: which machine to compile for, and the facts about it scheduling needs.

A target is a TOML file (bundled ones live in ``targets/``; ``--target`` also takes a path).
``"detect"`` values are read from the machine moec runs on.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

import tvm

from moec.errors import MoecError
from moec.schedule import CpuSchedule

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TARGETS_DIR = PROJECT_ROOT / "targets"
SCHEDULES_DIR = PROJECT_ROOT / "schedules"


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A resolved target: the TVM target plus the hardware facts and kernel schedule."""

    name: str
    description: str
    path: Path
    tvm_config: dict[str, Any]
    cores: int
    simd_bits: int
    cache_line_bytes: int
    schedule: CpuSchedule

    @property
    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.tvm_config)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "tvm": self.tvm_config,
            "cores": self.cores,
            "simd_bits": self.simd_bits,
            "cache_line_bytes": self.cache_line_bytes,
            "schedule": dataclasses.asdict(self.schedule),
        }


def bundled_targets() -> list[str]:
    """Names of the target files shipped with moec."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


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


def _require(table: dict, key: str, kind: type, where: str):
    if key not in table:
        raise MoecError(f"{where}: missing key '{key}'")
    value = table[key]
    if not isinstance(value, kind):
        raise MoecError(f"{where}: key '{key}' must be a {kind.__name__}, got {value!r}")
    return value


def load_target(name_or_path: str) -> TargetSpec:
    """Resolve ``--target``: a bundled name or the path of a user's TOML file."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") or os.sep in name_or_path):
        path = TARGETS_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise MoecError(
                f"unknown target '{name_or_path}'; valid targets: "
                f"{', '.join(bundled_targets())} (or the path of a .toml target file)"
            )
    if not path.exists():
        raise MoecError(f"{path}: target file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise MoecError(f"{path}: not valid TOML ({err})") from err
    where = str(path)
    tvm_table = dict(_require(data, "tvm", dict, where))
    hardware = _require(data, "hardware", dict, where)
    if tvm_table.get("mcpu") == "detect":
        tvm_table["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    cores = hardware.get("cores", "detect")
    cores = (os.cpu_count() or 1) if cores == "detect" else _require(hardware, "cores", int, where)
    simd = hardware.get("simd_bits", "detect")
    simd = _host_simd_bits() if simd == "detect" else _require(hardware, "simd_bits", int, where)
    tvm_table.setdefault("num-cores", cores)
    _require(tvm_table, "kind", str, f"{where} [tvm]")
    try:  # a bad [tvm] table is the user's file to fix, not an internal error at codegen time
        tvm.target.Target(tvm_table)
    except Exception as err:
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MoecError(f"{where}: [tvm] is not a valid TVM target ({cause})") from err
    schedule = load_schedule(_require(data, "schedule", str, where), simd)
    return TargetSpec(
        name=_require(data, "name", str, where),
        description=data.get("description", ""),
        path=path,
        tvm_config=tvm_table,
        cores=cores,
        simd_bits=simd,
        cache_line_bytes=_require(hardware, "cache_line_bytes", int, where),
        schedule=schedule,
    )


def load_schedule(name: str, simd_bits: int) -> CpuSchedule:
    """The kernel schedule table ``schedules/<name>.toml`` resolved for a SIMD width."""
    path = SCHEDULES_DIR / f"{name}.toml"
    if not path.exists():
        raise MoecError(f"{path}: schedule file not found")
    data = tomllib.loads(path.read_text())
    lanes = data.get("lanes", "simd")
    lanes = simd_bits // 32 if lanes == "simd" else int(lanes)
    return CpuSchedule(
        lanes=lanes, rows_per_task=int(data["rows_per_task"]), token_block=int(data["token_block"])
    )
