"""`mergevq export`: a run as a folder in the Hugging Face layout, with a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import console
from ..options import JsonOpt

EXAMPLES = """
Examples:

  mergevq export runs/tiny-20261130-120000 exported/tiny-tokenizer            # config.json, model.safetensors, README.md

  mergevq export runs/tiny-ar-mergear exported/tiny-mergear --dtype float16   # its tokenizer goes into tokenizer/

  mergevq generate --class 3 --sampler mergear --ckpt exported/tiny-mergear   # any --ckpt reads the folder

  HF_HUB_OFFLINE=1 mergevq reconstruct --photos --ckpt hf-hub:owner/tiny-tokenizer   # from the local HF cache
"""


def export(
    run: Annotated[Path, typer.Argument(help="A tokenizer or generator run, checkpoint or exported folder.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The new folder to write (must not exist or be empty).", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="float32 (exact), float16 or bfloat16 (half the size).")] = "float32",
    json_: JsonOpt = False,
) -> None:
    """Write a trained tokenizer or generator in the Hugging Face layout: config.json (the recipe, the step, the
    data, the training commands, the measured figures), model.safetensors and a README.md model card. A
    generator takes its tokenizer along in tokenizer/. Upload the folder as a model repository to share it."""
    from mergevq_core.export import export as export_run

    res = export_run(run, out, dtype=dtype)
    if json_:
        console.print_json(res.to_json())
        return
    rows = [("folder", res.folder), ("kind", "generator" if res.kind == "ar" else "tokenizer"), ("step", f"{res.step:,}"),
            ("weights", f"{res.params / 1e6:.2f}M parameters in {res.dtype}, {res.bytes / 1e6:.1f} MB in all")]
    if res.tokenizer is not None:
        rows.append(("its tokenizer", f"{res.tokenizer.folder} ({res.tokenizer.params / 1e6:.2f}M parameters)"))
    console.kv("export", rows)
