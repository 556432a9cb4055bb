"""Keep TVM's own warnings, which a moec user cannot act on, out of moec's output.

TVM warns in two ways while moec imports and compiles a model: Python ``UserWarning``s from its
ONNX frontend (``Renaming name past_key_values.0.key to past_key_values_0_key``) and native log
lines written straight to file descriptor 2 by its C++ code (``[10:41:07] .../transform.h:112:
Warning: Fast mode segfaults when there are out-of-bounds indices. Make sure input indices
are in bound``, for every ``take`` a decoder's embedding lowers to). Both are about TVM's
internals: the model is fine and there is nothing to change. :func:`quiet_tvm` drops them for
the block it wraps and passes every other line through; with ``MOEC_DEBUG=1`` nothing is dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

NATIVE_WARNING = re.compile(rb"^\[\d\d:\d\d:\d\d\] \S+:\d+: Warning: ")
"""The first line of a TVM C++ ``LOG(WARNING)``: ``[hh:mm:ss] file:line: Warning: ...``."""
TVM_MODULES = r"tvm(\.|$)"
"""The Python modules whose warnings are TVM's (``warnings.filterwarnings``' ``module``)."""


def debugging() -> bool:
    """Whether ``MOEC_DEBUG`` asks for everything (tracebacks, TVM's warnings)."""
    return bool(os.environ.get("MOEC_DEBUG"))


@contextlib.contextmanager
def quiet_tvm() -> Iterator[None]:
    """Run the block with TVM's Python warnings ignored and its native warning lines removed from
    file descriptor 2 (captured in a temporary file, the rest written out after the block, in
    order). Nothing is removed under ``MOEC_DEBUG=1``."""
    if debugging():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=TVM_MODULES)
        with _without_native_warnings():
            yield


@contextlib.contextmanager
def _without_native_warnings() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                capture.seek(0)
                kept = [line for line in capture.read().splitlines(True) if not NATIVE_WARNING.match(line)]
                sys.stderr.write(b"".join(kept).decode(errors="replace"))
                sys.stderr.flush()
    finally:
        os.close(saved)
