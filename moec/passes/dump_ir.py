"""DumpIR: write the module's TVMScript to a file between pipeline phases (for debugging)."""

from __future__ import annotations

from pathlib import Path

import tvm


@tvm.transform.module_pass(opt_level=0, name="DumpIR")
class DumpIR:
    """Writes ``<directory>/<name>.py`` with the module as TVMScript; the module is unchanged."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = Path(directory) / f"{name}.py"

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(mod.script(show_meta=False))
        return mod
