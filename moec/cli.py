"""The ``moec`` command line: compile, run, verify, package, inspect, targets."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np

from moec.errors import MoecError, each_warning_once, first_line, warn
from moec.options import (
    AUTO,
    DENSE_PRECISIONS,
    INT8_GROUPS,
    PRECISIONS,
    ROUTINGS,
    CompileOptions,
    OptionError,
)

OPTION_FLAGS = {
    "target": "--target",
    "force": "--force",
    "dump_ir": "--dump-ir",
    "precision": "--precision",
    "precision_plan": "--precision-plan",
    "int8_group": "--int8-group",
    "int8_exact": "--precision",  # derived: the layers --precision auto keeps in the model's own INT8
    "precision_budget": "--accuracy-budget",
    "router_precision": "--router-precision",
    "dense_precision": "--dense-precision",
    "max_tokens": "--max-tokens",
    "kept_experts": "--keep-experts/--mask-threshold",
    "kept_channels": "--prune-ratio",
    "skip_top1_above": "--skip-top1-above",
    "skip_below_fraction": "--skip-below-fraction",
    "routing": "--routing",
    "keep_experts": "--keep-experts",
    "mask_threshold": "--mask-threshold",
    "prune_ratio": "--prune-ratio",
}
"""The flag of each compile option (:class:`moec.options.CompileOptions` fields and the
parameters of :mod:`moec.analysis.masking`): an :class:`OptionError` names the option by field,
and ``compile`` restates it with the flag the user typed."""


MAX_TOKENS = 1 << 20
"""The largest token count an option takes (``--max-tokens``, ``--tokens``): a million tokens'
activations at hidden size 4096 are 16 GiB per tensor, beyond any board moec targets."""
MAX_CALLS = 1_000_000
"""The most timed or warm-up calls ``moec run`` makes."""
MAX_THREADS = 4 * (os.cpu_count() or 1)
"""The most threads ``--threads`` asks for: a few per core of this machine."""


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"moec: error: {message}", err=True)
    sys.exit(code)


def user_errors(func):
    """Turn :class:`MoecError` into a one-line message and exit 1; other errors exit 3."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MoecError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:  # the reader went away (`moec targets | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except Exception as err:  # never a traceback for users; MOEC_DEBUG=1 shows it
            if os.environ.get("MOEC_DEBUG"):
                raise
            _fail(
                f"internal error: {type(err).__name__}: {first_line(err)} "
                "(rerun with MOEC_DEBUG=1 for the traceback and report it)",
                3,
            )

    return wrapper


_STARTED = time.perf_counter()


def _progress(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since moec started."""
    click.echo(f"[{time.perf_counter() - _STARTED:6.1f}s] {message}", err=True)


def _note(label: str, message: str) -> None:
    """A line of ``verify``'s report that is neither a result nor an error."""
    click.echo(f"{label:>14}  note: {message}")


def _load_inputs(path: Path, session) -> dict[str, np.ndarray]:
    feeds = _read_npz(path)
    session.check_inputs(feeds, str(path))
    return feeds


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file by name, or a one-line error naming the file."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise MoecError(f"{path}: not an .npz archive; save inputs with numpy.savez(path, name=array)")
        with data:
            feeds = {k: data[k] for k in data.files}
    except FileNotFoundError as err:
        raise MoecError(f"{path}: no such inputs file") from err
    except (ValueError, OSError) as err:
        raise MoecError(f"{path}: not a readable .npz file ({err})") from err
    return feeds


def _check_interface(onnx_model, session, model: Path, artifact: Path) -> None:
    """Raise :class:`MoecError` unless MODEL has the inputs and outputs ARTIFACT was compiled with."""
    from moec.artifact import graph_inputs, value_info

    found = {v["name"]: v for v in map(value_info, graph_inputs(onnx_model))}
    for spec in session.inputs:
        got = found.get(spec["name"])
        if (
            got is None
            or got["dtype"] != spec["dtype"]
            or len(got["shape"]) != len(spec["shape"])
            or any(
                a != b
                for a, b in zip(got["shape"], spec["shape"], strict=True)
                if isinstance(a, int) and isinstance(b, int)
            )
        ):
            have = f"{got['shape']} {got['dtype']}" if got else "missing"
            raise MoecError(
                f"{model}: input '{spec['name']}' is {have} but {artifact} takes "
                f"{spec['shape']} {spec['dtype']}; is this the model it was compiled from?"
            )
    names = {o.name for o in onnx_model.graph.output}
    for spec in session.outputs:
        if spec["name"] not in names:
            raise MoecError(
                f"{model}: has no output '{spec['name']}' that {artifact} computes; "
                "is this the model it was compiled from?"
            )


def _has_symbolic(inputs: list[dict]) -> bool:
    """Whether any input has a symbolic dimension (a token count to choose)."""
    return any(isinstance(d, str) for spec in inputs for d in spec["shape"])


def _random_token_count(
    inputs: list[dict], tokens: int | None, artifact: Path, flag: str = "--tokens"
) -> int:
    """The token count for random inputs: ``tokens`` (default 1), refused with a one-line error on
    an artifact whose inputs have no symbolic dimension, where it would change nothing."""
    if tokens is not None and not _has_symbolic(inputs):
        shapes = ", ".join(f"{spec['name']} {spec['shape']}" for spec in inputs)
        raise MoecError(
            f"{flag} {tokens}: {artifact}'s inputs have fixed shapes ({shapes}), so there is no token "
            f"count to set; drop {flag}"
        )
    return 1 if tokens is None else tokens


def _fixed_token_count(inputs: list[dict]) -> int | None:
    """Tokens in one sample of a model whose inputs have fixed shapes (the first input's rows:
    every dimension but a float input's last, which is its width); None if any is symbolic."""
    if _has_symbolic(inputs):
        return None
    shape = inputs[0]["shape"]
    rows = shape[:-1] if np.dtype(inputs[0]["dtype"]).kind == "f" else shape
    return max(1, int(np.prod(rows, dtype=np.int64)))


def _shape_label(inputs: list[dict], feeds: dict[str, np.ndarray]) -> str:
    """What a case ran, by the sizes its symbolic dimensions took (``tokens=7``; ``batch=1 seq=7``),
    or ``fixed shapes`` for an artifact whose inputs have none."""
    sizes: dict[str, int] = {}
    for spec in inputs:
        for axis, dim in enumerate(spec["shape"]):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(feeds[spec["name"]].shape[axis]))
    return " ".join(f"{name}={size}" for name, size in sizes.items()) or "fixed shapes"


