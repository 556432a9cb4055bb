"""Helpers for passes that change the types of MoE layer weights (precision, expert masking).

A Relax ``GlobalVar`` carries its function's signature, so a pass that retypes a layer
function's parameters adds the function afresh under a new ``GlobalVar`` and points callers
at it; ``main``'s parameters that feed the retyped slots are retyped to match, so the artifact
stores the weights in their new form.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from moec.canonical.layer import WEIGHT_ROLES
from moec.kernels import kernel_config, kernel_kind, kernel_spec
from moec.kernels.config import KernelConfig, replace

ParamTypes = dict[int, relax.TensorType]
"""New types of a function's parameters, by parameter position."""


@mutator
class _Substitute(PyExprMutator):
    """Substitutes variables and callees (used to retype parameters and retarget calls); a
    ``call_tir`` of a kernel in ``remade`` declares the outputs of that kernel's config."""

    def __init__(
        self,
        remap: dict[relax.Var, relax.Var],
        callees: dict[str, tvm.ir.GlobalVar],
        mod: tvm.IRModule | None = None,
        remade: dict[str, KernelConfig] | None = None,
    ) -> None:
        super().__init__(mod)
        self.remap, self.callees, self.remade = remap, callees, remade or {}

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self.remap[var] if var in self.remap else super().visit_var_(var)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        new = super().visit_call_(call)
        if new.op == tvm.ir.Op.get("relax.call_tir") and new.args[0].name_hint in self.remade:
            config = self.remade[new.args[0].name_hint]
            return relax.call_tir(new.args[0], new.args[1], call_outputs(config, new.args[1], new.ty_args[0]))
        return new

    def visit_global_var_(self, gvar: tvm.ir.GlobalVar) -> relax.Expr:
        return self.callees.get(gvar.name_hint, gvar)


def call_outputs(
    config: KernelConfig, args: relax.Tuple, declared: relax.Type
) -> relax.TensorType | list[relax.TensorType]:
    """The output types a ``call_tir`` of ``config``'s kernel on ``args`` declares (a list where
    the kernel has several outputs).

    The token dimensions are read off the call: every argument (and every output the call
    declared before) whose signature dimension is a bare token dimension gives its size, so the
    kernel's signature over those sizes is the call's new output type. A pass that changes a
    kernel's config (its expert count, its channels) thus never writes output types by hand.
    """
    rows = tuple(tvm.tirx.Var(f"rows{i}", "int64") for i in range(config.row_dims))
    outputs = list(declared.fields) if isinstance(declared, relax.TupleType) else [declared]
    types = [arg.ty for arg in args.fields] + outputs
    sizes: dict[int, tvm.ir.Expr] = {}
    for buffer, ty in zip(config.signature(rows), types, strict=True):
        for dim, size in zip(buffer.shape, ty.shape.values, strict=True):
            if isinstance(dim, tvm.tirx.Var):
                sizes |= {i: size for i, row in enumerate(rows) if dim.same_as(row)}
    if len(sizes) != len(rows):
        raise ValueError(f"cannot read the token dimensions of a {config.kind} call off its arguments")
    bound = config.outputs(tuple(sizes[i] for i in range(len(rows))))
    made = [relax.TensorType(b.shape, b.dtype) for b in bound]
    return made if isinstance(declared, relax.TupleType) else made[0]


@visitor
class _CountVarUses(PyExprVisitor):
    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter = Counter()

    def visit_var_(self, var: relax.Var) -> None:
        self.uses[var] += 1


def var_uses(func: relax.Function) -> Counter:
    """How often each variable is used in ``func``'s body."""
    counter = _CountVarUses()
    counter.visit_expr(func.body)
    return counter.uses


def is_layer(func: object) -> bool:
    """Whether ``func`` is an MoE layer function (attribute ``moec.layer``)."""
    return isinstance(func, relax.Function) and func.attrs is not None and "moec.layer" in func.attrs


def layer_weight_slots(func: relax.Function) -> dict[str, int]:
    """Positions of an MoE layer function's weight parameters, by role (``w_up``, ..., ``b_down``).

    The frontend names each weight parameter after its role (:data:`WEIGHT_ROLES`), and passes
    keep parameter names, so a pass finds ``w_down`` by name whatever else the layer takes.
    """
    return {p.name: i for i, p in enumerate(func.params) if p.name in WEIGHT_ROLES}


def retype_params(
    func: relax.Function,
    types: ParamTypes,
    callees: dict[str, tvm.ir.GlobalVar] | None = None,
    mod: tvm.IRModule | None = None,
    remade: dict[str, KernelConfig] | None = None,
) -> relax.Function:
    """``func`` with parameter ``i`` of type ``types[i]``, uses substituted, and calls to the
    functions named in ``callees`` made through those (retyped) GlobalVars of ``mod``; a
    ``call_tir`` of a kernel named in ``remade`` declares that config's outputs
    (:func:`call_outputs`)."""
    remap = {func.params[i]: relax.Var(func.params[i].name, ty) for i, ty in types.items()}
    return replace_params(func, remap, callees, mod, remade)


