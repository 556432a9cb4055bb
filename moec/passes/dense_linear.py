"""DenseLinear: a dense matmul with a weight runs moec's linear kernel on a panel-packed weight.

TVM's default CPU lowering leaves a plain ``matmul`` unscheduled (scalar, one thread); in a
whole decoder those matmuls — attention projections, routers, shared experts, the LM head —
are most of the time. A dense linear layer is one weight streamed once per call, what moec's
kernels are built for.

Rewrite rules, on ``main``, for a weight parameter ``W`` of ``main`` (float32, rank 2):

- ``y = matmul(x, W)`` (``W`` ``[K, N]``), or ``y = matmul(x, t)`` with
  ``t = permute_dims(W, [1, 0])`` (``W`` ``[N, K]``: ONNX ``Gemm`` with ``transB``, a
  ``Linear`` exported untransposed), ``x`` float32 of rank ≥ 2 ending in ``K``, becomes::

      x2 = reshape(x, [n, K])                      # n: the product of x's leading dims
      y2 = call_tir(linear_KxN, [x2, W'], [n, N])  # a LinearConfig kernel spec
      y  = reshape(y2, shape of y)

  (no reshapes when ``x`` is already ``[n, K]``); ``t`` is dropped.
- ``W`` becomes ``W'`` ``[P, K, panel]``, the packed panels of
  :class:`moec.kernels.config.LinearConfig` (``panel`` = the schedule's ``lanes ×
  panel_vectors``, or ``N`` when smaller), and ``main``'s attribute ``moec.packed_weights``
  records, per parameter name, ``{"panel": panel, "transposed": bool}``, from which
  :class:`moec.passes.slice_weights.SliceWeights` packs the stored array.
- A weight is rewritten only when every use of it is such a matmul, all in one orientation: a
  weight also read by anything else (an embedding lookup tied to the LM head) keeps its layout
  and its matmuls stay with TVM's lowering.
- Its storage format (:mod:`moec.kernels.formats`) is ``router_format`` for a router (a
  weight whose matmul computes an MoE layer's router logits, through reshapes, adds and casts)
  and ``dense_format`` for the others. fp16 changes the packed weight's dtype. int8 replaces the
  parameter by two, ``{name}.int8`` (the packed INT8 values) and ``{name}.int8_scale``
  (``[1, panels * panel]``, one float32 scale per output column, or ``[1, in / group, panels *
  panel]`` with ``int8_group`` where the group divides the weight's inputs). Either is recorded in
  ``moec.expert_formats`` (``{"source", "format", "group", "scale", "output_axis", "router"}``)
  and ``moec.packed_weights`` (int8 scales: ``{"scale": true}``) for ``SliceWeights``.

Matmuls of the same shape share one kernel spec (``linear_KxN``); ``ApplyKernelSchedule``
builds it. Runs in the schedule phase, for CPU targets (on CUDA, dlight's GPU matmul schedules
apply instead).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from moec.kernels import kernel_spec
from moec.kernels.config import LinearConfig
from moec.passes.signature import is_layer
from moec.passes.slice_weights import EXPERT_FORMATS, PACKED_WEIGHTS
from moec.schedule import CpuSchedule

PASS_THROUGH = ("relax.reshape", "relax.add", "relax.astype", "relax.permute_dims")
"""Ops between a router matmul and the layer's logits argument (a bias, a flatten, a cast)."""


@dataclasses.dataclass(frozen=True)
class _Packing:
    """How one weight is packed: its kernel config and whether it is stored ``[N, K]``."""

    config: LinearConfig
    transposed: bool


