"""FuseTIRGuarded: TVM's ``FuseTIR``, leaving unfused the fused groups it cannot merge.

Rewrite rule: run ``relax.transform.FuseTIR``. Where it fails on the module, find the fused
groups (private Relax functions with attribute ``Primitive``) it fails on, one at a time, drop
their ``Primitive`` attribute so that ``FuseTIR`` leaves them as Relax functions whose kernels
run one after another, and run ``FuseTIR`` on the rest.

Why: TVM 0.27's ``FuseTIR`` renews the definitions of each merged function and fails ("Check
failed: VarRemapGet(source) == nullptr") on some groups of shape arithmetic with symbolic
dims passed as scalars, such as the index tensor that torch's dynamo exporter builds to gather a
KV-cache decoder's ``attention_mask`` (``arange`` → ``broadcast_to`` → ``concatenate`` → the
negative-index ``where`` of ``GatherND``, sized ``past + seq``). Those groups compute a few
integers per call; running their kernels unfused costs a few VM calls, not a failed compile.
"""

from __future__ import annotations

import tvm
from tvm import relax


def _fused_groups(mod: tvm.IRModule) -> list[tvm.ir.GlobalVar]:
    return [
        gv
        for gv, func in mod.functions_items()
        if isinstance(func, relax.Function) and func.attrs is not None and "Primitive" in func.attrs
    ]


def _fuses_alone(mod: tvm.IRModule, group: tvm.ir.GlobalVar, groups: list[tvm.ir.GlobalVar]) -> bool:
    """Whether ``FuseTIR`` succeeds when ``group`` is the module's only fused group."""
    trial = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for other in groups:
        if other != group:
            trial[other] = trial[other].without_attr("Primitive")
    try:
        relax.transform.FuseTIR()(trial)
    except tvm.error.InternalError:
        return False
    return True


@tvm.transform.module_pass(opt_level=0, name="FuseTIRGuarded")
class FuseTIRGuarded:
    """``FuseTIR`` that leaves the fused groups it fails on unfused (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        try:
            return relax.transform.FuseTIR()(mod)
        except tvm.error.InternalError:
            pass
        groups = _fused_groups(mod)
        failing = [group for group in groups if not _fuses_alone(mod, group, groups)]
        if not failing:
            raise RuntimeError("FuseTIR failed on the module but on none of its fused groups alone")
        kept = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for group in failing:
            kept[group] = kept[group].without_attr("Primitive")
        return relax.transform.FuseTIR()(kept)
