"""Run an artifact the way its board does: with ``moec-runner`` built for the board.

An artifact compiled for this machine runs in-process on TVM's Python runtime
(:class:`~moec.runtime.session.ArtifactSession`). One compiled for another board runs with the
C++ runner cross-built for the board's architecture, linked against that architecture's TVM
runtime (:mod:`moec.runtime.wheels`), and started under the target file's emulator (e.g.
``qemu-aarch64 -L /usr/aarch64-linux-gnu``) when the board's CPU is not this machine's. The
runner finds the TVM libraries through its run path (``$ORIGIN/../lib``, the cache layout and
the ``moec package`` layout alike) and the board's C and C++ libraries through the emulator's
``-L`` prefix, so no ``LD_LIBRARY_PATH`` is needed. The board comes from the manifest; the
compiler and emulator, which moec executes, from the target file (never from the manifest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from moec.artifact import check_files, read_manifest
from moec.errors import MoecError
from moec.runtime import native, wheels
from moec.targets import Toolchain, bundled_targets, target_toolchain

RUNNER = "moec-runner"
LATENCY = re.compile(r"^latency over \d+ runs: .*$", re.MULTILINE)
PEAK_RSS = re.compile(r"^peak RSS .*$", re.MULTILINE)
KERNEL_TIMES = re.compile(r"^kernels?[ :].*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class ArtifactTarget:
    """What running an artifact needs to know about its target, read from its manifest."""

    name: str
    arch: str
    cuda: bool
    toolchain: Toolchain

    @classmethod
    def from_manifest(
        cls, manifest: dict[str, Any], where: str | Path, target_file: str | None = None
    ) -> ArtifactTarget:
        """The target of the artifact at ``where`` whose manifest is ``manifest``.

        The board (name, architecture, CUDA or not) is the manifest's; the toolchain and the
        emulator, being commands moec runs, come from a target file: ``target_file`` (the user's
        ``--target``, which must name the same target), else the bundled file of the manifest's
        target name. An artifact for this machine's CPU needs neither (the native ``g++``);
        one for a board moec does not bundle needs ``--target``.
        """
        target = manifest["target"]
        name = str(target["name"])
        arch = str(target["hardware"]["arch"])
        cuda = target.get("cuda") is not None
        if target_file is not None:
            named, toolchain = target_toolchain(target_file)
            if named != name:
                raise MoecError(
                    f"{target_file}: is target '{named}' but {where} was compiled for '{name}'; pass "
                    "the target file it was compiled with"
                )
        elif name in bundled_targets():
            toolchain = target_toolchain(name)[1]
        elif arch == platform.machine() and not cuda:
            toolchain = Toolchain()
        else:
            raise MoecError(
                f"{where}: compiled for target '{name}', which moec does not bundle; pass --target "
                "FILE.toml, the target file it was compiled with (a compiler or emulator is never "
                "taken from the manifest)"
            )
        return cls(name=name, arch=arch, cuda=cuda, toolchain=toolchain)

    @property
    def same_arch(self) -> bool:
        """Whether the board's CPU runs this machine's binaries."""
        return self.arch == platform.machine()

    @property
    def runs_here(self) -> bool:
        """Whether TVM's Python runtime installed here can run the artifact in-process."""
        return self.same_arch and not self.cuda


def runtime_library_dirs(target: ArtifactTarget) -> list[Path]:
    """Directories holding the TVM runtime libraries (``libtvm_runtime.so``, ``libtvm_ffi.so``) for
    ``target``: PyPI's wheels for its platform, or the installed wheels for this machine's."""
    if target.toolchain.runtime_wheels:
        return [wheels.runtime_libraries(target.toolchain.runtime_wheels)]
    if not target.same_arch:
        raise MoecError(
            f"target {target.name} is {target.arch} but names no toolchain.runtime_wheels (the PyPI "
            f"platform of its TVM runtime, e.g. manylinux_2_28_{target.arch}); add it to the target file "
            "and recompile"
        )
    return native.runtime_paths()[1]


def runner_path(target: ArtifactTarget) -> Path:
    """Where the runner for ``target`` is cached: one per architecture, runtime and compiler.

    A board's runner sits beside the cached runtime (``<runtime>/runner-<key>/``, the libraries
    being in ``<runtime>/lib``), so that it finds them through ``$ORIGIN/../lib`` exactly as
    it does in a ``moec package`` tarball. The key hashes the compiler, the TVM versions and the
    runner's source, so an edit to any of them builds a new runner instead of reusing a stale one.
    """
    parts = [
        target.toolchain.cxx,
        target.toolchain.runtime_wheels,
        *wheels.installed_versions().values(),
        native.source_text(),
    ]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    if target.toolchain.runtime_wheels:
        return wheels.runtime_dir(target.toolchain.runtime_wheels) / f"runner-{key}" / RUNNER
    return wheels.cache_root() / "runner" / f"{target.arch}-installed-{key}" / RUNNER


