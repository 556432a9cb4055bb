"""OneTokenEntry: a second, fully static entry point for one token — the decoding step.

Decoding calls the model once per token. With symbolic shapes every call builds its shapes at
run time (``vm.builtin.make_shape``), checks and matches them, and allocates its tensors; on
a 2-layer decoder that is 420 VM built-in calls per token, 157 with the shapes fixed.

Rewrite rule: when ``main``'s inputs have symbolic dimensions, the module gains the public
function ``main_one_token``: ``main`` with every one of those dimensions bound to 1
(``relax.transform.BindSymbolicVars``), taking the same parameters. Its shapes are constants, so
TVM plans its memory statically and the VM builds no shapes. ``main`` is unchanged; the runtimes
call ``main_one_token`` when every symbolic dimension of a call's inputs is 1 (the manifest's
``entries``). A module whose inputs are all static is returned as it is.

Runs last in the export phase, so both functions go through moec's lowering (``InlineLayers``
inlines the layers of both).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from moec.passes.bound_tokens import input_symbols

ONE_TOKEN_ENTRY = "main_one_token"


@tvm.transform.module_pass(opt_level=0, name="OneTokenEntry")
class OneTokenEntry:
    """Add ``main_one_token``; ``bound`` names the dimensions it fixes to 1 (empty: not added)."""

    def __init__(self) -> None:
        self.bound: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        symbols = input_symbols(mod["main"])
        self.bound = [s.name for s in symbols]
        if not symbols:
            return mod
        one = relax.transform.BindSymbolicVars({s: 1 for s in symbols}, "main")(mod)["main"]
        one = copy_with_new_vars(one)  # a variable may be defined in one function only
        updated = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        updated[ONE_TOKEN_ENTRY] = one.with_attr("global_symbol", ONE_TOKEN_ENTRY)
        return updated
