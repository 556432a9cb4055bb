"""A fuzzing run as text: the tally by outcome, clear errors by kind of message, per-operator
counts and every bug with the command that reproduces it (``docs/robustness.md``)."""

from __future__ import annotations

import re
from collections import Counter

from tests.fuzz.harness import BUGS, KINDS, Result, Run
from tests.fuzz.mutators import OPERATORS

TOP_MESSAGES = 30
"""The kinds of error message the report lists one by one (the others are summed)."""


def message_kind(line: str) -> str:
    """What a ``moec: error:`` line says, without its particulars: the file path, quoted names,
    numbers and the advice after ``;`` removed, cut to ten words (``invalid ONNX model: Nodes in
    a graph must be topologically sorted``)."""
    text = line.removeprefix("moec: error: ")
    text = re.sub(r"^\S+\.(onnx|json|toml)\b:?\s*", "", text)  # the file
    text = re.sub(r"\([^()]*\)", "", text)  # parenthesised details (a parser's message)
    text = re.sub(r"'[^'\s]*'", "'…'", text)  # names; not from "TVM's" to "node's"
    text = text.replace(" :", ":")  # where "(Op)" was
    text = re.sub(r"\b\d+\b", "N", text)
    text = text.split(";")[0]
    words = text.split()
    return " ".join(words[:10]) + (" …" if len(words) > 10 else "")


def reproduce_command(result: Result) -> str:
    """The command that writes ``result``'s mutant to ``mutants/`` and prints how to run it."""
    m = result.mutant
    return f".venv/bin/python scripts/fuzz.py --seed {m.seed} --index {m.index} --save mutants/"


def markdown(run: Run, command: str) -> str:
    """The report of ``run`` (started with ``command``) as Markdown."""
    tally = run.tally()
    bugs = run.bugs()
    errors = Counter(message_kind(r.final.message) for r in run.results if r.final.kind == "error")
    rest = errors.most_common()[TOP_MESSAGES:]
    lines = [
        "## Latest full run",
        "",
        f"- Command: `{command}`",
        f"- Seed {run.seed}; {len(run.results)} mutants of {len(run.sources)} source models; "
        f"{sum(r.compile is not None for r in run.results)} of them also compiled "
        "(those `moec inspect` accepted)",
        f"- Time: {run.seconds:.0f} s ({run.seconds / max(len(run.results), 1):.2f} s per mutant), "
        f"{run.worker_starts} worker start(s)",
        "",
        "| outcome | mutants |",
        "|---|---:|",
        *(f"| {kind} | {tally.get(kind, 0)} |" for kind in KINDS),
        "",
        "Clear errors by kind of message (file, names and numbers elided):",
        "",
        "| message | mutants |",
        "|---|---:|",
        *(f"| {kind.replace('|', '/')} | {n} |" for kind, n in errors.most_common(TOP_MESSAGES)),
        *([f"| ({len(rest)} other kinds) | {sum(n for _, n in rest)} |"] if rest else []),
        "",
        "By operator (final outcome: compile's when it ran, else inspect's):",
        "",
        "| operator | " + " | ".join(KINDS) + " |",
        "|---|" + "---:|" * len(KINDS),
    ]
    for operator in OPERATORS:
        counts = Counter(r.final.kind for r in run.results if r.mutant.operator == operator)
        if counts:
            lines.append(f"| {operator} | " + " | ".join(str(counts.get(k, 0)) for k in KINDS) + " |")
    lines += ["", f"Bugs ({', '.join(BUGS)}): {len(bugs)}", ""]
    for result in bugs:
        m, outcome = result.mutant, result.final
        lines.append(
            f"- mutant {m.index} of {m.source} ({m.operator}: {m.description}): {outcome.kind}, "
            f"{outcome.message} — `{reproduce_command(result)}`"
        )
    return "\n".join(lines) + "\n"
