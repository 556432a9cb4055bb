"""``moec package``: one tarball holding everything a board needs to run an artifact.

Layout (``NAME`` is the tarball's name without ``.tar.gz``)::

    NAME/README.md          what it is, and the one command that runs it
    NAME/artifact/          model.so, weights.bin, manifest.json
    NAME/bin/moec-runner    the C++ runner built for the target's architecture
    NAME/lib/               TVM's runtime libraries for that architecture

The runner's run path includes ``$ORIGIN/../lib``, so the command works from ``NAME/`` with no
environment set. Nothing else is needed on the board but its C and C++ libraries (the glibc and
libstdc++ versions the binaries need are stated in the README).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from moec.artifact import (
    LIBRARY,
    MANIFEST,
    WEIGHTS,
    check_files,
    check_writable,
    output_lock,
    read_manifest,
)
from moec.errors import MoecError
from moec.runtime.board import RUNNER, ArtifactTarget, ensure_runner, runtime_library_dirs

LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")
DEFAULT_TOKENS = 1
DEFAULT_REPEAT = 100


def run_command(tokens: int = DEFAULT_TOKENS, repeat: int = DEFAULT_REPEAT) -> str:
    """The command, run from the unpacked directory, that runs the artifact and prints latency."""
    return f"bin/{RUNNER} artifact --random-inputs --tokens {tokens} --repeat {repeat}"


def default_output(artifact_dir: Path) -> Path:
    """``ARTIFACT.tar.gz`` beside the artifact directory."""
    artifact_dir = Path(os.path.abspath(artifact_dir))
    return artifact_dir.with_name(f"{artifact_dir.name}.tar.gz")


def bundle_name(out_file: Path) -> str:
    """The top directory inside the tarball: its file name without ``.tar.gz`` / ``.tgz``."""
    name = out_file.name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def required_versions(binaries: list[Path]) -> dict[str, str]:
    """The newest ``GLIBC_`` and ``GLIBCXX_`` symbol versions any of ``binaries`` needs."""
    newest: dict[str, tuple[int, ...]] = {}
    for binary in binaries:
        for name, version in re.findall(rb"\b(GLIBC|GLIBCXX)_(\d+(?:\.\d+)+)\b", binary.read_bytes()):
            key, parts = name.decode(), tuple(int(p) for p in version.decode().split("."))
            newest[key] = max(newest.get(key, parts), parts)
    return {key: ".".join(map(str, parts)) for key, parts in newest.items()}


def readme(
    manifest: dict[str, Any],
    target: ArtifactTarget,
    name: str,
    needs: dict[str, str],
) -> str:
    """The bundle's README: the one command, the inputs it takes, what the board needs."""
    described = manifest.get("target", {}).get("description", "")
    model = Path(manifest.get("model", {}).get("path", "model")).name
    inputs = "\n".join(
        f"- `{spec['name']}`: {spec['dtype']} of shape {spec['shape']}" for spec in manifest["inputs"]
    )
    own_inputs = " ".join(f"--input {spec['name']}={spec['name']}.npy" for spec in manifest["inputs"])
    device = (
        "CUDA GPU: the runner needs only the NVIDIA driver's libcuda.so.1 (JetPack provides it), no "
        "CUDA toolkit or runtime library"
        if target.cuda
        else "CPU"
    )
    libc = ", ".join(f"{key} >= {version}" for key, version in sorted(needs.items())) or "any glibc"
    return f"""# {model} for {target.name}

Compiled by moec {manifest.get("moec_version", "")} with TVM {manifest.get("tvm_version", "")} for
{target.name} ({described}). It runs on the board's {device}; the board needs {target.arch}
Linux with {libc}.

## Run it

On the board, unpack the tarball, enter `{name}/` and run (random inputs, one token, then 100
timed calls; it prints each output's shape and the latency mean, p50 and p99):

```sh
{run_command()}
```

## With your own inputs

Save each input as a `.npy` file (C order, little-endian) and pass it by name; outputs are
written to the output directory as `<output name>.npy`:

```sh
bin/{RUNNER} artifact {own_inputs} --output-dir out
```

Inputs (symbolic dimensions take any size, e.g. the number of tokens; `--tokens N` sets it for
`--random-inputs`):

{inputs}

## Contents

- `artifact/`: the compiled model (`{manifest.get("library", LIBRARY)}`), its weights
  (`{manifest.get("weights", WEIGHTS)}`) and `manifest.json`
- `bin/{RUNNER}`: the runner (TVM runtime only: no Python, no compiler)
- `lib/`: TVM's runtime libraries for {target.arch}, found by the runner through its run path
"""


