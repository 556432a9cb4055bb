"""What a careless or hostile user does to moec (issue 15's table), and what moec must then do.

Every case asserts the exit code, the one-line ``moec: error:`` message naming the culprit, and
that nothing outside the command's own output was touched: each test works in a tree holding
the model, an artifact, a notes file and an unrelated folder, with a sentinel file beside
every output, and compares the whole tree before and after (:class:`Tree`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moec.artifact import LIBRARY, MANIFEST, WEIGHTS, output_lock
from moec.compiler.compile import compile_model
from moec.options import CompileOptions
from moec.reference.evaluator import run_reference
from moec.reference.stored import canonical_evaluator
from moec.runtime.session import ArtifactSession, random_inputs
from moec.verify import compare_outputs
from tests.helpers import (
    EXAMPLE_MODEL,
    FP32_ATOL,
    PROGRESS,
    assert_close,
    assert_nothing_written,
    assert_user_error,
    embedding_model,
    error_line,
    invoke,
)

HIDDEN = 64  # the example's


# --------------------------------------------------------------------------
# the test tree
# --------------------------------------------------------------------------


@dataclass
class Tree:
    """A user's folder: ``model.onnx``, ``art/`` (its artifact), ``notes.txt``, ``unrelated/keep.txt``
    and ``SENTINEL`` files; :meth:`assert_untouched` checks every byte of it is as it was."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model.onnx"

    @property
    def artifact(self) -> Path:
        return self.root / "art"

    @property
    def notes(self) -> Path:
        return self.root / "notes.txt"

    def snapshot(self) -> dict[str, str]:
        """Every path under the tree, with its content's SHA-256 (files) or ``dir``."""
        return {
            str(path.relative_to(self.root)): (
                hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            )
            for path in sorted(self.root.rglob("*"))
        }

    def assert_untouched(self, before: dict[str, str], *created: Path) -> None:
        """The tree is exactly ``before``, except for ``created`` (a command's own output)."""
        after = self.snapshot()
        new = {str(path.relative_to(self.root)) for path in created}
        after = {
            k: v for k, v in after.items() if k not in new and not any(k.startswith(f"{n}/") for n in new)
        }
        assert after == before, f"changed: {sorted(set(after.items()) ^ set(before.items()))}"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model and its host artifact, compiled once."""
    root = tmp_path_factory.mktemp("hardening")
    shutil.copy(EXAMPLE_MODEL, root / "model.onnx")
    compile_model(root / "model.onnx", root / "art", CompileOptions())
    return root


@pytest.fixture
def tree(base: Path, tmp_path: Path) -> Tree:
    """A fresh copy of the user's folder, sentinels included."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copy(base / "model.onnx", root / "model.onnx")
    shutil.copytree(base / "art", root / "art")
    (root / "notes.txt").write_text("my notes\n")
    (root / "unrelated").mkdir()
    (root / "unrelated" / "keep.txt").write_text("keep me\n")
    (root / "SENTINEL").write_text("beside every output\n")
    return Tree(root)


