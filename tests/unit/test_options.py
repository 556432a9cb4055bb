"""CompileOptions: every bad value is refused when the options are made, naming the field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from moec.kernels import formats
from moec.options import INT8_GROUPS, PRECISIONS, ROUTINGS, CompileOptions, OptionError, resolve_stored_int8
from moec.passes.fixed_routing import PATTERNS


def test_defaults_compile_for_host_unchanged() -> None:
    options = CompileOptions()
    assert (options.target, options.precision, options.routing) == ("host", "auto", "learned")
    assert options.default_precision == "fp32" and not options.stores_experts
    assert options.precision_plan is None and options.int8_group == 0
    assert options.kept_experts is None and options.max_tokens is None and not options.skips_experts


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("target", "", "name a bundled target"),
        ("precision", "fp8", "must be one of auto, fp32, fp16, int8, int8-dot"),
        ("precision_plan", {"moe0": ["int8", "int4"]}, "has precision 'int4'"),
        ("precision_plan", {"moe0": []}, "needs a precision"),
        ("int8_group", 16, "must be one of 0, 32, 64, 128"),
        ("routing", "random", "must be one of learned, cycle, tile"),
        ("max_tokens", 0, "at least 1"),
        ("max_tokens", 2.5, "whole number"),
        ("max_tokens", True, "whole number"),
        ("skip_top1_above", 0.0, "must be in (0, 1]"),
        ("skip_top1_above", 1.5, "must be in (0, 1]"),
        ("skip_below_fraction", -0.1, "must be in (0, 1]"),
        ("kept_experts", {"moe0": []}, "at least one"),
        ("kept_experts", {"moe0": [1, 1]}, "distinct"),
        ("kept_experts", {"moe0": [-1]}, "non-negative"),
        ("kept_channels", {"moe0": [[0, 1], [2]]}, "the same number"),
        ("kept_channels", {"moe0": []}, "the same number"),
    ],
)
def test_bad_value_names_the_field(field: str, value: object, words: str) -> None:
    with pytest.raises(OptionError) as caught:
        CompileOptions(**{field: value})
    assert caught.value.option == field
    message = str(caught.value)
    assert message.startswith(field) and words in message and "\n" not in message, message


def test_error_restated_with_another_spelling() -> None:
    with pytest.raises(OptionError) as caught:
        CompileOptions(skip_top1_above=1.5)
    assert str(caught.value).startswith("skip_top1_above 1.5: ")
    assert caught.value.naming("--skip-top1-above").startswith("--skip-top1-above 1.5: ")


def test_frozen_with_own_copies() -> None:
    kept = {"moe0": [3, 1]}
    options = CompileOptions(kept_experts=kept, dump_ir="ir")
    kept["moe0"].append(2)
    assert options.kept_experts == {"moe0": [3, 1]} and options.dump_ir == Path("ir")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.target = "orin"  # type: ignore[misc]
    with pytest.raises(OptionError):
        dataclasses.replace(options, routing="nope")  # a changed copy is validated again


def test_numpy_values_become_plain_python() -> None:
    """The manifest stores options as JSON: numpy numbers are accepted and converted."""
    options = CompileOptions(
        max_tokens=np.int64(8), skip_top1_above=np.float32(0.5), kept_experts={"moe0": np.arange(2)}
    )
    fields = dataclasses.asdict(options)
    assert json.loads(json.dumps(fields)) == fields
    assert type(options.max_tokens) is int and type(options.skip_top1_above) is float


def test_early_exit_is_on_with_either_threshold() -> None:
    assert CompileOptions(skip_top1_above=0.9).skips_experts
    assert CompileOptions(skip_below_fraction=0.2).skips_experts


def test_choices_are_what_the_passes_accept() -> None:
    """The options' choices are spelled out here so the CLI can read them without loading TVM;
    they must stay the passes' own."""
    assert ROUTINGS == ("learned", *PATTERNS)
    assert PRECISIONS == formats.FORMATS
    assert INT8_GROUPS == formats.INT8_GROUPS


def test_layer_precisions_follow_the_plan_then_the_default() -> None:
    options = CompileOptions(precision="fp16", precision_plan={"moe0": ["int8", "fp32"], "moe1": "int8"})
    assert options.layer_precisions("moe0", 2) == ("int8", "fp32")
    assert options.layer_precisions("moe1", 3) == ("int8",) * 3
    assert options.layer_precisions("moe2", 2) == ("fp16", "fp16")


def test_auto_keeps_the_models_own_int8_layers_int8() -> None:
    """``auto``: the layers the model stores as INT8 (name → block) become int8 with the model's
    blocks, the others fp32; a plan naming such a layer wins; an explicit precision applies to all
    layers (int8 ones keep the model's integers); a pruned layer is requantized."""
    quantized = {"moe0": 32, "moe1": 0}
    auto = resolve_stored_int8(CompileOptions(int8_group=64), quantized)
    assert auto.precision == "fp32" and auto.stores_experts
    assert auto.layer_precisions("moe0", 2) == ("int8", "int8") and auto.layer_precisions("moe2", 1) == (
        "fp32",
    )
    assert auto.int8_exact == {"moe0": 32, "moe1": 0}
    assert (auto.layer_int8_group("moe0"), auto.layer_int8_group("moe1"), auto.layer_int8_group("moe2")) == (
        32,
        0,
        64,
    )
    assert resolve_stored_int8(auto, quantized) == auto  # idempotent
    planned = resolve_stored_int8(CompileOptions(precision_plan={"moe0": ["fp16", "int8-dot"]}), quantized)
    assert planned.layer_precisions("moe0", 2) == ("fp16", "int8-dot") and planned.int8_exact == {
        "moe0": 32,
        "moe1": 0,
    }
    fp32 = resolve_stored_int8(CompileOptions(precision="fp32"), quantized)
    assert (
        fp32.layer_precisions("moe0", 1) == ("fp32",) and fp32.int8_exact is None and not fp32.stores_experts
    )
    pruned = resolve_stored_int8(CompileOptions(), quantized, pruned=["moe1"])
    assert pruned.int8_exact == {"moe0": 32} and pruned.layer_precisions("moe1", 1) == ("int8",)
