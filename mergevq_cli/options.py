"""Option types shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file, e.g. recipes/gr.yaml.", show_default=False)]
TokensOpt = Annotated[
    Optional[int], typer.Option("--tokens", "-k", help="Keep K merged tokens (a perfect square ≤ N); default: the recipe's merge.keep.")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe value: key.path=value (repeatable), e.g. model.decoder.depth=4."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<recipe>-<time>).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed (overrides train.seed).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimizer steps (overrides train.max_steps).")]
TokenizerOpt = Annotated[
    Optional[Path], typer.Option("--ckpt", help="Tokenizer run or checkpoint folder (default: the newest tokenizer run).")
]
RunsOpt = Annotated[int, typer.Option("--runs", help="Timed runs (>= 10).")]
BenchOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the benchmark's JSON (and plot).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out (or the newest run of this recipe) from its last checkpoint.")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="fp32, or bf16: autocast around encode / decode (for GPUs and CPUs with native bf16; slow on others).")
]
BenchPrecisionOpt = Annotated[
    Optional[str], typer.Option("--precision", help="fp32 or bf16 (autocast) rows only (default: both, bf16 compared with fp32).", show_default=False)
]


# ----------------------------------------------------------------------------- comma-separated values


def int_list(text: str | None, option: str) -> list[int] | None:
    """`64,100,144` → [64, 100, 144] (None stays None); a bad entry names the option."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"{option}: expected an integer or a comma-separated list like 64,100,144, got {text!r}") from None


def float_list(text: str, option: str) -> list[float]:
    """`0,0.44,0.75` → [0.0, 0.44, 0.75]; a bad entry names the option."""
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"{option}: expected a number or a comma-separated list like 0.5,0.75, got {text!r}") from None


def per_sub_token(text: str, option: str) -> float | tuple[float, ...]:
    """One number, or one per sub-token (`1.9,2.0`) as a tuple."""
    values = tuple(float_list(text, option))
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
