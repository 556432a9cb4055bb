"""Decoders exported the way generation runs them, compiled and checked against PyTorch.

The fixtures (``fixtures/models/*-decoder-{mask,cache}*``, made by ``fixtures/make_fixtures.py``)
are 2-layer ``ForCausalLM`` models:

* ``FAMILY-decoder-mask-EXPORTER-EXPERTS``: ``input_ids`` + ``attention_mask`` (no cache), batch and
  sequence dynamic; cases ``traced`` [2, 7], ``padded`` [3, 13] with the first row left-padded,
  ``one`` [1, 1];
* ``FAMILY-decoder-cache-EXPORTER-EXPERTS``: one generation step with a KV cache (past keys and
  values in, present ones out; transformers' exporter takes ``position_ids`` and no mask),
  batch, sequence and cache length dynamic; cases (batch, cached, new) ``traced`` (2, 5, 3),
  ``prefill`` (1, 0, 6) on an empty cache, ``other`` (3, 4, 2), ``one`` (1, 9, 1): one token
  after a longer cache than traced; and PyTorch's greedy ``generate`` of 6 tokens after a
  5-token prompt;
* ``-fixed``: the same at the traced shape only (every family, from dynamo, TorchScript and, without a
  cache, transformers' exporter).

Exporters at their defaults: transformers' ``OnnxExporter`` with the families' default
``grouped_mm`` experts (plain, and with ``ort_fusions="cpu"``; ``"cuda"`` switches to
``batched_mm`` and fuses ``com.microsoft::MoE``), ``torch.onnx`` dynamo and TorchScript with
``batched_mm`` (neither takes ``grouped_mm``). Every MoE layer must be recognised (compiled
sparse), one build must serve every shape, and every output (logits and the whole present cache)
must match PyTorch and the numpy reference within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moec.compiler.compile import compile_model
from moec.errors import MoecError
from moec.runtime.generate import cache_interface, cache_key, greedy_generate
from moec.runtime.session import ArtifactSession
from tests.helpers import FIXTURES, check_exported_fixture, fixture_cases, fixture_generation, invoke

INDEX = {entry["name"]: entry for entry in json.loads((FIXTURES / "index.json").read_text())["fixtures"]}
GENERATION = sorted(
    name
    for name, entry in INDEX.items()
    if entry.get("kind", "").startswith(("decoder-mask", "decoder-cache")) and entry.get("export") == "ok"
)
CACHED = [name for name in GENERATION if INDEX[name]["kind"] == "decoder-cache"]
IN_CI = {
    "mixtral-decoder-cache-hf-onnx-grouped_mm",  # the exporters' defaults: grouped_mm, a cache
    "mixtral-decoder-mask-hf-onnx-ort-cpu-grouped_mm",  # CPU fusions: shapes shared across layers
    "qwen2_moe-decoder-cache-hf-onnx-ort-cuda-batched_mm",  # com.microsoft::MoE + shared expert gate
    "mixtral-decoder-cache-dynamo-batched_mm",  # the mask's GatherND index group FuseTIR cannot fuse
    "qwen3_moe-decoder-mask-torchscript-batched_mm",  # left padding
    "mixtral-decoder-cache-fixed-torchscript-batched_mm",  # fixed shapes
}
GENERATE_IN_CI = {"mixtral-decoder-cache-hf-onnx-grouped_mm", "mixtral-decoder-cache-dynamo-batched_mm"}
# transformers' exporter gives GPT-OSS's sliding-window layer a scalar state input
# (`_sliding_window_tensor`, the window) whose first value the graph does not say: generation
# refuses it (test_generation_refuses_a_state_input_it_cannot_start).
STATE_INPUT = "input.cache.layers.0._sliding_window_tensor"
GENERATABLE = [n for n in CACHED if "-fixed-" not in n and STATE_INPUT not in INDEX[n]["inputs"]]


def _params(names: list[str], in_ci: set[str]) -> list:
    return [pytest.param(name, marks=() if name in in_ci else pytest.mark.slow) for name in names]


def test_fixtures_cover_every_exporter_and_both_cache_modes() -> None:
    """The fixture set (and CI's subset of it) spans every exporter, with and without a cache."""
    for names in (GENERATION, sorted(IN_CI)):
        combos = {(INDEX[n]["exporter"], INDEX[n]["kind"].split("-")[1]) for n in names}
        exporters = {exporter for exporter, _ in combos}
        assert {"dynamo", "torchscript", "hf-onnx", "hf-onnx-ort-cpu", "hf-onnx-ort-cuda"} <= exporters
        assert {mode for _, mode in combos} == {"mask", "cache"}
    assert IN_CI <= set(GENERATION) and GENERATE_IN_CI <= set(CACHED)
    for name in GENERATION:
        assert INDEX[name]["onnx_bytes"] <= 2_000_000, name


@pytest.mark.parametrize("name", _params(GENERATION, IN_CI))
def test_generation_decoder_compiles_and_matches_pytorch(name: str, tmp_path: Path) -> None:
    kind = INDEX[name]["kind"]
    cases = {"traced", "prefill", "other", "one"} if kind == "decoder-cache" else {"traced", "padded", "one"}
    check_exported_fixture(name, tmp_path, cases if not kind.endswith("-fixed") else {"traced"})


@pytest.mark.parametrize("name", _params(GENERATABLE, GENERATE_IN_CI))
def test_greedy_generation_gives_pytorchs_tokens(name: str, tmp_path: Path) -> None:
    """Prompt once on an empty cache, then one call per token with the returned cache: the tokens
    are PyTorch's ``generate`` (greedy, with its KV cache)."""
    session = ArtifactSession(compile_model(FIXTURES / "models" / f"{name}.onnx", tmp_path / "artifact"))
    # the decoding step (one token after 9 cached) runs the one-token entry: its cache length is free
    one_token_step, _ = fixture_cases(name)["one"]
    assert session.entry_for(one_token_step) == "main_one_token"
    cache_lengths = {spec["shape"][2] for spec in session.inputs if cache_key(spec["name"]) is not None}
    assert cache_lengths and not cache_lengths & set(session.manifest["entries"]["one_token_dims"])
    prompt, torch_tokens = fixture_generation(name)
    new = torch_tokens.shape[1] - prompt.shape[1]
    generated = greedy_generate(session, prompt, new)
    np.testing.assert_array_equal(generated.tokens, torch_tokens)
    assert len(generated.seconds) == new


def test_generation_refuses_a_state_input_it_cannot_start() -> None:
    name = "gpt_oss-decoder-cache-hf-onnx-grouped_mm"
    inputs = [{"name": n, "shape": ["b", "s"], "dtype": "int64"} for n in INDEX[name]["inputs"]]
    outputs = [{"name": n, "shape": ["b", "s", 128], "dtype": "float32"} for n in INDEX[name]["outputs"]]
    with pytest.raises(MoecError, match=f"input '{STATE_INPUT}' is neither a token input"):
        cache_interface(inputs, outputs, name)


def test_cli_generate_prints_pytorchs_tokens(tmp_path: Path) -> None:
    name = "mixtral-decoder-cache-torchscript-batched_mm"
    out = tmp_path / "out"
    compiled = invoke("compile", str(FIXTURES / "models" / f"{name}.onnx"), "-o", str(out))
    assert compiled.exit_code == 0, compiled.output
    prompt, torch_tokens = fixture_generation(name)
    new = torch_tokens.shape[1] - prompt.shape[1]
    result = invoke("generate", str(out), "--prompt", ",".join(map(str, prompt[0])), "--new-tokens", str(new))
    assert result.exit_code == 0, result.output
    assert f"generated: {' '.join(map(str, torch_tokens[0, prompt.shape[1] :]))}" in result.output
    assert "per further token: median" in result.output
    bad = invoke("generate", str(out), "--prompt", "1,x")
    assert bad.exit_code == 1 and "--prompt" in bad.output
    # random inputs for a cache step: a cache, a mask over cache + new tokens, positions after it
    verified = invoke("verify", str(FIXTURES / "models" / f"{name}.onnx"), str(out), "-n", "1", "-n", "3")
    assert verified.exit_code == 0, verified.output
    assert verified.output.count("logits: max abs") == 2


def _spec(name: str, shape: list, dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


LOGITS = _spec("logits", ["b", "s", 128])


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ([_spec("input_ids", ["b", "s"], "int64")], [LOGITS], "no KV cache inputs"),
        (
            [_spec("input_ids", ["b", "s"], "int64"), _spec("past.0.key", ["b", 2, 5, 8])],
            [LOGITS, _spec("present.0.key", ["b", 2, "t", 8])],
            "one symbolic cache-length dimension",
        ),
        (
            [_spec("input_ids", ["b", "s"], "int64"), _spec("token_type_ids", ["b", "s"], "int64")],
            [LOGITS],
            "input 'token_type_ids'",
        ),
        (
            [_spec("input_ids", ["b", "s"], "int64"), _spec("past.0.key", ["b", 2, "p", 8])],
            [LOGITS],
            "no output returns the cache input 'past.0.key'",
        ),
    ],
)
def test_cache_interface_refuses_what_generation_cannot_feed(inputs, outputs, message) -> None:
    with pytest.raises(MoecError, match=message):
        cache_interface(inputs, outputs, "artifact")


def test_cache_interface_pairs_each_present_output_with_its_past_input() -> None:
    """Both exporters' names pair by layer and field; fixed dims written as digit strings are read."""
    inputs = [
        _spec("input_ids", ["b", "s"], "int64"),
        _spec("position_ids", ["b", "s"], "int64"),
        _spec("input.cache.layers.1.values", ["b", "2", "p", "8"]),
        _spec("input.cache.layers.0.keys", ["b", "2", "p", "8"]),
    ]
    outputs = [
        LOGITS,
        _spec("output.cache.layers.0.keys", ["b", 2, "p + s", 8]),
        _spec("output.cache.layers.1.values", ["b", 2, "p + s", 8]),
    ]
    interface = cache_interface(inputs, outputs, "artifact")
    assert interface.past == ("input.cache.layers.0.keys", "input.cache.layers.1.values")
    assert interface.present == ("output.cache.layers.0.keys", "output.cache.layers.1.values")
    assert interface.empty == ((1, 2, 0, 8), (1, 2, 0, 8))
    assert interface.attention_mask is None and interface.position_ids == "position_ids"
    assert interface.vocab == 128
