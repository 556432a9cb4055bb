"""Target files: the bundled boards, a user's own file, and NEON code for the Cortex-A72."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm

from moec.compiler.compile import compile_model, lower_model
from moec.errors import MoecError
from moec.frontend.importer import import_model
from moec.frontend.loader import load_model
from moec.kernels import kernel_kind, make_kernel
from moec.kernels.config import config_from_dict
from moec.options import CompileOptions
from moec.reference.evaluator import run_reference
from moec.runtime.session import ArtifactSession
from moec.schedule import CpuSchedule, GpuSchedule
from moec.targets import bundled_targets, load_target
from tests.helpers import EXAMPLE_MODEL, FP32_ATOL, assert_close, tokens_input
from tests.zoo.standard import build_dense_onehot_moe


def test_bundled_targets_are_the_documented_boards() -> None:
    assert {"host", "cortex-a72", "cortex-a76", "orin"} <= set(bundled_targets())
    a72 = load_target("cortex-a72")
    assert a72.tvm_target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert (a72.hardware.arch, a72.hardware.cores, a72.hardware.simd_bits) == ("aarch64", 4, 128)
    hw = a72.hardware
    assert (hw.cache_line_bytes, hw.l1d_bytes, hw.l2_bytes) == (64, 32768, 1 << 20)
    assert a72.hardware.compute_precisions == ("fp32",), "the A72 has no FP16 arithmetic nor dot product"
    assert a72.schedule == CpuSchedule(lanes=4, rows_per_task=128, token_block=6, accumulators=2)
    assert not a72.runs_here or platform.machine() == "aarch64"

    orin = load_target("orin")
    assert orin.tvm_target.kind.name == "cuda" and str(orin.tvm_target.attrs["arch"]) == "sm_87"
    assert orin.tvm_target.host.attrs["mtriple"] == "aarch64-linux-gnu"
    assert orin.cuda is not None and orin.cuda.arch == "sm_87"
    assert orin.hardware.cache_line_bytes == 128
    assert isinstance(orin.schedule, GpuSchedule) and not orin.runs_here

    a76 = load_target("cortex-a76")
    assert set(a76.hardware.compute_precisions) == {"fp32", "fp16", "int8"}
    host = load_target("host")
    assert host.runs_here and host.hardware.arch == platform.machine()


def _a72_kernel_assembly(kind: str) -> str:
    """Assembly of the ``kind`` kernel exactly as the cortex-a72 pipeline scheduled it."""
    target = load_target("cortex-a72")
    mod, _ = lower_model(import_model(load_model(EXAMPLE_MODEL)), target)
    kernels = [func for _, func in mod.functions_items() if kernel_kind(func) == kind]
    assert kernels, f"no {kind} kernel in the lowered module"
    lib = tvm.compile(
        tvm.IRModule({kind: kernels[0].with_attr("global_symbol", kind)}), target=target.tvm_target
    )
    return lib.mod.inspect_source("s")


@pytest.mark.parametrize("kind", ["expert_up", "expert_down"])
def test_a72_expert_kernels_use_neon_vector_fma(kind: str) -> None:
    asm = _a72_kernel_assembly(kind)
    vector_fma = len(re.findall(r"\bfmla\s+v\d+\.4s", asm)) + len(re.findall(r"\bfmul\s+v\d+\.4s", asm))
    scalar_fma = len(re.findall(r"\bfmadd\s+s\d+", asm))
    assert vector_fma >= 8, f"{kind}: only {vector_fma} NEON .4s multiply(-add)s"
    assert vector_fma > 4 * scalar_fma, f"{kind}: {vector_fma} vector vs {scalar_fma} scalar fmadd"


def test_a72_fp16_weights_are_widened_with_neon_not_a_libcall() -> None:
    """The A72 stores fp16 but computes fp32: weights convert with vector fcvtl, not __extendhfsf2."""
    target = load_target("cortex-a72")
    config = {"num_experts": 4, "hidden": 64, "ffn": 32, "top_k": 2, "formats": ["fp16"] * 4}
    kernel = make_kernel(config_from_dict("expert_down", config), target.schedule)
    kernel = kernel.with_attr("global_symbol", "expert_down")
    asm = tvm.compile(tvm.IRModule({"expert_down": kernel}), target=target.tvm_target).mod.inspect_source("s")
    assert len(re.findall(r"\bfcvtl2?\s+v\d+\.4s, v\d+\.[48]h", asm)) >= 4
    assert len(re.findall(r"\bfmla\s+v\d+\.4s", asm)) >= 4
    assert not re.search(r"\bbl\s+__extendhfsf2", asm), "fp16 weights widened by a library call"


@pytest.mark.parametrize("kind", ["expert_up", "expert_down"])
def test_a72_int8_weights_are_widened_and_scaled_with_neon(kind: str) -> None:
    """W8A32 on the A72 (no dot-product instructions): the panel kernels convert int8 weights to
    fp32 four lanes at a time (``scvtf v.4s``, LLVM placing each byte with ``tbl``) and multiply
    in NEON fp32; no scalar conversions or FMAs in the hot loop."""
    target = load_target("cortex-a72")
    config = {"num_experts": 4, "hidden": 64, "ffn": 64, "top_k": 2, "formats": ["int8"] * 4, "panel": 8}
    if kind == "expert_up":
        config |= {"activation": "silu", "gated": True}
    kernel = make_kernel(config_from_dict(kind, config), target.schedule).with_attr("global_symbol", kind)
    asm = tvm.compile(tvm.IRModule({kind: kernel}), target=target.tvm_target).mod.inspect_source("s")
    assert len(re.findall(r"\bscvtf\s+v\d+\.4s", asm)) >= 8
    assert len(re.findall(r"\bfmla\s+v\d+\.4s", asm)) >= 32
    assert not re.search(r"\b(scvtf|fmadd)\s+s\d+", asm), "scalar int8 conversion or FMA"


def _expert_assembly(target_name: str, precision: str) -> str:
    """Assembly of the example's expert kernels compiled for ``target_name`` with every expert
    stored as ``precision``."""
    target = load_target(target_name)
    options = CompileOptions(target=target_name, precision=precision)
    mod, _ = lower_model(import_model(load_model(EXAMPLE_MODEL)), target, options)
    experts = ("expert_up", "expert_down")
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if kernel_kind(f) in experts}
    assert len(kernels) == 2, sorted(kernels)
    module = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in kernels.items()})
    return tvm.compile(module, target=target.tvm_target).mod.inspect_source("s")


def test_fp16_experts_multiply_in_fp16_on_the_a76_only() -> None:
    """FP16 arithmetic where the core has it: the A76 (+fullfp16) build multiplies fp16 experts
    with FP16 vector FMAs (``fmla v.8h``: 8 lanes); the A72 build widens them (``fcvtl``) and
    multiplies in fp32, with no FP16 arithmetic at all."""
    a76, a72 = _expert_assembly("cortex-a76", "fp16"), _expert_assembly("cortex-a72", "fp16")
    assert len(re.findall(r"\bfmla\s+v\d+\.8h", a76)) >= 16
    assert not re.search(r"\bfmla\s+v\d+\.[48]h", a72)
    assert len(re.findall(r"\bfcvtl2?\s+v\d+\.4s, v\d+\.[48]h", a72)) >= 4


def test_int8_dot_experts_multiply_with_sdot_on_the_a76_only() -> None:
    """W8A8 where the core has INT8 dot products: the A76 (+dotprod) build of int8-dot experts
    runs ``sdot v.4s, v.16b, v.16b``; the weight-only int8 builds, on the A76 as on the A72, have
    no ``sdot`` at all (they widen and multiply in fp32), and the A72 refuses int8-dot (its test
    is in the CLI tests)."""
    a76 = _expert_assembly("cortex-a76", "int8-dot")
    assert len(re.findall(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", a76)) >= 16
    for board in ("cortex-a76", "cortex-a72"):
        assert not re.search(r"\bsdot\b", _expert_assembly(board, "int8")), board


@pytest.mark.parametrize(
    ("mcpu", "bits", "register"),
    [
        ("cascadelake", 512, "zmm"),
        ("alderlake", 256, "ymm"),
        pytest.param("cascadelake", 128, "xmm", marks=pytest.mark.slow),
    ],
)
def test_int8_dot_kernels_use_vnni_on_x86(tmp_path: Path, mcpu: str, bits: int, register: str) -> None:
    """x86 int8-dot kernels use ``vpdpbusd`` at the board's SIMD width: AVX-512 VNNI's zmm form
    (Cascade Lake), AVX-VNNI's ymm form (Alder Lake, no AVX-512), the xmm form for 128-bit lanes."""
    path = _board_with(tmp_path, "x86_64", f'mcpu = "{mcpu}"', '"detect"')
    path.write_text(path.read_text().replace("simd_bits = 128", f"simd_bits = {bits}"))
    target = load_target(str(path))
    assert target.int8_dot == "vnni"
    config = {"num_experts": 4, "hidden": 64, "ffn": 64, "top_k": 2, "formats": ["int8-dot"] * 4}
    config |= {"panel": target.schedule.panel(64), "int8_dot": "vnni", "activation": "silu", "gated": True}
    kernel = make_kernel(config_from_dict("expert_up", config), target.schedule).with_attr(
        "global_symbol", "k"
    )
    asm = tvm.compile(tvm.IRModule({"k": kernel}), target=target.tvm_target).mod.inspect_source("s")
    assert len(re.findall(rf"\bvpdpbusd\s+%{register}\d+, %{register}\d+, %{register}\d+", asm)) >= 16