def _latency_line(times: np.ndarray) -> str:
    ms = times * 1e3
    return (
        f"latency over {len(ms)} runs: mean {ms.mean():.3f} ms, p50 {np.percentile(ms, 50):.3f} ms, "
        f"p99 {np.percentile(ms, 99):.3f} ms"
    )


def _peak_rss_line() -> str:
    """This process's peak resident memory, as ``moec-runner`` prints its own: ``/proc/self/status``'s
    VmHWM (``ru_maxrss`` where there is none: Linux carries that over exec from the parent)."""
    import resource

    status = Path("/proc/self/status")
    fields = [line.split() for line in status.read_text().splitlines()] if status.exists() else []
    kib = next((int(f[1]) for f in fields if f[:1] == ["VmHWM:"]), 0)
    kib = kib or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak RSS {round(kib / 1024)} MiB"


def artifact_options(command):
    """The options of every command that opens an artifact: how its files are checked, and the
    target file of a board moec does not bundle."""
    command = click.option(
        "--skip-hash-check",
        is_flag=True,
        help="Check only the sizes of the artifact's files, not their SHA-256 against the manifest "
        "(hashing reads every byte once, about 0.6 s per GB here; for very large artifacts).",
    )(command)
    return click.option(
        "--target",
        "target_file",
        help="The target file the artifact was compiled with, for a board moec does not bundle: its "
        "compiler and emulator are read from it (never from the artifact's manifest).",
    )(command)


