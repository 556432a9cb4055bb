"""Compile an ONNX model into an artifact directory for one target: the compile driver.

:func:`compile_model` imports the model (``moec.frontend``), runs the pass pipeline
(:func:`moec.passes.pipeline.moe_pipeline`) with the target's schedule, hands the module to
``tvm.compile`` with moec's lowering, links the library for the target and writes the artifact
(:mod:`moec.artifact`). What to compile and how is one :class:`moec.options.CompileOptions`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from moec.artifact import (
    LIBRARY,
    WEIGHTS,
    build_manifest,
    check_replaceable,
    check_writable,
    graph_inputs,
    output_lock,
    record_files,
    staged_directory,
    write_manifest,
)
from moec.compiler.cuda import cuda_build, verify_cuda_library
from moec.compiler.tvm_log import quiet_tvm
from moec.errors import MoecError
from moec.frontend.importer import ImportedModel, import_model
from moec.frontend.loader import load_model
from moec.frontend.rewrite import layer_weight_names
from moec.options import CompileOptions, OptionError, resolve_stored_int8
from moec.passes.bound_tokens import input_symbols
from moec.passes.one_token_entry import ONE_TOKEN_ENTRY, one_token_symbols
from moec.passes.pipeline import lowering_pipeline, moe_pipeline
from moec.passes.slice_weights import DENSE_WEIGHTS, SliceWeights
from moec.runtime.generate import cache_length_inputs
from moec.targets import TargetSpec, load_target
from moec.weights_file import write_weights


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
    imported: ImportedModel, target: TargetSpec, options: CompileOptions | None = None
) -> tuple[tvm.IRModule, dict[str, tvm.runtime.Tensor]]:
    """The Relax module moec hands to ``tvm.compile`` for ``target``, and the weights it takes.

    This is everything target-specific that happens before TVM's own lowering: the MoE pass
    pipeline with ``options`` (default: none of its changes) and the target file's kernel
    schedule. ``target`` is the loaded target (``options.target`` is only its name). The
    weights are by parameter name (the ONNX names), in ``main``'s parameter order, as
    ``SliceWeights`` made them follow ``main``'s signature.
    """
    options = stored_int8_options(imported, options or CompileOptions())
    mod, params = relax.frontend.detach_params(imported.to_relax())
    main = mod["main"]
    names = [var.name for var in main.params[int(main.attrs["num_input"]) :]]
    weights = SliceWeights(
        dict(zip(names, params.get("main", []), strict=True)), model_int8_steps(imported, options)
    )
    pipeline = moe_pipeline(
        target.schedule,
        options,
        weights,
        c_identifiers=target.cuda is not None,
        cpu_fp16=target.cpu_fp16,
        int8_dot=target.int8_dot,
        free_inputs=free_inputs(imported),
    )
    return pipeline(mod), weights.weights


def free_inputs(imported: ImportedModel) -> frozenset[int]:
    """Positions of the model's inputs whose own dimensions the one-token entry keeps symbolic: a
    KV-cache decoder's cache tensors and mask (:func:`moec.runtime.generate.cache_length_inputs`)."""
    return frozenset(cache_length_inputs([i.name for i in graph_inputs(imported.canonical)]))


def stored_int8_options(imported: ImportedModel, options: CompileOptions) -> CompileOptions:
    """``options`` with ``auto`` and the layers the model stores as INT8 itself resolved
    (:func:`moec.options.resolve_stored_int8`); idempotent."""
    quantized = {b.layer.name: b.layer.int8_block for b in imported.blocks if b.layer.int8_steps is not None}
    return resolve_stored_int8(options, quantized, list(options.kept_channels or {}))


def model_int8_steps(imported: ImportedModel, options: CompileOptions) -> dict[str, np.ndarray]:
    """The model's own INT8 steps of the expert matrices ``options`` stores exactly, by the weight
    parameter each belongs to (``SliceWeights`` stores ``rint(W / step)`` with those steps)."""
    found = {}
    for block in imported.blocks:
        if block.layer.name not in (options.int8_exact or {}):
            continue
        for name in layer_weight_names(block):
            role = name.rsplit(".", 1)[1]
            if role in block.layer.int8_steps:
                found[name] = block.layer.int8_steps[role]
    return found


