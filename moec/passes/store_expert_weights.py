"""StoreExpertWeights: keep the MoE layers' expert weight matrices in a narrower precision.

Rewrite rules, for every Relax function with attribute ``moec.layer``, when ``precision`` is
not float32:

- its expert matrix parameters (``w_up``, ``w_gate``, ``w_down``: the rank-3 ``[E, out, in]``
  ones) get dtype ``precision``; the biases stay float32;
- the ``expert_up`` / ``expert_down`` kernels it calls are remade with ``weight_dtype =
  precision``: they widen each weight to float32 as they load it, so the arithmetic stays
  float32 (what the Cortex-A72 computes natively) while the bytes streamed from memory halve;
- ``main``'s parameters passed to those slots get the same dtype, so the artifact stores them
  narrow. If any slot is fed by something else (a weight also used by another op), nothing
  is rewritten. :func:`moec.build.compile.lower_model` then converts the
  weight arrays to ``main``'s signature.

Runs in the layers phase, before ``ApplyKernelSchedule`` retiles the remade kernels.
"""

from __future__ import annotations

import json
from collections import Counter

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from moec.kernels import kernel_kind, make_kernel
from moec.schedule import CpuSchedule

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16"}
WEIGHT_KERNELS = ("expert_up", "expert_down")


@mutator
class _Substitute(PyExprMutator):
    """Substitutes variables and callees (used to retype parameters and retarget calls)."""

    def __init__(
        self,
        remap: dict[relax.Var, relax.Var],
        callees: dict[str, tvm.ir.GlobalVar],
        mod: tvm.IRModule | None = None,
    ) -> None:
        super().__init__(mod)
        self.remap, self.callees = remap, callees

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self.remap.get(var, var)

    def visit_global_var_(self, gvar: tvm.ir.GlobalVar) -> relax.Expr:
        return self.callees.get(gvar.name_hint, gvar)


@visitor
class _CountVarUses(PyExprVisitor):
    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter = Counter()

    def visit_var_(self, var: relax.Var) -> None:
        self.uses[var] += 1


def _retype_params(
    func: relax.Function,
    dtypes: dict[int, str],
    callees: dict[str, tvm.ir.GlobalVar] | None = None,
    mod: tvm.IRModule | None = None,
) -> relax.Function:
    """``func`` with parameter ``i`` of dtype ``dtypes[i]`` (same shape), uses substituted, and
    calls to the functions named in ``callees`` made through those (retyped) GlobalVars of ``mod``.
    """
    remap = {
        func.params[i]: relax.Var(func.params[i].name, relax.TensorType(func.params[i].ty.shape, dtype))
        for i, dtype in dtypes.items()
    }
    body = _Substitute(remap, callees or {}, mod).visit_expr(func.body)
    params = [remap.get(p, p) for p in func.params]
    return relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)


def _is_layer(func: object) -> bool:
    return isinstance(func, relax.Function) and func.attrs is not None and "moec.layer" in func.attrs


@tvm.transform.module_pass(opt_level=0, name="StoreExpertWeights")
class StoreExpertWeights:
    """Store every MoE layer's expert matrices as ``precision``; ``changed`` lists the layers."""

    def __init__(self, precision: str = "fp32") -> None:
        if precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {precision!r}")
        self.dtype = PRECISION_DTYPES[precision]
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        if self.dtype == "float32":
            return mod
        retyped: dict[str, dict[int, str]] = {}
        kernels: dict[str, tvm.tirx.PrimFunc] = {}
        for gvar, func in mod.functions_items():
            if not _is_layer(func):
                continue
            slots = {
                i: self.dtype
                for i, p in enumerate(func.params)
                if len(p.ty.shape) == 3 and p.ty.dtype == "float32"
            }
            if not slots:
                continue
            retyped[gvar.name_hint] = slots
            for kernel in _called_kernels(mod, func):
                kernel_func = mod[kernel]
                config = json.loads(str(kernel_func.attrs["moec.config"])) | {"weight_dtype": self.dtype}
                kernels[kernel.name_hint] = make_kernel(kernel_kind(kernel_func), config, CpuSchedule())
        main_dtypes = _main_param_dtypes(mod["main"], retyped)
        if not retyped or main_dtypes is None:
            return mod
        # A GlobalVar carries its function's signature, so every retyped function is added afresh
        # under a new GlobalVar, and its callers are pointed at it.
        kept = {
            gv: f for gv, f in mod.functions_items() if gv.name_hint not in retyped.keys() | kernels.keys()
        }
        builder = relax.BlockBuilder(tvm.IRModule(kept, attrs=mod.attrs))
        callees = {name: builder.add_func(func, name) for name, func in kernels.items()}
        for name, slots in retyped.items():
            callees[name] = builder.add_func(_retype_params(mod[name], slots, callees), name)
        updated = builder.get()
        updated["main"] = _retype_params(updated["main"], main_dtypes, callees, updated)
        self.changed = sorted(retyped)
        return updated


def _called_kernels(mod: tvm.IRModule, func: relax.Function) -> list[tvm.ir.GlobalVar]:
    """The expert kernels ``func`` calls through ``call_tir``."""
    found: list[tvm.ir.GlobalVar] = []

    @visitor
    class _Calls(PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            if call.op == tvm.ir.Op.get("relax.call_tir"):
                callee = call.args[0]
                if kernel_kind(mod[callee]) in WEIGHT_KERNELS and callee not in found:
                    found.append(callee)
            super().visit_call_(call)

    _Calls().visit_expr(func.body)
    return found


def _main_param_dtypes(main: relax.Function, retyped: dict[str, dict[int, str]]) -> dict[int, str] | None:
    """New dtypes of ``main``'s parameters that feed retyped layer slots, by parameter index.

    None when some slot is fed by anything but a parameter used only there (a weight shared
    with another op, or computed at run time): then no layer is retyped, as a kernel may be
    shared between layers.
    """
    counter = _CountVarUses()
    counter.visit_expr(main.body)
    position = {p: i for i, p in enumerate(main.params)}
    dtypes: dict[int, str] = {}
    exclusive = True

    @visitor
    class _LayerCalls(PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            nonlocal exclusive
            for i, dtype in retyped.get(getattr(call.op, "name_hint", ""), {}).items():
                arg = call.args[i]
                if arg in position and counter.uses[arg] == 1:
                    dtypes[position[arg]] = dtype
                else:
                    exclusive = False
            super().visit_call_(call)

    _LayerCalls().visit_expr(main.body)
    return dtypes if exclusive else None