class MoecGroup(click.Group):
    """moec's command group: a mistyped option or value (click's usage errors) is one line too,
    ``moec: error: ...`` naming the option and the ``--help`` to read, with exit code 2; and a
    command prints each distinct warning once (:func:`moec.errors.each_warning_once`)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        with each_warning_once():
            return self._main(*args, standalone_mode=standalone_mode, **kwargs)

    def _main(self, *args: Any, standalone_mode: bool, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # bare 'moec': the help, as asked
            click.echo(err.ctx.get_help() if err.ctx is not None else err.format_message(), err=True)
            sys.exit(err.exit_code)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else "moec"
            click.echo(f"moec: error: {err.format_message()} (see '{where} --help')", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"moec: error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("moec: error: interrupted", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=MoecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moec")
def main() -> None:
    """moec compiles sparse Mixture-of-Experts ONNX models into deployable TVM libraries.

    \b
    Typical use:
      moec inspect model.onnx             what MoE layers moec found
      moec compile model.onnx -o out/     build the artifact (library, weights, manifest)
      moec run out/                       run it and print latency
      moec verify model.onnx out/         compare it with the numpy reference
      moec package out/                   one .tar.gz to copy to the board and run there
      moec profile model.onnx --calib data.npz -o p.json   router statistics for masking/pruning
    """
    from moec.compiler.tvm_log import TVM_MODULES, debugging

    if not debugging():  # TVM's Python warnings are about TVM, not the model (moec.compiler.tvm_log)
        warnings.filterwarnings("ignore", module=TVM_MODULES)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--target",
    "-t",
    default="host",
    show_default=True,
    help="Bundled target name (see 'moec targets') or path of a target .toml file.",
)
@click.option(
    "--output",
    "-o",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Artifact directory to create.",
)
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option(
    "--dump-ir",
    type=click.Path(path_type=Path),
    help="Write the IR as TVMScript after each pipeline phase into this directory.",
)
@click.option(
    "--precision",
    type=click.Choice((AUTO, *PRECISIONS)),
    default=AUTO,
    show_default=True,
    help="How every expert's weight matrices are stored. auto: fp32, except layers the model "
    "already stores as INT8 (onnxruntime QMoE, 8- or 4-bit), whose experts stay int8 with the "
    "model's own integers and scales (4-bit ones unpacked to a byte each). fp16 halves their "
    "memory and the bytes read per token, int8 (symmetric, float32 scales per output channel "
    "or --int8-group) quarters them; the arithmetic stays fp32, so every target runs them (a "
    "Cortex-A72 too). int8-dot stores the same INT8 weights and multiplies them with each "
    "token's activations quantized to INT8 (INT8 dot products: AVX-512 VNNI / AVX-VNNI, "
    "Cortex-A76 sdot, CUDA dp4a), on targets whose "
    "'moec targets' line says they compute int8.",
)
@click.option(
    "--precision-plan",
    "precision_plan_path",
    type=click.Path(path_type=Path),
    help='TOML file naming each layer\'s experts\' precisions ([layers] moe0 = ["int8", "fp32", ...] '
    'or moe0 = "fp16"); layers it does not name get --precision.',
)
@click.option(
    "--int8-group",
    type=click.Choice([str(g) for g in INT8_GROUPS]),
    default=None,
    help="INT8 scale group along each expert row: 0 = one scale per output channel (default), or "
    "32/64/128 inputs per scale (more accurate, more scale bytes).",
)
@click.option(
    "--router-precision",
    type=click.Choice(DENSE_PRECISIONS),
    default="fp32",
    show_default=True,
    help="How the MoE routers' weights are stored (CPU targets): int8 quarters the router's bytes, "
    "read for every token; 'moec verify --against original' reports its effect on routing agreement.",
)
@click.option(
    "--dense-precision",
    type=click.Choice(DENSE_PRECISIONS),
    default="fp32",
    show_default=True,
    help="How the other dense weights (attention, shared experts, LM head) are stored (CPU targets).",
)
@click.option(
    "--accuracy-budget",
    type=float,
    help="Choose each expert's precision (fp32, fp16, int8) to read the fewest bytes per token while "
    "the relative RMS error of the model's outputs on --calib data (vs all experts fp32) stays "
    "within this bound, e.g. 0.01. Needs --profile (activation frequencies) and --calib.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="With --accuracy-budget: .npz of calibration inputs (as for 'moec profile'); with several "
    "samples, every other one is held out to check the chosen plan.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(1, MAX_TOKENS),
    default=None,
    help="Upper bound on the token count: intermediates are then planned statically (less "
    "per-call work; memory sized for this many tokens) and a call with more tokens fails with "
    "an error. Default: no bound (any token count).",
)
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(path_type=Path),
    help="Router profile of MODEL (from 'moec profile') that drives expert masking.",
)
@click.option(
    "--keep-experts",
    type=int,
    help="With --profile: keep the N most used experts of every MoE layer; the others are never "
    "routed to and their weights are not stored.",
)
@click.option(
    "--mask-threshold",
    type=float,
    help="With --profile: keep the experts routed at least this share of the tokens (0..1).",
)
@click.option(
    "--prune-ratio",
    type=float,
    help="With --profile: drop this share (0..1) of every expert's intermediate channels, those "
    "contributing least on the calibration data; they are not stored.",
)
@click.option(
    "--skip-top1-above",
    type=float,
    help="Early exit: a token whose top-1 routing weight exceeds this (0..1] skips its other experts.",
)
@click.option(
    "--skip-below-fraction",
    type=float,
    help="Early exit: skip a token's expert whose routing weight is below this fraction of its "
    "top-1 expert's weight.",
)
@click.option(
    "--routing",
    type=click.Choice(ROUTINGS),
    default="learned",
    show_default=True,
    help="Replace the learned router by a fixed pattern over the tokens (for models trained that "
    "way): cycle = token t to experts t, t+1, ...; tile = contiguous tiles of tokens per expert.",
)
@user_errors
def compile(  # noqa: A001
    model: Path,
    target: str,
    out_dir: Path,
    force: bool,
    dump_ir: Path | None,
    precision: str,
    precision_plan_path: Path | None,
    int8_group: str | None,
    router_precision: str,
    dense_precision: str,
    accuracy_budget: float | None,
    calib: Path | None,
    max_tokens: int | None,
    profile_path: Path | None,
    keep_experts: int | None,
    mask_threshold: float | None,
    prune_ratio: float | None,
    skip_top1_above: float | None,
    skip_below_fraction: float | None,
    routing: str,
) -> None:
    """Compile MODEL (.onnx) into an artifact directory computing only the selected experts."""
    from moec.analysis.masking import choose_channels, choose_kept, load_profile
    from moec.artifact import read_manifest
    from moec.compiler.compile import compile_model
    from moec.precision_plan import load_precision_plan

    masking = keep_experts is not None or mask_threshold is not None
    if profile_path is None and (masking or prune_ratio is not None):
        _fail(
            "--keep-experts, --mask-threshold and --prune-ratio need --profile PROFILE.json "
            "(from 'moec profile')"
        )
    if keep_experts is not None and mask_threshold is not None:
        _fail("masking: pass exactly one of --keep-experts N and --mask-threshold F")
    kept, channels = None, None
    plan = load_precision_plan(precision_plan_path) if precision_plan_path is not None else None
    plan_group = plan.int8_group or 0 if plan is not None else 0
    try:
        if profile_path is not None:
            profile = load_profile(profile_path, model)
            if masking:
                kept = choose_kept(profile, keep_experts, mask_threshold)
            if prune_ratio is not None:
                channels = choose_channels(profile, prune_ratio, kept)
            if kept is None and channels is None and accuracy_budget is None:
                _fail(
                    "--profile needs --keep-experts, --mask-threshold, --prune-ratio or "
                    "--accuracy-budget to act on"
                )
        options = CompileOptions(
            target=target,
            precision=precision,
            precision_plan=plan.layers if plan else None,
            int8_group=int(int8_group) if int8_group is not None else plan_group,
            router_precision=router_precision,
            dense_precision=dense_precision,
            max_tokens=max_tokens,
            kept_experts=kept,
            kept_channels=channels,
            skip_top1_above=skip_top1_above,
            skip_below_fraction=skip_below_fraction,
            routing=routing,
            dump_ir=dump_ir,
            force=force,
        )
        if accuracy_budget is not None:
            options = _budget_options(model, options, profile_path, calib, accuracy_budget)
        compile_model(model, out_dir, options, log=_progress)
    except OptionError as err:
        raise MoecError(err.naming(OPTION_FLAGS[err.option])) from err
    _warn_caveats(read_manifest(out_dir)["layers"])
    for layer, experts in (kept or {}).items():
        click.echo(f"{layer}: kept experts {experts}")
    for layer, per_expert in (channels or {}).items():
        click.echo(f"{layer}: kept {len(per_expert[0])} intermediate channels per expert")
    manifest = read_manifest(out_dir)
    if manifest.get("precision_budget"):
        choice = manifest["precision_budget"]
        held, per_token = choice["held_out_error"], choice["expected_expert_bytes_per_token"]
        click.echo(
            f"accuracy budget {choice['budget']:g}: output error {choice['error']:.3g}"
            + (f" (held-out samples {held:.3g})" if held is not None else "")
            + f"; expected expert bytes per token {per_token['plan'] / 1e6:.3f} MB "
            f"(all fp32: {per_token['fp32'] / 1e6:.3f} MB)"
        )
    click.echo(f"compiled {model} for {target} -> {out_dir}")


def _budget_options(
    model: Path, options: CompileOptions, profile_path: Path | None, calib: Path | None, budget: float
) -> CompileOptions:
    """``options`` with the precision plan chosen under the accuracy ``budget`` (and its record)."""
    import dataclasses

    from moec.analysis.masking import load_profile
    from moec.analysis.precision_budget import choose_precisions
    from moec.analysis.profile import calibration_samples
    from moec.artifact import graph_inputs, value_info
    from moec.frontend.loader import load_model
    from moec.runtime.session import check_feeds

    if profile_path is None or calib is None:
        _fail("--accuracy-budget needs --profile PROFILE.json (from 'moec profile') and --calib DATA.npz")
    if options.precision != AUTO or options.precision_plan:
        _fail("--accuracy-budget chooses the precisions itself: leave out --precision and --precision-plan")
    if not budget > 0:
        _fail(f"--accuracy-budget {budget}: must be a positive relative error, e.g. 0.01")
    onnx_model = load_model(model)
    inputs = [value_info(v) for v in graph_inputs(onnx_model)]
    samples = calibration_samples(_read_npz(calib), inputs, str(calib))
    for sample in samples:
        check_feeds(inputs, sample, str(calib))
    _progress(f"choosing expert precisions within relative error {budget:g} on {len(samples)} sample(s)")
    result = choose_precisions(
        onnx_model,
        load_profile(profile_path, model),
        samples,
        budget,
        options,
        progress=_progress,
    )
    record = result.describe(budget, options.int8_group)
    return dataclasses.replace(options, precision_plan=result.precisions, precision_budget=record)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--inputs",
    type=click.Path(path_type=Path),
    help=".npz of inputs keyed by ONNX input name (random inputs if omitted).",
)
@click.option("--output", type=click.Path(path_type=Path), help="Write outputs to this .npz.")
@click.option(
    "--tokens",
    type=click.IntRange(1, MAX_TOKENS),
    help="Token count for random inputs (the symbolic dimension; default 1). An artifact whose "
    "inputs have fixed shapes refuses it.",
)
@click.option(
    "--repeats",
    default=50,
    show_default=True,
    type=click.IntRange(1, MAX_CALLS),
    help="Timed runs for the latency figures.",
)
@click.option(
    "--warmup",
    type=click.IntRange(0, MAX_CALLS),
    help="Untimed calls before the timed ones (default: 5, at most --repeats).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, MAX_THREADS),
    help="CPU threads the kernels use (default: TVM's, one per core); sets TVM_NUM_THREADS, "
    "which moec-runner also reads.",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Also print the time per function (kernels, TVM operators, VM built-ins) per call, "
    "measured with the VM's instrument hook; for a CUDA artifact, each GPU kernel's time per call "
    "from CUDA events, over as many more calls as --repeats.",
)
@artifact_options
@user_errors
def run(
    artifact: Path,
    inputs: Path | None,
    output: Path | None,
    tokens: int | None,
    repeats: int,
    warmup: int | None,
    threads: int | None,
    profile: bool,
    skip_hash_check: bool,
    target_file: str | None,
) -> None:
    """Run a compiled ARTIFACT directory and print its latency and peak memory (RSS).

    An artifact for another board runs with moec-runner built for it, under the target's
    emulator (e.g. qemu-aarch64) when its CPU differs from this machine's.
    """
    from moec.runtime.board import RunnerSession, open_session
    from moec.runtime.session import random_inputs

    if threads is not None:  # read when TVM's thread pool starts: at the first kernel call
        os.environ["TVM_NUM_THREADS"] = str(threads)
    session = open_session(artifact, not skip_hash_check, target_file)
    if profile and isinstance(session, RunnerSession) and not session.target.cuda:
        raise MoecError(
            f"{artifact}: --profile needs an artifact that runs here (a host target artifact) or on "
            "this machine's GPU (a cuda target artifact)"
        )
    if isinstance(session, RunnerSession):
        click.echo(session.how)
    if inputs and tokens is not None:
        raise MoecError(f"--tokens {tokens}: sets the size of random inputs; drop it with --inputs {inputs}")
    tokens = _random_token_count(session.inputs, tokens, artifact)
    feeds = _load_inputs(inputs, session) if inputs else random_inputs(session.inputs, tokens)
    warmup = min(5, repeats) if warmup is None else warmup
    click.echo(f"timing: {warmup} warm-up call(s), then {repeats} timed call(s)")
    if isinstance(session, RunnerSession):
        outputs, (latency, peak, *kernel_times) = session.run_timed(feeds, repeats, warmup, profile)
        if session.emulator:
            latency += " (emulated: not the board's latency)"
            peak += " (emulated: includes the emulator)"
    else:
        outputs = session.run(feeds)
    for name, value in outputs.items():
        click.echo(f"output {name}: shape {list(value.shape)} {value.dtype}")
    if output:
        np.savez(output, **outputs)
        click.echo(f"wrote {output}")
    if not isinstance(session, RunnerSession):
        latency = _latency_line(session.time(feeds, repeats=repeats, warmup=warmup))
        peak = _peak_rss_line()
    click.echo(latency)
    click.echo(peak)
    if profile and isinstance(session, RunnerSession):
        click.echo("\n".join(kernel_times))
    elif profile:
        _print_profile(session, feeds)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--prompt",
    required=True,
    help="The prompt's token ids, comma-separated (e.g. 5,17,42).",
)
@click.option(
    "--new-tokens",
    default=8,
    show_default=True,
    type=click.IntRange(min=1, max=4096),
    help="Tokens to generate after the prompt.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="CPU threads the kernels use (default: TVM's, one per core); sets TVM_NUM_THREADS.",
)
@artifact_options
@user_errors
def generate(
    artifact: Path,
    prompt: str,
    new_tokens: int,
    threads: int | None,
    skip_hash_check: bool,
    target_file: str | None,
) -> None:
    """Greedily generate tokens with a decoder ARTIFACT that has a KV cache.

    The decoder must have been exported with use_cache=True (past keys and values in, present
    ones out) and compiled with its sequence and cache lengths dynamic. The prompt runs once on
    an empty cache, then each new token is one call with the cache the previous call returned:
    no token is computed twice. Prints the tokens and the time of the prompt call and of each
    further token.
    """
    from moec.runtime.board import open_session
    from moec.runtime.generate import greedy_generate
    from moec.runtime.session import ArtifactSession

    try:
        ids = np.array([[int(t) for t in prompt.replace(" ", "").split(",") if t]], dtype=np.int64)
    except ValueError as err:
        raise MoecError(f"--prompt: token ids must be integers separated by commas, got {prompt!r}") from err
    if ids.size == 0:
        raise MoecError("--prompt: give at least one token id")
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    session = open_session(artifact, not skip_hash_check, target_file)
    if not isinstance(session, ArtifactSession):
        raise MoecError(f"{artifact}: generate runs artifacts for this machine (a host target artifact)")
    result = greedy_generate(session, ids, new_tokens)
    click.echo(f"prompt: {' '.join(str(t) for t in ids[0])}")
    click.echo(f"generated: {' '.join(str(t) for t in result.tokens[0, ids.shape[1] :])}")
    decode = result.seconds[1:]
    line = f"prompt ({ids.shape[1]} tokens): {result.seconds[0] * 1e3:.3f} ms"
    if decode:
        line += (
            f"; per further token: median {np.median(decode) * 1e3:.3f} ms, max {max(decode) * 1e3:.3f} ms"
        )
    click.echo(line)


def _print_profile(session, feeds: dict[str, np.ndarray]) -> None:
    """The time per function of ``session``'s ``main`` on ``feeds``, largest first."""
    from moec.runtime.profile import profile_functions

    click.echo(
        "time per function and call of main (VM instrument hook: each call adds a few µs; a layer "
        "function not inlined includes its kernels):"
    )
    click.echo(f"  {'ms':>8}  {'calls':>6}  function")
    for f in profile_functions(session, feeds).functions:
        click.echo(f"  {f.ms:8.3f}  {f.calls:6.0f}  {f.name}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--inputs", type=click.Path(path_type=Path), help=".npz of inputs (overrides --tokens).")
