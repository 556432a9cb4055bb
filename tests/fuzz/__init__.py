"""A seeded mutation fuzzer for moec's command line (issue 15).

``mutators`` breaks a valid ONNX model in one way at a time (a dropped node, an absurd shape, a
truncated initializer, a cycle, garbage bytes, ...): mutant ``i`` of seed ``s`` of a source model
is always the same bytes. ``harness`` runs each mutant through ``moec inspect`` and, when that
succeeds, ``moec compile``, in a long-lived worker process (``worker``) with a timeout, and
classifies the outcome: ok, a clear one-line error, or a bug (internal error or traceback, crash,
hang). ``tests/fuzz/test_fuzz.py`` runs a small seeded subset in CI and the full run behind the
``slow`` marker; ``scripts/fuzz.py`` runs it from the command line and writes
``docs/robustness.md``.
"""
