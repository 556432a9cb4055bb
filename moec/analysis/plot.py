"""Pictures of a router profile that a person reads at a glance (PNG, via matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import MoecError


def write_plots(profile: dict[str, Any], directory: Path) -> list[Path]:
    """``activation.png`` (frequency per expert, one panel per layer) and ``coactivation.png``
    (how often each pair of experts is selected for the same token) in ``directory``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MoecError("--plot needs matplotlib; reinstall moec's dependencies (scripts/setup.sh)") from err
    layers = profile["layers"]
    if not layers:
        raise MoecError("--plot: the model has no MoE layers to plot")
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 2.2 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        frequency = np.array(layer["activation_frequency"])
        ax.bar(np.arange(len(frequency)), frequency, color="tab:blue")
        ax.axhline(layer["top_k"] / layer["experts"], color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{layer['name']}: share of tokens routed to each expert (dashed: uniform)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylim(0, 1)
    fig.tight_layout()
    written.append(directory / "activation.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        experts = layer["experts"]
        matrix = np.zeros((experts, experts))
        for edge in layer["coactivation"]["edges"]:
            matrix[edge["source"], edge["target"]] = matrix[edge["target"], edge["source"]] = edge["count"]
        image = ax.imshow(matrix, cmap="viridis")
        ax.set_title(f"{layer['name']}: tokens routed to both", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    written.append(directory / "coactivation.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
