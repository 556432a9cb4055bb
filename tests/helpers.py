"""Helpers every kind of test imports: the one numeric check, compiling and running test models,
driving the ``moec`` command line, and the plain-numpy routing and experts the pass tests start from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from moec.cli import main
from moec.compiler.compile import compile_model
from moec.frontend.importer import find_blocks
from moec.frontend.loader import load_model
from moec.options import CompileOptions
from moec.reference.evaluator import run_reference
from moec.reference.stored import canonical_evaluator
from moec.runtime.session import ArtifactSession
from moec.weights_file import HEADER, MAGIC, PAGE, VERSION

FP32_ATOL = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "fixtures"
EXAMPLE_MODEL = REPO_ROOT / "examples" / "mixtral_tiny.onnx"  # two MoE layers, hidden 64
PROGRESS = re.compile(r"^\[\s*\d+\.\d+s\] ")  # compile's progress lines, also on stderr


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str = "") -> None:
    """Assert equal shape and dtype, and every value within ``atol`` (no relative slack)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    label = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{label}shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{label}dtype {actual.dtype} != {expected.dtype}"
    np.testing.assert_allclose(actual, expected, rtol=0.0, atol=atol, err_msg=label)


def tokens_input(tokens: int, hidden: int, seed: int = 0, batch: tuple[int, ...] = ()) -> np.ndarray:
    """Deterministic O(1) hidden states ``[*batch, tokens, hidden]``."""
    rng = np.random.default_rng(1000 + 17 * tokens + seed)
    return rng.standard_normal((*batch, tokens, hidden)).astype(np.float32)


def compile_to(model: onnx.ModelProto, directory: Path, target: str = "host") -> ArtifactSession:
    """Save ``model`` under ``directory``, compile it, and load the artifact."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    onnx.save(model, path)
    compile_model(path, directory / "artifact", CompileOptions(target=target))
    return ArtifactSession(directory / "artifact")


def check_artifact(
    session: ArtifactSession,
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    atol: float = FP32_ATOL,
    onnxruntime: bool = True,
) -> None:
    """The artifact's outputs match the numpy reference (and onnxruntime, when it runs the model)."""
    actual = session.run(feeds)
    expected = run_reference(model, feeds)
    for name, value in expected.items():
        assert_close(actual[name], value, atol, f"{name} vs numpy reference")
    if onnxruntime:
        import onnxruntime as ort

        ort_session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in ort_session.get_outputs()]
        for name, value in zip(names, ort_session.run(None, feeds), strict=True):
            assert_close(actual[name], value, atol, f"{name} vs onnxruntime")


