"""What every benchmark script shares: progress lines, run facts, its BENCHMARKS.md section, and
the repository root on ``sys.path`` (the scripts run as ``python benchmarks/<script>.py`` and
build their models with the tests' synthetic builders, ``tests.zoo``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(message: str) -> None:
    """Progress line on stderr (stdout carries the result table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    """CPU model name as lscpu reports it, with the hypervisor when there is one."""
    fields: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    except (OSError, subprocess.CalledProcessError):
        pass
    name = fields.get("Model name", platform.processor() or "unknown").strip()
    hypervisor = fields.get("Hypervisor vendor", "").strip()
    return f"{name} ({hypervisor} guest)" if hypervisor else name


def git_revision() -> str:
    """Short HEAD commit of the repository, marked when the tree has uncommitted changes."""
    try:
        git = ["git", "-C", str(REPO)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True)
        return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git(*args: str) -> str:
    """Output of a git command in this repository; a failure ends the benchmark with git's message."""
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


BUNDLED = {"bundled_targets": "targets", "bundled_schedules": "schedules"}
"""The packages a wheel maps onto top-level folders (pyproject.toml's package-dir)."""


@contextlib.contextmanager
def revision_tree(revision: str, tree: Path) -> Iterator[Path]:
    """This repository at ``revision``, checked out (a detached git worktree) at ``tree`` for the
    ``with`` block, with its own target and schedule files as the ones its moec reads: an editable
    install maps ``moec.bundled_*`` onto this repository's folders, which ``PYTHONPATH`` alone
    would not override (the old revision would read the new one's schedules)."""
    git("worktree", "add", "--detach", str(tree), revision)
    try:
        for package, folder in BUNDLED.items():
            if (tree / folder).is_dir() and not (tree / "moec" / package).exists():
                (tree / "moec" / package).symlink_to(tree / folder, target_is_directory=True)
        yield tree
    finally:
        git("worktree", "remove", "--force", str(tree))


COMPILE_SCRIPT = "import sys; from moec.cli import main; sys.argv[0] = 'moec'; main()"
"""Runs a revision's own CLI (its ``moec compile`` options have been stable since the start)."""


def compile_at(tree: Path, model: Path, out: Path, target: str = "host") -> None:
    """Compile ``model`` for ``target`` into ``out`` with the moec sources in ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-c", COMPILE_SCRIPT, "compile", str(model), "--target", target, "-o", str(out)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"moec at {tree} failed to compile {model.name}:\n{done.stderr.strip()[-2000:]}")


def publish(section: str, markdown: str | Path | None, name: str) -> None:
    """Print a benchmark's report ``section`` and, with a ``markdown`` file, put it there as
    benchmark ``name``'s section (:func:`write_markdown`)."""
    print(section)
    if markdown is not None:
        write_markdown(Path(markdown), name, section)
        log(f"updated {markdown}")


def write_markdown(path: Path, name: str, section: str) -> None:
    """Put ``section`` between benchmark ``name``'s markers in ``path`` (appended if absent,
    the file created if missing); the other benchmarks' sections stay as they are."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nNumbers measured by `benchmarks/`.\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


class MoecModel:
    """A moec artifact run as moec's Python runtime runs it (``ArtifactSession``: the manifest's
    one-token entry point for calls whose symbolic input dimensions are all 1, else ``main``), so
    a benchmark times what a user's call costs. TVM is imported on construction only."""

    def __init__(self, folder: Path) -> None:
        from moec.runtime.session import ArtifactSession

        self.session = ArtifactSession(folder)
        self.vm, self.params, self.device = self.session.vm, self.session.params, self.session.device

    def feeds(self, *inputs) -> dict:
        """``inputs`` (in the manifest's input order) by input name."""
        return {spec["name"]: value for spec, value in zip(self.session.inputs, inputs, strict=True)}

    def function_for(self, *inputs) -> Any:
        """The VM function a call on ``inputs`` (in the manifest's input order) runs."""
        return self.vm[self.session.entry_for(self.feeds(*inputs))]

    def make(self, *inputs) -> tuple[Callable[[], Any], Callable[[], Any]]:
        """A no-argument call on ``inputs`` (converted to TVM tensors once) and a function
        returning its (single) output as numpy."""
        main, params = self.function_for(*inputs), self.params
        args = self.session.input_tensors(self.feeds(*inputs))

        def call() -> Any:
            return main(*args, *params)

        return call, lambda: call().numpy()


def busy_and_children_s() -> tuple[float, float, float]:
    """(CPU seconds all cores spent busy per ``/proc/stat``, CPU seconds of this process's finished
    children, wall seconds): the difference of two readings tells what other processes used."""
    import resource

    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields[i] for i in (0, 1, 2, 5, 6))  # user nice system (idle iowait) irq softirq
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime, time.perf_counter()


