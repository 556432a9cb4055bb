"""Run mutants through ``moec inspect`` and ``moec compile`` and classify what happens.

Each mutant is written to a temporary directory and run as ``moec inspect MUTANT``, then, when
that succeeds and the run compiles it, ``moec compile MUTANT -o OUT --target host``. The
commands run in a :class:`Worker`: one long-lived subprocess that imports moec once (a fresh
process per command costs 2-3 s of Python and TVM start-up, more than most mutants take), with
a timeout per command. Outcomes, as the project's rule for bad input defines them:

- ``ok``: exit 0;
- ``error``: exit 1 with exactly one ``moec: error:`` line on stderr besides progress and
  warning lines — a clear error;
- ``traceback``: an internal error (exit 3), a ``Traceback`` on stderr, several error lines, or
  any other exit status or message: a bug;
- ``crash``: the process killed by a signal (the worker died): a bug;
- ``hang``: no answer within the timeout (the worker is killed): a bug.

A worker that crashed or hung is replaced by a fresh one for the next command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.fuzz.mutators import OPERATORS, Mutant, make_mutant

WORKER = Path(__file__).with_name("worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"^\[\s*\d+\.\d+s\] ")  # compile's progress lines (as tests/helpers.py)
SOURCES = [
    REPO_ROOT / "examples" / name for name in ("mixtral_tiny.onnx", "ms_moe_tiny.onnx", "qmoe_tiny.onnx")
] + [
    REPO_ROOT / "fixtures" / "models" / f"{name}.onnx"
    for name in (
        "mixtral-block-torchscript-batched_mm",
        "deepseek_v3-block-dynamo-batched_mm",
        "gpt_oss-block-hf-onnx-batched_mm",
        "qwen2_moe-block-dynamo-batched_mm",
        "llama4-block-torchscript-na",
        "switch_transformers-block-torchscript-na",
        "phimoe-block-hf-onnx-ort-cuda-batched_mm",
    )
]
"""The models mutated: the bundled examples (standard ops, onnxruntime's fused MoE and QMoE) and
one small exported block of seven families, from three exporters (decoders compile too slowly)."""
BUGS = ("traceback", "crash", "hang")
KINDS = ("ok", "error", *BUGS)
#: Address space a worker may map: a mutant that makes moec allocate absurd amounts fails with
#: MemoryError (an internal error to fix) instead of taking the shared machine's memory.
MEMORY_LIMIT = 16 * 2**30


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one command on one mutant ended."""

    kind: str  # one of KINDS
    code: int | None  # exit status; negative: killed by that signal; None: hang
    message: str  # the error line, the first lines of a traceback, or what went wrong
    seconds: float


@dataclasses.dataclass(frozen=True)
class Result:
    """A mutant and the outcome of each command run on it (compile only after inspect succeeded)."""

    mutant: Mutant
    inspect: Outcome
    compile: Outcome | None

    @property
    def final(self) -> Outcome:
        """The outcome that counts: compile's when it ran, else inspect's."""
        return self.compile or self.inspect


def classify(code: int | None, stderr: str, seconds: float) -> Outcome:
    """The outcome of a command that exited with ``code`` (None: timed out) and wrote ``stderr``."""
    if code is None:
        return Outcome("hang", None, f"no answer within {seconds:.0f} s", seconds)
    if code < 0:
        last = stderr.strip().splitlines()[-1:] or ["no output"]
        return Outcome("crash", code, f"killed by {signal.Signals(-code).name}: {last[0]}", seconds)
    lines = [
        line
        for line in stderr.splitlines()
        if line.strip() and not PROGRESS.match(line) and not line.startswith("moec: warning: ")
    ]
    if "Traceback" in stderr:
        start = next(i for i, line in enumerate(lines) if "Traceback" in line)
        return Outcome("traceback", code, " | ".join(lines[start:][-3:]), seconds)
    if code == 0:
        return Outcome("ok", 0, "", seconds)
    errors = [line for line in lines if line.startswith("moec: error: ")]
    if code == 1 and len(lines) == 1 and len(errors) == 1 and "internal error" not in errors[0]:
        return Outcome("error", 1, errors[0], seconds)
    return Outcome("traceback", code, " | ".join(lines[-3:]) or "no message", seconds)


class Worker:
    """A ``tests/fuzz/worker.py`` process running ``moec`` commands in ``workdir`` (its cwd)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def run(self, args: list[str], timeout: float) -> Outcome:
        """``moec ARGS`` in the worker (started if need be), classified; a crash or hang ends it."""
        if self.process is None:
            self._start()
        out, err = self.workdir / "stdout.txt", self.workdir / "stderr.txt"
        job = {"args": args, "stdout": str(out), "stderr": str(err)}
        started = time.perf_counter()
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        reply = self.process.stdout.readline() if ready else None
        seconds = time.perf_counter() - started
        if reply is None:
            self.stop()
            return classify(None, "", timeout)
        stderr = err.read_text(errors="replace") if err.exists() else ""
        if not reply:  # the worker died
            code = self.process.wait()
            self.process = None
            return classify(code if code < 0 else -signal.SIGABRT, stderr, seconds)
        return classify(json.loads(reply)["code"], stderr, seconds)

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MOEC_DEBUG"}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its own process group: a hang is killed with its children
            preexec_fn=_limit_memory,
        )
        self.starts += 1

    def stop(self) -> None:
        """End the worker (and anything it started) now."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None


def _limit_memory() -> None:
    """Run in the worker before it starts: cap its address space at :data:`MEMORY_LIMIT`."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@dataclasses.dataclass
class Run:
    """A fuzzing run: what it was asked to do and every result."""

    seed: int
    count: int
    sources: list[str]
    results: list[Result]
    seconds: float
    worker_starts: int

    def tally(self) -> Counter:
        """Mutants by final outcome kind."""
        return Counter(r.final.kind for r in self.results)

    def bugs(self) -> list[Result]:
        """The results whose inspect or compile was a traceback, crash or hang (compile runs only
        after inspect succeeded, so the final outcome is the bug)."""
        return [r for r in self.results if r.final.kind in BUGS]

    def summary(self) -> str:
        """One line: mutants, the tally, compiles, time."""
        tally = self.tally()
        compiled = sum(r.compile is not None for r in self.results)
        kinds = ", ".join(f"{kind} {tally.get(kind, 0)}" for kind in KINDS)
        return (
            f"{len(self.results)} mutants (seed {self.seed}): {kinds}; {compiled} compiled; "
            f"{self.seconds:.0f} s, {self.worker_starts} worker start(s)"
        )


def fuzz(
    sources: list[Path],
    seed: int,
    count: int,
    compile_when: Callable[[Mutant], bool] = lambda _: True,
    operators: tuple[str, ...] = OPERATORS,
    timeout: float = 120.0,
    indices: Iterable[int] | None = None,
    progress: Callable[[Result], None] = lambda _: None,
) -> Run:
    """Mutants ``0..count-1`` (or ``indices``) of ``seed``, mutant ``i`` made from
    ``sources[i % len(sources)]``, each run through ``moec inspect`` and, when that succeeds and
    ``compile_when(mutant)``, ``moec compile`` for the host. Nothing is written outside a
    temporary directory, which is removed at the end."""
    started = time.perf_counter()
    data = {str(path): path.read_bytes() for path in sources}
    names = list(data)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="moec-fuzz-") as tmp:
        workdir = Path(tmp)
        worker = Worker(workdir)
        try:
            for i in range(count) if indices is None else indices:
                source = names[i % len(names)]
                mutant = make_mutant(_display(source), data[source], seed, i, operators)
                result = run_mutant(worker, workdir, mutant, compile_when, timeout)
                results.append(result)
                progress(result)
        finally:
            worker.stop()
    return Run(
        seed, count, [_display(s) for s in names], results, time.perf_counter() - started, worker.starts
    )


def run_mutant(
    worker: Worker, workdir: Path, mutant: Mutant, compile_when: Callable[[Mutant], bool], timeout: float
) -> Result:
    """``moec inspect`` and perhaps ``moec compile`` on ``mutant``, saved in ``workdir``."""
    path = workdir / f"mutant-{mutant.index}.onnx"
    path.write_bytes(mutant.data)
    out = workdir / f"out-{mutant.index}"
    try:
        inspected = worker.run(["inspect", str(path)], timeout)
        compiled = None
        if inspected.kind == "ok" and compile_when(mutant):
            compiled = worker.run(["compile", str(path), "-o", str(out), "--target", "host"], timeout)
    finally:
        path.unlink()
        shutil.rmtree(out, ignore_errors=True)
    return Result(mutant, inspected, compiled)


def _display(source: str) -> str:
    """A source model's path relative to the repository, as reports name it."""
    path = Path(source).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
