"""CIdentifiers: give ``main``'s parameters names that are C identifiers.

TVM's CUDA code generation names a kernel's parameters after the Relax variables they came
from, and ONNX names such as ``mlp/w`` or ``input.1`` are not valid C, so nvcc would reject the
generated source.

Rewrite rule: every parameter of ``main`` whose name has a character other than a letter, digit
or underscore is replaced by a variable of the same type named with each such character turned
into ``_`` (``mlp/w`` → ``mlp_w``), in the parameter list and everywhere in ``main``'s body.
Nothing else changes, and a module whose names are all identifiers is returned as it is.

Parameters are positional at run time, so only the generated code sees the new names: the
artifact keeps the ONNX names (``SliceWeights`` has recorded the weights under them). Runs last
in the export phase, for CUDA targets.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax

from moec.passes.signature import replace_params

NOT_IDENTIFIER = re.compile(r"\W")


@tvm.transform.module_pass(opt_level=0, name="CIdentifiers")
class CIdentifiers:
    """Rename ``main``'s parameters to C identifiers; ``renamed`` maps old names to new ones."""

    def __init__(self) -> None:
        self.renamed: dict[str, str] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        remap = {
            p: relax.Var(NOT_IDENTIFIER.sub("_", p.name), p.ty)
            for p in main.params
            if NOT_IDENTIFIER.search(p.name)
        }
        self.renamed = {old.name: new.name for old, new in remap.items()}
        if not remap:
            return mod
        updated = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        updated["main"] = replace_params(main, remap)
        return updated
