"""The artifact format: what ``moec compile`` writes and every runtime reads, in one place.

An artifact is a directory holding :data:`LIBRARY` (kernels and Relax VM bytecode),
:data:`WEIGHTS` (:mod:`moec.weights_file`'s memory-mappable format, in ``manifest["params"]``
order) and :data:`MANIFEST` (:class:`Manifest`: what the library computes and how it was built).
The compiler writes it (:func:`build_manifest`, :func:`write_manifest`, :func:`staged_directory`);
the Python runtime, the board runner (``moec/runtime/native/runner.cc``, which reads the same
keys) and ``moec package`` read it (:func:`read_manifest`). The module does not import TVM, so
packaging an artifact loads no compiler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import onnx

import moec
from moec.errors import MoecError
from moec.frontend.rewrite import layer_weight_names
from moec.options import CompileOptions, OptionError

if TYPE_CHECKING:
    import tvm

    from moec.frontend.importer import ImportedModel
    from moec.targets import TargetSpec

LIBRARY = "model.so"
WEIGHTS = "weights.bin"
MANIFEST = "manifest.json"
FORMAT = "moec-artifact/2"
"""Version 2: the weights are a :mod:`moec.weights_file` (version 1 had a TVM param dict)."""


class ValueInfo(TypedDict):
    """A graph input or output: ``shape`` holds ints for fixed dimensions and names (``"tokens"``,
    ``"?"`` if unnamed) for symbolic ones."""

    name: str
    shape: list[int | str]
    dtype: str


class ExpertPlan(TypedDict):
    """One expert of a layer: whether it is stored (masking), its stored and computed precision,
    and the bytes it occupies in the weights file (0 when masked)."""

    expert: int
    kept: bool
    precision: str
    compute: str
    bytes: int


class Pruning(TypedDict):
    """A pruned layer: the intermediate channels each kept expert keeps, and how many."""

    ffn_kept: int
    channels: list[list[int]]


class _ManifestKeys(TypedDict):
    """The keys every manifest has (see :class:`Manifest`)."""

    format: str
    moec_version: str
    tvm_version: str
    model: dict[str, str]
    target: dict[str, Any]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    params: list[str]
    library: str
    weights: str
    layers: list[dict[str, Any]]
    early_exit: dict[str, float | None]
    routing: str
    pruning: dict[str, Pruning]
    max_tokens: int | None


class Manifest(_ManifestKeys, total=False):
    """``manifest.json``. ``layers`` holds each MoE layer's ``MoELayer.describe()`` plus
    ``weights`` (role → parameter name), ``plan`` (one :class:`ExpertPlan` per expert) and
    ``int8_group`` (the INT8 scale group when an expert is int8, else None), ``int8_source``
    ``"model"`` where those are the model's own INT8 integers and steps (QMoE);
    ``early_exit`` holds ``top1_above`` / ``below_fraction`` (empty when off); ``pruning`` the
    pruned layers; ``max_tokens`` the token bound (None: none). ``cuda_build``, for CUDA targets
    only, names the toolchain that made the cubins. ``precision_budget``, when the experts'
    precisions were chosen under an accuracy budget, records that choice (budget, metric,
    measured errors). ``dense_weights`` names the dense weights (routers, attention, LM head)
    stored narrower: precision, the axis of their outputs, whether a router. ``entries`` names
    extra entry points of the library by use: ``one_token`` is ``main`` with the symbolic input
    dimensions ``one_token_dims`` fixed to 1 (static shapes and memory; a KV cache's length stays
    symbolic), for calls where those dimensions are all 1."""

    cuda_build: dict[str, Any]
    entries: dict[str, Any]
    precision_budget: dict[str, Any]
    dense_weights: dict[str, dict[str, Any]]


def value_info(value: onnx.ValueInfoProto) -> ValueInfo:
    """The manifest's description of an ONNX graph input or output."""
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return {
        "name": value.name,
        "shape": dims,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
    }


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers listed as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def build_manifest(
    imported: ImportedModel,
    target: TargetSpec,
    model_path: Path,
    weights: dict[str, tvm.runtime.Tensor],
    options: CompileOptions,
    cuda_build: dict[str, Any] | None = None,
    entries: dict[str, Any] | None = None,
    dense: dict[str, dict[str, Any]] | None = None,
) -> Manifest:
    """The manifest of ``imported`` compiled for ``target`` with ``options``.

    ``weights`` are the stored weight tensors by name, in ``main``'s parameter order: each
    layer's plan reports the precision its expert matrices are stored in and the bytes one
    expert occupies in the weights file. ``cuda_build``: what the CUDA build used (CUDA targets);
    ``entries``: the library's extra entry points by use; ``dense``: the dense weights stored
    narrower (name → precision, output axis, router or not).
    """
    import tvm  # already loaded by the compiler; imported here to keep it out of the readers' imports

    from moec.kernels.formats import INT8_FORMATS, fp16_arithmetic

    kept_experts = options.kept_experts or {}
    layers = []
    for block in imported.blocks:
        layer = block.layer
        entry = layer.describe()
        names = layer_weight_names(block)
        entry["weights"] = {name.rsplit(".", 1)[1]: name for name in names}
        kept = kept_experts.get(layer.name, list(range(layer.num_experts)))
        precisions = options.layer_precisions(layer.name, layer.num_experts)
        stored = expert_bytes(weights, names, [precisions[e] for e in kept])
        int8 = set(INT8_FORMATS) & set(precisions)
        entry["int8_group"] = options.layer_int8_group(layer.name) if int8 else None
        if int8 and layer.name in (options.int8_exact or {}):
            entry["int8_source"] = "model"  # the model's own integers and steps, not requantized
        ffn = len((options.kept_channels or {}).get(layer.name, [range(layer.ffn)])[0])
        half = fp16_arithmetic(target.cpu_fp16, layer.hidden, ffn)
        entry["plan"] = [
            ExpertPlan(
                expert=expert,
                kept=expert in kept,
                precision=precisions[expert],
                compute=expert_compute(precisions[expert], half),
                bytes=stored[kept.index(expert)] if expert in kept else 0,
            )
            for expert in range(layer.num_experts)
        ]
        layers.append(entry)
    manifest = Manifest(
        format=FORMAT,
        moec_version=moec.__version__,
        tvm_version=tvm.__version__,
        model={
            "path": str(model_path),
            "sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
        },
        target=target.describe(),
        inputs=[value_info(v) for v in graph_inputs(imported.original)],
        outputs=[value_info(v) for v in imported.original.graph.output],
        params=list(weights),
        library=LIBRARY,
        weights=WEIGHTS,
        layers=layers,
        early_exit=(
            {"top1_above": options.skip_top1_above, "below_fraction": options.skip_below_fraction}
            if options.skips_experts
            else {}
        ),
        routing=options.routing,
        pruning={
            layer: Pruning(ffn_kept=len(channels[0]), channels=channels)
            for layer, channels in (options.kept_channels or {}).items()
        },
        max_tokens=options.max_tokens,
    )
    if dense:
        manifest["dense_weights"] = dense
    if options.precision_budget:
        manifest["precision_budget"] = dict(options.precision_budget)
    if cuda_build:
        manifest["cuda_build"] = cuda_build
    if entries:
        manifest["entries"] = entries
    return manifest


