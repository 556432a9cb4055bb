"""Run an artifact with TVM's runtime alone: load the library, map the weights, call ``main``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm.runtime
from tvm.runtime.vm import VirtualMachine

from moec.artifact import check_files, read_manifest
from moec.errors import MoecError, first_line
from moec.runtime.generate import cache_length_inputs
from moec.weights_file import read_weights


class ArtifactSession:
    """A loaded artifact, ready to run on the CPU.

    ``params`` are views into the memory-mapped weights file (:func:`moec.weights_file.read_weights`):
    no weight is copied, and each view keeps the mapping alive for as long as the session holds it.
    The artifact's files are checked against the manifest before they are loaded (sizes, and
    SHA-256 unless ``check_hashes`` is off: :func:`moec.artifact.check_files`).

    A session may be shared between threads: TVM's Relax VM keeps each call's registers in the
    VM object, so two calls at once on one VM would overwrite each other's; calls therefore take
    turns (:attr:`_calls`), and the kernels of each call still use every core.
    """

    def __init__(self, artifact_dir: str | Path, check_hashes: bool = True) -> None:
        self.dir = Path(artifact_dir)
        self.manifest: dict[str, Any] = read_manifest(self.dir)
        check_files(self.dir, self.manifest, check_hashes)
        self._calls = threading.Lock()
        try:  # a damaged artifact is the user's to fix (recompile), not an internal error
            library = tvm.runtime.load_module(str(self.dir / self.manifest["library"]))
            self.device = tvm.cpu()
            self.vm = VirtualMachine(library, self.device)
        except Exception as err:
            raise MoecError(f"{self.dir}: damaged artifact ({first_line(err)}); recompile the model") from err
        stored = read_weights(self.dir / self.manifest["weights"])
        missing = [name for name in self.manifest["params"] if name not in stored]
        if missing:
            cause = f"weights lack {missing[0]!r}"
            raise MoecError(f"{self.dir}: damaged artifact ({cause}); recompile the model")
        self.params = [tvm.runtime.from_dlpack(stored[name]) for name in self.manifest["params"]]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["outputs"]

    def check_inputs(self, feeds: dict[str, np.ndarray], source: str) -> None:
        """Raise :class:`MoecError` if ``feeds`` lacks an input or has a wrong shape or dtype."""
        check_feeds(self.inputs, feeds, source)

    def check_token_bound(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise :class:`MoecError` if a symbolic (token) dimension exceeds ``--max-tokens``."""
        limit = self.manifest.get("max_tokens")
        if limit is None:
            return
        for spec in self.inputs:
            name = spec["name"]
            for axis, dim in enumerate(spec["shape"]):
                size = feeds[name].shape[axis] if name in feeds else 0
                if isinstance(dim, str) and size > limit:
                    raise MoecError(
                        f"{self.dir}: input '{name}' has {size} tokens but the artifact was compiled "
                        f"with --max-tokens {limit}; recompile with a larger bound"
                    )

    def input_tensors(self, feeds: dict[str, np.ndarray]) -> list[tvm.runtime.Tensor]:
        """``main``'s input arguments: ``feeds`` in the manifest's input order, on the device."""
        return [tvm.runtime.tensor(np.asarray(feeds[s["name"]], order="C"), self.device) for s in self.inputs]

    def entry_for(self, feeds: dict[str, np.ndarray]) -> str:
        """The library function a call on ``feeds`` runs: the one-token entry point (the
        manifest's ``entries``) when every symbolic input dimension it fixed (``one_token_dims``;
        older manifests: all of them) is 1, else ``main``."""
        entries = self.manifest.get("entries", {})
        one_token, fixed = entries.get("one_token"), entries.get("one_token_dims")
        symbolic = [
            feeds[spec["name"]].shape[axis]
            for spec in self.inputs
            for axis, dim in enumerate(spec["shape"])
            if isinstance(dim, str) and (fixed is None or dim in fixed)
        ]
        return one_token if one_token and all(size == 1 for size in symbolic) else "main"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for inputs by name."""
        self.check_token_bound(feeds)
        args = self.input_tensors(feeds)
        with self._calls:  # outputs copied out before the next call may reuse the VM
            result = self.vm[self.entry_for(feeds)](*args, *self.params)
            values = list(result) if len(self.outputs) > 1 else [result]
            return {s["name"]: v.numpy() for s, v in zip(self.outputs, values, strict=True)}

    def time(self, feeds: dict[str, np.ndarray], repeats: int = 50, warmup: int = 5) -> np.ndarray:
        """Wall-clock seconds of ``repeats`` calls (after ``warmup`` calls), inputs pre-loaded."""
        self.check_token_bound(feeds)
        args = self.input_tensors(feeds)
        main = self.vm[self.entry_for(feeds)]
        times = []
        with self._calls:
            for _ in range(warmup):
                main(*args, *self.params)
            for _ in range(repeats):
                start = time.perf_counter()
                main(*args, *self.params)
                times.append(time.perf_counter() - start)
        return np.array(times)


def check_feeds(inputs: list[dict[str, Any]], feeds: dict[str, np.ndarray], source: str) -> None:
    """Raise :class:`MoecError` if ``feeds`` lacks one of ``inputs`` or has a wrong shape or dtype."""
    for spec in inputs:
        name = spec["name"]
        if name not in feeds:
            raise MoecError(
                f"{source}: missing input '{name}' (expected keys: {', '.join(s['name'] for s in inputs)})"
            )
        value = feeds[name]
        if value.dtype != np.dtype(spec["dtype"]):
            raise MoecError(f"{source}: input '{name}' has dtype {value.dtype}, expected {spec['dtype']}")
        fixed = list(spec["shape"])
        if len(value.shape) != len(fixed) or any(
            isinstance(d, int) and d != s for d, s in zip(fixed, value.shape, strict=True)
        ):
            raise MoecError(f"{source}: input '{name}' has shape {list(value.shape)}, expected {fixed}")


def random_inputs(inputs: list[dict[str, Any]], tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds; symbolic dimensions become ``tokens`` (other symbols become 1). Integer inputs
    span their manifest ``range`` (token ids: the whole vocabulary), else 0 and 1. A KV-cache
    decoder's step gets ``tokens`` new tokens after a cache of ``tokens`` positions, its mask and
    positions consistent with them."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        symbolic = [d for d in spec["shape"] if not isinstance(d, int)]
        shape = []
        for d in spec["shape"]:
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(tokens if d == symbolic[-1] else 1)
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        else:  # token ids over the whole vocabulary; other integers (masks) 0 or 1
            low, high = spec.get("range", (0, 2))
            feeds[spec["name"]] = rng.integers(low, high, size=shape).astype(dtype)
    names = [spec["name"] for spec in inputs]
    if cache_length_inputs(names) and "input_ids" in feeds:
        # A step of a KV-cache decoder: ``tokens`` new tokens after ``tokens`` cached ones, the mask
        # over both (all attended) and the new tokens' positions after the cache.
        batch, new = feeds["input_ids"].shape
        if "attention_mask" in feeds:
            feeds["attention_mask"] = np.ones((batch, tokens + new), feeds["attention_mask"].dtype)
        if "position_ids" in feeds:
            positions = np.arange(tokens, tokens + new, dtype=feeds["position_ids"].dtype)
            feeds["position_ids"] = np.broadcast_to(positions, (batch, new)).copy()
    return feeds