def _user_target(tmp_path: Path) -> Path:
    """A board file written the way the cortex-a76 example tells a user to, for this machine."""
    (tmp_path / "narrow.toml").write_text(
        'kind = "cpu"\nlanes = 4\nrows_per_task = 3\ntoken_block = 2\naccumulators = 1\n'
    )
    text = f"""
name = "my-board"
description = "a user's board: this CPU with a narrow schedule of its own"
schedule = "narrow.toml"

[tvm]
kind = "llvm"
mcpu = "{tvm.target.codegen.llvm_get_system_cpu()}"

[hardware]
arch = "{platform.machine()}"
cores = 2
simd_bits = 128
cache_line_bytes = 64
l1d_bytes = 32768
l2_bytes = 1048576
memory_bandwidth_gbps = 10
compute_precisions = ["fp32"]
"""
    path = tmp_path / "my-board.toml"
    path.write_text(text)
    return path


def _board_with(tmp_path: Path, arch: str, tvm_table: str, precisions: str) -> Path:
    """A CPU board file with the given ``[tvm]`` lines and ``compute_precisions`` value."""
    path = tmp_path / "board.toml"
    path.write_text(
        f'name = "board"\nschedule = "cpu"\n[tvm]\nkind = "llvm"\n{tvm_table}\n[hardware]\narch = "{arch}"\n'
        "cores = 4\nsimd_bits = 128\ncache_line_bytes = 64\nl1d_bytes = 32768\nl2_bytes = 1048576\n"
        f"memory_bandwidth_gbps = 10\ncompute_precisions = {precisions}\n"
    )
    return path