def expert_compute(precision: str, fp16_arithmetic: bool) -> str:
    """The arithmetic an expert stored as ``precision`` multiplies in: int8 for int8-dot, fp16 for
    fp16 on a target with FP16 arithmetic (``fp16_arithmetic``), else fp32."""
    if precision == "int8-dot":
        return "int8"
    return "fp16" if fp16_arithmetic and precision == "fp16" else "fp32"


def expert_bytes(
    weights: dict[str, tvm.runtime.Tensor], names: list[str], precisions: list[str]
) -> list[int]:
    """Bytes each stored expert of a layer occupies in the weights file, for the layer's weights
    ``names`` (by role) stored with the experts' ``precisions``: a weight stored whole gives each
    expert an equal share; one stored per precision (``{name}.{precision}``, with int8's
    ``{name}.int8_scale``; int8-dot's ``{name}.int8_dot``) gives its share to the experts of that
    precision only."""
    shares = [0] * len(precisions)
    for name in names:
        parts = {n: weights[n] for n in weights if n == name or n.startswith(f"{name}.")}
        for part, value in parts.items():
            precision = part.removeprefix(f"{name}.").removesuffix("_scale") if part != name else None
            owners = [i for i, p in enumerate(precisions) if precision in (None, p.replace("-", "_"))]
            size = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
            for i in owners:
                shares[i] += size // len(owners)
    return shares


def write_manifest(artifact_dir: Path, manifest: Manifest) -> None:
    """Write ``manifest`` as the manifest of the (staged) artifact directory ``artifact_dir``."""
    (Path(artifact_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(artifact_dir: Path) -> Manifest:
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


def is_artifact(directory: Path) -> bool:
    """Whether ``directory`` is a moec artifact: its manifest names moec's artifact format."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("moec-artifact/")


def check_replaceable(out_dir: Path, force: bool, protected: Sequence[Path] = ()) -> None:
    """Raise :class:`OptionError` (option ``force``) unless ``out_dir`` may be written: it does not
    exist, or ``force`` is on and it is moec's to replace — a moec artifact (:func:`is_artifact`)
    or an empty directory — that is not the current directory or one of its parents and holds
    none of ``protected`` (the input model). ``--force`` never deletes what moec did not write."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise OptionError("force", f"{out_dir}: output directory exists; pass {{option}} to replace it")
    resolved, here = out_dir.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise OptionError(
            "force",
            f"{out_dir}: is the current directory or one of its parents, which {{option}} never "
            "replaces; pass another -o",
        )
    for path in protected:
        inside = Path(path).resolve()
        if inside == resolved or resolved in inside.parents:
            raise OptionError(
                "force",
                f"{out_dir}: holds the input {path}, which {{option}} never replaces; pass another -o",
            )
    if out_dir.is_symlink() or not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_artifact(out_dir)):
        raise OptionError(
            "force",
            f"{out_dir}: is not a moec artifact; {{option}} replaces only a moec artifact or an empty "
            "directory: pass another -o",
        )


@contextlib.contextmanager
def staged_directory(out_dir: Path, force: bool, protected: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; move it into place only if the block succeeds.

    A failed compile leaves nothing behind, and an existing ``out_dir`` is replaced only with
    ``force``, only if it is moec's to replace (:func:`check_replaceable`, checked again just
    before) and only once the new artifact is complete.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, force, protected)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact should not be
    try:
        yield staging
        check_replaceable(out_dir, force, protected)  # what appeared meanwhile is not replaced either
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
