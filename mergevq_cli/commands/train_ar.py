"""`mergevq train-ar`: stage-2 training of a generator on token shards, with progress, checkpoints and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, MaxStepsOpt, OutOpt, RecipeArg, ResumeOpt, SeedOpt, SetOpt
from .train_tokenizer import TrainBar, steps_text

EXAMPLES = """
Examples:

  mergevq tokenize shapes --out tokens/tiny --tokens-sample      # shards of the tiny tokenizer
  mergevq train-ar recipes/ar/tiny.yaml --shards tokens/tiny --generator mergear

  torchrun --nproc-per-node 8 -m mergevq_cli train-ar recipes/ar/mergear-l.yaml --shards tokens/gr

  mergevq train-ar recipes/ar/tiny.yaml --generator randar --out runs/randar-1 --resume

  mergevq train-ar recipes/ar/tiny.yaml -g mergear --shards tokens/tiny200 --init runs/ar-mergear   # more data
"""

GeneratorOpt = Annotated[Optional[str], typer.Option("--generator", "-g", help="llamagen, mergear or randar (overrides generator.name).")]
ShardsOpt = Annotated[Optional[Path], typer.Option("--shards", "-t", help="Token-shards folder from `mergevq tokenize` (overrides data.tokens).")]
OldTokensOpt = Annotated[Optional[Path], typer.Option("--tokens", hidden=True, help="Deprecated: --shards.")]
InitOpt = Annotated[Optional[Path], typer.Option("--init", help="Start from this generator run's weights (same generator, architecture and tokenizer) with a fresh optimizer and schedule, e.g. to train on more data.")]


def _describe(what: str, procs: str, info: dict[str, Any]) -> str:
    if info.get("init"):
        what += f" from {info['init']}"
    ks = ", ".join(f"{k}: {n}" for k, n in info["k_counts"].items())
    views = info.get("views") or {}
    seen = f", {views['count']} {views['mode']} views per item, one drawn per epoch" if views.get("count", 1) > 1 else ""
    return (f"{what} {info['generator']} ({info['params'] / 1e6:.2f}M params) on {info['device']}{procs}, batch "
            f"{info['batch_size']} (accumulation {info['accum']}), {info['train_items']:,} items + "
            f"{info['val_items']:,} held out{seen} (K per view: {ks}) → {info['run_dir']}")


def _shards(shards: Path | None, tokens: Path | None) -> Path | None:
    """`--tokens DIR` is the old name of `--shards DIR` (it means K in the other commands)."""
    from mergevq_core.errors import ConfigError

    if tokens is None:
        return shards
    if shards is not None:
        raise ConfigError("--shards and --tokens both given: --tokens DIR is the deprecated name of --shards DIR, give only --shards")
    if console.is_main_process():
        console.err.print("--tokens DIR is deprecated for train-ar: use --shards DIR", soft_wrap=True, markup=False, highlight=False)
    return tokens


def train_ar(
    recipe: RecipeArg, shards: ShardsOpt = None, generator: GeneratorOpt = None, out: OutOpt = None,
    resume: ResumeOpt = False, max_steps: MaxStepsOpt = None, set_: SetOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = "auto", json_: JsonOpt = False, init: InitOpt = None, tokens: OldTokensOpt = None,
) -> None:
    """Train a stage-2 generator (LlamaGen, MergeAR or RandAR) on token shards."""
    from mergevq_core import api

    shards = _shards(shards, tokens)
    eval_line = lambda step, res: f"step {step}: validation loss {res['val_loss']:.4f} ({res['items']} items)"  # noqa: E731
    with TrainBar("tok/s", ("ce",), json_, _describe, eval_line) as bar:
        res = api.train_ar(recipe, tuple(set_ or ()), shards=shards, generator=generator, out=out, resume=resume,
                           max_steps=max_steps, seed=seed, device=device, init=init, progress=bar)
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
        ("steps", steps_text(res)),
        ("time", f"{res.wall_s:.0f} s, {res.tokens_per_s:,.0f} tok/s"),
        ("validation loss", f"{hist[0][1]:.4f} → {res.val_loss:.4f}" if hist else f"{res.val_loss:.4f}"),
        ("tokenizer", res.tokenizer["checkpoint"]), ("checkpoint", res.checkpoint),
        ("curve", f"{res.run_dir}/loss_curve.png"),
    ])
