"""StoreExpertWeights: store each MoE layer's experts in the format its precision plan names.

Rewrite rules, for every Relax function with attribute ``moec.layer`` whose plan (``formats``:
layer name → one format per expert, :mod:`moec.kernels.formats`, or one for all; ``default``
for every expert of a layer it does not name) is not all ``fp32``:

- each expert matrix parameter (``w_up``, ``w_gate``, ``w_down``: ``[E, out, in]`` float32,
  found by role) is replaced, in place, by one parameter per format the layer's experts use,
  holding those experts in order: ``w_up`` ``[E32, out, in]`` float32, ``w_up_fp16`` float16,
  ``w_up_int8`` int8 and its scales ``w_up_int8_scale`` (``[E8, out]``, or ``[E8, in / group,
  out]`` with an ``int8_group``), ``w_up_int8_dot`` and ``w_up_int8_dot_scale`` alike; the
  biases stay float32;
- the ``expert_up`` / ``expert_down`` kernels it calls are remade with the plan's ``formats``,
  ``int8_group`` (``groups`` names it per layer where it differs: a layer the model stores as
  INT8 keeps its own block), on a CPU target with FP16 arithmetic (``cpu_fp16``) ``fp16_arithmetic`` for
  fp16 experts (:func:`moec.kernels.formats.fp16_arithmetic`), and for int8-dot experts the
  target's INT8 dot instructions ``int8_dot`` (:data:`moec.kernels.int8_dot.INSTRUCTION_SETS`), as
  ``{layer}_{kind}_stored`` (layers with the same plan share them, as the frontend's layers
  shared the kernels before): their signatures list the same buffers in the same place, so
  each call takes the new parameters where it took the old one;
- ``main``'s parameter passed to each replaced slot is replaced the same way by parameters named
  ``{name}.{format}`` (and ``{name}.int8_scale``; ``int8-dot`` written ``int8_dot``), recorded in
  ``main``'s attribute ``moec.expert_formats`` (new name → ``{"source", "experts", "format",
  "group", "scale"}``), from which ``SliceWeights`` makes the stored arrays: the source weight
  after masking and pruning, those experts, converted (int8, int8-dot:
  :func:`moec.kernels.formats.quantize_int8`).

If a slot is fed by anything but a parameter of ``main`` used only there, or is not float32,
the layer is left as it is. Runs last in the layers phase (after masking and pruning, whose
expert numbering the plan follows); ``PackExpertWeights`` then packs each matrix part.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from moec.canonical.layer import EXPERT_MATRICES
from moec.kernels import kernel_config, kernel_spec
from moec.kernels.config import replace
from moec.kernels.formats import ExpertFormats, fp16_arithmetic
from moec.passes.signature import call_outputs, called_kernels, is_layer, layer_weight_slots, var_uses
from moec.passes.slice_weights import EXPERT_FORMATS

WEIGHT_KERNELS = ("expert_up", "expert_down")

Expansion = dict[relax.Var, list[relax.Var]]
"""Parameters replaced by several, in place: old variable → its new variables."""


@mutator
class _ExpandArguments(PyExprMutator):
    """Replaces each use of an expanded variable in call arguments by its new variables, calls
    the functions named in ``callees`` through the new GlobalVars, and makes each ``call_tir`` of
    a remade kernel declare its config's outputs."""

    def __init__(self, expansion: Expansion, callees: dict[str, tvm.ir.GlobalVar], mod: tvm.IRModule) -> None:
        super().__init__()
        self.expansion, self.callees, self.mod = expansion, callees, mod

    def _expand(self, args) -> list[relax.Expr]:
        expanded: list[relax.Expr] = []
        for arg in args:
            expanded += self.expansion.get(arg, [self.visit_expr(arg)])
        return expanded

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if call.op == tvm.ir.Op.get("relax.call_tir") and call.args[0].name_hint in self.callees:
            callee = self.callees[call.args[0].name_hint]
            args = relax.Tuple(self._expand(call.args[1].fields))
            return relax.call_tir(
                callee, args, call_outputs(kernel_config(self.mod[callee]), args, call.ty_args[0])
            )
        op = call.op
        if isinstance(op, tvm.ir.GlobalVar) and op.name_hint in self.callees:
            return relax.Call(self.callees[op.name_hint], self._expand(call.args), call.attrs, call.ty_args)
        return super().visit_call_(call)


def _expanded(func: relax.Function, expansion: Expansion, callees, mod) -> relax.Function:
    """``func`` with its parameters and call arguments expanded."""
    body = _ExpandArguments(expansion, callees, mod).visit_expr(func.body)
    params = [new for p in func.params for new in expansion.get(p, [p])]
    return relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)


