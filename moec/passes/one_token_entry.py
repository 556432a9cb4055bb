"""OneTokenEntry: a second, fully static entry point for one token — the decoding step.

Decoding calls the model once per token. With symbolic shapes every call builds its shapes at
run time (``vm.builtin.make_shape``), checks and matches them, and allocates its tensors; on
a 2-layer decoder that is 420 VM built-in calls per token, 157 with the shapes fixed.

Rewrite rule: when ``main``'s inputs have symbolic dimensions, the module gains the public
function ``main_one_token``: ``main`` with those dimensions bound to 1
(``relax.transform.BindSymbolicVars``), taking the same parameters. Its shapes are constants, so
TVM plans its memory statically and the VM builds no shapes. ``main`` is unchanged; the runtimes
call ``main_one_token`` when every dimension it bound is 1 in a call's inputs (the manifest's
``entries``: ``one_token`` and ``one_token_dims``). A module whose inputs are all static is
returned as it is, and so is one whose shapes do not agree with those dimensions at 1 (an input
declaring its hidden size symbolic): calls then all run ``main``.

A decoder with a KV cache decodes one token against a cache of any length: the inputs at
``free_inputs`` (its cache tensors and mask, :func:`moec.runtime.generate.cache_length_inputs`)
keep the dimensions no other input has (the cache length) symbolic, so ``main_one_token`` is
the decoding step with every token-sized shape fixed.

Runs last in the export phase, so both functions go through moec's lowering (``InlineLayers``
inlines the layers of both).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from moec.passes.bound_tokens import input_symbols

ONE_TOKEN_ENTRY = "main_one_token"


def one_token_symbols(main: relax.Function, free_inputs: frozenset[int] = frozenset()) -> list[tvm.tirx.Var]:
    """The symbolic dimensions ``main_one_token`` binds to 1: those of ``main``'s inputs but the
    ones that only the inputs at ``free_inputs`` have."""
    count = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else None
    return input_symbols(main, [p for i, p in enumerate(list(main.params)[:count]) if i not in free_inputs])


@tvm.transform.module_pass(opt_level=0, name="OneTokenEntry")
class OneTokenEntry:
    """Add ``main_one_token``; ``bound`` names the dimensions it fixes to 1 (empty: not added);
    the symbols only inputs at ``free_inputs`` have stay symbolic."""

    def __init__(self, free_inputs: frozenset[int] = frozenset()) -> None:
        self.free_inputs = free_inputs
        self.bound: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        symbols = one_token_symbols(mod["main"], self.free_inputs)
        if not symbols:
            return mod
        try:
            one = relax.transform.BindSymbolicVars({s: 1 for s in symbols}, "main")(mod)["main"]
        except ValueError:  # shapes that do not hold at 1 (a symbolic hidden size): no such entry
            return mod
        self.bound = [s.name for s in symbols]
        one = copy_with_new_vars(one)  # a variable may be defined in one function only
        updated = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        updated[ONE_TOKEN_ENTRY] = one.with_attr("global_symbol", ONE_TOKEN_ENTRY)
        return updated
