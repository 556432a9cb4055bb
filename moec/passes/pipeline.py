"""moec's pass pipeline over the Relax module the frontend lifted, in phases.

Phase 0 (frontend, not here): MoE blocks → canonical layer functions calling our kernels.
Phase 1 (layers): rewrites of MoE layers driven by the compile options (masking and pruning
         chosen from the calibration profile) — ``MaskExperts``, ``PruneChannels``,
         ``SkipExperts``, ``FixedRouting``, ``StoreExpertWeights`` (each expert's precision),
         each only when asked for.
Phase 2 (schedule): on CPU targets, ``main``'s dense matmuls with weights moved onto moec's linear
         kernel, their weights packed in panels (``DenseLinear``), and the expert matrices
         packed in panels for the output-stationary expert kernels (``PackExpertWeights``);
         then every kernel spec built for the target's schedule (``ApplyKernelSchedule``).
Phase 3 (export): the detached weights sliced and converted to ``main``'s signature as the
         layer passes left it (``SliceWeights``), then, for CUDA targets, ``main``'s parameters
         renamed to C identifiers (``CIdentifiers``); last, ``main_one_token``, ``main`` with its
         symbolic input dimensions bound to 1 (``OneTokenEntry``).
Phase 4 (lowering, in ``tvm.compile``; :func:`lowering_pipeline`): redundant reshapes
         removed, then TVM's default lowering for the target (legalisation and fusion of the
         ordinary graph, dataflow lowering, memory planning, VM code generation) with, on CPU
         targets, the ordinary ops (everything not a moec kernel) scheduled by moec's dlight
         rules after the legalisation, and moec's per-call overhead passes after the dataflow
         lowering: ``InlineLayers``, binding clean-up (and ``BoundTokens`` with a
         ``max_tokens`` bound), before memory planning.

With ``options.dump_ir`` the module is written as TVMScript before and after every phase.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import dlight

from moec.kernels.ordinary_ops import ordinary_op_rules
from moec.options import CompileOptions
from moec.passes.apply_kernel_schedule import ApplyKernelSchedule
from moec.passes.bound_tokens import BoundTokens
from moec.passes.c_identifiers import CIdentifiers
from moec.passes.dense_linear import DenseLinear
from moec.passes.dump_ir import DumpIR
from moec.passes.fixed_routing import FixedRouting
from moec.passes.fuse_tir_guarded import FuseTIRGuarded
from moec.passes.inline_layers import InlineLayers
from moec.passes.mask_experts import MaskExperts
from moec.passes.nan_legalize import NAN_PROPAGATING_LEGALIZE
from moec.passes.one_token_entry import OneTokenEntry
from moec.passes.order_shape_functions import OrderShapeFunctions
from moec.passes.pack_expert_weights import PackExpertWeights
from moec.passes.prune_channels import PruneChannels
from moec.passes.skip_experts import SkipExperts
from moec.passes.slice_weights import SliceWeights
from moec.passes.store_expert_weights import StoreExpertWeights
from moec.schedule import CpuSchedule, GpuSchedule


def moe_pipeline(
    schedule: CpuSchedule | GpuSchedule,
    options: CompileOptions,
    weights: SliceWeights,
    c_identifiers: bool = False,
    cpu_fp16: bool = False,
    int8_dot: str | None = None,
    free_inputs: frozenset[int] = frozenset(),
) -> tvm.transform.Pass:
    """The phases moec runs before handing the module to ``tvm.compile``.

    ``options`` choose the layer rewrites (masking, pruning, early exit, fixed routing, weight
    precision) and the IR dump directory. ``weights`` holds ``main``'s detached weights; once
    the pipeline has run, its ``weights`` follow ``main``'s signature. ``c_identifiers``: rename
    ``main``'s parameters to C identifiers (CUDA targets, whose kernel parameters TVM names
    after them). ``cpu_fp16``: a CPU target with FP16 arithmetic (fp16 experts multiply in FP16).
    ``int8_dot``: the target's INT8 dot-product instructions (for int8-dot experts), if any.
    ``free_inputs``: positions of the inputs whose own symbolic dimensions (a KV cache's length)
    ``main_one_token`` keeps symbolic (:class:`~moec.passes.one_token_entry.OneTokenEntry`).
    """
    layers: list[tvm.transform.Pass] = []
    if options.kept_experts:
        layers.append(MaskExperts(dict(options.kept_experts)))
    if options.kept_channels:
        layers.append(PruneChannels(dict(options.kept_channels)))
    if options.skips_experts:
        layers.append(SkipExperts(options.skip_top1_above, options.skip_below_fraction))
    if options.routing != "learned":
        layers.append(FixedRouting(options.routing))
    if options.stores_experts:
        stored = StoreExpertWeights(
            _stored_plan(options),
            options.default_precision,
            options.int8_group,
            cpu_fp16,
            int8_dot,
            groups=dict(options.int8_exact or {}),
        )
        layers.append(stored)
    dense: list[tvm.transform.Pass] = []
    if isinstance(schedule, CpuSchedule):
        linear = DenseLinear(schedule, options.router_precision, options.dense_precision, options.int8_group)
        dense = [linear, PackExpertWeights(schedule)]
    identifiers = [CIdentifiers()] if c_identifiers else []
    phases: list[tuple[str, tvm.transform.Pass]] = [
        # Phase 1: MoE layer rewrites.
        ("layers", tvm.transform.Sequential(layers)),
        # Phase 2: dense matmuls on moec's linear kernel and expert weights in panels (CPU), then
        # kernel schedules from the target file.
        ("schedule", tvm.transform.Sequential([*dense, ApplyKernelSchedule(schedule)])),
        # Phase 3: the weights follow main's signature; names the generated code can use; the
        # static one-token entry point.
        ("export", tvm.transform.Sequential([weights, *identifiers, OneTokenEntry(free_inputs)])),
    ]
    dump_dir = options.dump_ir
    passes: list[tvm.transform.Pass] = [DumpIR(dump_dir, "00-frontend")] if dump_dir else []
    for number, (name, phase) in enumerate(phases, start=1):
        passes.append(phase)
        if dump_dir:
            passes.append(DumpIR(dump_dir, f"{number:02d}-{name}"))
    return tvm.transform.Sequential(passes, name="moec")


def _stored_plan(options: CompileOptions) -> dict[str, str | tuple[str, ...]]:
    """``options.precision_plan`` numbered as the layers are after masking (the kept experts')."""
    plan: dict[str, str | tuple[str, ...]] = {}
    for layer, planned in (options.precision_plan or {}).items():
        kept = (options.kept_experts or {}).get(layer, range(len(planned)))
        plan[layer] = planned if isinstance(planned, str) else tuple(planned[e] for e in kept)
    return plan


LOWERING_BACKENDS = {"llvm": "cpu_generic", "cuda": "cuda"}
"""Target kinds whose TVM default pipeline moec extends, and TVM's backend module for each."""


def lowering_pipeline(target: tvm.target.Target, max_tokens: int | None = None) -> tvm.transform.Pass:
    """Phase 4: TVM's default Relax pipeline for ``target`` with moec's call-overhead passes.

    First TVM's ``RemoveRedundantReshape`` drops reshapes to the shape a tensor already has
    (the frontend's flattening around each layer call; the last one was a copy kernel). On CPU
    targets, after TVM's legalisation and fusion, dlight schedules the functions that are not
    moec kernels with :func:`moec.kernels.ordinary_ops.ordinary_op_rules` (TVM's CPU pipeline
    leaves them as scalar loops on one thread; its CUDA legalisation applies dlight's GPU rules
    itself); TVM's ``FuseTIR`` is :class:`~moec.passes.fuse_tir_guarded.FuseTIRGuarded` and its
    ``LegalizeOps`` propagates NaN through min/max ops (:func:`_moec_pass`). The others run
    after TVM's dataflow lowering: by then the kernels' ``call_tir``s are plain calls
    outside any dataflow block, where TVM's dataflow passes (which expect schedulable TIR, not
    our hand-written kernels) no longer look, and before ``StaticPlanBlockMemory``:
    ``InlineLayers``; ``CanonicalizeBindings`` and ``DeadCodeElimination`` (the kernels' output
    tuples the inlined layers left unused); ``BoundTokens(max_tokens)`` if given. Last,
    ``OrderShapeFunctions`` writes the VM's shape functions in one order (reproducible builds).
    A target kind without an entry in :data:`LOWERING_BACKENDS` gets TVM's pipeline unchanged.
    """
    if target.kind.name not in LOWERING_BACKENDS:
        return relax.get_default_pipeline(target)
    backend = getattr(relax.backend, LOWERING_BACKENDS[target.kind.name]).pipeline
    # TVM's CUDA legalisation already schedules every function with dlight's GPU rules; its CPU
    # one schedules none.
    ordinary_ops = [dlight.ApplyDefaultSchedule(*ordinary_op_rules())] if target.kind.name == "llvm" else []
    ours: list[tvm.transform.Pass] = [
        InlineLayers(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ]
    if max_tokens is not None:
        ours.append(BoundTokens(max_tokens))  # after DCE, which would drop its unused check call

    @tvm.transform.module_pass(opt_level=0, name="MoecLowering")
    def lower(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                [relax.transform.RemoveRedundantReshape()]
                + backend.library_dispatch_passes(target)
                + [_moec_pass(p) for p in backend.legalize_passes(target)]
                + ordinary_ops
                + backend.dataflow_lower_passes(target)
                + ours
                + backend.finalize_passes(target)
                + [OrderShapeFunctions()]
            )(mod)

    return lower


def _moec_pass(tvm_pass: tvm.transform.Pass) -> tvm.transform.Pass:
    """moec's replacement of one of TVM's legalisation passes, or the pass itself: ``LegalizeOps``
    with NaN-propagating min/max ops (:mod:`moec.passes.nan_legalize`), and
    :class:`~moec.passes.fuse_tir_guarded.FuseTIRGuarded` for ``FuseTIR``."""
    if tvm_pass.info.name == "LegalizeOps":
        return relax.transform.LegalizeOps(NAN_PROPAGATING_LEGALIZE)
    if tvm_pass.info.name == "FuseTIR":
        return FuseTIRGuarded()
    return tvm_pass