def others_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores other processes kept busy on average between two :func:`busy_and_children_s` readings."""
    return ((after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2])


def wait_quiet(limit_s: float, threshold: float = 0.25) -> None:
    """Wait (up to ``limit_s``) until other processes use under ``threshold`` cores over 2 s: this VM
    is shared, and a busy core ruins 2-thread numbers (llama.cpp's most)."""
    if limit_s <= 0:
        return
    started = time.perf_counter()
    while True:
        before = busy_and_children_s()
        time.sleep(2.0)
        busy = others_cores(before, busy_and_children_s())
        if busy < threshold:
            return
        if time.perf_counter() - started > limit_s:
            log(f"other processes still use {busy:.2f} cores after {limit_s:.0f} s; timing anyway")
            return
        log(f"waiting for a quiet machine: other processes use {busy:.2f} cores")
        time.sleep(8.0)


THREAD_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Each runtime's thread-count variable; a timing child gets its thread count in all of them."""


def run_timing_children(
    script: str | Path,
    workdir: Path,
    thread_counts: Sequence[int],
    procs: int,
    wait_limit_s: float,
    child_args: Callable[[int, int], list[str]],
) -> tuple[dict[int, list[dict[str, Any]]], dict[int, list[float]]]:
    """Run ``script --child --threads N --json-out FILE`` plus ``child_args(proc, N)``, ``procs``
    times per thread count (``TVM_NUM_THREADS`` is read once per process), each after waiting for
    a quiet machine (:func:`wait_quiet`); return per thread count the children's JSON and the cores
    other processes used while each ran."""
    children: dict[int, list[dict[str, Any]]] = {n: [] for n in thread_counts}
    others: dict[int, list[float]] = {n: [] for n in thread_counts}
    for proc in range(procs):
        for n in thread_counts:
            json_out = workdir / f"threads{n}_proc{proc}.json"
            env = dict(os.environ, **dict.fromkeys(THREAD_VARIABLES, str(n)))
            cmd = [sys.executable, str(script), "--child", "--threads", str(n), "--json-out", str(json_out)]
            wait_quiet(wait_limit_s)
            log(f"process {proc + 1}/{procs}, {n} thread(s)")
            start = busy_and_children_s()
            subprocess.run([*cmd, *child_args(proc, n)], env=env, check=True)
            children[n].append(json.loads(json_out.read_text()))
            others[n].append(others_cores(start, busy_and_children_s()))
            log(f"other processes used {others[n][-1]:.2f} cores meanwhile")
    return children, others


def timing_parser(doc: str, evict_mb: int) -> argparse.ArgumentParser:
    """The command line of an interleaved timing benchmark whose module docstring is ``doc``:
    described by its first paragraph, with :func:`add_timing_options`."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_timing_options(parser, evict_mb)
    return parser


def add_timing_options(parser: argparse.ArgumentParser, evict_mb: int) -> None:
    """The options of an interleaved timing benchmark run in child processes: ``--quick``,
    ``--reps``, ``--procs``, ``--inner``, ``--evict-mb`` (default ``evict_mb``), ``--tokens``,
    ``--threads``, ``--markdown``, ``--no-markdown``, ``--wait-quiet`` and the children's hidden
    ``--child``, ``--workdir``, ``--json-out``; :func:`timing_defaults` completes them."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few repetitions, one process per thread count (smoke check); does not write "
        "BENCHMARKS.md unless --markdown is given",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions per case, split over --procs (default 20, --quick 3)",
    )
    parser.add_argument(
        "--procs", type=int, default=None, help="processes per thread count (default 2, --quick 1)"
    )
    parser.add_argument(
        "--inner",
        type=int,
        default=None,
        help="warm timed calls per system per repetition (default 5, --quick 2)",
    )
    parser.add_argument(
        "--evict-mb",
        type=int,
        default=evict_mb,
        help="cache-flush buffer, MiB (default max(2 x LLC, 64), capped at 1024: %(default)s here)",
    )
    parser.add_argument("--tokens", default="1,16", help="comma-separated token counts (default 1,16)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument(
        "--markdown",
        default=None,
        help="write the report section to this file (default: BENCHMARKS.md at the repo root for a "
        "full run, nothing with --quick)",
    )
    parser.add_argument("--no-markdown", action="store_true", help="do not write any Markdown file")
    add_wait_quiet_option(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)


def repetition_defaults(args: argparse.Namespace) -> None:
    """Fill ``--reps``, ``--procs`` and ``--inner`` left unset: 20, 2 and 5, or 3, 1 and 2 with
    ``--quick``."""
    if args.reps is None:
        args.reps = 3 if args.quick else 20
    if args.procs is None:
        args.procs = 1 if args.quick else 2
    if args.inner is None:
        args.inner = 2 if args.quick else 5


def timing_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` of :func:`add_timing_options` with ``--quick``'s lower repetition defaults and the
    Markdown file (BENCHMARKS.md for a full run); a non-positive count is a usage error."""
    repetition_defaults(args)
    if args.no_markdown:
        args.markdown = None
    elif args.markdown is None and not args.quick:
        args.markdown = str(REPO / "BENCHMARKS.md")
    if min(args.reps, args.procs, args.inner, args.evict_mb) < 1:
        parser.error("--reps, --procs, --inner and --evict-mb must be positive")
    return args


def add_wait_quiet_option(parser: argparse.ArgumentParser) -> None:
    """``--wait-quiet SECONDS``, the limit :func:`wait_quiet` gets before each timing process."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=600.0,
        help="before each timing process, wait up to this many seconds for other processes to leave "
        "the cores idle (default 600; 0: do not wait)",
    )