def is_package(path: Path) -> bool:
    """Whether ``path`` is a tarball ``moec package`` wrote: its first member is ``NAME/README.md``
    saying so (only the first few KiB are decompressed, however large the tarball)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
            if first is None or not first.isfile() or first.name.count("/") != 1:
                return False
            if not first.name.endswith("/README.md") or first.size > 1 << 16:
                return False
            text = tar.extractfile(first).read().decode()
    except (OSError, EOFError, tarfile.TarError, UnicodeDecodeError, AttributeError):
        return False
    return "\nCompiled by moec " in text


def check_output(out_file: Path, artifact_dir: Path, force: bool) -> None:
    """Raise a one-line :class:`MoecError` unless the tarball may be written at ``out_file``: in an
    existing, writable directory outside the artifact, under a name that makes a plain top
    directory, and — if something is there already — only with ``force`` and only over a
    tarball ``moec package`` wrote (:func:`is_package`)."""
    if out_file.is_dir():
        raise MoecError(
            f"{out_file}: is a directory; pass the tarball's file name (e.g. {out_file}/model.tar.gz)"
        )
    check_writable(out_file, "--output")
    if not out_file.parent.is_dir():
        raise MoecError(f"{out_file.parent}: no such directory for the tarball")
    name = bundle_name(out_file)
    if name.startswith("."):
        raise MoecError(
            f"{out_file}: the tarball's top directory would be '{name}'; give it a plain name such as "
            "model.tar.gz"
        )
    inside = Path(os.path.abspath(artifact_dir))
    if inside in Path(os.path.abspath(out_file)).parents:
        raise MoecError(f"{out_file}: is inside the artifact {artifact_dir}; write the tarball elsewhere")
    if out_file.exists() or out_file.is_symlink():
        if not force:
            raise MoecError(f"{out_file}: exists; pass --force to replace it")
        if out_file.is_symlink() or not is_package(out_file):
            raise MoecError(
                f"{out_file}: is not a tarball moec package wrote; --force replaces only those: pass "
                "another --output"
            )


def package_artifact(
    artifact_dir: str | Path,
    out_file: str | Path | None = None,
    force: bool = False,
    check_hashes: bool = True,
    target_file: str | None = None,
) -> Path:
    """Write the tarball for ``artifact_dir`` to ``out_file`` (default ``ARTIFACT.tar.gz``); return it.

    The artifact's files are checked against its manifest first (SHA-256 too unless
    ``check_hashes`` is off); an existing ``out_file`` is replaced only with ``force`` and only
    if moec wrote it (:func:`check_output`); ``target_file`` is the user's ``--target`` (the
    target file, for an artifact of a board moec does not bundle).

    The tarball is written under a temporary name beside ``out_file`` and renamed into place,
    so a failure never leaves a partial one (nor replaces an existing one).
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    out_file = default_output(artifact_dir) if out_file is None else Path(out_file)
    check_output(out_file, artifact_dir, force)
    with output_lock(out_file):
        return _package_locked(artifact_dir, manifest, out_file, force, check_hashes, target_file)


def _package_locked(
    artifact_dir: Path,
    manifest: dict[str, Any],
    out_file: Path,
    force: bool,
    check_hashes: bool,
    target_file: str | None,
) -> Path:
    """:func:`package_artifact` once it holds the tarball's lock."""
    check_files(artifact_dir, manifest, check_hashes)
    files = [artifact_dir / MANIFEST, artifact_dir / manifest["library"], artifact_dir / manifest["weights"]]

    target = ArtifactTarget.from_manifest(manifest, artifact_dir, target_file)
    runner = ensure_runner(target)
    libraries = []
    for library in LIBRARIES:
        found = [d / library for d in runtime_library_dirs(target) if (d / library).exists()]
        if not found:
            raise MoecError(
                f"{library}: not found in TVM's runtime for {target.arch}; reinstall the TVM wheels"
            )
        libraries.append(found[0])

    name = bundle_name(out_file)
    entries: list[tuple[Path, str, int]] = [(path, f"{name}/artifact/{path.name}", 0o644) for path in files]
    entries.append((runner, f"{name}/bin/{RUNNER}", 0o755))
    entries += [(path, f"{name}/lib/{path.name}", 0o755) for path in libraries]
    text = readme(manifest, target, name, required_versions([runner, *libraries])).encode()

    fd, temp_name = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as stream, tarfile.open(fileobj=stream, mode="w:gz") as tar:
            _add_bytes(tar, f"{name}/README.md", text)
            for path, arcname, mode in entries:
                info = tar.gettarinfo(str(path), arcname)
                info.mode, info.uid, info.gid, info.uname, info.gname = mode, 0, 0, "", ""
                with open(path, "rb") as data:
                    tar.addfile(info, data)
        temp.chmod(0o644)
        check_output(out_file, artifact_dir, force)  # what appeared meanwhile is not replaced either
        temp.replace(out_file)
    finally:
        temp.unlink(missing_ok=True)
    return out_file


def _add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    """Add ``data`` to ``tar`` as a regular file ``arcname``."""
    info = tarfile.TarInfo(arcname)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))