def embedding_model(path: Path, vocab: int = 1000, fixed: bool = False) -> Path:
    """``y = emb[ids]`` with ``ids: int64[1, 8]`` (fixed) or ``[1, tokens]``."""
    table = numpy_helper.from_array(np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4), "emb")
    tokens = 8 if fixed else "tokens"
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["y"])],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, tokens])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, 4])],
        [table],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def softmax_top_k(
    x: np.ndarray, router_w: np.ndarray, k: int, kept: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts and renormalised weights per token of a softmax router ``x @ router_w``,
    computed in float64 (the independent routing the masking/pruning/skipping tests start from).

    ``kept``: top-k over these experts only, the scores still a softmax over all of them.
    """
    logits = x.astype(np.float64) @ router_w
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    choice = probs
    if kept is not None:
        choice = np.full_like(probs, -1.0)
        choice[:, kept] = probs[:, kept]
    index = np.argsort(-choice, axis=1, kind="stable")[:, :k]
    gain = np.take_along_axis(probs, index, 1)
    return index, gain / gain.sum(1, keepdims=True)


def swiglu_hidden(x: np.ndarray, w: dict, e: int) -> np.ndarray:
    """Expert ``e``'s intermediate activations ``silu(x @ gate) * (x @ up)`` for a block built with
    ``weights_out`` (``w["gate"][e]``, ``w["up"][e]``: ``[H, F]``), in float64."""
    x = x.astype(np.float64)
    gate, up = x @ w["gate"][e], x @ w["up"][e]
    return gate / (1 + np.exp(-gate)) * up


def swiglu_expert(x: np.ndarray, w: dict, e: int) -> np.ndarray:
    """Expert ``e``'s output ``swiglu_hidden(x) @ down`` in float64."""
    return swiglu_hidden(x, w, e) @ w["down"][e]


def fixture_cases(name: str) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """An exported fixture's npz (keys ``CASE.in.NAME`` / ``CASE.out.NAME``) as
    {case: (inputs, PyTorch outputs)}; a cache fixture's ``generate.*`` arrays are not cases."""
    cases: dict = {}
    with np.load(FIXTURES / "models" / f"{name}.npz") as data:
        for key in data.files:
            if key.startswith("generate."):
                continue
            case, kind, tensor = key.split(".", 2)
            cases.setdefault(case, ({}, {}))[0 if kind == "in" else 1][tensor] = data[key]
    return cases


def check_exported_fixture(
    name: str, tmp_path: Path, cases: set[str], blocks: int = 2, traced_loop: bool = False
) -> ArtifactSession:
    """An exported fixture with its ``blocks`` MoE blocks recognised, compiled, and every output of
    every case (exactly ``cases``) within FP32_ATOL of PyTorch's and of the numpy reference's.

    ``traced_loop``: the graph holds a TorchScript trace of an experts loop with split sizes from
    the traced input, so the graph itself (in numpy, as in onnxruntime) runs at the traced shape
    only; the other cases are checked against the canonical numpy reference (the graph with each
    block as numpy layer semantics)."""
    path = FIXTURES / "models" / f"{name}.onnx"
    model = load_model(path)
    assert len(find_blocks(model)) == blocks, f"{name}: every MoE block is recognised"
    session = ArtifactSession(compile_model(path, tmp_path / "artifact"))
    canonical = canonical_evaluator(model)[0] if traced_loop else None  # built once, for every case
    found = fixture_cases(name)
    assert set(found) == cases, f"{name}: cases {sorted(found)}"
    for case, (feeds, torch_outputs) in found.items():
        actual = session.run(feeds)
        assert set(actual) == set(torch_outputs)
        for output, expected in torch_outputs.items():
            assert_close(actual[output], expected, FP32_ATOL, f"{name} {case} {output} vs PyTorch")
        if traced_loop and case != "traced":
            reference = dict(
                zip([o.name for o in model.graph.output], canonical.run(None, feeds), strict=True)
            )
        else:
            reference = run_reference(model, feeds)
        for output, expected in reference.items():
            assert_close(actual[output], expected, FP32_ATOL, f"{name} {case} {output} vs numpy")
    return session


def fixture_generation(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A cache fixture's greedy-generation check: the prompt ``[1, P]`` and PyTorch's ``generate``
    tokens ``[1, P + new]`` (prompt included)."""
    with np.load(FIXTURES / "models" / f"{name}.npz") as data:
        return data["generate.prompt"], data["generate.tokens"]


def invoke(*args: str | Path) -> Result:
    """Run ``moec ARGS`` in-process (MOEC_DEBUG unset, so errors are never re-raised)."""
    return CliRunner(env={"MOEC_DEBUG": None}).invoke(main, [str(a) for a in args])


def error_line(stderr: str) -> str:
    """The single non-progress line of ``stderr``, which must be a ``moec: error:`` line."""
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1, f"expected exactly one error line on stderr, got {lines!r}"
    assert lines[0].startswith("moec: error: "), lines[0]
    return lines[0]


def assert_user_error(result: Result, *culprits: str | Path) -> str:
    """Exit 1, one ``moec: error:`` line naming every culprit, and no traceback; return the line."""
    assert "Traceback" not in result.output and "Traceback" not in result.stderr, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    line = error_line(result.stderr)
    assert result.exit_code == 1, f"exit {result.exit_code} (3 means an internal error): {line}"
    assert "internal error" not in line, line
    for culprit in culprits:
        assert str(culprit) in line, f"{culprit!r} not named in {line!r}"
    return line


def assert_nothing_written(out_dir: Path) -> None:
    """Neither ``out_dir`` nor a hidden ``.<name>.*`` staging sibling exists."""
    assert not out_dir.exists(), f"{out_dir} was left behind"
    staging = sorted(p.name for p in out_dir.parent.glob(f".{out_dir.name}.*"))
    assert not staging, f"staging directories left behind: {staging}"


def profile_model(model: Path, directory: Path, calib: dict[str, np.ndarray], *extra: str) -> Path:
    """``moec profile MODEL`` on ``calib`` (saved as ``directory/calib.npz``); the profile's path."""
    np.savez(directory / "calib.npz", **calib)
    profile = directory / "p.json"
    result = invoke("profile", model, "--calib", directory / "calib.npz", "-o", profile, *extra)
    assert result.exit_code == 0, result.output
    return profile


def rewrite_weights(artifact: Path, tensors: dict[str, np.ndarray]) -> None:
    """Replace ``artifact``'s weights by ``tensors`` (e.g. poisoned with NaN) and record the new
    file's size and hash in its manifest, as a compile writing those weights would."""
    from moec.artifact import MANIFEST, WEIGHTS, record_files
    from moec.weights_file import write_weights

    write_weights(artifact / WEIGHTS, tensors)
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"].update(record_files(artifact, [WEIGHTS]))
    (artifact / MANIFEST).write_text(json.dumps(manifest))


WEIGHTS_DAMAGE = {
    "truncated": "ends past the end of the file",
    "bad magic": "bad magic",
    "index past end": "index runs past the end of the file",
    "tensor past end": "'w' ends past the end of the file",
    "misaligned": "offset 4, not a multiple of 64",
    "garbled index": "unreadable index",
    "newer version": f"format version {VERSION + 1}",
    "shorter than the header": "4 bytes, shorter than its 16-byte header",
    "empty": "0 bytes, shorter than its 16-byte header",
}
"""How :func:`damage_weights` can break a weights file, and the cause every reader names for it."""


def damage_weights(path: Path, case: str) -> None:
    """Break the weights file at ``path`` as ``case`` (a key of :data:`WEIGHTS_DAMAGE`) says."""
    data = path.read_bytes()
    one_tensor = {"name": "w", "dtype": "float32", "shape": [4], "offset": 64, "nbytes": 16}
    if case == "misaligned":
        one_tensor.update(shape=[1], offset=4, nbytes=4)
    index = json.dumps({"tensors": [one_tensor]}).encode()
    made = HEADER.pack(MAGIC, VERSION, len(index)) + index
    broken = {
        "truncated": data[:-5],
        "bad magic": b"PARAMS\0\0" + data[8:],
        "index past end": HEADER.pack(MAGIC, VERSION, len(data)) + data[HEADER.size :],
        "tensor past end": made + bytes(PAGE + 64 + 8 - len(made)),  # 'w' has 8 of its 16 bytes
        "misaligned": made + bytes(2 * PAGE - len(made)),
        "garbled index": data[: HEADER.size] + b"\xff" * (len(data) - HEADER.size),
        "newer version": HEADER.pack(MAGIC, VERSION + 1, 0) + data[HEADER.size :],
        "shorter than the header": b"junk",
        "empty": b"",
    }
    path.write_bytes(broken[case])


H200_SIZES = {"cores": 132, "l1d_bytes": 49152, "l2_bytes": 52428800, "memory_bandwidth_gbps": 4800}
"""An H200's streaming multiprocessors, shared memory per block, L2 and memory bandwidth (GB/s)."""


def named_gpu_target(directory: Path, arch: str = "sm_90", sizes: dict[str, int] | None = None) -> Path:
    """A copy of the bundled ``cuda`` target naming its GPU (default: an H200) instead of
    detecting it, as its header tells a user without a driver to write; returns its path."""
    from moec.targets import bundled_target_file

    text = bundled_target_file("cuda").read_text().replace('arch = "detect"    #', f'arch = "{arch}"    #')
    for field, value in (sizes or H200_SIZES).items():
        text = text.replace(f'{field} = "detect"', f"{field} = {value}")
    path = Path(directory) / f"gpu-{arch}.toml"
    path.write_text(text)
    return path
