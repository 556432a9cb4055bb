"""The artifact directory: compiled library, weights file and manifest, written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moec.errors import MoecError

LIBRARY = "model.so"
WEIGHTS = "weights.params"
MANIFEST = "manifest.json"
FORMAT = "moec-artifact/1"


@contextlib.contextmanager
def staged_directory(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; move it into place only if the block succeeds.

    A failed compile leaves nothing behind, and an existing ``out_dir`` is replaced only with
    ``force`` and only once the new artifact is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise MoecError(f"{out_dir}: output directory exists; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact should not be
    try:
        yield staging
        if out_dir.exists():
            if out_dir.is_dir():
                shutil.rmtree(out_dir)
            else:
                out_dir.unlink()
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, so a failure leaves no partial file."""
    path = Path(path)
    if path.is_dir():
        raise MoecError(f"{path}: is a directory; pass a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        temp.chmod(0o666 & ~umask)
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    """The manifest of an artifact directory, with a clear error if it is not one."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir() or not path.exists():
        raise MoecError(
            f"{artifact_dir}: not a moec artifact directory (no {MANIFEST}); make one with 'moec compile'"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MoecError(f"{path}: corrupt manifest ({err}); recompile the model") from err
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise MoecError(f"{path}: unknown artifact format {found!r}; this moec reads {FORMAT}")
    return manifest
