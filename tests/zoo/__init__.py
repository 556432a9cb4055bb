"""Builders of small synthetic MoE ONNX models (standard-op patterns, ``com.microsoft::MoE``).

Test fixtures, not part of the product: the tests, ``examples/make_examples.py`` and the
benchmarks import them as ``tests.zoo`` from the repository root; nothing in ``moec/`` does.
"""
