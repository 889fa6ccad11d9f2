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