def check_model_options(imported: ImportedModel, model_path: Path, options: CompileOptions) -> None:
    """Raise :class:`OptionError` if the masking, pruning or precision plan in ``options`` does not
    fit the model: a layer it does not have, an expert or channel id past a layer's, channels
    for a different number of experts than the layer keeps, a precision plan naming a different
    number of experts than the layer has, or an INT8 group that does not divide a layer's
    inputs."""
    layers = {b.layer.name: b.layer for b in imported.blocks}
    for name, precisions in (options.precision_plan or {}).items():
        if name in layers and not isinstance(precisions, str) and len(precisions) != layers[name].num_experts:
            raise OptionError(
                "precision_plan",
                f"{{option}}: layer {name} has {layers[name].num_experts} experts; "
                f"the plan names {len(precisions)}",
            )
    for name, layer in layers.items():
        ffn = len((options.kept_channels or {}).get(name, [range(layer.ffn)])[0])
        if name in (options.int8_exact or {}):
            continue  # the model's own blocks
        if options.int8_group and (layer.hidden % options.int8_group or ffn % options.int8_group):
            raise OptionError(
                "int8_group",
                f"{{option}} {options.int8_group}: does not divide layer {name}'s hidden size {layer.hidden} "
                f"and expert width {ffn}; use 0 (one scale per output channel) or a divisor of both",
            )
    for option in ("kept_experts", "kept_channels", "precision_plan"):
        unknown = sorted(set(getattr(options, option) or {}) - set(layers))
        if unknown:
            raise OptionError(
                option, f"{{option}}: names layer(s) {', '.join(unknown)} that {model_path} does not have"
            )
    for name, kept in (options.kept_experts or {}).items():
        experts = layers[name].num_experts
        if max(kept) >= experts:
            raise OptionError(
                "kept_experts", f"{{option}}: layer {name} keeps expert {max(kept)} but has {experts} experts"
            )
    for name, channels in (options.kept_channels or {}).items():
        layer = layers[name]
        experts = len((options.kept_experts or {}).get(name, range(layer.num_experts)))
        if len(channels) != experts or max(max(ids) for ids in channels) >= layer.ffn:
            raise OptionError(
                "kept_channels",
                f"{{option}}: layer {name} needs channel ids below {layer.ffn} for each of its "
                f"{experts} kept experts; got {len(channels)} lists",
            )


def compile_model(
    model_path: str | Path,
    out_dir: str | Path,
    options: CompileOptions | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """Compile ``model_path`` into the artifact directory ``out_dir`` as ``options`` say (default:
    for ``host``, unchanged); return ``out_dir``. ``log`` receives a progress line per stage.

    Options that do not fit the model (a token bound on a model with several symbolic
    dimensions, masking a layer it does not have) raise :class:`OptionError`. Two compiles to
    one ``out_dir`` at once: the second fails at once (:func:`moec.artifact.output_lock`).
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    options = options or CompileOptions()
    with output_lock(out_dir):
        return _compile_locked(model_path, out_dir, options, log)


def _compile_locked(
    model_path: Path, out_dir: Path, options: CompileOptions, log: Callable[[str], None]
) -> Path:
    """:func:`compile_model` once it holds the output's lock."""
    target = load_target(options.target)
    for option in ("router_precision", "dense_precision"):
        if getattr(options, option) != "fp32" and target.cuda is not None:
            raise OptionError(
                option,
                f"{{option}}: dense weights are stored narrower on CPU targets only, not on {target.name}",
            )
    if options.uses_int8_dot and target.int8_dot is None:
        precisions = "/".join(target.hardware.compute_precisions)
        raise OptionError(
            "precision_plan" if options.precision_plan else "precision",
            f"{{option}}: int8-dot multiplies in INT8, which {target.name} does not compute (it computes "
            f"{precisions}); use int8 (weight-only INT8) or a target with INT8 dot products",
        )
    check_replaceable(out_dir, options.force, [model_path])
    if options.dump_ir is not None:
        check_writable(options.dump_ir / "00-frontend.py", "--dump-ir")
    log(f"loading {model_path}")
    with quiet_tvm():
        imported = import_model(load_model(model_path), model_path)
    log(f"found {len(imported.blocks)} MoE layer(s); lifting to Relax")
    options = stored_int8_options(imported, options)
    check_model_options(imported, model_path, options)
    with quiet_tvm():
        mod, weights = lower_model(imported, target, options)
    if options.max_tokens is not None:
        symbols = [v.name for v in input_symbols(mod["main"])]
        if len(symbols) != 1:
            raise OptionError(
                "max_tokens",
                f"{{option}} {options.max_tokens}: the model's inputs have {len(symbols)} symbolic "
                f"dimensions ({', '.join(symbols) or 'none'}); a token bound needs exactly one",
            )
    fcompile = library_linker(target)
    log(f"compiling for {target.name} ({target.tvm_config.get('mcpu', target.tvm_config['kind'])})")
    with quiet_tvm(), target.tvm_target, cuda_build(target, log) as cuda_info:
        executable = tvm.compile(
            mod,
            target=target.tvm_target,
            relax_pipeline=lowering_pipeline(target.tvm_target, options.max_tokens),
        )
    with staged_directory(out_dir, options.force, [model_path]) as staging:
        executable.export_library(str(staging / LIBRARY), fcompile=fcompile)
        verify_cuda_library(staging / LIBRARY, target, mod)  # CUDA targets: cubins, not source
        write_weights(staging / WEIGHTS, weights, lambda tensor: tensor.numpy())
        has_one_token = any(g.name_hint == ONE_TOKEN_ENTRY for g in mod.get_global_vars())
        entries: dict[str, Any] = {}
        if has_one_token:
            bound = one_token_symbols(mod["main"], free_inputs(imported))
            entries = {"one_token": ONE_TOKEN_ENTRY, "one_token_dims": [str(v.name) for v in bound]}
        dense = (
            json.loads(str(mod["main"].attrs[DENSE_WEIGHTS])) if DENSE_WEIGHTS in mod["main"].attrs else {}
        )
        files = record_files(staging, (LIBRARY, WEIGHTS))
        manifest = build_manifest(
            imported, target, model_path, weights, options, files, cuda_info, entries, dense
        )
        write_manifest(staging, manifest)
    log(f"wrote {out_dir}")
    return out_dir
