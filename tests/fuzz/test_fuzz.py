"""No mutant of a valid model makes moec print a traceback, crash or hang (issue 15).

CI runs 50 seeded mutants (``moec inspect`` each, ``moec compile`` those of the sources that
compile in a second or two); the 1,000-mutant run, compiling every mutant inspect accepts, is
behind the ``slow`` marker and is what ``scripts/fuzz.py`` runs to write docs/robustness.md.
"""

from __future__ import annotations

import pytest

from tests.fuzz.harness import SOURCES, Run, fuzz
from tests.fuzz.mutators import Mutant
from tests.fuzz.report import reproduce_command

CI_SEED, CI_COUNT = 15, 50
FULL_SEED, FULL_COUNT = 0, 1000
QUICK_COMPILES = {"qmoe_tiny", "ms_moe_tiny", "switch_transformers-block", "phimoe-block", "gpt_oss-block"}
"""The sources whose mutants CI compiles too (about a second each; the others' mutants are only
inspected there, which is where most of them fail)."""


def quick_compile(mutant: Mutant) -> bool:
    return any(name in mutant.source for name in QUICK_COMPILES)


def bug_report(run: Run) -> str:
    return "\n".join(
        f"mutant {r.mutant.index} of {r.mutant.source} ({r.mutant.description}): "
        f"{r.final.kind}: {r.final.message} — {reproduce_command(r)}"
        for r in run.bugs()
    )


def test_fuzz_subset_finds_no_bugs(capsys: pytest.CaptureFixture[str]) -> None:
    run = fuzz(SOURCES, CI_SEED, CI_COUNT, compile_when=quick_compile)
    with capsys.disabled():
        print(f"\nfuzz: {run.summary()}")
    assert not run.bugs(), bug_report(run)
    assert run.tally()["error"] > CI_COUNT // 2, "most mutants are broken models: clear errors"


@pytest.mark.slow
def test_fuzz_full_run_finds_no_bugs(capsys: pytest.CaptureFixture[str]) -> None:
    run = fuzz(SOURCES, FULL_SEED, FULL_COUNT)
    with capsys.disabled():
        print(f"\nfuzz: {run.summary()}")
    assert not run.bugs(), bug_report(run)
