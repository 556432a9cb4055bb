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
from moec.errors import MoecError, first_line
from moec.frontend.rewrite import layer_weight_names
from moec.manifest_schema import check_manifest
from moec.options import CompileOptions, OptionError

if TYPE_CHECKING:
    import tvm

    from moec.frontend.importer import ImportedModel
    from moec.targets import TargetSpec

LIBRARY = "model.so"
WEIGHTS = "weights.bin"
MANIFEST = "manifest.json"
FORMAT = "moec-artifact/3"
"""Version 3: the manifest records each file's size and SHA-256 (``files``); version 2 began the
:mod:`moec.weights_file` weights (version 1 had a TVM param dict)."""
HASH_CHUNK = 1 << 20
"""Files are hashed in pieces of this many bytes, so hashing a large weights file holds no copy."""


class _ValueInfoKeys(TypedDict):
    name: str
    shape: list[int | str]
    dtype: str


class ValueInfo(_ValueInfoKeys, total=False):
    """A graph input or output: ``shape`` holds ints for fixed dimensions and names (``"tokens"``,
    ``"?"`` if unnamed) for symbolic ones; ``range``, for an integer input that indexes the rows
    of a weight (token ids into an embedding), ``[0, rows]``: it takes values from the first up
    to, not including, the second."""

    range: list[int]


class ExpertPlan(TypedDict):
    """One expert of a layer: whether it is stored (masking), its stored and computed precision,
    and the bytes it occupies in the weights file (0 when masked)."""

    expert: int
    kept: bool
    precision: str
    compute: str
    bytes: int


class FileRecord(TypedDict):
    """What the manifest knows of one file of the artifact: its size and SHA-256 (hex)."""

    bytes: int
    sha256: str


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
    files: dict[str, FileRecord]
    layers: list[dict[str, Any]]
    early_exit: dict[str, float | None]
    routing: str
    pruning: dict[str, Pruning]
    max_tokens: int | None


class Manifest(_ManifestKeys, total=False):
    """``manifest.json``. ``layers`` holds each MoE layer's ``MoELayer.describe()`` plus
    ``weights`` (role → parameter name), ``plan`` (one :class:`ExpertPlan` per expert) and
    ``int8_group`` (the INT8 scale group when an expert is int8, else None), ``int8_source``
    ``"model"`` where those are the model's own INT8 integers and steps (QMoE); ``files`` the
    size and SHA-256 of ``library`` and ``weights`` (plain names inside the artifact directory),
    checked before either is loaded (:func:`check_files`);
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


def index_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """The graph inputs that index rows of a weight, by name, with the number of rows: an input
    read as ``Gather``'s indices into an initializer (token ids into an embedding table) takes
    values below that table's size along the gathered axis (the smallest, if several)."""
    sizes = {t.name: list(t.dims) for t in model.graph.initializer}
    inputs = {v.name for v in graph_inputs(model)}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        table, indices = node.input[0], node.input[1]
        if indices in inputs and table in sizes and sizes[table]:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if -len(sizes[table]) <= axis < len(sizes[table]):
                rows[indices] = min(rows.get(indices, sizes[table][axis]), sizes[table][axis])
    return rows


