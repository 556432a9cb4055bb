"""What to tell a user whose transformers MoE model does not export to ONNX, and what exports.

moec compiles what exporters write, but some exporter × experts-implementation pairs write
nothing (the export raises deep inside torch) or write a graph that is right only for the
trace input. transformers picks the experts' code with ``config._experts_implementation``;
what each exporter does with each (torch 2.13, transformers 5.24, see fixtures/README.md):

=============  ===============================  ====================================  ==========
exporter       ``eager``                        ``grouped_mm``                        batched_mm
=============  ===============================  ====================================  ==========
dynamo         fails: data-dependent guard      fails: no ONNX function for           exports
               (the loop over hit experts)      ``transformers.grouped_mm_fallback``
torchscript    exports, trace-specialised       fails: ``aten::histc`` unsupported    exports
hf-onnx        (dynamo underneath: as dynamo)   (as dynamo)                           exports
=============  ===============================  ====================================  ==========

Switch Transformers has no experts setting, and its router's ``self.classifier =
self.classifier.to(dtype)`` inside ``forward`` breaks torch.export (``Cannot swap t1 because
it has weakref``): export it with the TorchScript exporter (``dynamo=False``).
"""

from __future__ import annotations

from typing import Any

from moec.errors import MoecError, first_line

EXPORTERS = ("dynamo", "torchscript", "hf-onnx")
SETTING = "config._experts_implementation"
FIX = f"set {SETTING} = 'batched_mm' before exporting"

# (exporter, experts implementation) -> why it does not export
_FAILS = {
    ("dynamo", "eager"): "torch.export cannot trace the 'eager' experts' loop over the experts hit "
    "(GuardOnDataDependentSymNode)",
    ("dynamo", "grouped_mm"): "the ONNX exporter has no function for transformers.grouped_mm_fallback",
    ("torchscript", "grouped_mm"): "the TorchScript exporter cannot export aten::histc, which "
    "'grouped_mm' uses",
}
_FAILS |= {("hf-onnx", impl): why for (exporter, impl), why in list(_FAILS.items()) if exporter == "dynamo"}

# substrings of the exporters' own errors, by the cause they reveal
_SIGNATURES = {
    "GuardOnDataDependentSymNode": "eager",
    "grouped_mm_fallback": "grouped_mm",
    "aten::histc": "grouped_mm",
    "Cannot swap": "switch",
}


def _check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise MoecError(f"exporter '{exporter}' is not one of {', '.join(EXPORTERS)}")


def export_advice(exporter: str, experts_implementation: str | None) -> str | None:
    """Why ``exporter`` cannot export experts written with ``experts_implementation``, and the
    setting that can; None when the pair exports (``None`` implementation: the model has none).

    TorchScript with ``eager`` exports, but only the experts the trace input hit: that earns
    advice too, since the graph is wrong for other routings.
    """
    _check_exporter(exporter)
    if experts_implementation is None or experts_implementation == "batched_mm":
        return None
    why = _FAILS.get((exporter, experts_implementation))
    if why is None and (exporter, experts_implementation) == ("torchscript", "eager"):
        why = (
            "the TorchScript exporter unrolls the 'eager' experts' loop for the experts its trace "
            "input hit, so the graph is wrong for other routings"
        )
    return None if why is None else f"{exporter} export of {experts_implementation!r} experts: {why}; {FIX}"


def check_exportable(config: Any, exporter: str) -> None:
    """Raise a one-line :class:`MoecError` before a doomed (or trace-specialised) export of a
    model with this transformers ``config``."""
    advice = export_advice(exporter, getattr(config, "_experts_implementation", None))
    if advice is not None:
        raise MoecError(advice)


def explain_export_error(
    error: BaseException | str, exporter: str, experts_implementation: str | None
) -> str:
    """One line for an export that raised ``error``: what failed, and the setting that exports."""
    _check_exporter(exporter)
    message = first_line(error)
    cause = next((c for s, c in _SIGNATURES.items() if s in str(error)), None)
    if cause == "switch":
        return (
            f"{exporter} export failed ({message[:80]}): Switch Transformers' router reassigns its "
            "classifier inside forward, which torch.export cannot trace; export with the TorchScript "
            "exporter (torch.onnx.export(..., dynamo=False))"
        )
    advice = export_advice(exporter, cause or experts_implementation)
    if advice is None:
        return f"{exporter} export failed: {message}"
    return f"{advice} (the exporter said: {message[:80]})"
