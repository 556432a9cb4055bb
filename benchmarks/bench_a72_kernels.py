#!/usr/bin/env python
"""The expert and linear kernels as the Cortex-A72 build compiles them: instruction counts of
the hot loop and its throughput by LLVM's machine-code analyser, for the output-stationary panel
kernels against the row-dot kernels they replaced.

What: the Mixtral-style block of ``bench_mixtral_block.py`` (hidden 512, FFN 1024, 8 SwiGLU
experts, top-2, fp32) lowered for the ``cortex-a72`` target; each of its CPU kernels built on
its own for the A72 (``tvm.tirx.build``: AArch64 assembly from LLVM) in two forms: *panel* (what
moec compiles: weights packed in panels of output columns, a block of tokens × a panel of
output vectors accumulated in registers, one broadcast activation per multiply-add row) and
*row* (the same config without a panel, the kernel before the rewrite: one dot product per
weight row and token, accumulated in vectors along the row, folded horizontally at its end).

Why: there is no A72 board here and qemu does not model timing; the issue asks for instruction
counts of the A72 build. The hot loop (the innermost loop with the most ``fmla``) is where the
kernel spends its time on a large weight: its instruction mix says how much of the issue width
goes to arithmetic, and ``llvm-mca -mcpu=cortex-a72`` (LLVM's scheduling model of the core)
gives its steady-state cycles per iteration, hence multiply-add lanes per cycle, against the
A72's peak of one 128-bit ``fmla`` (4 fp32 lanes) per cycle. The row form also folds each dot
horizontally after its loop (outside the hot loop, not counted here: the numbers flatter it).

Run from the repository root (seconds; needs llvm-mca: Debian package llvm)::

    .venv/bin/python benchmarks/bench_a72_kernels.py            # updates BENCHMARKS.md
    .venv/bin/python benchmarks/bench_a72_kernels.py --no-markdown
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import git_revision, log, write_markdown  # noqa: E402

TARGET = "cortex-a72"
BRANCH = re.compile(r"^(b(\.\w+)?|cbn?z|tbn?z)\s+.*?([.\w$]+)$")
LABEL = re.compile(r"^([.\w$]+):")


@dataclass(frozen=True)
class HotLoop:
    """The innermost loop of a kernel with the most multiply-adds."""

    instructions: int
    fmla: int
    loads: int
    cycles: float  # per iteration, steady state, llvm-mca

    @property
    def lanes_per_cycle(self) -> float:
        """fp32 multiply-add lanes per cycle (4 per 128-bit ``fmla``; the A72's peak is 4)."""
        return 4 * self.fmla / self.cycles


def instructions(assembly: str) -> tuple[list[str], dict[str, int]]:
    """The instructions of ``assembly`` in order, and each label's index among them."""
    body: list[str] = []
    labels: dict[str, int] = {}
    for line in assembly.splitlines():
        text = line.split("//")[0].strip()
        if not text:
            continue
        label = LABEL.match(text)
        if label:
            labels[label.group(1)] = len(body)
        elif not text.startswith("."):
            body.append(text)
    return body, labels


def hot_loop(assembly: str, workdir: Path) -> HotLoop:
    """The innermost loop (a backward branch's range containing no other) with the most
    ``fmla``, measured by ``llvm-mca`` for the Cortex-A72."""
    body, labels = instructions(assembly)
    loops = []
    for end, text in enumerate(body):
        branch = BRANCH.match(text)
        if branch and labels.get(branch.group(3), end + 1) <= end:
            loops.append((labels[branch.group(3)], end))
    innermost = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
    start, end = max(innermost, key=lambda r: sum(t.startswith("fmla") for t in body[r[0] : r[1] + 1]))
    loop = body[start : end + 1]
    source = workdir / "loop.s"
    source.write_text("\n".join(loop) + "\n")
    iterations = 1000
    report = subprocess.run(
        ["llvm-mca", "-mtriple=aarch64-linux-gnu", f"-mcpu={TARGET}", f"-iterations={iterations}", source],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", report).group(1)) / iterations
    return HotLoop(
        instructions=len(loop),
        fmla=sum(t.startswith("fmla") for t in loop),
        loads=sum(t.startswith(("ldr", "ld1", "ldp", "ldur")) for t in loop),
        cycles=cycles,
    )


def kernels(workdir: Path) -> dict[str, object]:
    """The block's CPU kernels for the A72 schedule, by function name (kernel specs built in
    the schedule phase)."""
    from bench_mixtral_block import build_models

    from moec.compiler.compile import lower_model
    from moec.frontend.importer import import_model
    from moec.frontend.loader import load_model
    from moec.kernels import kernel_kind
    from moec.targets import load_target

    build_models(workdir)
    mod, _weights = lower_model(import_model(load_model(workdir / "standard.onnx")), load_target(TARGET))
    wanted = ("expert_up", "expert_down", "linear")
    return {gv.name_hint: f for gv, f in mod.functions_items() if kernel_kind(f) in wanted}


def measure(workdir: Path) -> list[tuple[str, str, HotLoop]]:
    """``(kernel, form, hot loop)`` for every expert and linear kernel of the block."""
    import tvm

    from moec.kernels import kernel_config, make_kernel
    from moec.kernels.config import replace
    from moec.targets import load_target

    target = load_target(TARGET)
    rows = []
    for name, func in sorted(kernels(workdir).items()):
        config = kernel_config(func)
        forms = {"panel": func}
        if getattr(config, "panel", None) is not None and config.kind != "linear":
            forms["row"] = make_kernel(replace(config, panel=None), target.schedule)
        for form, kernel in forms.items():
            module = tvm.IRModule({name: kernel.with_attr("global_symbol", name)})
            assembly = tvm.tirx.build(module, target=target.tvm_target).inspect_source("asm")
            rows.append((name, form, hot_loop(assembly, workdir)))
            log(f"{name} {form}: {rows[-1][2]}")
    return rows


def report(rows: list[tuple[str, str, HotLoop]], wall_s: float, argv: list[str]) -> str:
    """The Markdown section."""
    from moec.targets import load_target

    schedule = load_target(TARGET).schedule
    lines = [
        "## Cortex-A72 build of the kernels: hot-loop instruction counts (`benchmarks/bench_a72_kernels.py`)",
        "",
        f"Command (repo root): `{' '.join(['.venv/bin/python', 'benchmarks/bench_a72_kernels.py', *argv])}`"
        "  ",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_revision()}; "
        f"{shutil.which('llvm-mca')} ({_mca_version()}); total wall time {wall_s:.0f} s.",
        "",
        f"Kernels of the benchmark block (hidden 512, FFN 1024, 8 SwiGLU experts, fp32) built for "
        f"`{TARGET}` (NEON, 4 fp32 lanes; schedule: token block {schedule.token_block}, "
        f"{schedule.panel_vectors} vectors per panel, {schedule.accumulators} accumulators per row dot). "
        "*panel*: what moec compiles (output-stationary over packed weight panels); *row*: the same "
        "config without a panel (one dot per weight row and token, folded horizontally after the loop, "
        "which this count leaves out). Hot loop = the innermost loop with the most `fmla`; cycles per "
        "iteration by `llvm-mca -mcpu=cortex-a72` (steady state, data in L1: an upper bound on speed); "
        "lanes/cycle = 4 × `fmla` ÷ cycles, against the core's peak of 4 (one 128-bit `fmla` per cycle).",
        "",
        "| kernel | form | instructions | fmla | loads | other | cycles / iteration | fp32 FMA lanes / cycle "
        "| % of peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, form, loop in rows:
        other = loop.instructions - loop.fmla - loop.loads
        lines.append(
            f"| `{name}` | {form} | {loop.instructions} | {loop.fmla} | {loop.loads} | {other} | "
            f"{loop.cycles:.1f} | {loop.lanes_per_cycle:.2f} | {100 * loop.lanes_per_cycle / 4:.0f} % |"
        )
    return "\n".join(lines) + "\n"


def _mca_version() -> str:
    out = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"LLVM version ([\d.]+)", out)
    return f"LLVM {found.group(1)}" if found else "LLVM"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-markdown", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    if shutil.which("llvm-mca") is None:
        raise SystemExit("llvm-mca: not installed; install it with apt-get install llvm")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="moec-a72-") as tmp:
        rows = measure(Path(tmp))
    section = report(rows, time.time() - start, [a for a in argv if a != "--no-markdown"])
    print(section)
    if not args.no_markdown:
        write_markdown(REPO / "BENCHMARKS.md", "bench_a72_kernels", section)
        log("updated BENCHMARKS.md")


if __name__ == "__main__":
    main()
