"""TVM's runtime libraries for a board's architecture, taken from PyPI's wheels and cached.

An artifact cross-compiled for a board runs with the TVM runtime built for that board's
architecture: ``libtvm_runtime.so`` and ``libtvm_ffi.so``. CUDA boards need nothing more: the
runner drives the GPU through the NVIDIA driver itself (``runtime/native/cuda_driver.cc``).
PyPI ships the ``apache-tvm`` and ``apache-tvm-ffi`` wheels per platform, so moec downloads the
pair whose versions equal the installed ones (the runtime must match the compiler that built the
artifact), keeps only those libraries, and reuses them:

    <cache>/runtime/<platform tag>/tvm-<version>_ffi-<version>/lib/

``<cache>`` is ``$MOEC_CACHE``, else ``.cache`` in the moec checkout. ``scripts/setup.sh``
prefetches the libraries for every bundled target (``python -m moec.runtime.wheels``) so that
tests need no network; ``--wheels DIR`` unpacks wheels fetched by hand instead of downloading.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from moec.errors import MoecError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# distribution -> the libraries it contributes
DISTRIBUTIONS = {
    "apache-tvm": ("libtvm_runtime.so",),
    "apache-tvm-ffi": ("libtvm_ffi.so",),
}
REQUIRED_LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")


def cache_root() -> Path:
    """Where moec keeps downloaded runtimes and built runners: ``$MOEC_CACHE`` or ``<checkout>/.cache``."""
    if os.environ.get("MOEC_CACHE"):
        return Path(os.environ["MOEC_CACHE"]).expanduser()
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / ".cache"
    return Path.home() / ".cache" / "moec"


def installed_versions() -> dict[str, str]:
    """The installed version of each TVM distribution; the board's runtime must be the same."""
    try:
        return {name: importlib.metadata.version(name) for name in DISTRIBUTIONS}
    except importlib.metadata.PackageNotFoundError as err:
        raise MoecError(f"package '{err.name}' is not installed; install moec's dependencies") from err


def runtime_dir(platform: str) -> Path:
    """The cache directory for ``platform``'s runtime at the installed versions (maybe not there yet)."""
    versions = installed_versions()
    tag = f"tvm-{versions['apache-tvm']}_ffi-{versions['apache-tvm-ffi']}"
    return cache_root() / "runtime" / platform / tag


def download_command(platform: str, dest: Path) -> list[str]:
    """The ``pip download`` command line that fetches ``platform``'s wheels into ``dest``."""
    pins = [f"{name}=={version}" for name, version in installed_versions().items()]
    return [
        "pip",
        "download",
        "--platform",
        platform,
        "--only-binary=:all:",
        "--no-deps",
        *pins,
        "-d",
        str(dest),
    ]


def runtime_libraries(platform: str, wheels: Path | None = None) -> Path:
    """The directory holding ``platform``'s TVM runtime libraries; fetched once, then cached.

    ``wheels`` is a directory of wheels fetched by hand (no download). Raises a one-line
    :class:`MoecError` that says how to fetch them by hand when the download fails.
    """
    lib_dir = runtime_dir(platform) / "lib"
    if all((lib_dir / name).exists() for name in REQUIRED_LIBRARIES):
        return lib_dir
    lib_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=lib_dir.parent) as scratch:
        scratch = Path(scratch)
        if wheels is None:
            wheels = scratch / "wheels"
            _download(platform, wheels)
        staged = scratch / "lib"
        _unpack(platform, wheels, staged)
        try:
            staged.rename(lib_dir)  # atomic: a concurrent fetch may have won; its libraries are equal
        except OSError:
            if not all((lib_dir / name).exists() for name in REQUIRED_LIBRARIES):
                raise
    return lib_dir


def _download(platform: str, dest: Path) -> None:
    command = [sys.executable, "-m", *download_command(platform, dest)]
    command[4:4] = ["--disable-pip-version-check", "--quiet", "--retries", "1"]  # after "pip download"
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        cause = next(
            (line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "no output"
        )
        by_hand = " ".join(download_command(platform, Path("DIR")))
        raise MoecError(
            f"cannot download TVM's runtime for {platform} from PyPI ({cause}); fetch it by hand "
            f"where there is network ('{by_hand}'), copy DIR here and run "
            f"'python -m moec.runtime.wheels --wheels DIR {platform}'"
        )


def _unpack(platform: str, wheels: Path, dest: Path) -> None:
    """Extract the runtime libraries from the two wheels for ``platform`` in ``wheels`` into ``dest``."""
    dest.mkdir(parents=True)
    for dist, libraries in DISTRIBUTIONS.items():
        version = installed_versions()[dist]
        prefix = f"{dist.replace('-', '_')}-{version}-"
        found = [p for p in sorted(Path(wheels).glob(f"{prefix}*.whl")) if _platform_matches(p, platform)]
        if not found:
            raise MoecError(
                f"{wheels}: no {dist} {version} wheel for {platform} (expected {prefix}*{platform}*.whl)"
            )
        try:
            with zipfile.ZipFile(found[0]) as wheel:
                members = {Path(n).name: n for n in wheel.namelist() if "/lib/" in n}
                for name in libraries:
                    if name not in members:
                        raise MoecError(f"{found[0]}: has no {name}; is it a TVM wheel?")
                    with wheel.open(members[name]) as src, open(dest / name, "wb") as out:
                        shutil.copyfileobj(src, out)
                    (dest / name).chmod(0o755)
        except zipfile.BadZipFile as err:
            raise MoecError(f"{found[0]}: not a valid wheel ({err}); download it again") from err


def _platform_matches(wheel: Path, platform: str) -> bool:
    """Whether ``wheel``'s platform tags (``a.b`` compressed sets allowed) include ``platform``."""
    return platform in wheel.stem.rsplit("-", 1)[-1].split(".")


def bundled_platforms() -> list[str]:
    """The wheel platforms the bundled target files name (their ``toolchain.runtime_wheels``)."""
    from moec.targets import bundled_targets, target_toolchain

    names = {target_toolchain(name)[1].runtime_wheels for name in bundled_targets()}
    return sorted(name for name in names if name)


def main(argv: list[str] | None = None) -> int:
    """``python -m moec.runtime.wheels [--wheels DIR] [PLATFORM ...]``: fetch runtimes into the cache."""
    parser = argparse.ArgumentParser(prog="python -m moec.runtime.wheels", description=main.__doc__)
    parser.add_argument("platforms", nargs="*", help="wheel platform tags (default: the bundled targets')")
    parser.add_argument("--wheels", type=Path, help="directory of wheels fetched by hand (no download)")
    args = parser.parse_args(argv)
    try:
        for platform in args.platforms or bundled_platforms():
            print(f"TVM runtime for {platform}: {runtime_libraries(platform, args.wheels)}")
    except MoecError as err:
        print(f"moec: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