# What each CPU computes natively, from the vendors' documentation: VNNI (INT8 dot products)
# since Cascade Lake and Zen 4, AVX-512 FP16 since Sapphire Rapids (not on Zen 4), Armv8.2
# dot product and FP16 on the Cortex-A76, neither on the A72.
NAMED_CPUS = {
    ("x86_64", 'mcpu = "skylake-avx512"'): ("fp32",),
    ("x86_64", 'mcpu = "cascadelake"'): ("fp32", "int8"),
    ("x86_64", 'mcpu = "znver4"'): ("fp32", "int8"),
    ("x86_64", 'mcpu = "sapphirerapids"'): ("fp32", "fp16", "int8"),
    ("aarch64", 'mtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a72"'): ("fp32",),
    ("aarch64", 'mtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a76"'): ("fp32", "fp16", "int8"),
    ("aarch64", 'mtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a72"\nmattr = ["+dotprod"]'): ("fp32", "int8"),
}


@pytest.mark.parametrize("board", sorted(NAMED_CPUS), ids=lambda board: board[1].split("mcpu = ")[-1])
def test_detected_compute_precisions_of_named_cpus(tmp_path: Path, board: tuple[str, str]) -> None:
    arch, tvm_table = board
    spec = load_target(str(_board_with(tmp_path, arch, tvm_table, '"detect"')))
    assert spec.hardware.compute_precisions == NAMED_CPUS[board]


def test_host_reports_int8_arithmetic_where_the_cpu_has_vnni() -> None:
    """The host target detects its precisions; /proc/cpuinfo (the kernel's view) says whether
    this CPU has AVX-512 VNNI or AVX-VNNI."""
    if platform.machine() != "x86_64":
        pytest.skip("an x86-64 check")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    precisions = load_target("host").hardware.compute_precisions
    assert precisions[0] == "fp32"
    assert ("int8" in precisions) == bool({"avx512_vnni", "avx_vnni"} & flags)
    assert ("fp16" in precisions) == ("avx512_fp16" in flags)


def test_a_listed_precision_the_cpu_lacks_is_refused(tmp_path: Path) -> None:
    path = _board_with(tmp_path, "x86_64", 'mcpu = "skylake-avx512"', '["fp32", "int8"]')
    with pytest.raises(MoecError, match=r"lists 'int8'.*\+avx512vnni"):
        load_target(str(path))


def test_user_target_file_compiles_and_matches_reference(tmp_path: Path) -> None:
    target_file = _user_target(tmp_path)
    spec = load_target(str(target_file))
    assert spec.schedule == CpuSchedule(lanes=4, rows_per_task=3, token_block=2, accumulators=1)
    model = build_dense_onehot_moe(hidden=16, inter=24, experts=6, k=2, activation="swiglu")
    onnx.save(model, tmp_path / "model.onnx")
    compile_model(tmp_path / "model.onnx", tmp_path / "out", CompileOptions(target=str(target_file)))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["target"]["name"] == "my-board"
    assert manifest["target"]["schedule"]["rows_per_task"] == 3
    session = ArtifactSession(tmp_path / "out")
    for tokens in (1, 7):
        feeds = {"x": tokens_input(tokens, 16)}
        expected = run_reference(model, feeds)
        actual = session.run(feeds)
        for name, value in expected.items():
            assert_close(actual[name], value, FP32_ATOL, f"{name} at {tokens} tokens")
    assert np.isfinite(actual["y"]).all()
