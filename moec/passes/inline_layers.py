"""InlineLayers: put every MoE layer's kernel calls straight into ``main`` (and ``main_one_token``).

Rewrite rule, for every call ``y = moe<i>(x, logits, *weights)`` in an entry point (a public
Relax function: ``main``, and ``main_one_token`` where ``OneTokenEntry`` added it) whose callee
is a Relax function with attribute ``moec.layer``:

- the callee's symbolic dimensions are bound to the caller's (its ``n`` becomes, e.g., ``main``'s
  ``tokens``, or a constant such as the one sequence of a ``[1, seq, H]`` capacity layer), read
  off the shapes of the arguments;
- its parameters are replaced by the arguments and its bindings (the ``call_tir`` of ``route``,
  ``group``, ``expert_up``, ``expert_down`` and the tuple projections between them) are emitted
  in place of the call, in ``main``'s block; the call's result is the callee's result;
- a layer function no longer called from anywhere is removed from the module.

A call is left as it is when an argument lacks a shape for one of the callee's symbolic
dimensions, or when that dimension is an expression rather than one of the caller's variables or
a constant (a ``[batch, seq, hidden]`` input flattened to ``batch * seq`` tokens: binding ``n`` to
it would leave ``batch`` and ``seq`` undefined in the inlined body); such layers keep the call.

Why: on the Relax VM a call to a Relax function is a new frame, a shape heap, a
``check_tensor_info`` and a ``match_shape`` per argument, and a ``match_shape`` of the result,
about 20 VM instructions per layer per call for nothing the kernels need. Cold (weights and
runtime state out of cache, as when decoding a large model) each instruction costs ~1 µs here.

Runs in moec's lowering (:func:`moec.passes.pipeline.lowering_pipeline`), after TVM's dataflow
lowering: the passes that find layers by their function have run, and the kernel calls land in
``main``'s ordinary (non-dataflow) bindings, where TVM's dataflow passes, which expect
schedulable TIR and fail on our hand-written kernels, no longer look. It works on any form of
the bindings (``call_tir``, or the explicit allocations and calls after ``CallTIRRewrite``).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from moec.passes.signature import is_layer


def _symbol_bindings(
    params: list[relax.Var], args: list[relax.Expr]
) -> dict[tvm.tirx.Var, tvm.ir.PrimExpr] | None:
    """The callee's symbolic dimensions as the caller's variables, or None if one is not one."""
    bindings: dict[tvm.tirx.Var, tvm.ir.PrimExpr] = {}
    for param, arg in zip(params, args, strict=True):
        if not isinstance(param.ty, relax.TensorType) or param.ty.shape is None:
            continue
        dims = [d for d in param.ty.shape.values if isinstance(d, tvm.tirx.Var)]
        if not dims:
            continue
        arg_ty = arg.ty
        if not isinstance(arg_ty, relax.TensorType) or arg_ty.shape is None:
            return None
        arg_shape = getattr(arg_ty.shape, "values", None)
        if arg_shape is None or len(arg_shape) != len(param.ty.shape.values):
            return None
        for dim, value in zip(param.ty.shape.values, arg_shape, strict=True):
            if isinstance(dim, tvm.tirx.Var) and dim not in bindings:
                if not isinstance(value, tvm.tirx.Var | tvm.tirx.IntImm):
                    return None  # e.g. batch * seq: the inlined body would use undefined vars
                bindings[dim] = value
    return bindings


@mutator
class _Inliner(PyExprMutator):
    """Replaces calls of layer functions by the layers' bindings."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.inlined: list[str] = []

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        args = [self.visit_expr(arg) for arg in call.args]
        callee = self.mod[call.op] if isinstance(call.op, tvm.ir.GlobalVar) else None
        symbols = _symbol_bindings(list(callee.params), args) if is_layer(callee) else None
        if symbols is None:
            return relax.Call(call.op, args, call.attrs, call.ty_args, call.span)
        func = callee.bind_symbolic_vars(symbols) if symbols else callee
        for param, arg in zip(func.params, args, strict=True):
            if not isinstance(arg, relax.Var):
                arg = self.builder_.emit(arg, param.name)
            self.set_var_remap(param, arg)
        body = func.body
        for block in body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    raise ValueError(f"{call.op.name_hint}: cannot inline a {type(binding).__name__}")
                value = self.builder_.emit(self.visit_expr(binding.value), binding.var.name)
                self.set_var_remap(binding.var, value)
        self.inlined.append(call.op.name_hint)
        return self.visit_expr(body.body)


@visitor
class _Callees(PyExprVisitor):
    """Names of the functions an expression calls."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def visit_global_var_(self, gvar: tvm.ir.GlobalVar) -> None:
        self.names.add(gvar.name_hint)


def _entry_points(mod: tvm.IRModule) -> list[tvm.ir.GlobalVar]:
    """The module's public Relax functions (``main``, and ``main_one_token`` where there is one)."""
    return [
        gvar
        for gvar, func in mod.functions_items()
        if isinstance(func, relax.Function) and func.attrs is not None and "global_symbol" in func.attrs
    ]


@tvm.transform.module_pass(opt_level=0, name="InlineLayers")
class InlineLayers:
    """Inline every MoE layer function into the entry points; ``inlined`` lists the layers inlined
    (once per entry point that called them)."""

    def __init__(self) -> None:
        self.inlined: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.inlined = []
        entries = {}
        for gvar in _entry_points(mod):
            inliner = _Inliner(mod)
            entries[gvar] = inliner.visit_expr(mod[gvar])
            self.inlined += inliner.inlined
        if not self.inlined:
            return mod
        called = _Callees()
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                called.visit_expr(entries.get(gvar, func))
        kept = {
            gvar: entries.get(gvar, func)
            for gvar, func in mod.functions_items()
            if gvar in entries or not is_layer(func) or gvar.name_hint in called.names
        }
        return tvm.IRModule(kept, attrs=mod.attrs, global_infos=mod.global_infos)
