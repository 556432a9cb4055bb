"""Building ``fake_cuda_driver.c``, the stand-in NVIDIA driver the CUDA tests run on (no GPU here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

FAKE_DRIVER = Path(__file__).with_name("fake_cuda_driver.c")


def build_fake_driver(directory: Path, cc: str = "cc") -> Path:
    """``fake_cuda_driver.c`` built with ``cc`` as ``directory/libcuda.so.1``; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    command = [cc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-Wl,-soname,libcuda.so.1"]
    subprocess.run([*command, "-o", str(directory / "libcuda.so.1"), str(FAKE_DRIVER)], check=True)
    return directory
