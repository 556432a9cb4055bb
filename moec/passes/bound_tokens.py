"""BoundTokens: give ``main``'s token dimension an upper bound so its memory is planned statically.

Rewrite rules, for ``max_tokens`` N, when ``main``'s inputs have exactly one symbolic dimension
``t`` (the token count: ``[tokens, hidden]``, or ``[1, seq, hidden]`` with the rest fixed):

- ``main`` gets the function attributes ``tir_var_upper_bound = {t: N}`` and
  ``tir_non_negative_var = [t]``. TVM's ``StaticPlanBlockMemory`` then sizes every intermediate
  whose size depends on ``t`` for ``t = N`` and allocates it with a constant size, sharing storage
  between tensors whose lifetimes do not overlap (the result is still allocated per call, at
  its real size);
- a PrimFunc ``moec_check_tokens(t)`` asserting ``t <= N`` is added to the module and called
  by a first binding of ``main``: a call with more tokens fails with a message naming
  ``--max-tokens`` instead of TVM's "storage allocation failure".

With several symbolic dimensions (``[batch, seq, hidden]``) a bound per dimension would plan
N² tokens, so nothing is changed and ``skipped`` says why.

Why: with a bound, each intermediate's storage needs no run-time size computation
(``make_shape``) and fewer storages are allocated per call, which is part of the per-call VM
overhead that matters when decoding one token at a time.

Runs in moec's lowering (see :func:`moec.passes.pipeline.lowering_pipeline`) after TVM's
dataflow lowering, where ``main`` may hold the impure assertion, and before memory planning.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

CHECK_FUNC = "moec_check_tokens"
"""Name of the PrimFunc that checks the token count."""


def token_check(limit: int) -> tvm.tirx.PrimFunc:
    """A PrimFunc ``(tokens: int64)`` that fails with a message naming ``limit`` if tokens > limit.

    A compiled TIR assertion, not ``R.assert_op``: that one is a Python callback, which a
    deployed artifact (TVM's runtime alone) does not have, and slow on every call.
    """
    message = f"moec: more tokens than this library was compiled for (--max-tokens {limit})"

    @T.prim_func(private=True)
    def check(tokens: T.int64) -> None:
        assert tokens <= limit, message

    return check


def input_symbols(func: relax.Function, params: list[relax.Var] | None = None) -> list[tvm.tirx.Var]:
    """The symbolic dimensions of ``func``'s inputs (the first ``num_input`` parameters; or of
    ``params``, some of them), in order."""
    count = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else None
    found: list[tvm.tirx.Var] = []
    for param in list(func.params)[:count] if params is None else params:
        ty = param.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            continue
        for dim in getattr(ty.shape, "values", []):
            if isinstance(dim, tvm.tirx.Var) and not any(dim.same_as(v) for v in found):
                found.append(dim)
    return found


@tvm.transform.module_pass(opt_level=0, name="BoundTokens")
class BoundTokens:
    """Bound ``main``'s token dimension by ``max_tokens``; ``bounded`` names it, ``skipped`` says why not."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.bounded: str | None = None
        self.skipped: str | None = None

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.bounded, self.skipped = None, None
        main_var = next((gv for gv in mod.get_global_vars() if gv.name_hint == "main"), None)
        if main_var is None:
            self.skipped = "the module has no main function"
            return mod
        main = mod[main_var]
        symbols = input_symbols(main)
        if len(symbols) != 1:
            self.skipped = (
                f"main's inputs have {len(symbols)} symbolic dimensions "
                f"({', '.join(v.name for v in symbols) or 'none'}); a token bound needs exactly one"
            )
            return mod
        (tokens,) = symbols
        builder = relax.BlockBuilder(mod)
        check_var = builder.add_func(token_check(self.max_tokens), CHECK_FUNC)
        check = relax.BlockBuilder().normalize(relax.Call(check_var, [relax.prim_value(tokens)]))
        body = main.body
        binding = relax.VarBinding(relax.Var("_", check.ty), check)
        blocks = list(body.blocks)
        if blocks and not isinstance(blocks[0], relax.DataflowBlock):
            blocks[0] = relax.BindingBlock([binding, *blocks[0].bindings])
        else:
            blocks.insert(0, relax.BindingBlock([binding]))
        checked = relax.SeqExpr(blocks, body.body)
        func = relax.BlockBuilder().normalize(
            relax.Function(main.params, checked, main.ret_ty, main.is_pure, main.attrs, main.span)
        )
        func = func.with_attr("tir_var_upper_bound", {tokens.name: self.max_tokens}).with_attr(
            "tir_non_negative_var", [tokens.name]
        )
        updated = builder.get()
        updated[main_var] = func
        self.bounded = tokens.name
        return updated
