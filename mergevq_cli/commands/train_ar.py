"""`mergevq train-ar`: stage-2 training of a generator on token shards, with progress, checkpoints and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, MaxStepsOpt, OutOpt, RecipeArg, ResumeOpt, SeedOpt, SetOpt

EXAMPLES = """
Examples:

  mergevq tokenize shapes --out tokens/tiny --tokens-sample      # shards of the tiny tokenizer
  mergevq train-ar recipes/ar/tiny.yaml --tokens tokens/tiny --generator mergear

  torchrun --nproc-per-node 8 -m mergevq_cli train-ar recipes/ar/mergear-l.yaml --tokens tokens/gr

  mergevq train-ar recipes/ar/tiny.yaml --generator randar --out runs/randar-1 --resume

  mergevq train-ar recipes/ar/tiny.yaml -g mergear --tokens tokens/tiny200 --init runs/ar-mergear   # more data
"""

GeneratorOpt = Annotated[
    Optional[str], typer.Option("--generator", "-g", help="llamagen, mergear or randar (overrides generator.name).")
]


def train_ar(
    recipe: RecipeArg,
    tokens: Annotated[Optional[Path], typer.Option("--tokens", "-t", help="Token-shards folder from `mergevq tokenize` (overrides data.tokens).")] = None,
    generator: GeneratorOpt = None, out: OutOpt = None, resume: ResumeOpt = False, max_steps: MaxStepsOpt = None,
    set_: SetOpt = None, seed: SeedOpt = None, device: DeviceOpt = "auto", json_: JsonOpt = False,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this generator run's weights (same generator, architecture and tokenizer) with a fresh optimizer and schedule, e.g. to train on more data.")] = None,
) -> None:
    """Train a stage-2 generator (LlamaGen, MergeAR or RandAR) on token shards."""
    from mergevq_core import api
    from mergevq_core.train.tokenizer_loop import TrainHooks

    bar = console.TrainProgress("tok/s", ("ce",))

    def on_start(info: dict) -> None:
        if not json_:
            what = "resuming" if info["resumed"] else "training"
            if info.get("init"):
                what += f" from {info['init']}"
            procs = f" × {info['world_size']} processes" if info["world_size"] > 1 else ""
            ks = ", ".join(f"{k}: {n}" for k, n in info["k_counts"].items())
            bar.note(
                f"{what} {info['generator']} ({info['params'] / 1e6:.2f}M params) on {info['device']}{procs}, batch "
                f"{info['batch_size']} (accumulation {info['accum']}), {info['train_items']:,} items + "
                f"{info['val_items']:,} held out (K per item: {ks}) → {info['run_dir']}"
            )
            bar.start("train", info["total_steps"], info["start_step"])

    def on_eval(step: int, res: dict) -> None:
        if not json_:
            bar.note(f"step {step}: validation loss {res['val_loss']:.4f} ({res['items']} items)")

    hooks = TrainHooks(
        on_start=on_start,
        on_step=(lambda step, terms: None) if json_ else bar.step,
        on_log=(lambda row: None) if json_ else (lambda row: bar.throughput(row["tok_per_s"])),
        on_eval=on_eval,
    )
    try:
        res = api.train_ar(recipe, tuple(set_ or ()), tokens, generator, out, resume, max_steps, seed, device, hooks, init)
    finally:
        if bar.task is not None:
            bar.stop()
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    hist = res.val_losses
    rows = [[str(s), f"{v:.4f}"] for s, v in (hist if len(hist) <= 8 else hist[:: max(1, len(hist) // 8)] + hist[-1:])]
    console.table("validation loss (cross-entropy per token, nats)", ["step", "val loss"], rows)
    console.kv("summary", [
        ("run", res.run_dir), ("generator", res.generator),
        ("steps", f"{res.steps}" + (f" (resumed at {res.resumed_from})" if res.resumed_from is not None else "")),
        ("time", f"{res.wall_s:.0f} s, {res.tokens_per_s:,.0f} tok/s"),
        ("validation loss", f"{hist[0][1]:.4f} → {res.val_loss:.4f}" if hist else f"{res.val_loss:.4f}"),
        ("tokenizer", res.tokenizer["checkpoint"]), ("checkpoint", res.checkpoint),
        ("curve", f"{res.run_dir}/loss_curve.png"),
    ])