def edit_manifest(artifact: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    edit(manifest)
    (artifact / MANIFEST).write_text(json.dumps(manifest))


# --------------------------------------------------------------------------
# artifact integrity
# --------------------------------------------------------------------------


def cut_one_byte(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def other_models_weights(path: Path) -> None:
    """Replace the weights by those of a same-shaped model with other values (same size)."""
    other = path.parent.parent / "other"
    model = onnx.load(EXAMPLE_MODEL)
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            tensor.CopyFrom(numpy_helper.from_array(array * np.float32(1.5), tensor.name))
    other.mkdir()
    onnx.save(model, other / "model.onnx")
    compile_model(other / "model.onnx", other / "art", CompileOptions())
    assert (other / "art" / WEIGHTS).stat().st_size == path.stat().st_size
    shutil.copy(other / "art" / WEIGHTS, path)
    shutil.rmtree(other)


DAMAGE = {
    "weights cut by one byte": (WEIGHTS, cut_one_byte, "bytes, the manifest says"),
    "one bit of the weights flipped": (WEIGHTS, flip_one_bit, "SHA-256 differs"),
    "another model's weights": (WEIGHTS, other_models_weights, "SHA-256 differs"),
    "library truncated": (LIBRARY, lambda path: os.truncate(path, 4096), "bytes, the manifest says"),
    "weights missing": (WEIGHTS, Path.unlink, "the file is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_artifact_is_refused(tree: Tree, damage: str) -> None:
    """run, verify and package refuse a damaged artifact in one line naming the file (today's
    alternative: wrong numbers with exit 0, or SIGBUS)."""
    name, apply, cause = DAMAGE[damage]
    apply(tree.artifact / name)
    before = tree.snapshot()
    tarball = tree.root / "bundle.tar.gz"
    for command in (
        ("run", tree.artifact, "--repeats", "1"),
        ("verify", tree.model, tree.artifact),
        ("package", tree.artifact, "-o", tarball),
    ):
        assert_user_error(invoke(*command), tree.artifact / name, cause)
    tree.assert_untouched(before)


def test_skip_hash_check_still_checks_sizes(tree: Tree) -> None:
    """--skip-hash-check runs a flipped bit (the user asked not to hash) but never a cut file."""
    flip_one_bit(tree.artifact / WEIGHTS)
    result = invoke("run", tree.artifact, "--repeats", "1", "--skip-hash-check")
    assert result.exit_code == 0, result.output
    cut_one_byte(tree.artifact / WEIGHTS)
    assert_user_error(invoke("run", tree.artifact, "--skip-hash-check"), tree.artifact / WEIGHTS, "bytes")


@pytest.mark.parametrize("key", ["library", "weights"])
@pytest.mark.parametrize("value", ["../notes.txt", "/etc/passwd", "sub/x.bin", ".."])
def test_manifest_file_names_are_plain(tree: Tree, key: str, value: str) -> None:
    """A manifest naming a file outside the artifact is refused; package copies nothing."""
    edit_manifest(tree.artifact, lambda m: m.update({key: value}))
    before = tree.snapshot()
    for command in (("run", tree.artifact), ("package", tree.artifact, "-o", tree.root / "b.tar.gz")):
        assert_user_error(invoke(*command), tree.artifact / MANIFEST, f"'{key}'", "file name")
    tree.assert_untouched(before)


MANIFEST_DAMAGE: dict[str, tuple[Callable[[dict], None], str]] = {
    "inputs not a list": (lambda m: m.update(inputs={"x": 1}), "'inputs' must be a list"),
    "a float dimension": (lambda m: m["inputs"][0]["shape"].__setitem__(1, 1.5), "'inputs[0].shape[1]'"),
    "unknown dtype": (lambda m: m["outputs"][0].update(dtype="float99"), "'outputs[0].dtype'"),
    "a numeric param": (lambda m: m["params"].__setitem__(0, 7), "'params[0]'"),
    "no files": (lambda m: m.pop("files"), "has no 'files'"),
    "short hash": (lambda m: m["files"][WEIGHTS].update(sha256="abc"), f"'files.{WEIGHTS}.sha256'"),
    "negative size": (lambda m: m["files"][LIBRARY].update(bytes=-1), f"'files.{LIBRARY}.bytes'"),
    "unknown precision": (lambda m: m["layers"][0]["plan"][0].update(precision="int9"), "precision'"),
    "zero token bound": (lambda m: m.update(max_tokens=0), "'max_tokens'"),
    "no hardware": (lambda m: m["target"].pop("hardware"), "has no 'hardware'"),
    "not an object": (lambda m: m.update(entries=[1]), "'entries' must be an object"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest_field_is_one_line(tree: Tree, case: str) -> None:
    edit, named = MANIFEST_DAMAGE[case]
    edit_manifest(tree.artifact, edit)
    before = tree.snapshot()
    for command in (
        ("run", tree.artifact),
        ("verify", tree.model, tree.artifact),
        ("inspect", tree.artifact),
    ):
        assert_user_error(invoke(*command), tree.artifact / MANIFEST, "damaged manifest", named)
    tree.assert_untouched(before)


# --------------------------------------------------------------------------
# outputs: package, up-front checks, concurrency
# --------------------------------------------------------------------------


def test_package_output_rules(tree: Tree) -> None:
    """package -o: an existing file needs --force, and --force replaces only moec's own tarball;
    a name whose top directory would not be plain, or a place inside the artifact, is refused."""
    before = tree.snapshot()
    assert_user_error(invoke("package", tree.artifact, "-o", tree.notes), tree.notes, "--force")
    assert_user_error(
        invoke("package", tree.artifact, "-o", tree.notes, "--force"), tree.notes, "moec package"
    )
    for name in ("...tar.gz", ".tar.gz", ".hidden.tar.gz"):
        assert_user_error(invoke("package", tree.artifact, "-o", tree.root / name), name, "top directory")
    inside = tree.artifact / "bundle.tar.gz"
    assert_user_error(invoke("package", tree.artifact, "-o", inside), inside, "inside the artifact")
    tree.assert_untouched(before)

    tarball = tree.root / "bundle.tar.gz"
    assert invoke("package", tree.artifact, "-o", tarball).exit_code == 0
    first = tarball.read_bytes()
    assert_user_error(invoke("package", tree.artifact, "-o", tarball), tarball, "--force")
    assert tarball.read_bytes() == first
    result = invoke("package", tree.artifact, "-o", tarball, "--force")
    assert result.exit_code == 0, result.output
    with tarfile.open(tarball) as tar:
        assert all(name.startswith("bundle/") for name in tar.getnames())
    tree.assert_untouched(before, tarball)


UNWRITABLE = Path("/proc/moec-cannot-write-here")
"""A place no process can create anything in, root included (permissions alone do not stop root)."""


@pytest.mark.parametrize("where", ["under a file", "unwritable"])
def test_output_location_is_checked_before_compiling(tree: Tree, where: str) -> None:
    out = tree.notes / "out" if where == "under a file" else UNWRITABLE / "out"
    before = tree.snapshot()
    result = invoke("compile", tree.model, "-o", out)
    line = assert_user_error(result, out, "cannot be created")
    assert not any("loading" in row for row in result.stderr.splitlines() if PROGRESS.match(row)), line
    dump = invoke("compile", tree.model, "-o", tree.root / "new", "--dump-ir", tree.notes / "ir")
    assert_user_error(dump, "--dump-ir", "cannot be created")
    profile = invoke("profile", tree.model, "--synthetic", "4", "-o", out)
    assert_user_error(profile, out, "cannot be created")
    tarball = invoke("package", tree.artifact, "-o", out.with_suffix(".tar.gz"))
    assert_user_error(tarball, "cannot be created")
    tree.assert_untouched(before)


def test_option_bounds_are_one_line(tree: Tree) -> None:
    """A value past an option's bound is refused before any work, in one line naming the option."""
    for command, flag in (
        (("compile", tree.model, "-o", tree.root / "out", "--max-tokens", "100000000000"), "--max-tokens"),
        (("run", tree.artifact, "--tokens", "100000000000"), "--tokens"),
        (("run", tree.artifact, "--threads", "100000"), "--threads"),
        (("verify", tree.model, tree.artifact, "-n", "0"), "--tokens"),
    ):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert flag in error_line(result.stderr)
    assert_nothing_written(tree.root / "out")


def test_target_file_bounds(tmp_path: Path) -> None:
    from moec.targets import bundled_target_file

    target = tmp_path / "huge.toml"
    target.write_text(
        bundled_target_file("cortex-a72").read_text().replace("cores = 4", "cores = 1000000000")
    )
    result = invoke("compile", EXAMPLE_MODEL, "--target", target, "-o", tmp_path / "out")
    assert_user_error(result, target, "'cores'", "between")
    assert_nothing_written(tmp_path / "out")


def test_external_data_outside_the_model_folder(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", 4])],
        [weight],
    )
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    shutil.move(folder / "w.bin", tmp_path / "w.bin")
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../w.bin"
    onnx.save(model, path)
    for command in (("inspect", path), ("compile", path, "-o", tmp_path / "out")):
        assert_user_error(invoke(*command), path, "unsafe external data")
    assert_nothing_written(tmp_path / "out")


def test_second_compile_to_one_output_fails_at_once(tree: Tree) -> None:
    """While one moec writes an output (holding its lock), another compile to it fails at once
    with a clear line; it writes nothing, and the first still owns the output."""
    out = tree.root / "out"
    before = tree.snapshot()
    with output_lock(out):
        result = invoke("compile", tree.model, "-o", out)
        assert_user_error(result, out, "another moec process", str(os.getpid()))
        assert not any(PROGRESS.match(row) for row in result.stderr.splitlines())
    tree.assert_untouched(before)
    result = invoke("compile", tree.model, "-o", out)  # released: it compiles
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_two_compile_processes_race(tree: Tree) -> None:
    """Two ``moec compile -o same`` processes started together: exactly one succeeds."""
    out = tree.root / "out"
    script = Path(sys.executable).with_name("moec")
    processes = [
        subprocess.Popen(
            [str(script), "compile", str(tree.model), "-o", str(out)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    assert sorted(code for code, _ in results) == [0, 1], results
    failed = next(err for code, err in results if code == 1)
    assert "another moec process" in failed or "exists" in failed, failed
    assert ArtifactSession(out).run({"x": np.ones((2, HIDDEN), np.float32)})["y"].shape == (2, HIDDEN)


def test_one_session_from_many_threads(base: Path) -> None:
    """Calls from several threads at once each get their own inputs' outputs."""
    session = ArtifactSession(base / "art")
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((i + 1, HIDDEN)).astype(np.float32)} for i in range(8)
    ]
    expected = [session.run(f)["y"] for f in feeds]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(feeds))}

    def work(i: int) -> None:
        for _ in range(10):
            results[i].append(session.run(feeds[i])["y"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(feeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, outputs in results.items():
        assert len(outputs) == 10
        for output in outputs:
            np.testing.assert_array_equal(output, expected[i])


# --------------------------------------------------------------------------
# NaN and Inf
# --------------------------------------------------------------------------


def nan_tokens(tokens: int = 6) -> np.ndarray:
    """Random tokens; token 2 holds one NaN, token 4 one +Inf."""
    x = np.random.default_rng(7).standard_normal((tokens, HIDDEN)).astype(np.float32)
    x[2, 3], x[4, 5] = np.nan, np.inf
    return x


@pytest.mark.parametrize("precision", ["fp32", "int8-dot"])
def test_nan_token_gives_nan_row(base: Path, tmp_path: Path, precision: str) -> None:
    """A NaN (or Inf) in a token makes its output row NaN, as in onnxruntime and the numpy
    reference, through the dense ReLU, the routers and the experts; other rows are unchanged."""
    artifact = base / "art"
    if precision != "fp32":
        artifact = compile_model(base / "model.onnx", tmp_path / "art", CompileOptions(precision=precision))
    x = nan_tokens()
    actual = ArtifactSession(artifact).run({"x": x})["y"]
    onnxruntime = ort.InferenceSession(str(EXAMPLE_MODEL)).run(None, {"x": x})[0]
    assert np.isnan(onnxruntime).all(axis=1).tolist() == [False, False, True, False, True, False]
    assert np.array_equal(np.isnan(actual), np.isnan(onnxruntime)), np.isnan(actual).sum(axis=1)
    clean = [0, 1, 3, 5]
    finite = ArtifactSession(artifact).run({"x": x[clean]})["y"]
    np.testing.assert_array_equal(actual[clean], finite)  # the NaN rows change no other row
    if precision == "fp32":
        assert_close(actual, run_reference(onnx.load(EXAMPLE_MODEL), {"x": x})["y"], FP32_ATOL, "vs numpy")


EXPERT_WEIGHT = {
    "gpt_oss-block-dynamo-batched_mm": ("val_21", (0, 0)),  # expert 0's fused gate/up [E, H, 2F]
    "switch_transformers-block-torchscript-na": ("onnx::MatMul_319", (0,)),  # expert 0's wi [H, F]
}
"""Per fixture, an expert's first weight and the slice of it set to NaN: a row feeding every
intermediate unit of that expert (GPT-OSS clamps them, Switch applies ReLU)."""


@pytest.mark.parametrize("fixture", sorted(EXPERT_WEIGHT))
def test_nan_passes_clamps_and_relu_experts(tmp_path: Path, fixture: str) -> None:
    """A NaN weight of one expert makes the outputs of the tokens routed to it NaN through
    GPT-OSS's clamped SwiGLU and Switch's ReLU, as in PyTorch and numpy (TVM's min/max would
    clamp the NaN to the limit, or ReLU it to 0); the other tokens' outputs stay numbers, since
    moec computes each token's selected experts only."""
    from tests.helpers import FIXTURES, fixture_cases

    model = onnx.load(FIXTURES / "models" / f"{fixture}.onnx")
    name, where = EXPERT_WEIGHT[fixture]
    tensor = next(t for t in model.graph.initializer if t.name == name)
    weight = numpy_helper.to_array(tensor).copy()
    weight[where] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(weight, name))
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    session = ArtifactSession(compile_model(path, tmp_path / "art", CompileOptions()))
    # numpy's canonical layers: each token through its selected experts only (a batched_mm graph
    # multiplies every expert by routing weight 0, which spreads the NaN to every token)
    canonical = canonical_evaluator(model)[0]
    rows = []
    for feeds, _ in fixture_cases(fixture).values():  # shapes the trace runs at
        expected = dict(zip([o.name for o in model.graph.output], canonical.run(None, feeds), strict=True))
        actual = session.run(feeds)
        for output, value in expected.items():
            rows += np.isnan(value).reshape(-1, value.shape[-1]).any(axis=1).tolist()
            assert_close(actual[output], value, FP32_ATOL, output)  # NaN exactly where numpy has NaN
    assert any(rows) and not all(rows), f"tokens routed to expert 0: {rows}: the cases test nothing"


def test_verify_counts_nan_mismatches(tree: Tree) -> None:
    both = compare_outputs({"y": np.array([np.nan, np.inf, 1.0])}, {"y": np.array([np.nan, np.inf, 1.0])}, 1)[
        0
    ]
    assert both.nan_mismatches == 0 and both.max_abs == 0.0 and both.within(0.0)
    one = compare_outputs({"y": np.array([np.nan, 2.0, 1.0])}, {"y": np.array([5.0, 2.0, 1.0])}, 1)[0]
    assert one.nan_mismatches == 1 and not one.within(1e9)

    x = np.random.default_rng(0).standard_normal((3, HIDDEN)).astype(np.float32)
    expected = run_reference(onnx.load(tree.model), {"x": x})
    expected["y"][1, 7] = np.nan  # what the framework gave, say: the artifact gives a number
    np.savez(tree.root / "in.npz", x=x)
    np.savez(tree.root / "out.npz", **expected)
    result = invoke(
        "verify",
        tree.model,
        tree.artifact,
        "--inputs",
        tree.root / "in.npz",
        "--expected",
        tree.root / "out.npz",
    )
    assert_user_error(result, tree.artifact, "1 NaN value(s)")
    assert "value(s) NaN in one and not the other" in result.stdout


@pytest.mark.parametrize(
    "calib, cause",
    [
        ({"x": np.zeros((0, HIDDEN), np.float32)}, "has no tokens"),
        ({"x": np.full((4, HIDDEN), np.nan, np.float32)}, "NaN or Inf"),
        ({"x": np.zeros((0, 4, HIDDEN), np.float32)}, "no samples"),
    ],
)
def test_calibration_data_must_have_finite_tokens(tree: Tree, calib: dict, cause: str) -> None:
    path = tree.root / "calib.npz"
    np.savez(path, **calib)
    before = tree.snapshot()
    result = invoke("profile", tree.model, "--calib", path, "-o", tree.root / "p.json")
    assert_user_error(result, path, cause)
    tree.assert_untouched(before)


# --------------------------------------------------------------------------
# honest inputs
# --------------------------------------------------------------------------


def test_random_token_ids_span_the_vocabulary(tmp_path: Path) -> None:
    artifact = compile_model(embedding_model(tmp_path / "m.onnx"), tmp_path / "art", CompileOptions())
    inputs = json.loads((artifact / MANIFEST).read_text())["inputs"]
    assert inputs[0]["range"] == [0, 1000]
    ids = random_inputs(inputs, 4000)["ids"]
    assert ids.min() >= 0 and ids.max() < 1000 and len(np.unique(ids)) > 900
    result = invoke("verify", tmp_path / "m.onnx", artifact, "-n", "64")
    assert result.exit_code == 0, result.output


def test_tokens_on_a_fixed_shape_model(tmp_path: Path) -> None:
    """--tokens on an artifact with fixed input shapes is refused; verify runs it once and says
    which shapes it ran."""
    model = embedding_model(tmp_path / "m.onnx", fixed=True)
    artifact = compile_model(model, tmp_path / "art", CompileOptions())
    assert_user_error(invoke("run", artifact, "--tokens", "1000"), "--tokens 1000", "fixed shapes", "[1, 8]")
    assert_user_error(invoke("verify", model, artifact, "-n", "5"), "-n 5", "fixed shapes")
    result = invoke("verify", model, artifact)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if " y: max abs" in line]
    assert len(rows) == 1 and "fixed shapes" in rows[0] and "token" not in rows[0], rows


def test_synthetic_profile_of_a_fixed_shape_model_counts_its_tokens(tmp_path: Path) -> None:
    """--synthetic N on a model whose inputs have fixed shapes profiles samples of that shape until
    N tokens are covered (and says so), instead of one sample whatever N is."""
    model = onnx.load(EXAMPLE_MODEL)
    (dim, *_) = model.graph.input[0].type.tensor_type.shape.dim
    dim.dim_value = 5  # [tokens, 64] -> [5, 64]
    path = tmp_path / "fixed.onnx"
    onnx.save(model, path)
    result = invoke("profile", path, "--synthetic", "12", "-o", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert "profiling 12 random tokens (3 samples of the model's fixed 5 tokens)" in result.stderr
    profile = json.loads((tmp_path / "p.json").read_text())
    assert profile["samples"] == 3 and {layer["tokens"] for layer in profile["layers"]} == {15}
    dynamic = invoke("profile", EXAMPLE_MODEL, "--synthetic", "12", "-o", tmp_path / "q.json")
    assert dynamic.exit_code == 0, dynamic.output
    profile = json.loads((tmp_path / "q.json").read_text())
    assert profile["samples"] == 1 and {layer["tokens"] for layer in profile["layers"]} == {12}


def test_verify_labels_cases_by_their_shapes(tree: Tree) -> None:
    result = invoke("verify", tree.model, tree.artifact, "-n", "3", "-n", "7")
    assert result.exit_code == 0, result.output
    labels = [line.split()[0] for line in result.stdout.splitlines() if " y: max abs" in line]
    assert labels == ["tokens=3", "tokens=7"], labels


def test_repeats_and_warmup_are_exact(base: Path) -> None:
    """``run`` makes exactly the warm-up and timed calls asked for (and says so)."""
    result = invoke("run", base / "art", "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "timing: 1 warm-up call(s), then 1 timed call(s)" in result.stdout
    assert "latency over 1 runs" in result.stdout
    result = invoke("run", base / "art", "--repeats", "3", "--warmup", "0")
    assert "timing: 0 warm-up call(s), then 3 timed call(s)" in result.stdout

    session = ArtifactSession(base / "art")
    calls = []
    entry = session.vm["main"]

    class CountingVM:
        def __getitem__(self, name: str) -> Callable[..., object]:
            return lambda *args: (calls.append(name), entry(*args))[1]

    session.vm = CountingVM()
    times = session.time({"x": np.ones((3, HIDDEN), np.float32)}, repeats=2, warmup=1)
    assert len(times) == 2 and len(calls) == 3


def test_tvm_warnings_are_not_printed(tmp_path: Path) -> None:
    """A cache decoder's compile prints progress and the result only: not TVM's frontend warnings
    ("Renaming name past_key_values.0.key ...") nor its native ones; MOEC_DEBUG=1 keeps them."""
    from tests.helpers import FIXTURES

    model = FIXTURES / "models" / "mixtral-decoder-cache-dynamo-batched_mm.onnx"
    result = invoke("compile", model, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    noise = [line for line in result.stderr.splitlines() if not PROGRESS.match(line)]
    assert not noise, noise

    code = (
        "import tvm\nfrom moec.compiler.tvm_log import quiet_tvm\n"
        "with quiet_tvm():\n    tvm.target.Target('cuda')\n"  # TVM logs a native warning here
    )
    for debug, shown in (({}, False), ({"MOEC_DEBUG": "1"}, True)):
        env = {k: v for k, v in os.environ.items() if k != "MOEC_DEBUG"} | debug
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        assert ("Warning:" in run.stderr) == shown, run.stderr


# --------------------------------------------------------------------------
# reproducible builds
# --------------------------------------------------------------------------


def test_same_model_compiles_to_the_same_bytes(base: Path, tmp_path: Path) -> None:
    """The example compiled again, elsewhere: byte-identical library and weights."""
    again = compile_model(base / "model.onnx", tmp_path / "again", CompileOptions())
    for name in (LIBRARY, WEIGHTS):
        assert (again / name).read_bytes() == (base / "art" / name).read_bytes(), f"{name} differs"


@pytest.mark.slow
def test_decoder_builds_compute_the_same(tmp_path: Path) -> None:
    """A cache decoder's two builds: identical weights and bit-identical outputs. (Its libraries
    may differ: see docs/robustness.md, "Reproducible builds".)"""
    from tests.helpers import FIXTURES

    model = FIXTURES / "models" / "mixtral-decoder-cache-dynamo-batched_mm.onnx"
    builds = [compile_model(model, tmp_path / f"build{i}", CompileOptions()) for i in range(2)]
    assert (builds[0] / WEIGHTS).read_bytes() == (builds[1] / WEIGHTS).read_bytes()
    sessions = [ArtifactSession(build) for build in builds]
    for tokens in (1, 5):
        feeds = random_inputs(sessions[0].inputs, tokens, seed=tokens)
        first, second = (s.run(feeds) for s in sessions)
        for name in first:
            np.testing.assert_array_equal(first[name], second[name])
