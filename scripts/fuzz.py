"""Fuzz moec's command line with seeded mutants of small MoE models (tests/fuzz/).

    .venv/bin/python scripts/fuzz.py --seed 0 --count 1000 --report docs/robustness.md
    .venv/bin/python scripts/fuzz.py --seed 0 --index 17 --save mutants/   # one mutant, to rerun by hand

Runs mutant 0..COUNT-1 of SEED through ``moec inspect`` and ``moec compile`` (tests/fuzz/harness.py),
prints every bug (traceback, crash, hang) as it is found and a tally at the end, and with
``--report`` replaces that file's "Latest full run" section with this run's report. Exit status 1
when any mutant found a bug.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the fuzzer lives with the tests (tests/fuzz/)

from tests.fuzz.harness import BUGS, SOURCES, Result, fuzz  # noqa: E402
from tests.fuzz.mutators import make_mutant  # noqa: E402
from tests.fuzz.report import markdown, reproduce_command  # noqa: E402

SECTION = "## Latest full run"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000, help="mutants 0..COUNT-1 (default 1000)")
    parser.add_argument("--index", type=int, action="append", help="only this mutant (repeatable)")
    parser.add_argument("--save", type=Path, help="with --index: write the mutants here, run nothing")
    parser.add_argument("--report", type=Path, help="replace this Markdown file's run section")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per command (default 120)")
    args = parser.parse_args()
    if args.save is not None:
        return save(args.seed, args.index or [], args.save)

    def show(result: Result) -> None:
        done = result.mutant.index + 1
        if result.final.kind in BUGS:
            outcome = result.final
            print(
                f"BUG {outcome.kind}: mutant {result.mutant.index} of {result.mutant.source} "
                f"({result.mutant.description}): {outcome.message}\n    {reproduce_command(result)}",
                flush=True,
            )
        elif args.index is None and done % 50 == 0:
            print(f"{done}/{args.count} mutants", flush=True)

    run = fuzz(SOURCES, args.seed, args.count, timeout=args.timeout, indices=args.index, progress=show)
    print(run.summary())
    if args.report is not None:
        command = shlex.join([".venv/bin/python", "scripts/fuzz.py", *sys.argv[1:]])
        write_section(args.report, markdown(run, command))
        print(f"wrote {args.report}")
    return 1 if run.bugs() else 0


def save(seed: int, indices: list[int], directory: Path) -> int:
    """Write mutants ``indices`` of ``seed`` into ``directory`` and say how to run them."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in indices:
        source = SOURCES[index % len(SOURCES)]
        mutant = make_mutant(str(source.relative_to(REPO_ROOT)), source.read_bytes(), seed, index)
        path = directory / f"mutant-{seed}-{index}.onnx"
        path.write_bytes(mutant.data)
        print(f"{path}: {mutant.source}, {mutant.operator}: {mutant.description}")
        print(f"    .venv/bin/moec inspect {path} && .venv/bin/moec compile {path} -o {path.with_suffix('')}")
    return 0


def write_section(path: Path, section: str) -> None:
    """Replace the ``## Latest full run`` section of ``path`` (to the next ``## `` heading or the
    end) with ``section``, or append it when there is none."""
    text = path.read_text() if path.exists() else ""
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
