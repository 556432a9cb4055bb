"""What to keep, chosen from a router profile: experts per layer (static expert masking) and
intermediate channels per expert (structured pruning)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moec.analysis.profile import FORMAT, model_fingerprint
from moec.errors import MoecError
from moec.options import OptionError


def load_profile(path: Path, model_path: Path) -> dict[str, Any]:
    """A profile file, checked to be one and to have been made for the model at ``model_path``."""
    try:
        profile = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise MoecError(
            f"{path}: no such profile; make one with 'moec profile MODEL --calib DATA -o FILE'"
        ) from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoecError(f"{path}: not a moec profile (not readable JSON: {err})") from err
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise MoecError(
            f"{path}: not a moec profile of this version (expected format {FORMAT}); "
            "make it again with 'moec profile'"
        )
    if profile["model"]["sha256"] != model_fingerprint(model_path):
        raise MoecError(
            f"{path}: profile of a different model ({profile['model']['path']}); "
            f"profile {model_path} with 'moec profile'"
        )
    return profile


def choose_kept(
    profile: dict[str, Any], keep_experts: int | None = None, mask_threshold: float | None = None
) -> dict[str, list[int]]:
    """Kept expert ids per layer: the ``keep_experts`` most used, or those routed at least
    ``mask_threshold`` of the tokens (activation frequency); ties go to the lower id.

    A value that does not fit raises :class:`OptionError` naming the parameter."""
    if (keep_experts is None) == (mask_threshold is None):
        raise ValueError("choose_kept: pass exactly one of keep_experts and mask_threshold")
    if mask_threshold is not None and not 0.0 <= mask_threshold <= 1.0:
        raise OptionError(
            "mask_threshold", f"{{option}} {mask_threshold}: must be between 0 and 1 (a share of tokens)"
        )
    kept = {}
    for layer in profile["layers"]:
        frequency = np.array(layer["activation_frequency"])
        order = np.argsort(-frequency, kind="stable")
        if keep_experts is not None:
            if not layer["top_k"] <= keep_experts <= layer["experts"]:
                raise OptionError(
                    "keep_experts",
                    f"{{option}} {keep_experts}: layer {layer['name']} routes each token to "
                    f"{layer['top_k']} of {layer['experts']} experts; keep between {layer['top_k']} "
                    f"and {layer['experts']}",
                )
            chosen = order[:keep_experts]
        else:
            chosen = np.flatnonzero(frequency >= mask_threshold)
            if len(chosen) < layer["top_k"]:
                raise OptionError(
                    "mask_threshold",
                    f"{{option}} {mask_threshold}: would leave layer {layer['name']} "
                    f"{len(chosen)} expert(s), fewer than its top-k {layer['top_k']}; lower the threshold",
                )
        kept[layer["name"]] = sorted(int(e) for e in chosen)
    return kept


def choose_channels(
    profile: dict[str, Any], prune_ratio: float, kept_experts: dict[str, list[int]] | None = None
) -> dict[str, list[list[int]]]:
    """Per layer and kept expert, the intermediate channels to keep: all but the ``prune_ratio``
    share with the least contribution on the calibration data (the same count for every expert).

    A ratio that does not fit raises :class:`OptionError` naming ``prune_ratio``."""
    if not 0.0 <= prune_ratio < 1.0:
        raise OptionError(
            "prune_ratio",
            f"{{option}} {prune_ratio}: must be at least 0 and below 1 (the share of channels dropped)",
        )
    kept = {}
    for layer in profile["layers"]:
        contribution = np.array(layer["channel_contribution"])
        ffn = contribution.shape[1]
        width = ffn - int(round(ffn * prune_ratio))
        if width < 1:
            raise OptionError(
                "prune_ratio", f"{{option}} {prune_ratio}: would leave layer {layer['name']} no channel"
            )
        experts = (kept_experts or {}).get(layer["name"], range(layer["experts"]))
        kept[layer["name"]] = [
            sorted(int(c) for c in np.argsort(-contribution[e], kind="stable")[:width]) for e in experts
        ]
    return kept
