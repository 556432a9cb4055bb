"""The fuzzer's worker process: runs ``moec`` commands one after another in one Python process.

Starting Python and importing TVM costs seconds per process, more than most mutants take, so
the harness starts this script once and sends it one job per line on stdin: a JSON object with
``args`` (the ``moec`` arguments) and ``stdout``/``stderr`` (files to write the command's output
to). The command runs as the console script would run it (``moec.cli.main``; an exception that
escapes it is printed as a traceback and exits 1, as Python does), with file descriptors 1 and 2
redirected to those files, so that output from TVM's C++ code is captured too. For each job the
worker writes ``{"code": EXIT_STATUS}`` on a line to its original stdout. A crash or hang is
seen by the harness as the worker dying or falling silent.

Run by path (``python tests/fuzz/worker.py``): it needs moec, not the tests.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager


@contextmanager
def _redirected(stdout_path: str, stderr_path: str):
    """File descriptors 1 and 2 (and Python's streams on them) writing to the given files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    files = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for p in (stdout_path, stderr_path)]
    try:
        os.dup2(files[0], 1)
        os.dup2(files[1], 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*files, *saved):
            os.close(fd)


def _exit_status(code: object) -> int:
    """The process exit status ``sys.exit(code)`` gives."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def main() -> None:
    """Serve jobs from stdin until it closes."""
    results = os.fdopen(os.dup(1), "w")
    os.environ.pop("MOEC_DEBUG", None)  # errors as users see them, never re-raised
    from moec.cli import main as moec

    for line in sys.stdin:
        job = json.loads(line)
        with _redirected(job["stdout"], job["stderr"]):
            try:
                moec.main(job["args"], prog_name="moec", standalone_mode=False)
                code = 0
            except SystemExit as exit_:
                code = _exit_status(exit_.code)
            except BaseException:  # noqa: BLE001 - what the console script would print
                traceback.print_exc()
                code = 1
        results.write(json.dumps({"code": code}) + "\n")
        results.flush()


if __name__ == "__main__":
    main()
