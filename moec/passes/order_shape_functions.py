"""Write the VM's shape functions in one order, so that the same model compiles to the same bytes.

TVM's ``VMShapeLower`` computes the symbolic sizes a Relax function needs (``tokens * 256``, a
storage's bytes) in a TIR ``shape_func`` that stores each into a slot of the shape heap ``H``.
It emits those stores in the iteration order of a container keyed by object addresses, which
change from run to run (address-space randomisation): two compiles of one model gave libraries
whose only difference was the order of independent stores like

    H[4] = 4 * (H[0] * 2)        H[7] = 4 * H[0] * 64
    H[7] = 4 * H[0] * 64         H[4] = 4 * (H[0] * 2)

Rewrite rule: in a shape function's sequence of heap stores, each maximal run of stores that
read no slot written earlier in the run is sorted by the slot written. Stores that depend on
an earlier one start a new run, so every value is still computed before it is read; the
computation is unchanged and its order no longer depends on addresses.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import Expr, TensorLoad  # TensorLoad: TIR's BufferLoad in TVM 0.27

SHAPE_FUNCTION = "shape_func"
"""The name (prefix) ``VMShapeLower`` gives its shape functions."""


@tvm.transform.module_pass(opt_level=0, name="OrderShapeFunctions")
class OrderShapeFunctions:
    """Sort the independent heap stores of every VM shape function by slot (see the module)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and gvar.name_hint.startswith(SHAPE_FUNCTION):
                body = _ordered(func.body)
                if not body.same_as(func.body):
                    updates[gvar] = func.with_body(body)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def _ordered(body: tirx.Stmt) -> tirx.Stmt:
    """``body`` with each run of independent heap stores sorted by slot; other statements stay."""
    if not isinstance(body, tirx.SeqStmt):
        return body
    stores = list(body.seq)
    if not all(isinstance(s, tirx.BufferStore) and _slot(s) is not None for s in stores):
        return body
    ordered: list[tirx.BufferStore] = []
    run: list[tirx.BufferStore] = []
    for store in stores:
        if _reads(store) & {_slot(s) for s in run}:
            ordered += sorted(run, key=_slot)
            run = []
        run.append(store)
    ordered += sorted(run, key=_slot)
    if all(a.same_as(b) for a, b in zip(ordered, stores, strict=True)):
        return body
    return tirx.SeqStmt(ordered)


def _slot(store: tirx.BufferStore) -> int | None:
    """The constant heap slot ``store`` writes, or None."""
    index = store.indices[0] if len(store.indices) == 1 else None
    return int(index.value) if isinstance(index, tirx.IntImm) else None


def _reads(store: tirx.BufferStore) -> set[int | None]:
    """The heap slots ``store``'s value reads (None for a slot that is not a constant)."""
    slots: set[int | None] = set()
    pending: list[object] = [store.value]
    while pending:
        node = pending.pop()
        if isinstance(node, TensorLoad) and node.source.same_as(store.buffer):
            index = node.indices[0] if len(node.indices) == 1 else None
            slots.add(int(index.value) if isinstance(index, tirx.IntImm) else None)
        for field in OPERAND_FIELDS:
            child = getattr(node, field, None)
            if isinstance(child, Expr):
                pending.append(child)
            elif isinstance(child, tvm_ffi.Array):
                pending.extend(c for c in child if isinstance(c, Expr))
    return slots


OPERAND_FIELDS = ("a", "b", "value", "condition", "true_value", "false_value", "args", "indices")
"""The fields holding an expression's operands (binary ops, casts, selects, calls, loads)."""
