"""Compile an ONNX model into an artifact directory for one target."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax

import moec
from moec.build.artifact import FORMAT, LIBRARY, MANIFEST, WEIGHTS, staged_directory
from moec.build.cuda import cuda_build, verify_cuda_library, with_c_identifiers
from moec.errors import MoecError
from moec.frontend.importer import ImportedModel, import_model
from moec.frontend.loader import load_model
from moec.frontend.rewrite import layer_weight_names
from moec.passes.bound_tokens import input_symbols
from moec.passes.pipeline import lowering_pipeline, moe_pipeline
from moec.targets import TargetSpec, load_target


def value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
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


STORED_PRECISIONS = {"float32": "fp32", "float16": "fp16"}


def build_manifest(
    imported: ImportedModel,
    target: TargetSpec,
    model_path: Path,
    weights: dict[str, Any],
    kept_experts: dict[str, list[int]],
) -> dict[str, Any]:
    """The manifest: what the artifact computes and how it was built.

    ``weights`` are the stored weight tensors by name: each layer's plan reports the precision
    its expert matrices are stored in and the bytes one expert occupies in the weights file.
    """
    layers = []
    for block in imported.blocks:
        layer = block.layer
        entry = layer.describe()
        names = layer_weight_names(block)
        entry["weights"] = {name.rsplit(".", 1)[1]: name for name in names}
        precision = STORED_PRECISIONS[str(weights[f"{layer.name}.w_up"].dtype)]
        kept = kept_experts.get(layer.name, list(range(layer.num_experts)))
        expert_bytes = sum(weights[name].numpy().nbytes for name in names) // len(kept)
        plan = [
            {
                "expert": expert,
                "kept": expert in kept,
                "precision": precision,
                "compute": "fp32",
                "bytes": expert_bytes if expert in kept else 0,
            }
            for expert in range(layer.num_experts)
        ]
        entry["plan"] = plan
        layers.append(entry)
    return {
        "format": FORMAT,
        "moec_version": moec.__version__,
        "tvm_version": tvm.__version__,
        "model": {
            "path": str(model_path),
            "sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
        },
        "target": target.describe(),
        "inputs": [value_info(v) for v in graph_inputs(imported.original)],
        "outputs": [value_info(v) for v in imported.original.graph.output],
        "params": list(weights),
        "library": LIBRARY,
        "weights": WEIGHTS,
        "layers": layers,
    }


def require_tool(command: str, package: str, purpose: str) -> str:
    """The path of ``command``, or a one-line error naming the Debian package that provides it."""
    path = shutil.which(command)
    if path is None:
        raise MoecError(
            f"{command}: not installed; it {purpose}. Install it with 'apt-get install {package}' "
            "(scripts/setup.sh does this)"
        )
    return path


def library_linker(target: TargetSpec) -> Callable[..., None] | None:
    """The ``fcompile`` that links the model library for ``target`` (None: TVM's native default)."""
    if target.runs_here:
        return None
    require_tool(target.toolchain.cxx, target.toolchain.package, f"links the {target.name} library")
    return tvm.support.cc.cross_compiler(target.toolchain.cxx)


def lower_model(
    imported: ImportedModel,
    target: TargetSpec,
    dump_ir: Path | None = None,
    weights_precision: str = "fp32",
    kept_experts: dict[str, list[int]] | None = None,
    kept_channels: dict[str, list[list[int]]] | None = None,
    early_exit: dict[str, float] | None = None,
    routing: str = "learned",
) -> tuple[tvm.IRModule, dict[str, list]]:
    """The Relax module moec hands to ``tvm.compile`` for ``target``, and its detached weights.

    This is everything target-specific that happens before TVM's own lowering: the MoE pass
    pipeline with the target file's kernel schedule. Passes may retype ``main``'s weight
    parameters: the weights follow (masked experts and pruned channels sliced away, as ``main``'s
    attributes ``moec.expert_slices`` / ``moec.channel_slices`` list; then converted to the
    parameter's dtype).
    """
    mod, params = relax.frontend.detach_params(imported.to_relax())
    pipeline = moe_pipeline(
        target.schedule, dump_ir, weights_precision, kept_experts, kept_channels, early_exit, routing
    )
    mod = pipeline(mod)
    main = mod["main"]
    slices = json.loads(str(main.attrs["moec.expert_slices"])) if "moec.expert_slices" in main.attrs else {}
    channels = (
        json.loads(str(main.attrs["moec.channel_slices"])) if "moec.channel_slices" in main.attrs else {}
    )
    num_inputs = int(main.attrs["num_input"])
    weights = []
    for var, value in zip(main.params[num_inputs:], params.get("main", []), strict=True):
        dtype = str(var.ty.dtype)
        if var.name not in slices and var.name not in channels and str(value.dtype) == dtype:
            weights.append(value)  # unchanged: no copy
            continue
        array = value.numpy()
        if var.name in slices:
            array = array[slices[var.name]]
        if var.name in channels:
            axis, kept = channels[var.name]
            array = np.stack([np.take(array[e], ids, axis=axis - 1) for e, ids in enumerate(kept)])
        weights.append(tvm.runtime.tensor(np.ascontiguousarray(array.astype(dtype, copy=False))))
    return mod, {"main": weights}


def compile_model(
    model_path: str | Path,
    target_name: str,
    out_dir: str | Path,
    *,
    force: bool = False,
    dump_ir: Path | None = None,
    weights_precision: str = "fp32",
    max_tokens: int | None = None,
    kept_experts: dict[str, list[int]] | None = None,
    kept_channels: dict[str, list[list[int]]] | None = None,
    early_exit: dict[str, float] | None = None,
    routing: str = "learned",
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """Compile ``model_path`` for ``target_name`` into ``out_dir``; return ``out_dir``.

    ``dump_ir`` names a directory that receives the module as TVMScript after each phase.
    ``weights_precision`` (``fp32``/``fp16``) is how expert weight matrices are stored; the
    arithmetic stays fp32. ``max_tokens`` bounds the token dimension so intermediates are
    planned statically (:class:`moec.passes.bound_tokens.BoundTokens`); a call with more
    tokens then fails with an error saying so. None: no bound. ``kept_experts`` (per layer
    name, from :func:`moec.analysis.masking.choose_kept`) masks the other experts statically;
    ``kept_channels`` (per layer, per kept expert) prunes the other intermediate channels.
    ``early_exit`` (``top1_above`` / ``below_fraction``) skips a confident token's other experts.
    ``routing``: ``learned``, or a fixed pattern (``cycle``, ``tile``) replacing the router.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    target = load_target(target_name)
    if out_dir.exists() and not force:
        raise MoecError(f"{out_dir}: output directory exists; pass --force to replace it")
    log(f"loading {model_path}")
    imported = import_model(load_model(model_path))
    log(f"found {len(imported.blocks)} MoE layer(s); lifting to Relax")
    named = set(kept_experts or {}) | set(kept_channels or {})
    unknown = sorted(named - {b.layer.name for b in imported.blocks})
    if unknown:
        raise MoecError(
            f"masking/pruning names layer(s) {', '.join(unknown)} that {model_path} does not have"
        )
    if early_exit:
        for key, value in early_exit.items():
            if value is not None and not 0.0 < value <= 1.0:
                option = "--skip-top1-above" if key == "top1_above" else "--skip-below-fraction"
                raise MoecError(
                    f"{option} {value}: must be in (0, 1] (a routing weight or a fraction of one)"
                )
    mod, params = lower_model(
        imported, target, dump_ir, weights_precision, kept_experts, kept_channels, early_exit, routing
    )
    if max_tokens is not None:
        symbols = [v.name for v in input_symbols(mod["main"])]
        if len(symbols) != 1:
            raise MoecError(
                f"--max-tokens: the model's inputs have {len(symbols)} symbolic dimensions "
                f"({', '.join(symbols) or 'none'}); a token bound needs exactly one"
            )
    num_inputs = int(mod["main"].attrs["num_input"])
    param_names = [v.name for v in mod["main"].params[num_inputs:]]
    weights = dict(zip(param_names, params["main"], strict=True))
    fcompile = library_linker(target)
    log(f"compiling for {target.name} ({target.tvm_config.get('mcpu', target.tvm_config['kind'])})")
    with target.tvm_target, cuda_build(target, log) as cuda_info:
        executable = tvm.compile(
            with_c_identifiers(mod, target),
            target=target.tvm_target,
            relax_pipeline=lowering_pipeline(target.tvm_target, max_tokens),
        )
    with staged_directory(out_dir, force) as staging:
        executable.export_library(str(staging / LIBRARY), fcompile=fcompile)
        verify_cuda_library(staging / LIBRARY, target, mod)  # CUDA targets: cubins, not source
        tvm.runtime.save_param_dict_to_file(weights, str(staging / WEIGHTS))
        manifest = build_manifest(imported, target, model_path, weights, kept_experts or {})
        manifest["early_exit"] = early_exit or {}
        manifest["routing"] = routing
        manifest["pruning"] = {
            layer: {"ffn_kept": len(channels[0]), "channels": channels}
            for layer, channels in (kept_channels or {}).items()
        }
        if cuda_info:
            manifest["cuda_build"] = cuda_info
        manifest["max_tokens"] = max_tokens
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out_dir}")
    return out_dir