def replace_params(
    func: relax.Function,
    remap: dict[relax.Var, relax.Var],
    callees: dict[str, tvm.ir.GlobalVar] | None = None,
    mod: tvm.IRModule | None = None,
    remade: dict[str, KernelConfig] | None = None,
) -> relax.Function:
    """``func`` with each parameter in ``remap`` replaced by its new variable, uses included (and
    callees and ``call_tir`` output types changed as :func:`retype_params` says)."""
    body = _Substitute(remap, callees or {}, mod, remade).visit_expr(func.body)
    params = [remap.get(p, p) for p in func.params]
    return relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)


def called_kernels(mod: tvm.IRModule, func: relax.Function, kinds: tuple[str, ...]) -> list[tvm.ir.GlobalVar]:
    """The moec kernels of the given kinds that ``func`` calls through ``call_tir``."""
    found: list[tvm.ir.GlobalVar] = []

    @visitor
    class _Calls(PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            if call.op == tvm.ir.Op.get("relax.call_tir"):
                callee = call.args[0]
                if kernel_kind(mod[callee]) in kinds and callee not in found:
                    found.append(callee)
            super().visit_call_(call)

    _Calls().visit_expr(func.body)
    return found


def main_param_types(main: relax.Function, retyped: dict[str, ParamTypes]) -> ParamTypes | None:
    """New types of ``main``'s parameters that feed retyped layer slots, by parameter index.

    None when some slot is fed by anything but a parameter used only there (a weight shared
    with another op, or computed at run time): the pass should then change nothing, as a
    kernel may be shared between layers.
    """
    uses = var_uses(main)
    position = {p: i for i, p in enumerate(main.params)}
    types: ParamTypes = {}
    exclusive = True

    @visitor
    class _LayerCalls(PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            nonlocal exclusive
            for i, ty in retyped.get(getattr(call.op, "name_hint", ""), {}).items():
                arg = call.args[i]
                if arg in position and uses[arg] == 1:
                    types[position[arg]] = ty
                else:
                    exclusive = False
            super().visit_call_(call)

    _LayerCalls().visit_expr(main.body)
    return types if exclusive else None


def rebuild(
    mod: tvm.IRModule,
    kernels: dict[str, tvm.tirx.PrimFunc],
    layers: dict[str, tuple[relax.Function, ParamTypes, dict[str, str]]],
    main_attrs: dict[str, Any] | None = None,
) -> tvm.IRModule | None:
    """``mod`` with ``kernels`` (specs) added, replacing functions of the same name; each layer
    function retyped (``layers[name] = (function, parameter types, {old kernel name: new kernel
    name})``), its calls of the new kernels declaring their configs' outputs; and ``main``'s
    parameters feeding the retyped slots retyped to match (:func:`main_param_types`), with extra
    attributes. None when a retyped slot is fed by anything but a parameter used only there: the
    pass then changes nothing."""
    main_types = main_param_types(mod["main"], {name: types for name, (_, types, _) in layers.items()})
    if main_types is None:
        return None
    replaced = layers.keys() | kernels.keys()
    kept = {gv: f for gv, f in mod.functions_items() if gv.name_hint not in replaced}
    builder = relax.BlockBuilder(tvm.IRModule(kept, attrs=mod.attrs))
    kernel_vars = {name: builder.add_func(func, name) for name, func in kernels.items()}
    remade = {var.name_hint: kernel_config(kernels[name]) for name, var in kernel_vars.items()}
    layer_vars = {}
    for name, (func, types, kernel_names) in layers.items():
        callees = {old: kernel_vars[new] for old, new in kernel_names.items()}
        layer_vars[name] = builder.add_func(retype_params(func, types, callees, None, remade), name)
    updated = builder.get()
    main = retype_params(updated["main"], main_types, layer_vars, updated)
    for key, value in (main_attrs or {}).items():
        main = main.with_attr(key, value)
    updated["main"] = main
    return relax.transform.DeadCodeElimination(["main"])(updated)


def layer_arguments(main: relax.Function, slots: dict[str, Any]) -> dict[relax.Var, tuple[str, int]]:
    """``main``'s parameters passed to the given slots (``{layer: {slot: ...}}``) of layer calls,
    with the layer's name and the slot."""
    params = set(main.params)
    found: dict[relax.Var, tuple[str, int]] = {}

    @visitor
    class _Calls(PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            layer = getattr(call.op, "name_hint", "")
            for i in slots.get(layer, {}):
                if call.args[i] in params:
                    found[call.args[i]] = (layer, i)
            super().visit_call_(call)

    _Calls().visit_expr(main.body)
    return found


def reconfigured(kernel: tvm.tirx.PrimFunc, extra: dict[str, Any]) -> tvm.tirx.PrimFunc:
    """The spec of a moec kernel whose config is updated by ``extra`` (the schedule phase builds it)."""
    return kernel_spec(replace(kernel_config(kernel), **extra))


def reconfigure_kernels(
    mod: tvm.IRModule, kind: str, extra: dict[str, Any]
) -> tuple[tvm.IRModule, list[str]]:
    """``mod`` with every ``kind`` kernel :func:`reconfigured` by ``extra`` (same signature, so
    callers need no change); and the names of the kernels remade (those whose config changed)."""
    updated = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    changed = []
    for gvar, func in mod.functions_items():
        if kernel_kind(func) == kind and replace(kernel_config(func), **extra) != kernel_config(func):
            updated[gvar] = reconfigured(func, extra)
            changed.append(gvar.name_hint)
    return updated, changed
