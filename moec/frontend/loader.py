"""Loading an ONNX file with errors that name the file and what to do about it."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from moec.errors import MoecError, first_line, warn
from moec.frontend.nonfinite import nonfinite_warnings
from moec.frontend.validate import check_model_data


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read and validate an ONNX model; raise :class:`MoecError` for anything a user can fix, and
    warn (once per weight, on stderr) of weights holding NaN or Inf."""
    path = Path(path)
    if not path.exists():
        raise MoecError(f"{path}: no such file; pass the path of an .onnx model")
    if path.is_dir():
        raise MoecError(f"{path}: is a directory; pass the path of an .onnx model")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except onnx.checker.ValidationError as err:  # external data outside the model's folder
        raise MoecError(
            f"{path}: unsafe external data ({first_line(err)}); keep the model's data files in its folder"
        ) from err
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise MoecError(
            f"{path}: not a readable ONNX model ({first_line(err)}); is the file complete?"
        ) from err
    if not model.graph.node and not model.graph.output:
        raise MoecError(f"{path}: not an ONNX model (no graph found); is this the right file?")
    _import_missing_domains(model)
    _number_dims_as_numbers(model)
    try:
        onnx.checker.check_model(_checkable(model))
    except onnx.checker.ValidationError as err:
        detail = " ".join(str(err).split())  # the checker names the node on a later line
        raise MoecError(f"{path}: invalid ONNX model: {detail}; re-export it or fix the graph") from err
    except UnicodeDecodeError as err:  # a name or string field that is not text: a damaged file
        raise MoecError(
            f"{path}: invalid ONNX model: a name or string in it is not UTF-8 text ({err.reason} at "
            f"byte {err.start}); is the file complete and undamaged?"
        ) from err
    latest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= latest:
            raise MoecError(
                f"{path}: invalid ONNX model: default-domain opset {opset.version} is outside "
                f"1..{latest} (what this onnx knows); re-export it with a supported opset"
            )
    check_model_data(model, str(path))
    for message in nonfinite_warnings(model, str(path)):
        warn(message)
    return model


IMPLIED_DOMAINS = {"com.microsoft": 1}
"""Operator domains some exporters use without importing them, and the version they mean.

transformers' ONNX exporter with onnxruntime fusions writes ``com.microsoft::MoE`` (and
attention fusions) but no ``com.microsoft`` opset import, which onnx's checker rejects although
onnxruntime's contrib ops have only ever had version 1.
"""


def _number_dims_as_numbers(model: onnx.ModelProto) -> None:
    """Dimensions named by a number (transformers' exporter writes a KV cache's heads and head
    size as ``dim_param: "8"``) are that number: fixed, as the exporter meant, not a symbol."""
    graph = model.graph
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param.isdigit():
                    dim.dim_value = int(dim.dim_param)


def _import_missing_domains(model: onnx.ModelProto) -> None:
    """Add the opset import of an implied domain that the graph's nodes use but do not import."""
    imported = {opset.domain for opset in model.opset_import}
    used = {node.domain for node in model.graph.node}
    for domain in sorted((used & IMPLIED_DOMAINS.keys()) - imported):
        model.opset_import.append(onnx.helper.make_opsetid(domain, IMPLIED_DOMAINS[domain]))


ORT_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}
"""onnxruntime contrib ops registered in the default ONNX domain, which onnx's checker does not
know ("No Op registered for SimplifiedLayerNormalization"); transformers' exporter with
onnxruntime fusions writes them. moec runs them (``moec.frontend.contrib_ops``)."""


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy for onnx's checker with the default-domain onnxruntime ops moved to
    ``com.microsoft`` (whose ops the checker leaves alone); the model itself stays as written."""
    if not any(n.op_type in ORT_DEFAULT_DOMAIN_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type in ORT_DEFAULT_DOMAIN_OPS and node.domain in ("", "ai.onnx"):
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return copy
