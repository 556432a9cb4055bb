"""What checking an artifact's files costs before it runs: SHA-256 of every byte vs sizes only.

Every runtime checks the artifact's files against the sizes and SHA-256 its manifest records
(``moec.artifact.check_files``, and ``moec-runner``'s own SHA-256) before loading them;
``--skip-hash-check`` keeps only the sizes. This measures, on an artifact whose weights file is
``--mb`` MiB (an embedding table: a one-node model, so the weights dominate), interleaved:

- the Python check alone, hashes on and off, with the weights in the page cache (warm) and
  evicted first (cold: ``posix_fadvise(DONTNEED)``, as after a reboot or on a board's first run);
- ``moec-runner``'s whole run of one call (start, check, map, run, exit), with and without
  ``--skip-hash-check``, warm and cold.

Reproduce: ``.venv/bin/python benchmarks/bench_integrity.py --markdown BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import cpu_model, git_revision, log, publish

from moec.artifact import WEIGHTS, check_files, read_manifest
from moec.compiler.compile import compile_model
from moec.runtime.native import build_runner
from tests.helpers import embedding_model


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (clean pages of a regular file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as stream:
        while stream.read(1 << 24):
            pass


def time_cells(
    cells: dict[str, Callable[[], None]], prepare: dict[str, Callable[[], None]], reps: int
) -> dict:
    """Median seconds of each cell, cells interleaved rep by rep, each after its ``prepare``."""
    times: dict[str, list[float]] = {name: [] for name in cells}
    for _ in range(reps):
        for name, cell in cells.items():
            prepare[name]()
            start = time.perf_counter()
            cell()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="size of the weights file in MiB")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per cell")
    parser.add_argument("--markdown", type=Path, help="put the result in this file's bench_integrity section")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as scratch:
        work = Path(scratch)
        rows = args.mb * 1024 * 1024 // (4 * 4)
        log(f"compiling an embedding of {rows} rows ({args.mb} MiB of weights)")
        artifact = compile_model(embedding_model(work / "m.onnx", vocab=rows), work / "art")
        manifest = read_manifest(artifact)
        weights = artifact / WEIGHTS
        size = weights.stat().st_size
        runner = build_runner(work / "moec-runner")
        command = [str(runner), str(artifact), "--random-inputs", "--tokens", "1"]

        def run(*extra: str) -> Callable[[], None]:
            return lambda: subprocess.run([*command, *extra], check=True, capture_output=True)

        cells = {
            "python check, SHA-256": lambda: check_files(artifact, manifest, hashes=True),
            "python check, sizes only": lambda: check_files(artifact, manifest, hashes=False),
            "moec-runner, SHA-256": run(),
            "moec-runner, sizes only (--skip-hash-check)": run("--skip-hash-check"),
        }
        results = {}
        for mode, prepare in (("warm", lambda: warm(weights)), ("cold", lambda: evict(weights))):
            log(f"timing {mode}, {args.reps} reps")
            results[mode] = time_cells(cells, dict.fromkeys(cells, prepare), args.reps)

    warm_s, cold_s = results["warm"], results["cold"]
    python_rate = size / warm_s["python check, SHA-256"] / 1e9
    runner_hash_s = warm_s["moec-runner, SHA-256"] - warm_s["moec-runner, sizes only (--skip-hash-check)"]
    lines = [
        "## Checking an artifact before it runs: SHA-256 vs sizes only (`benchmarks/bench_integrity.py`)",
        "",
        f"`.venv/bin/python benchmarks/bench_integrity.py --mb {args.mb}` on {cpu_model()}, "
        f"{os.cpu_count()} cores, moec {git_revision()}, Python {sys.version.split()[0]}. Weights file "
        f"{size / 2**20:.0f} MiB; median of {args.reps} interleaved runs per cell; cold = the weights "
        "evicted from the page cache first. The runner's rows are its whole process (start, check, map, "
        "one call, exit).",
        "",
        "| what | warm (ms) | cold (ms) |",
        "|---|---|---|",
        *(f"| {name} | {warm_s[name] * 1e3:.1f} | {cold_s[name] * 1e3:.1f} |" for name in cells),
        "",
        f"SHA-256 throughput, warm: Python's hashlib {python_rate:.2f} GB/s; moec-runner's own "
        f"{size / runner_hash_s / 1e9:.2f} GB/s (its two rows' difference).",
    ]
    publish("\n".join(lines), args.markdown, "bench_integrity")


if __name__ == "__main__":
    main()
