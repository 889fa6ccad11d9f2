"""`mergevq demo`: train everything briefly on the built-in data and write one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import console
from ..options import JsonOpt, positive

EXAMPLES = """
Examples:

  mergevq demo                                   # about 15 minutes on 2 CPU cores → runs/demo/report.html

  mergevq demo --out runs/demo-long --minutes 60 # four times the steps

  mergevq demo --out runs/demo                   # again after Ctrl-C: continues where it stopped
"""


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the runs, the pictures and the report.")] = Path("runs/demo"),
    minutes: Annotated[float, typer.Option("--minutes", callback=positive, help="Scales every step's length: about this many minutes on 2 CPU cores.")] = 15.0,
    json_: JsonOpt = False,
) -> None:
    """Train the tiny tokenizer on the built-in shapes, reconstruct the built-in photos at three K, tokenize,
    train MergeAR, LlamaGen and RandAR briefly and sample a grid with each, run the linear probe and the KV-cache
    benchmark, beside the shipped weights; write report.html and report.md with every picture, table, wall time
    and the command that reproduces each step. Run it again after an interruption: it resumes."""
    from mergevq_core.demo import run_demo

    bar = console.DemoBar(quiet=json_)
    try:
        res = run_demo(out, minutes, bar)
    finally:
        bar.end()
    if json_:
        console.print_json(res.to_json())
        return
    console.kv("demo", [("report", res.report_html), ("markdown", res.report_md),
                        ("compute", f"{res.wall_s / 60:.1f} min over {len(res.steps)} steps")])
