"""TVM's runtime for a board's architecture: fetched from PyPI's wheels once, then cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from moec.errors import MoecError
from moec.runtime import wheels

PLATFORM = "manylinux_2_28_aarch64"


def test_bundled_targets_name_the_aarch64_wheels() -> None:
    assert PLATFORM in wheels.bundled_platforms()


def test_cache_is_per_platform_and_versions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOEC_CACHE", str(tmp_path))
    versions = wheels.installed_versions()
    path = wheels.runtime_dir(PLATFORM)
    assert path.parent == tmp_path / "runtime" / PLATFORM
    assert versions["apache-tvm"] in path.name and versions["apache-tvm-ffi"] in path.name


def test_download_command_pins_the_installed_versions(tmp_path: Path) -> None:
    command = wheels.download_command(PLATFORM, tmp_path)
    versions = wheels.installed_versions()
    assert command[:2] == ["pip", "download"] and ["--platform", PLATFORM] == command[2:4]
    assert f"apache-tvm=={versions['apache-tvm']}" in command
    assert f"apache-tvm-ffi=={versions['apache-tvm-ffi']}" in command


def test_failed_download_is_one_line_saying_how_to_fetch_by_hand(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No index (as offline): one line naming the platform and the commands that fix it."""
    monkeypatch.setenv("MOEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(MoecError) as raised:
        wheels.runtime_libraries(PLATFORM)
    message = str(raised.value)
    assert "\n" not in message
    assert PLATFORM in message and "pip download --platform" in message and "--wheels DIR" in message
    assert not (wheels.runtime_dir(PLATFORM) / "lib").exists()
    assert not list(wheels.runtime_dir(PLATFORM).parent.glob("*/.fetch-*")), "scratch left behind"


def test_wheels_directory_without_the_wheels_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MOEC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "wheels").mkdir()
    with pytest.raises(MoecError, match=f"no apache-tvm .* wheel for {PLATFORM}"):
        wheels.runtime_libraries(PLATFORM, tmp_path / "wheels")
    assert wheels.main(["--wheels", str(tmp_path / "wheels"), PLATFORM]) == 1


def test_platform_tags_of_wheel_names() -> None:
    name = "apache_tvm-0.27.0.post1-py3-none-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl"
    assert wheels._platform_matches(Path(name), PLATFORM)
    assert not wheels._platform_matches(Path(name), "manylinux_2_28_x86_64")