def _layer_call_arguments(main: relax.Function, layer: str) -> list[list[relax.Expr]]:
    """The arguments of every call of ``layer`` in ``main``."""
    found: list[list[relax.Expr]] = []

    @visitor
    class _Calls(PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            if getattr(call.op, "name_hint", "") == layer:
                found.append(list(call.args))
            super().visit_call_(call)

    _Calls().visit_expr(main.body)
    return found


@tvm.transform.module_pass(opt_level=0, name="StoreExpertWeights")
class StoreExpertWeights:
    """Store each planned layer's experts in their formats; ``changed`` lists the layers."""

    def __init__(
        self,
        formats: dict[str, str | tuple[str, ...]] | None = None,
        default: str = "fp32",
        int8_group: int = 0,
        cpu_fp16: bool = False,
        int8_dot: str | None = None,
        groups: dict[str, int] | None = None,
    ) -> None:
        self.plan = dict(formats or {})
        self.default, self.group, self.cpu_fp16, self.int8_dot = default, int8_group, cpu_fp16, int8_dot
        self.groups = dict(groups or {})
        self.formats: dict[str, ExpertFormats] = {}
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.changed = []
        main = mod["main"]
        uses = var_uses(main)
        main_params = set(main.params)
        layer_expansions: dict[str, Expansion] = {}
        main_expansion: Expansion = {}
        records: dict[str, dict] = {}
        for gvar, func in mod.functions_items():
            if not is_layer(func):
                continue
            experts = int(func.params[layer_weight_slots(func)["w_up"]].ty.shape[0])
            plan = self.plan.get(gvar.name_hint, self.default)
            plan = (plan,) * experts if isinstance(plan, str) else tuple(plan)
            if set(plan) == {"fp32"}:
                continue
            if len(plan) != experts:
                raise ValueError(
                    f"{gvar.name_hint}: the plan names {len(plan)} experts, the layer has {experts}"
                )
            w_up = func.params[layer_weight_slots(func)["w_up"]]
            _, ffn, hidden = (int(d) for d in w_up.ty.shape)
            arithmetic = fp16_arithmetic(self.cpu_fp16, hidden, ffn)
            group = self.groups.get(gvar.name_hint, self.group)
            formats = self.formats[gvar.name_hint] = ExpertFormats(plan, group, arithmetic)
            planned = self._plan_layer(
                func, formats, _layer_call_arguments(main, gvar.name_hint), uses, main_params
            )
            if planned is None:
                continue
            layer_expansions[gvar.name_hint], expansion, record = planned
            main_expansion |= expansion
            records |= record
        if not layer_expansions:
            return mod
        return self._rebuild(mod, layer_expansions, main_expansion, records)

    def _plan_layer(self, func, formats: ExpertFormats, calls, uses, main_params):
        """(layer expansion, main expansion, records) of one layer; None to leave it alone."""
        if len(calls) != 1 or len(formats.formats) != int(
            func.params[layer_weight_slots(func)["w_up"]].ty.shape[0]
        ):
            return None
        layer_expansion: Expansion = {}
        main_expansion: Expansion = {}
        records: dict[str, dict] = {}
        for role, i in layer_weight_slots(func).items():
            if role not in EXPERT_MATRICES:
                continue
            param, source = func.params[i], calls[0][i]
            if str(param.ty.dtype) != "float32" or source not in main_params or uses[source] != 1:
                return None
            _, rows, columns = (int(d) for d in param.ty.shape)
            parts = formats.buffers(role, rows, columns, lambda count, _fmt, r=rows, c=columns: (count, r, c))
            layer_expansion[param] = [
                relax.Var(name, relax.TensorType(shape, dtype)) for name, shape, dtype in parts
            ]
            main_expansion[source] = []
            for name, shape, dtype in parts:
                _, fmt, scale = ExpertFormats.part_of(name, [role])
                stored = f"{source.name}.{name[len(role) + 1 :] if name != role else 'fp32'}"
                main_expansion[source].append(relax.Var(stored, relax.TensorType(shape, dtype)))
                records[stored] = {
                    "source": source.name,
                    "experts": formats.experts(fmt),
                    "format": fmt,
                    "group": formats.group,
                    "scale": scale,
                }
        return layer_expansion, main_expansion, records

    def _rebuild(self, mod, layer_expansions: dict[str, Expansion], main_expansion: Expansion, records):
        kernels: dict[str, tvm.tirx.PrimFunc] = {}
        renamed: dict[str, dict[str, str]] = {}  # per layer: its old kernel names → the new ones
        made: dict[str, str] = {}  # a new kernel's config → its name (layers with one plan share it)
        for name in layer_expansions:
            formats = self.formats[name]
            renamed[name] = {}
            for kernel in called_kernels(mod, mod[name], WEIGHT_KERNELS):
                config = kernel_config(mod[kernel])
                config = replace(
                    config,
                    formats=formats.formats,
                    int8_group=formats.group,
                    fp16_arithmetic=formats.fp16_arithmetic and "fp16" in formats.formats,
                    int8_dot=self.int8_dot if "int8-dot" in formats.formats else None,
                )
                key = f"{config.kind}:{config.to_json()}"
                if key not in made:
                    made[key] = f"{name}_{config.kind}_stored"
                    kernels[made[key]] = kernel_spec(config)
                renamed[name][kernel.name_hint] = made[key]
        kept = {gv: f for gv, f in mod.functions_items() if gv.name_hint not in layer_expansions}
        builder = relax.BlockBuilder(tvm.IRModule(kept, attrs=mod.attrs))
        kernel_vars = {name: builder.add_func(func, name) for name, func in kernels.items()}
        staged = builder.get()
        layer_vars = {}
        for name, expansion in layer_expansions.items():
            callees = {old: kernel_vars[new] for old, new in renamed[name].items()}
            layer_vars[name] = builder.add_func(_expanded(mod[name], expansion, callees, staged), name)
        updated = builder.get()
        main = _expanded(updated["main"], main_expansion, layer_vars, updated)
        previous = json.loads(str(main.attrs[EXPERT_FORMATS])) if EXPERT_FORMATS in main.attrs else {}
        updated["main"] = main.with_attr(EXPERT_FORMATS, json.dumps(previous | records, sort_keys=True))
        self.changed = sorted(layer_expansions)
        return relax.transform.DeadCodeElimination(["main"])(updated)