@click.option(
    "--tokens",
    "-n",
    multiple=True,
    type=click.IntRange(1, MAX_TOKENS),
    help="Token counts to check with random inputs (repeatable; default 1 and 7; an artifact "
    "whose inputs have fixed shapes runs once, at those shapes).",
)
@click.option(
    "--expected",
    type=click.Path(path_type=Path),
    help="With --inputs: .npz of the outputs the original framework (e.g. PyTorch) gave for them, keyed "
    "by ONNX output name; checked as well as the reference.",
)
@click.option("--atol", default=1e-4, show_default=True, help="Largest acceptable absolute error.")
@click.option(
    "--rtol",
    default=1e-5,
    show_default=True,
    help="An error within this share of the output's largest value is acceptable too: fp32 sums taken "
    "in another order differ by about 1e-6 of it, which exceeds --atol on large outputs.",
)
@click.option(
    "--against",
    type=click.Choice(["reference", "original"]),
    default="reference",
    show_default=True,
    help="'original': also report the accuracy cost of the artifact's changes against the unchanged model.",
)
@artifact_options
@user_errors
def verify(
    model: Path,
    artifact: Path,
    inputs: Path | None,
    tokens: tuple[int, ...],
    expected: Path | None,
    atol: float,
    rtol: float,
    against: str,
    skip_hash_check: bool,
    target_file: str | None,
) -> None:
    """Check ARTIFACT against the numpy reference of MODEL; exit 1 above tolerance.

    The reference applies what the artifact changed (fp16 weights, masked experts, pruned
    channels, early exit), so this checks the compilation exactly. With --against original it
    also reports what those changes cost against the unchanged model: max abs error, cosine
    similarity, top-1 agreement of logit-like outputs, and router agreement per MoE layer.
    """
    from moec.frontend.loader import load_model
    from moec.kernels.formats import REDUCED_ARITHMETIC_TOLERANCE
    from moec.runtime.board import RunnerSession, open_session
    from moec.runtime.session import random_inputs
    from moec.verify import (
        accuracy_against_original,
        compare_outputs,
        layer_plans,
        reduced_arithmetic,
        reference_outputs,
        router_agreement,
    )

    onnx_model = load_model(model)
    session = open_session(artifact, not skip_hash_check, target_file)
    if isinstance(session, RunnerSession):
        click.echo(session.how)
    _check_interface(onnx_model, session, model, artifact)
    cases = []
    if expected and not inputs:
        _fail(f"--expected {expected}: pass the inputs those outputs came from with --inputs")
    known = _read_npz(expected) if expected else {}
    outputs = [o["name"] for o in session.outputs]
    unknown = sorted(set(known) - set(outputs))
    if unknown:
        _fail(f"{expected}: {unknown} are not outputs of {artifact}; its outputs are {outputs}")
    if inputs and tokens:
        _fail(f"--tokens: sets the size of random inputs; drop it with --inputs {inputs}")
    if inputs:
        feeds = _load_inputs(inputs, session)
        cases.append((feeds, None))
    else:
        counts = tokens or (1, 7)
        if not _has_symbolic(session.inputs):  # one case, at the fixed shapes (-n refused)
            counts = (_random_token_count(session.inputs, tokens[0] if tokens else None, artifact, "-n"),)
        for count in counts:
            cases.append((random_inputs(session.inputs, count, seed=count), count))
    changed = sorted(layer_plans(session.manifest))
    if changed:
        click.echo(
            f"layers {', '.join(changed)} were changed (masking, pruning, early exit, fixed routing, "
            "expert precisions): the reference makes the same changes"
        )
    relative = REDUCED_ARITHMETIC_TOLERANCE if reduced_arithmetic(session.manifest) else None
    if relative is not None:
        kinds = sorted(
            {e["compute"] for layer in session.manifest["layers"] for e in layer["plan"]} - {"fp32"}
        )
        click.echo(
            f"experts multiply in {'/'.join(k.upper() for k in kinds)} on "
            f"{session.manifest['target']['name']}: outputs are held to {relative:g} of their largest "
            f"value (reduced arithmetic's bound) or atol {atol:g}"
        )
    worst = 0.0
    nan_mismatches = 0
    failed = False
    for feeds, count in cases:
        label = _shape_label(session.inputs, feeds)
        actual = session.run(feeds)
        if against == "original":
            for cost in accuracy_against_original(actual, onnx_model, feeds):
                top1 = "" if cost.top1_agreement is None else f"  top-1 agreement {cost.top1_agreement:.1%}"
                click.echo(
                    f"{label:>14}  {cost.name} vs original model: max abs {cost.max_abs:.3e}  "
                    f"cosine {cost.cosine:.6f}{top1}"
                )
            for layer, share in router_agreement(onnx_model, session.manifest, feeds).items():
                click.echo(f"{label:>14}  {layer} router agreement with the original: {share:.1%}")
        note = functools.partial(_note, label)
        checks = [("", reference_outputs(onnx_model, session.manifest, feeds, on_fallback=note))]
        if known:
            checks.append((f" vs {expected.name}", known))
        for against_what, wanted in checks:
            for err in compare_outputs(actual, wanted, count or 0):
                ok = err.within(atol) or (err.agrees and err.max_rel <= max(rtol, relative or 0.0))
                status = "ok" if ok else "FAIL"
                failed |= not ok
                worst = max(worst, err.max_abs)
                nan_mismatches += err.nan_mismatches
                note = "" if err.shape_ok else " (shape or dtype differs)"
                if err.nan_mismatches:
                    note += f" ({err.nan_mismatches} value(s) NaN in one and not the other)"
                click.echo(
                    f"{label:>14}  {err.name}{against_what}: max abs {err.max_abs:.3e}  "
                    f"max rel {err.max_rel:.3e}  {status}{note}"
                )
    if failed:
        what = f"the reference of {model}" + (f" or {expected}" if known else "")
        nans = f" and in {nan_mismatches} NaN value(s)" if nan_mismatches else ""
        _fail(f"{artifact} differs from {what} by {worst:.3e}{nans} > atol {atol:g} (and rtol {rtol:g})")
    click.echo(
        f"verified: max abs error {worst:.3e} (each output within atol {atol:g} or rtol "
        f"{max(rtol, relative or 0.0):g} of its largest value)"
    )


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help=".npz of calibration inputs keyed by ONNX input name, as the model would see them in use; "
    "an extra leading axis holds several samples.",
)
@click.option(
    "--synthetic",
    type=click.IntRange(min=1),
    help="Without --calib: profile on this many random tokens instead (not meaningful for real routing).",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Profile JSON to write.")
@click.option("--plot", type=click.Path(path_type=Path), help="Also write PNG pictures of the profile here.")
@user_errors
def profile(model: Path, calib: Path | None, synthetic: int | None, output: Path, plot: Path | None) -> None:
    """Profile MODEL's routers on calibration data: expert activation, co-activation, confidence.

    The profile (JSON) is what `moec compile --profile` will use to mask and prune experts; it
    names the model by its sha256, so it is only used with that model.
    """
    from moec.analysis.profile import calibration_samples, profile_model
    from moec.artifact import check_writable, graph_inputs, value_info, write_atomically
    from moec.frontend.loader import load_model
    from moec.runtime.session import check_feeds, random_inputs

    if output.is_dir():
        raise MoecError(
            f"{output}: is a directory; pass the profile's file name (e.g. {output}/profile.json)"
        )
    check_writable(output)  # before profiling, not after
    onnx_model = load_model(model)
    inputs = [value_info(v) for v in graph_inputs(onnx_model)]
    if calib is not None and synthetic is not None:
        _fail("pass either --calib or --synthetic, not both")
    if calib is None and synthetic is None:
        _fail(
            "no calibration data: pass --calib data.npz with inputs the model sees in use (e.g. "
            "numpy.savez('data.npz', **{input_name: array}) from your own pipeline), or --synthetic N "
            "for random tokens (a profile that says nothing about real routing)"
        )
    if calib is not None:
        samples = calibration_samples(_read_npz(calib), inputs, str(calib))
        for sample in samples:
            check_feeds(inputs, sample, str(calib))
    else:
        per_sample = _fixed_token_count(inputs)
        count = 1 if per_sample is None else -(-synthetic // per_sample)
        shaped = "" if per_sample is None else f" ({count} samples of the model's fixed {per_sample} tokens)"
        warn(
            f"profiling {synthetic} random tokens{shaped}: real routers route real data "
            "differently, so do not mask or prune from this profile"
        )
        if per_sample is None:
            samples = [random_inputs(inputs, synthetic, seed=0)]
        else:
            samples = [random_inputs(inputs, 1, seed=seed) for seed in range(count)]

    def progress(done: int, total: int) -> None:
        if total > 1:
            _progress(f"profiled sample {done}/{total}")

    result = profile_model(onnx_model, model, samples, progress, synthetic=synthetic is not None)
    write_atomically(output, json.dumps(result, indent=1) + "\n")
    for layer in result["layers"]:
        top = np.argsort(layer["activation_frequency"])[::-1][:3]
        click.echo(
            f"{layer['name']}: {layer['tokens']} tokens, busiest experts "
            + ", ".join(f"{e} ({layer['activation_frequency'][e]:.0%})" for e in top)
            + f", mean top-1 weight {layer['confidence']['top1_mean']:.2f}"
        )
    if not result["layers"]:
        click.echo(f"{model}: no MoE layers found; the profile is empty")
    if plot is not None:
        from moec.analysis.plot import write_plots

        for path in write_plots(result, plot):
            click.echo(f"wrote {path}")
    click.echo(f"wrote {output}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@user_errors
def inspect(model: Path, as_json: bool) -> None:
    """List the MoE layers found in MODEL and what sparse execution saves; or, for an artifact
    directory, how each layer's experts are stored (precision plan, bytes, masking)."""
    from moec.frontend.importer import find_blocks
    from moec.frontend.indexed_experts import rewrite_indexed_experts
    from moec.frontend.loader import load_model

    if model.is_dir():
        _inspect_artifact(model, as_json)
        return
    loaded = load_model(model)
    layers = [b.layer.describe() for b in find_blocks(loaded)]
    _, indexed = rewrite_indexed_experts(loaded)
    if as_json:
        click.echo(
            json.dumps({"model": str(model), "moe_layers": layers, "indexed_experts": indexed}, indent=2)
        )
        return
    if indexed:
        click.echo(f"{model}: {indexed} sum(s) of input-indexed experts, computed one expert per sample")
    if not layers:
        click.echo(f"{model}: no MoE layers found")
        return
    click.echo(f"{model}: {len(layers)} MoE layer(s)")
    header = (
        f"{'layer':<6} {'experts':>7} {'top-k':>5} {'hidden':>6} {'ffn':>6} {'activation':<14} "
        f"{'router':<32} {'shared':<6} {'params MB':>9} {'dense MB/tok':>12} {'sparse MB/tok':>13}"
    )
    click.echo(header)
    for layer in layers:
        router = _router_summary(layer["router"])
        click.echo(
            f"{layer['name']:<6} {layer['experts']:>7} {layer['top_k']:>5} {layer['hidden']:>6} "
            f"{layer['ffn']:>6} {layer['activation']:<14} {router:<32} "
            f"{'yes' if layer['shared_expert'] else 'no':<6} {layer['parameter_bytes'] / 1e6:>9.3f} "
            f"{layer['bytes_per_token_dense'] / 1e6:>12.3f} {layer['bytes_per_token_sparse'] / 1e6:>13.3f}"
        )
    _warn_caveats(layers)


def _inspect_artifact(artifact: Path, as_json: bool) -> None:
    """Print each layer's stored-expert plan from ``artifact``'s manifest."""
    from moec.artifact import read_manifest

    manifest = read_manifest(artifact)
    plans = {layer["name"]: layer["plan"] for layer in manifest["layers"]}
    if as_json:
        record = {"artifact": str(artifact), "plans": plans}
        record["precision_budget"] = manifest.get("precision_budget")
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(f"{artifact}: {len(plans)} MoE layer(s), compiled for {manifest['target']['name']}")
    click.echo(f"{'layer':<8} {'stored MB':>9}  experts by precision (masked experts: -)")
    for layer in manifest["layers"]:
        plan = layer["plan"]
        stored = sum(entry["bytes"] for entry in plan)
        group = layer.get("int8_group")
        counts, computes = {}, {}
        for entry in plan:
            if entry["kept"]:
                counts[entry["precision"]] = counts.get(entry["precision"], 0) + 1
                computes[entry["compute"]] = computes.get(entry["compute"], 0) + 1
        summary = ", ".join(f"{count} {precision}" for precision, count in counts.items())
        if group is not None:
            summary += f" (int8 scales per {'output channel' if group == 0 else f'{group} inputs'}"
            summary += ", the model's own INT8)" if layer.get("int8_source") == "model" else ")"
        if set(computes) - {"fp32"}:
            summary += "; multiplied in " + ", ".join(f"{kind}: {n}" for kind, n in sorted(computes.items()))
        click.echo(f"{layer['name']:<8} {stored / 1e6:>9.3f}  {summary}")
        cells = [entry["precision"] if entry["kept"] else "-" for entry in plan]
        click.echo(f"{'':<8} {'':>9}  " + " ".join(f"{e}:{cell}" for e, cell in enumerate(cells)))
    dense = manifest.get("dense_weights") or {}
    if dense:
        stored = [
            f"{name} {entry['precision']}{' (router)' if entry['router'] else ''}"
            for name, entry in dense.items()
        ]
        click.echo(f"dense weights stored narrower: {', '.join(stored)}")
    choice = manifest.get("precision_budget")
    if choice:
        click.echo(
            f"chosen under accuracy budget {choice['budget']:g} ({choice['metric']}): "
            f"error {choice['error']:.3g}"
            + (f", held-out {choice['held_out_error']:.3g}" if choice["held_out_error"] is not None else "")
        )


def _warn_caveats(layers: list[dict]) -> None:
    """A warning on stderr for each way a layer (``MoELayer.describe()``) computes differently
    from its graph."""
    for layer in layers:
        for caveat in layer.get("caveats", []):
            warn(f"{layer['name']}: {caveat}")


def _router_summary(rule: dict) -> str:
    """A routing rule (``MoELayer.router()``) in a few words, e.g. ``sigmoid +bias 2/4grp +norm x2.5``
    or ``softmax capacity 64``."""
    words = [rule["scoring"]]
    if "selection_bias" in rule:
        words.append("+bias")
    if "groups" in rule:
        words.append(f"{rule['top_groups']}/{rule['groups']}grp")
    if rule["normalize"]:
        words.append("+norm")
    if "scale" in rule:
        words.append(f"x{rule['scale']:g}")
    if rule.get("gain_on_input"):
        words.append("w*x")
    if "capacity" in rule:
        words.append(f"capacity {rule['capacity']}")
    return " ".join(words)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    help="Tarball to write (default: ARTIFACT.tar.gz beside the artifact directory).",
)
@click.option("--force", is_flag=True, help="Replace the tarball if it exists (only one moec package wrote).")
@artifact_options
@user_errors
def package(
    artifact: Path, output: Path | None, force: bool, skip_hash_check: bool, target_file: str | None
) -> None:
    """Bundle ARTIFACT with the runner and TVM runtime for its board into one .tar.gz.

    Copy the tarball to the board, unpack it and run the command its README.md names.
    """
    from moec.runtime.package import bundle_name, package_artifact, run_command

    path = package_artifact(
        artifact, output, force=force, check_hashes=not skip_hash_check, target_file=target_file
    )
    click.echo(f"wrote {path}")
    click.echo(f"on the board: tar xzf {path.name} && cd {bundle_name(path)} && {run_command()}")


@main.command()
@user_errors
def targets() -> None:
    """List the bundled target files and their key facts."""
    from moec.targets import bundled_target_file, bundled_targets, load_target, target_description

    for name in bundled_targets():
        try:
            spec = load_target(name)
        except MoecError as err:  # a target detecting hardware this machine lacks (cuda: a GPU)
            click.echo(f"{name:<12} {target_description(name)}")
            click.echo(f"{'':<12} not usable here: {err}  [{bundled_target_file(name)}]")
            continue
        hw = spec.hardware
        device = f"cuda {spec.cuda.arch} (CUDA {spec.cuda.version})" if spec.cuda else hw.arch
        click.echo(f"{name:<12} {spec.description}")
        click.echo(
            f"{'':<12} {device}, {hw.cores} {'SMs' if spec.cuda else 'cores'}, {hw.simd_bits}-bit SIMD, "
            f"{hw.cache_line_bytes} B lines, computes {'/'.join(hw.compute_precisions)}, "
            f"built with {spec.toolchain.cxx}  [{spec.path}]"
        )