def ensure_runner(target: ArtifactTarget) -> Path:
    """The runner built for ``target`` (built once with the target's compiler, then cached)."""
    return native.build_runner(
        runner_path(target),
        target.toolchain.cxx,
        runtime_library_dirs(target),
        package=target.toolchain.package,
        relocatable=bool(target.toolchain.runtime_wheels),
    )


def emulator_for(target: ArtifactTarget) -> list[str]:
    """The command prefix that runs ``target``'s binaries here: empty when the CPU is the same.

    Raises a one-line :class:`MoecError` when the target's code cannot run on this machine or
    when its emulator is not installed (naming the package that provides it).
    """
    if target.same_arch:
        return []
    machine = platform.machine()
    if target.cuda:
        raise MoecError(
            f"{target.name} artifacts run on the board's CUDA GPU, which cannot be emulated on this "
            f"{machine} machine; copy 'moec package' output to the board and run it there"
        )
    if not target.toolchain.emulator:
        raise MoecError(
            f"{target.name} artifacts are {target.arch} code and this machine is {machine}; the target "
            "names no toolchain.emulator to run them here; run it on the board ('moec package')"
        )
    command = target.toolchain.emulator[0]
    if shutil.which(command) is None:
        package = target.toolchain.emulator_package or command
        raise MoecError(
            f"{command}: not installed; it runs {target.arch} code on this {machine} machine. Install it "
            f"with 'apt-get install {package}' (scripts/setup.sh does this)"
        )
    return list(target.toolchain.emulator)


class RunnerSession:
    """An artifact run by ``moec-runner`` built for its target, under its emulator if needed.

    It offers what :class:`~moec.runtime.session.ArtifactSession` offers for verifying and
    running (``manifest``, ``inputs``, ``outputs``, ``check_inputs``, ``run``), each run being
    one runner process fed through ``.npy`` files, as on the board.
    """

    def __init__(
        self, artifact_dir: str | Path, check_hashes: bool = True, target_file: str | None = None
    ) -> None:
        self.dir = Path(artifact_dir)
        self.manifest: dict[str, Any] = read_manifest(self.dir)
        check_files(self.dir, self.manifest, check_hashes)  # once here; each runner call checks sizes
        self.target = ArtifactTarget.from_manifest(self.manifest, self.dir, target_file)
        self.emulator = emulator_for(self.target)  # before building: a missing emulator is the news
        self.runner = ensure_runner(self.target)

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["outputs"]

    @property
    def how(self) -> str:
        """One line saying how this artifact is run here."""
        if self.emulator:
            where = f"under {Path(self.emulator[0]).name}"
        else:
            where = "on this machine's CUDA GPU" if self.target.cuda else "natively"
        return f"running {self.target.name} ({self.target.arch}) artifact with {RUNNER} {where}"

    def check_inputs(self, feeds: dict[str, np.ndarray], source: str) -> None:
        """Raise :class:`MoecError` if ``feeds`` lacks an input or has a wrong shape or dtype."""
        from moec.runtime.session import check_feeds

        check_feeds(self.inputs, feeds, source)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for inputs by name."""
        return native.run_native(self.runner, self.dir, feeds, emulator=self.emulator, check_hashes=False)[0]

    def run_timed(
        self, feeds: dict[str, np.ndarray], repeats: int, warmup: int = 5, kernel_times: bool = False
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """Outputs by name, and the runner's report lines: its latency over ``repeats`` timed
        calls, its peak RSS and, with ``kernel_times`` (CUDA artifacts), each kernel's GPU time
        per call over as many more calls (``kernel NAME: ...``, then ``kernels: ...``)."""
        outputs, stdout = native.run_native(
            self.runner,
            self.dir,
            feeds,
            repeat=repeats,
            warmup=warmup,
            emulator=self.emulator,
            check_hashes=False,
            kernel_times=kernel_times,
        )
        lines = []
        for pattern, what in ((LATENCY, "latency"), (PEAK_RSS, "peak RSS")):
            found = pattern.search(stdout)
            if found is None:
                raise MoecError(f"{self.dir}: {RUNNER} printed no {what} line (got {stdout.strip()!r})")
            lines.append(found.group(0))
        return outputs, [*lines, *KERNEL_TIMES.findall(stdout)]


def open_session(artifact_dir: str | Path, check_hashes: bool = True, target_file: str | None = None) -> Any:
    """A session for ``artifact_dir``: in-process for this machine's artifacts, else the runner's.

    Either checks the artifact's files against the manifest first (sizes, and SHA-256 unless
    ``check_hashes`` is off); ``target_file`` is the user's ``--target`` (see
    :meth:`ArtifactTarget.from_manifest`)."""
    manifest = read_manifest(Path(artifact_dir))
    target = ArtifactTarget.from_manifest(manifest, artifact_dir, target_file)
    if target.runs_here:
        from moec.runtime.session import ArtifactSession

        return ArtifactSession(artifact_dir, check_hashes)
    return RunnerSession(artifact_dir, check_hashes, target_file)
