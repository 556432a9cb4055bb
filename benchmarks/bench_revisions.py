#!/usr/bin/env python
"""The same MoE block compiled by two revisions of moec, timed side by side: did a change slow it?

What: the Mixtral-style block of ``bench_mixtral_block.py`` (hidden 512, FFN 1024, 8 SwiGLU
experts, top-2, fp32) compiled for the ``host`` target by moec at a *base* revision (a git
commit, checked out into a temporary worktree) and at the *head* (the working tree as it is,
uncommitted changes included), each through its own ``moec compile`` command line.

Why: a kernel rewrite should be judged against the kernels it replaces on the same machine in
the same process: absolute numbers in BENCHMARKS.md move from machine to machine (these VMs
differ between sessions by 2x in DRAM bandwidth), a ratio measured interleaved does not.

How: both artifacts are loaded with moec's runtime (``ArtifactSession``: the artifact format
both revisions write; each call through the entry point the runtime picks for it) into
``--procs`` processes per thread count (TVM reads ``TVM_NUM_THREADS`` once; where an artifact's
weights land in memory moves its cold time by several per cent, so samples of several processes
are pooled). Both outputs are
checked against the float64 numpy block first. Then, per token count, cold (cache flushed
before each call, as in ``bench_mixtral_block.py``) and warm calls alternate between the two
artifacts, the order rotated every repetition. Reported: each one's median and head ÷ base
(< 1: head is faster).

Run from the repository root (about 4 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_revisions.py --base ac84617          # updates BENCHMARKS.md
    .venv/bin/python benchmarks/bench_revisions.py --base HEAD~3 --no-markdown --reps 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from bench_mixtral_block import (
    TOLERANCE,
    Evictor,
    bench_input,
    build_models,
    default_evict_mb,
    numpy_block,
    time_interleaved,
)
from common import (
    REPO,
    MoecModel,
    compile_at,
    cpu_model,
    git,
    git_revision,
    log,
    revision_tree,
    write_markdown,
)

HEAD = "head"
BASE = "base"
MODES = ("cold", "warm")


def run_child(args: argparse.Namespace) -> None:
    """Time both artifacts at this process's thread count; write the samples as JSON."""
    threads = int(args.threads)
    workdir = Path(args.workdir)
    weights = dict(np.load(workdir / "weights.npz"))
    artifacts = {name: MoecModel(workdir / name) for name in (BASE, HEAD)}
    pool = ThreadPoolExecutor(threads)
    evict = Evictor(args.evict_mb, threads, pool)
    result: dict[str, Any] = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = bench_input(tokens)
        reference, _ = numpy_block(x, weights)
        made = {name: artifact.make(x) for name, artifact in artifacts.items()}
        for name, (_, output) in made.items():
            error = float(np.abs(output() - reference).max())
            if not error <= TOLERANCE:
                raise SystemExit(f"{name} differs from the numpy block by {error:.2e} at {tokens} tokens")
        calls = {name: call for name, (call, _) in made.items()}
        settle_s = 0.1 if threads > 1 else 0.005
        result[str(tokens)] = {
            mode: time_interleaved(calls, mode, args.reps, 1, evict, settle_s) for mode in MODES
        }
        log(f"threads={threads} tokens={tokens}: timed")
    Path(args.json_out).write_text(json.dumps(result))


def merge(into: dict[str, Any], child: dict[str, Any]) -> None:
    """Pool one child's samples (``tokens → mode → artifact → seconds``) into ``into``."""
    for tokens, by_mode in child.items():
        for mode, by_name in by_mode.items():
            for name, seconds in by_name.items():
                into.setdefault(tokens, {}).setdefault(mode, {}).setdefault(name, []).extend(seconds)


def report(samples: dict[int, dict[str, Any]], facts: dict[str, str]) -> str:
    """The Markdown section: one row per thread count, token count and cache state."""
    lines = [
        "## Two revisions of moec on one block (`benchmarks/bench_revisions.py`)",
        "",
        f"Command (repo root): `{facts['command']}`  ",
        f"Run {facts['when']}, {facts['cpu']}; total wall time {facts['wall']}.",
        "",
        f"Block: `bench_mixtral_block.py`'s (hidden 512, FFN 1024, 8 SwiGLU experts, top-2, fp32), "
        f"compiled for `host` by moec at **base** {facts['base']} and at **head** {facts['head']}, "
        f"both checked against the float64 numpy block, then timed interleaved, {facts['procs']} "
        f"processes per thread count, {facts['reps']} calls each per case and process, pooled (cold = "
        f"cache flushed before every call). Loading the same artifact twice moved its cold 1-token "
        f"median by up to ±8 % here (where its weights land in memory), hence several processes.",
        "",
        "| threads | tokens | cache | base ms (median) | head ms (median) | head ÷ base |",
        "|---|---|---|---|---|---|",
    ]
    for threads, by_tokens in samples.items():
        for tokens, by_mode in by_tokens.items():
            for mode in MODES:
                base = float(np.median(by_mode[mode][BASE])) * 1e3
                head = float(np.median(by_mode[mode][HEAD])) * 1e3
                ratio = head / base
                lines.append(f"| {threads} | {tokens} | {mode} | {base:.3f} | {head:.3f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def run_parent(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Check out the base, compile both, run one child per thread count, report."""
    wall = time.perf_counter()
    base_commit = git("rev-parse", "--short", args.base)
    samples: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="moec-revisions-") as tmp:
        workdir = Path(tmp)
        build_models(workdir)
        with revision_tree(base_commit, workdir / "base-tree") as tree:
            log(f"compiling the block at base {base_commit} and at head {git_revision()}")
            compile_at(tree, workdir / "standard.onnx", workdir / BASE)
            compile_at(REPO, workdir / "standard.onnx", workdir / HEAD)
        for proc in range(args.procs):
            for threads in (int(n) for n in args.threads.split(",")):
                json_out = workdir / f"threads{threads}_proc{proc}.json"
                env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
                child = [sys.executable, __file__, "--child", "--threads", str(threads), "--workdir", tmp]
                child += ["--json-out", str(json_out), "--tokens", args.tokens, "--reps", str(args.reps)]
                subprocess.run([*child, "--evict-mb", str(args.evict_mb)], check=True, env=env)
                merge(samples.setdefault(threads, {}), json.loads(json_out.read_text()))
    facts = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_revisions.py", *argv]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "wall": f"{time.perf_counter() - wall:.0f} s",
        "base": f"`{base_commit}`",
        "head": f"`{git_revision()}`",
        "reps": str(args.reps),
        "procs": str(args.procs),
    }
    section = report(samples, facts)
    print(section)
    if not args.no_markdown:
        write_markdown(REPO / "BENCHMARKS.md", "bench_revisions", section)
        log(f"updated {REPO / 'BENCHMARKS.md'}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the git revision to compare the working tree with (required)")
    parser.add_argument("--reps", type=int, default=150, help="timed calls per artifact, case (default 150)")
    parser.add_argument("--procs", type=int, default=3, help="processes per thread count, pooled (default 3)")
    parser.add_argument("--tokens", default="1,16", help="comma-separated token counts (default 1,16)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--evict-mb", type=int, default=default_evict_mb(), help="cache flush buffer, MiB")
    parser.add_argument("--no-markdown", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and not args.base:
        parser.error("--base REVISION is required (e.g. --base HEAD~1)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        run_child(args)
    else:
        run_parent(args, [a for a in argv if a])


if __name__ == "__main__":
    main()
