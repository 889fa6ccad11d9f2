"""Option types shared by several commands, declared once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file, e.g. recipes/gr.yaml.", show_default=False)]
TokensOpt = Annotated[
    Optional[int], typer.Option("--tokens", "-k", min=1, help="Keep K merged tokens (a perfect square ≤ N); default: the recipe's merge.keep.")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe value: key.path=value (repeatable), e.g. model.decoder.depth=4."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<recipe>-<time>).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed (overrides train.seed).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps (overrides train.max_steps).")]
TokenizerOpt = Annotated[
    Optional[Path], typer.Option("--ckpt", help="Tokenizer run, checkpoint or exported folder, or hf-hub:owner/name (default: the newest tokenizer run under runs/, else the shipped one).")
]
RunsOpt = Annotated[int, typer.Option("--runs", min=10, help="Timed runs (>= 10).")]
BenchOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the benchmark's JSON (and plot).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out (or the newest run of this recipe) from its last checkpoint.")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="fp32, or bf16: autocast around encode / decode (for GPUs and CPUs with native bf16; slow on others).")
]
BenchPrecisionOpt = Annotated[
    Optional[str], typer.Option("--precision", help="fp32 or bf16 (autocast) rows only (default: both, bf16 compared with fp32).", show_default=False)
]


# ----------------------------------------------------------------------------- numbers
# Integer options carry their range in `typer.Option(min=...)` (checked while parsing, shown in --help); float
# options also take one of these callbacks, since a range alone lets nan through.


def finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value}: must be a finite number")
    return value


def positive(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value}: must be a finite number > 0")
    return value


def class_ids(value: list[int] | None) -> list[int] | None:
    """`--class`: ids >= 0 (the upper bound is the model's and is checked once it is loaded)."""
    bad = [v for v in value or [] if v < 0]
    if bad:
        raise typer.BadParameter(f"{bad[0]}: class ids are >= 0")
    return value


def tokens_or_all(value: str) -> str:
    """`--tokens` of probe: `all` or a K >= 1."""
    if value != "all" and not (value.isdigit() and int(value) >= 1):
        raise typer.BadParameter(f"{value!r}: expected `all` or a number of tokens K >= 1")
    return value


# ----------------------------------------------------------------------------- comma-separated values


def int_list(text: str | None, option: str, minimum: int = 1) -> list[int] | None:
    """`64,100,144` → [64, 100, 144] (None stays None); a bad entry names the option."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"{option}: expected an integer or a comma-separated list like 64,100,144, got {text!r}") from None
    bad = [v for v in values if v < minimum]
    if bad:
        raise typer.BadParameter(f"{option} {text}: every value must be >= {minimum}, got {bad[0]}")
    return values


def float_list(text: str, option: str, low: float | None = None, high: float | None = None) -> list[float]:
    """`0,0.44,0.75` → [0.0, 0.44, 0.75]; a bad entry (not a number, not finite, outside [low, high]) names the option."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"{option}: expected a number or a comma-separated list like 0.5,0.75, got {text!r}") from None
    for v in values:
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            span = f" in [{low:g}, {high:g}]" if low is not None and high is not None else f" >= {low:g}" if low is not None else ""
            raise typer.BadParameter(f"{option} {text}: every value must be a finite number{span}, got {v:g}")
    return values


def per_sub_token(text: str, option: str, low: float | None = None, high: float | None = None) -> float | tuple[float, ...]:
    """One number, or one per sub-token (`1.9,2.0`) as a tuple."""
    values = tuple(float_list(text, option, low, high))
    if not values:
        raise typer.BadParameter(f"{option}: expected a number or one per sub-token like 1.9,2.0, got {text!r}")
    return values[0] if len(values) == 1 else values


# ----------------------------------------------------------------------------- precision


def checked_precision(text: str | None, device: str) -> str:
    """`--precision` checked (a ConfigError naming it); bf16 on a device without native bf16 prints one warning."""
    from mergevq_core.dist import pick_device
    from mergevq_core.precision import check_precision, slow_bf16_warning

    from . import console

    precision = check_precision(text)
    message = slow_bf16_warning(precision, pick_device(device))
    if message:
        console.warning(message)
    return precision
