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
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out (or the newest run of this recipe) from its last checkpoint.")]
