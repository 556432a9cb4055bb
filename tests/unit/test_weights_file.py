"""The weights file (``moec.weights_file``): layout, round trip, damage, mapping in place, huge pages."""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import numpy as np
import pytest

from moec.artifact import WEIGHTS
from moec.errors import MoecError
from moec.weights_file import ALIGNMENT, HEADER, MAGIC, PAGE, VERSION, read_weights, write_weights
from tests.helpers import FP32_ATOL, WEIGHTS_DAMAGE, assert_close, damage_weights, tokens_input

TENSORS = {
    "scalar": np.array(2.5, np.float32),
    "empty": np.zeros((0, 3), np.float32),
    "half": np.linspace(-2, 2, 7, dtype=np.float16),
    "bytes": np.arange(-5, 6, dtype=np.int8).reshape(1, 11),
    "ids": np.array([[1, -(2**40)], [3, 2**62]], np.int64),
    "nothing": np.zeros((0,), np.int8),
    "matrix": np.random.default_rng(0).standard_normal((3, 5, 2)).astype(np.float32),
    "flags": np.array([True, False, True]),
}


def index_of(path: Path) -> tuple[int, list[dict]]:
    """The data region's start and the index entries, read straight from the bytes."""
    data = path.read_bytes()
    magic, version, length = HEADER.unpack_from(data)
    assert (magic, version) == (MAGIC, VERSION)
    start = -(-(HEADER.size + length) // PAGE) * PAGE
    return start, json.loads(data[HEADER.size : HEADER.size + length])["tensors"]


def test_round_trip_keeps_order_dtypes_shapes_and_values(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    write_weights(path, TENSORS)
    read = read_weights(path)
    assert list(read) == list(TENSORS)
    for name, expected in TENSORS.items():
        assert read[name].dtype == expected.dtype and read[name].shape == expected.shape, name
        np.testing.assert_array_equal(read[name], expected, err_msg=name)


def test_every_tensor_is_aligned_and_the_data_region_starts_on_a_page(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    write_weights(path, TENSORS)
    start, entries = index_of(path)
    assert start % PAGE == 0 and [e["name"] for e in entries] == list(TENSORS)
    data = path.read_bytes()
    for entry in entries:
        assert entry["offset"] % ALIGNMENT == 0, entry
        expected = TENSORS[entry["name"]]
        assert entry["nbytes"] == expected.nbytes and entry["shape"] == list(expected.shape), entry
        raw = data[start + entry["offset"] : start + entry["offset"] + entry["nbytes"]]
        assert raw == expected.astype(expected.dtype.newbyteorder("<")).tobytes(), entry["name"]
    for name, view in read_weights(path).items():
        assert view.ctypes.data % ALIGNMENT == 0, name


def test_tvm_tensors_are_converted_one_at_a_time(tmp_path: Path) -> None:
    """What compile does: TVM tensors in, each converted with ``.numpy()`` as it is written."""
    import tvm

    converted = []

    def to_numpy(tensor: tvm.runtime.Tensor) -> np.ndarray:
        converted.append(tensor)
        return tensor.numpy()

    tensors = {n: tvm.runtime.tensor(v) for n, v in TENSORS.items() if v.size}
    write_weights(tmp_path / "w.bin", tensors, to_numpy)
    assert converted == list(tensors.values())
    for name, view in read_weights(tmp_path / "w.bin").items():
        np.testing.assert_array_equal(view, TENSORS[name])


def test_unsupported_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MoecError, match="'z' has dtype complex64"):
        write_weights(tmp_path / "w.bin", {"z": np.zeros(2, np.complex64)})
    assert not list(tmp_path.iterdir())


def test_views_are_private_copy_on_write(tmp_path: Path) -> None:
    """The views share the mapping (no copy); writing one changes neither the file nor a new read."""
    path = tmp_path / "weights.bin"
    write_weights(path, TENSORS)
    before = path.read_bytes()
    read = read_weights(path)
    assert all(view.base is read["matrix"].base for view in read.values())
    read["matrix"][...] = 7
    assert path.read_bytes() == before
    np.testing.assert_array_equal(read_weights(path)["matrix"], TENSORS["matrix"])


def test_rewriting_leaves_a_mapped_file_intact(tmp_path: Path) -> None:
    """A new file replaces the old one by rename: a reader of the old mapping still sees it whole."""
    path = tmp_path / "weights.bin"
    write_weights(path, TENSORS)
    old = read_weights(path)
    write_weights(path, {"matrix": np.zeros(4, np.float32)})
    np.testing.assert_array_equal(old["matrix"], TENSORS["matrix"])
    assert list(read_weights(path)) == ["matrix"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


@pytest.mark.parametrize(("case", "why"), list(WEIGHTS_DAMAGE.items()))
def test_damaged_file_is_a_one_line_error(tmp_path: Path, case: str, why: str) -> None:
    path = tmp_path / "weights.bin"
    write_weights(path, TENSORS)
    damage_weights(path, case)
    with pytest.raises(MoecError) as caught:
        read_weights(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: damaged weights (") and message.endswith("; recompile the model")
    assert why in message and "\n" not in message, message


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MoecError, match=r"weights\.bin: no weights file; recompile the model"):
        read_weights(tmp_path / "weights.bin")


def smaps_field(address: int, field: str) -> int | None:
    """``field`` (kB) of the mapping holding ``address`` in ``/proc/self/smaps``; None if it has none."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= address < int(span[2], 16)
        elif inside and line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def test_a_large_mapping_gets_huge_pages(tmp_path: Path) -> None:
    """On a kernel whose page cache holds large folios, the mapping advised MADV_HUGEPAGE is mapped
    with 2 MiB entries once read (the writer leaves the new file in 2 MiB folios of the page cache)."""
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not enabled.exists() or "[never]" in enabled.read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    path = tmp_path / "weights.bin"
    write_weights(path, {"big": np.ones((8, 1024, 1024), np.uint8)})
    view = read_weights(path)["big"]
    if smaps_field(view.ctypes.data, "FilePmdMapped") is None:
        pytest.skip("this kernel's smaps has no FilePmdMapped")
    pages = view.reshape(-1)[::4096]
    assert int(pages.sum()) == pages.size  # touch every page
    mapped = smaps_field(view.ctypes.data, "FilePmdMapped")
    assert mapped is not None and mapped >= 2048, f"no 2 MiB page maps the file ({mapped} kB)"


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges in ``/proc/self/maps`` that map ``path``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def test_session_params_live_in_the_mapped_file(moe_block, tmp_path: Path) -> None:
    """``ArtifactSession.params`` are the file's pages, not copies: every nonempty parameter's
    data pointer lies inside the mapping of ``weights.bin``, and stays valid while the session is."""
    from moec.compiler.compile import compile_model
    from moec.runtime.session import ArtifactSession

    path, _ = moe_block(hidden=16, ffn=32, experts=4, top_k=2)
    artifact = compile_model(path, tmp_path / "artifact")
    session = ArtifactSession(artifact)
    ranges = mapped_ranges(artifact / WEIGHTS)
    assert ranges, "weights.bin is not mapped"
    for name, tensor in zip(session.manifest["params"], session.params, strict=True):
        pointer = tensor.data_ptr()
        assert any(low <= pointer < high for low, high in ranges), f"{name} was copied out of the mapping"
    x = tokens_input(3, 16)
    first = session.run({"x": x})["y"]
    gc.collect()  # nothing but the session holds the mapping now
    assert_close(session.run({"x": x})["y"], first, FP32_ATOL, "second call")
