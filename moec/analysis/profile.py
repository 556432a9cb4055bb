"""Calibration profile of a model's routers: what each MoE layer's router does on real inputs.

Per layer: how often each expert is selected (activation frequency) and how much routing weight
it receives (weight mass), which experts are selected together for the same token (the
co-activation graph, a :mod:`networkx` graph with pair counts as edge weights), how sure the
router is (the distribution of each token's top-1 weight), and how much each expert's
intermediate channels contribute to its output (for structured pruning). Later passes read it to mask, prune
and lay out experts; the model's sha256 ties a profile to the model it was made for.

The routing comes from the numpy reference (the canonical layers of the model run by the ONNX
reference evaluator), so a profile needs no compiled artifact and no TVM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx

from moec.canonical.layer import MoELayer
from moec.canonical.semantics import expert_hidden
from moec.errors import MoecError
from moec.reference.stored import canonical_evaluator

FORMAT = "moec-profile/2"
CONFIDENCE_BINS = 10


class _LayerStats:
    """Running counts for one layer."""

    def __init__(self, layer: MoELayer) -> None:
        self.layer = layer
        self.tokens = 0
        self.counts = np.zeros(layer.num_experts, np.int64)
        self.mass = np.zeros(layer.num_experts, np.float64)
        self.pairs = np.zeros((layer.num_experts, layer.num_experts), np.int64)
        self.top1 = np.zeros(CONFIDENCE_BINS, np.int64)
        self.top1_sum = 0.0
        self.channels = np.zeros((layer.num_experts, layer.ffn), np.float64)

    def add(self, layer: MoELayer, x: np.ndarray, index: np.ndarray, weight: np.ndarray) -> None:
        """Count one run's routing, and each expert's intermediate channels' contribution to its
        output on the tokens it got: routing weight x |activation| x norm of the down column."""
        for expert in np.unique(index):
            rows, slots = np.nonzero(index == expert)
            hidden = expert_hidden(layer, int(expert), x[rows].astype(np.float64))
            column_norms = np.linalg.norm(layer.w_down[expert].astype(np.float64), axis=0)
            self.channels[expert] += (weight[rows, slots, None] * np.abs(hidden)).sum(axis=0) * column_norms
        experts = self.layer.num_experts
        self.tokens += index.shape[0]
        np.add.at(self.counts, index.reshape(-1), 1)
        np.add.at(self.mass, index.reshape(-1), weight.reshape(-1))
        onehot = np.zeros((index.shape[0], experts), np.int64)
        np.put_along_axis(onehot, index, 1, axis=1)
        together = onehot.T @ onehot
        np.fill_diagonal(together, 0)
        self.pairs += together
        top = weight.max(axis=1)
        self.top1 += np.histogram(top, bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0]
        self.top1_sum += float(top.sum())

    def coactivation_graph(self) -> nx.Graph:
        graph = nx.Graph()
        graph.add_nodes_from(range(self.layer.num_experts))
        for a, b in zip(*np.nonzero(np.triu(self.pairs, 1)), strict=True):
            graph.add_edge(int(a), int(b), count=int(self.pairs[a, b]))
        return graph

    def to_json(self) -> dict[str, Any]:
        tokens = max(self.tokens, 1)
        return {
            "name": self.layer.name,
            "experts": self.layer.num_experts,
            "top_k": self.layer.top_k,
            "tokens": self.tokens,
            "activation_count": self.counts.tolist(),
            "activation_frequency": (self.counts / tokens).round(6).tolist(),
            "weight_mass": (self.mass / tokens).round(6).tolist(),
            "coactivation": nx.node_link_data(self.coactivation_graph(), edges="edges"),
            "confidence": {
                "top1_mean": round(self.top1_sum / tokens, 6),
                "top1_histogram": {
                    "bins": CONFIDENCE_BINS,
                    "range": [0.0, 1.0],
                    "counts": self.top1.tolist(),
                },
            },
            # Per expert, per intermediate channel: mean contribution to the layer output per token
            # (structured pruning drops the smallest).
            "channel_contribution": (self.channels / tokens).round(8).tolist(),
        }


def model_fingerprint(path: Path) -> str:
    """sha256 of the model file: what a profile (and an artifact's manifest) names its model by."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def calibration_samples(
    data: dict[str, np.ndarray], inputs: list[dict[str, Any]], source: str = "calibration data"
) -> list[dict[str, np.ndarray]]:
    """The feeds of a calibration file (``source``, for messages): each input's array as one sample,
    or, with one more leading axis than the input has, one sample per entry of that axis.

    Data a profile cannot be made from is refused with a one-line :class:`MoecError`: no
    samples, an input with no values (no tokens), or NaN/Inf in a floating-point input (the
    routers' statistics would be NaN, and masking chosen from them arbitrary).
    """
    ranks = {spec["name"]: len(spec["shape"]) for spec in inputs}
    stacked = {name: data[name].ndim == ranks[name] + 1 for name in ranks if name in data}
    if any(stacked.values()):
        counts = {data[name].shape[0] for name, is_stacked in stacked.items() if is_stacked}
        if not all(stacked.values()) or len(counts) != 1:
            raise MoecError(f"{source}: stack every input along the same leading sample axis, or none")
        samples = [{name: data[name][i] for name in ranks} for i in range(counts.pop())]
    else:
        samples = [{name: data[name] for name in ranks if name in data}]
    if not samples:
        raise MoecError(f"{source}: holds no samples (a leading sample axis of 0)")
    for number, sample in enumerate(samples):
        of_sample = f" of sample {number}" if len(samples) > 1 else ""
        for name, value in sample.items():
            if value.size == 0:
                raise MoecError(
                    f"{source}: input '{name}'{of_sample} has no tokens (shape {list(value.shape)})"
                )
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                bad = int(np.count_nonzero(~np.isfinite(value)))
                raise MoecError(
                    f"{source}: input '{name}'{of_sample} holds {bad} NaN or Inf value(s); calibration data "
                    "must be finite"
                )
    return samples


def profile_model(
    model: onnx.ModelProto,
    model_path: Path,
    samples: list[dict[str, np.ndarray]],
    progress: Callable[[int, int], None] = lambda _done, _total: None,
    synthetic: bool = False,
) -> dict[str, Any]:
    """The profile (JSON-ready) of ``model``'s routers over ``samples``."""
    stats: list[_LayerStats] = []

    def on_route(layer: int, spec: MoELayer, x: np.ndarray, index: np.ndarray, weight: np.ndarray) -> None:
        stats[layer].add(spec, x, index, weight)

    evaluator, layers = canonical_evaluator(model, on_route=on_route)
    stats.extend(_LayerStats(layer) for layer in layers)
    for done, feeds in enumerate(samples, start=1):
        evaluator.run(None, feeds)
        progress(done, len(samples))
    return {
        "format": FORMAT,
        "model": {"path": str(model_path), "sha256": model_fingerprint(model_path)},
        "samples": len(samples),
        "synthetic": synthetic,
        "layers": [s.to_json() for s in stats],
    }