def _op(expr: relax.Expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get(name)


def _is_float32(expr: relax.Expr, rank: int | None = None) -> bool:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32" or ty.shape is None:
        return False
    return rank is None or len(ty.shape.values) == rank


def _packed_params(name: str, config: LinearConfig) -> list[relax.Var]:
    """The parameters replacing weight ``name`` packed for ``config``: its kernel's weight
    buffers (the packed weight; for int8, then its scales), named as ``main`` stores them."""
    buffers = config.signature((tvm.tirx.IntImm("int64", 1),))[1:-1]
    names = [name] if len(buffers) == 1 else [f"{name}.{config.weight_format}", f"{name}.int8_scale"]
    return [
        relax.Var(n, relax.TensorType(list(b.shape), b.dtype)) for n, b in zip(names, buffers, strict=True)
    ]


def _router_weights(mod: tvm.IRModule, main: relax.Function, found: _Uses) -> set[relax.Var]:
    """``main``'s weights whose matmul computes an MoE layer's router logits (the layer call's
    second argument, through :data:`PASS_THROUGH` ops)."""
    routers = set()

    @visitor
    class _LayerCalls(PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            if isinstance(call.op, tvm.ir.GlobalVar) and is_layer(mod[call.op]) and len(call.args) > 1:
                value = found.values.get(call.args[1])
                while value is not None and any(_op(value, name) for name in PASS_THROUGH):
                    value = found.values.get(value.args[0])
                if value is not None and _op(value, "relax.matmul"):
                    weight = value.args[1]
                    source = found.values.get(weight)
                    routers.add(
                        source.args[0] if source is not None and _op(source, "relax.permute_dims") else weight
                    )
            super().visit_call_(call)

    _LayerCalls().visit_expr(main.body)
    return routers


@visitor
class _Uses(PyExprVisitor):
    """Every variable's uses in a function body, and each binding's value."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter = Counter()
        self.values: dict[relax.Var, relax.Expr] = {}

    def visit_var_(self, var: relax.Var) -> None:
        self.uses[var] += 1

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> None:
        self.uses[var] += 1

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        self.values[binding.var] = binding.value
        super().visit_var_binding_(binding)


def _packings(
    main: relax.Function,
    found: _Uses,
    schedule: CpuSchedule,
    formats: dict[bool, str],
    routers: set[relax.Var],
    int8_group: int = 0,
) -> tuple[dict[relax.Var, _Packing], set[relax.Var]]:
    """The weights to pack (by parameter) and the transposes of them the rewrite drops, from the
    uses and bindings ``found`` in ``main``'s body; a weight in ``routers`` is stored as
    ``formats[True]``, the others as ``formats[False]`` (int8 with a scale per ``int8_group``
    inputs where that divides the weight's inputs, else per output column)."""
    weights = set(main.params[int(main.attrs["num_input"]) :])
    transposes = {
        var: value.args[0]
        for var, value in found.values.items()
        if _op(value, "relax.permute_dims")
        and value.args[0] in weights
        and [int(a) for a in value.attrs.axes] == [1, 0]
    }
    direct: Counter = Counter()
    through: Counter = Counter()
    transposed_uses: Counter = Counter()
    for value in found.values.values():
        if not _op(value, "relax.matmul") or value.attrs.out_dtype not in (None, "", "float32"):
            continue
        x, w = value.args
        if not (isinstance(x, relax.Var) and _is_float32(x) and len(x.ty.shape.values) >= 2):
            continue
        if w in weights:
            direct[w] += 1
        elif w in transposes:
            through[transposes[w]] += 1
            transposed_uses[w] += 1
    packings: dict[relax.Var, _Packing] = {}
    for w in weights:
        if not _is_float32(w, rank=2):
            continue
        own = [t for t, source in transposes.items() if source.same_as(w)]
        every_transpose_to_matmuls = all(found.uses[t] == transposed_uses[t] for t in own)
        if direct[w] and direct[w] == found.uses[w]:
            transposed = False
        elif through[w] and len(own) == found.uses[w] and every_transpose_to_matmuls:
            transposed = True
        else:
            continue
        rows, cols = (int(d) for d in w.ty.shape.values)
        in_features, out_features = (cols, rows) if transposed else (rows, cols)
        panel = schedule.panel(out_features)
        fmt = formats[w in routers]
        group = int8_group if fmt == "int8" and in_features % max(int8_group, 1) == 0 else 0
        config = LinearConfig(
            in_features=in_features,
            out_features=out_features,
            panel=panel,
            weight_format=fmt,
            int8_group=group,
        )
        packings[w] = _Packing(config, transposed)
    dropped = {t for t, source in transposes.items() if source in packings}
    return packings, dropped


@mutator
class _Rewriter(PyExprMutator):
    """Replaces the packable matmuls by linear kernel calls (see the module docstring)."""

    def __init__(
        self,
        mod: tvm.IRModule,
        packings: dict[relax.Var, _Packing],
        dropped: set[relax.Var],
        packed: dict[relax.Var, list[relax.Var]],
        values: dict[relax.Var, relax.Expr],
    ) -> None:
        super().__init__(mod)
        self.packings, self.dropped, self.packed, self.values = packings, dropped, packed, values
        self.kernels: dict[LinearConfig, relax.GlobalVar] = {}

    def _weight(self, expr: relax.Expr) -> relax.Var | None:
        if expr in self.packings:
            return expr
        if expr in self.dropped:
            return self.values[expr].args[0]
        return None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.dropped:
            return
        value = binding.value
        weight = self._weight(value.args[1]) if _op(value, "relax.matmul") else None
        if weight is None:
            super().visit_var_binding_(binding)
            return
        config = self.packings[weight].config
        if config not in self.kernels:
            name = f"linear_{config.in_features}x{config.out_features}"
            name += "" if config.weight_format == "fp32" else f"_{config.weight_format}"
            self.kernels[config] = self.builder_.add_func(kernel_spec(config), name)
        x = self.visit_expr(value.args[0])
        *leading, _ = x.ty.shape.values
        rows = leading[0]
        for dim in leading[1:]:
            rows = rows * dim
        flat = x if len(leading) == 1 else self.builder_.emit(relax.op.reshape(x, [rows, config.in_features]))
        out = relax.TensorType([rows, config.out_features], "float32")
        y = relax.call_tir(self.kernels[config], [flat, *self.packed[weight]], out)
        if len(leading) > 1:
            y = relax.op.reshape(self.builder_.emit(y), binding.var.ty.shape)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(y)))


@tvm.transform.module_pass(opt_level=0, name="DenseLinear")
class DenseLinear:
    """Run ``main``'s dense matmuls with weights on moec's linear kernel; ``changed`` lists the
    packed weights by name."""

    def __init__(
        self,
        schedule: CpuSchedule,
        router_format: str = "fp32",
        dense_format: str = "fp32",
        int8_group: int = 0,
    ) -> None:
        self.schedule = schedule
        self.formats = {True: router_format, False: dense_format}
        self.int8_group = int8_group
        self.changed: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        found = _Uses()
        found.visit_expr(main.body)
        routers = _router_weights(mod, main, found)
        packings, dropped = _packings(main, found, self.schedule, self.formats, routers, self.int8_group)
        self.changed = sorted(w.name for w in packings)
        if not packings:
            return mod
        packed = {w: _packed_params(w.name, p.config) for w, p in packings.items()}
        rewriter = _Rewriter(mod, packings, dropped, packed, found.values)
        rewritten = rewriter.visit_expr(main)
        record, parts = {}, {}
        for w, p in packings.items():
            record[packed[w][0].name] = {"panel": p.config.panel, "transposed": p.transposed}
            if len(packed[w]) == 2:  # int8: the values, then their scales
                record[packed[w][1].name] = {"panel": p.config.panel, "scale": True, "transposed": False}
            if p.config.weight_format != "fp32":
                for var, scale in zip(packed[w], (False, True)[: len(packed[w])], strict=True):
                    parts[var.name] = {
                        "source": w.name, "format": p.config.weight_format, "scale": scale,
                        "group": p.config.int8_group,
                        "output_axis": 0 if p.transposed else 1, "router": w in routers,
                    }  # fmt: skip
        params = [new for param in rewritten.params for new in packed.get(param, [param])]
        rewritten = relax.Function(
            params, rewritten.body, rewritten.ret_ty, rewritten.is_pure, rewritten.attrs
        )
        rewritten = rewritten.with_attr(PACKED_WEIGHTS, json.dumps(record, sort_keys=True))
        if parts:
            previous = json.loads(str(main.attrs[EXPERT_FORMATS])) if EXPERT_FORMATS in main.attrs else {}
            rewritten = rewritten.with_attr(EXPERT_FORMATS, json.dumps(previous | parts, sort_keys=True))
        rewriter.builder_.update_func(mod.get_global_var("main"), rewritten)
        return rewriter.builder_.get()