def input_infos(model: onnx.ModelProto) -> list[ValueInfo]:
    """The manifest's ``inputs``: each real graph input's :func:`value_info`, with its ``range``
    where it indexes a weight's rows (:func:`index_ranges`)."""
    ranges = index_ranges(model)
    infos = []
    for value in graph_inputs(model):
        info = value_info(value)
        if value.name in ranges and np.dtype(info["dtype"]).kind in "iu":
            info["range"] = [0, ranges[value.name]]
        infos.append(info)
    return infos


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
    files: dict[str, FileRecord],
    cuda_build: dict[str, Any] | None = None,
    entries: dict[str, Any] | None = None,
    dense: dict[str, dict[str, Any]] | None = None,
) -> Manifest:
    """The manifest of ``imported`` compiled for ``target`` with ``options``.

    ``weights`` are the stored weight tensors by name, in ``main``'s parameter order: each
    layer's plan reports the precision its expert matrices are stored in and the bytes one
    expert occupies in the weights file. ``files``: the library's and the weights file's
    :func:`file_record` (:func:`record_files`). ``cuda_build``: what the CUDA build used (CUDA targets);
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
        inputs=input_infos(imported.original),
        outputs=[value_info(v) for v in imported.original.graph.output],
        params=list(weights),
        library=LIBRARY,
        weights=WEIGHTS,
        files=files,
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
    """The manifest of an artifact directory, with a clear error if it is not one or if any field
    a reader relies on is damaged (:func:`moec.manifest_schema.check_manifest`)."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir() or not path.is_file():
        raise MoecError(
            f"{artifact_dir}: not a moec artifact directory (no {MANIFEST}); make one with 'moec compile'"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise MoecError(f"{path}: corrupt manifest ({first_line(err)}); recompile the model") from err
    except OSError as err:
        raise MoecError(f"{path}: cannot read the manifest ({err.strerror or err})") from err
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise MoecError(
            f"{path}: unknown artifact format {found!r}; this moec reads {FORMAT}: recompile the model"
        )
    check_manifest(manifest, str(path))
    return manifest


def file_record(path: Path) -> FileRecord:
    """The size and SHA-256 of the file at ``path``, read in :data:`HASH_CHUNK` pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return FileRecord(bytes=Path(path).stat().st_size, sha256=digest.hexdigest())


def record_files(artifact_dir: Path, names: Sequence[str]) -> dict[str, FileRecord]:
    """The manifest's ``files``: :func:`file_record` of each of ``names`` in ``artifact_dir``."""
    return {name: file_record(Path(artifact_dir) / name) for name in names}


def check_files(artifact_dir: Path, manifest: Manifest, hashes: bool = True) -> None:
    """Raise a one-line :class:`MoecError` naming the first file of the artifact that is missing, or
    whose size or (with ``hashes``) SHA-256 differs from what the manifest records.

    A weights file cut short, a bit flipped or a file swapped for another model's would otherwise
    run and give wrong numbers (TVM's loaders fill what is missing with zeros), and a truncated
    library kills the process with SIGBUS when a page past its end is touched. Sizes cost one
    ``stat``; hashing reads every byte once (about 1.8 GB/s here with SHA-NI), which
    ``hashes=False`` (``--skip-hash-check``) skips for very large artifacts.
    """
    artifact_dir = Path(artifact_dir)
    for key in ("library", "weights"):
        name = manifest[key]
        path = artifact_dir / name
        recorded = manifest["files"].get(name)
        if recorded is None:
            raise MoecError(
                f"{artifact_dir / MANIFEST}: damaged manifest: 'files' has no '{name}'; recompile the model"
            )
        if not path.is_file():
            raise MoecError(
                f"{path}: damaged artifact: the file is missing; recompile the model or copy the "
                "artifact again"
            )
        size = path.stat().st_size
        if size != recorded["bytes"]:
            raise MoecError(
                f"{path}: damaged artifact: {size} bytes, the manifest says {recorded['bytes']}; "
                "recompile the model or copy the artifact again"
            )
        if hashes and file_record(path)["sha256"] != recorded["sha256"]:
            raise MoecError(
                f"{path}: damaged artifact: its SHA-256 differs from the manifest's; recompile the model "
                "or copy the artifact again"
            )


def is_artifact(directory: Path) -> bool:
    """Whether ``directory`` is a moec artifact: its manifest names moec's artifact format."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("moec-artifact/")


def check_writable(path: Path, option: str = "-o") -> None:
    """Raise a one-line :class:`MoecError` unless ``path`` can be created: its nearest existing
    ancestor is a directory in which this process can create entries (tried, with a directory
    made and removed at once: permissions alone do not tell, e.g. for root on a read-only file
    system or under ``/proc``). Checked before the work that would write there, not after it."""
    ancestor = Path(os.path.abspath(path)).parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MoecError(
            f"{path}: cannot be created: {ancestor} is a file, not a directory; pass another {option}"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".moec-probe-", dir=ancestor))
    except OSError as err:
        raise MoecError(
            f"{path}: cannot be created: {ancestor} is not writable ({err.strerror}); pass another {option}"
        ) from err


def check_replaceable(out_dir: Path, force: bool, protected: Sequence[Path] = ()) -> None:
    """Raise :class:`OptionError` (option ``force``) unless ``out_dir`` may be written: it does not
    exist, or ``force`` is on and it is moec's to replace — a moec artifact (:func:`is_artifact`)
    or an empty directory — that is not the current directory or one of its parents and holds
    none of ``protected`` (the input model). ``--force`` never deletes what moec did not write.
    The location must be writable (:func:`check_writable`)."""
    out_dir = Path(out_dir)
    check_writable(out_dir)
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
def output_lock(out_path: Path) -> Iterator[None]:
    """Hold, for the block, this user's lock on writing ``out_path``; if another moec process holds
    it (two compiles to one output at once), raise a one-line :class:`MoecError` at once.

    The lock is an ``flock`` on a file named by a hash of the resolved path, in a private folder
    of the temporary directory, not beside the output: nothing is written there before the
    output itself, and a killed process's lock goes with it. Lock files stay (a few bytes each);
    removing one while another process waits on it would let a third take a second lock.
    """
    import fcntl

    key = hashlib.sha256(str(Path(out_path).resolve()).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / f"moec-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    with open(folder / f"{key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise MoecError(
                f"{out_path}: another moec process (pid {holder}) is writing it now; wait for it to "
                "finish or pass another output"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


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
    check_writable(path)
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
