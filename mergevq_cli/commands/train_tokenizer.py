"""`mergevq train-tokenizer`: stage-1 training with progress, checkpoints, evaluation and a summary."""

from __future__ import annotations

from typing import Any

from .. import console
from ..options import DeviceOpt, JsonOpt, MaxStepsOpt, OutOpt, RecipeArg, ResumeOpt, SeedOpt, SetOpt

EXAMPLES = """
Examples:

  mergevq train-tokenizer recipes/tiny.yaml            # CPU, built-in shapes data, 10–16 minutes on 2 cores

  mergevq train-tokenizer recipes/gr.yaml --set data.root=/data/imagenet/train \\
      --set model.encoder.dinov2_weights=dinov2_vitb14.pth --set loss.teacher_weights=dinov2_vitb14.pth \\
      --set loss.vgg_weights=vgg16-397923af.pth

  torchrun --nproc-per-node 8 -m mergevq_cli train-tokenizer recipes/gr.yaml --set data.root=...

  mergevq train-tokenizer recipes/tiny.yaml --out runs/tiny-1 --resume
"""


class TrainBar(console.BarProgress):
    """The bar of both train commands: a line saying what trains (`describe(info)`) when training starts, and
    one line per evaluation row (`eval_line(step, results)`)."""

    def __init__(self, unit: str, terms: tuple[str, ...], quiet: bool, describe: Any, eval_line: Any) -> None:
        super().__init__(unit, terms, quiet)
        self.describe, self.eval_line = describe, eval_line

    def start(self, stage: str, total: int, done: int = 0, **info: Any) -> None:
        what = "resuming" if info["resumed"] else "training"
        procs = f" × {info['world_size']} processes" if info["world_size"] > 1 else ""
        self.note(self.describe(what, procs, info))
        super().start(stage, total, done, **info)

    def log(self, row: dict[str, Any]) -> None:
        super().log(row)
        if "eval" in row:
            self.note(self.eval_line(row["step"], row["eval"]))


def _describe(what: str, procs: str, info: dict[str, Any]) -> str:
    return (f"{what} {info['params'] / 1e6:.2f}M params on {info['device']}{procs}, batch {info['batch_size']}"
            f" (accumulation {info['accum']}), {info['train_images']:,} images → {info['run_dir']}")


def _eval_line(step: int, res: dict[str, Any]) -> str:
    psnr = ", ".join(f"K={k}: {v:.2f} dB" for k, v in res["psnr_by_tokens"].items())
    acc = res["source_recovery_acc"]
    return (f"step {step}: held-out PSNR {psnr}; codebook usage {res['codebook_usage']:.3f}"
            + (f"; source recovery {acc:.3f}" if acc is not None else ""))


def steps_text(res: Any) -> str:
    """The summary's steps: a resume of a finished run says so (it changed nothing)."""
    if res.resumed_from is not None and res.resumed_from >= res.steps:
        return f"{res.steps} (already finished at step {res.steps}: nothing done)"
    return f"{res.steps}" + (f" (resumed at {res.resumed_from})" if res.resumed_from is not None else "")


def train_tokenizer(
    recipe: RecipeArg, out: OutOpt = None, resume: ResumeOpt = False, max_steps: MaxStepsOpt = None,
    set_: SetOpt = None, seed: SeedOpt = None, device: DeviceOpt = "auto", json_: JsonOpt = False,
) -> None:
    """Train a MergeVQ tokenizer (stage 1) from a recipe."""
    from mergevq_core import api

    with TrainBar("img/s", ("total", "recon", "source_acc"), json_, _describe, _eval_line) as bar:
        res = api.train_tokenizer(recipe, tuple(set_ or ()), out=out, resume=resume, max_steps=max_steps, seed=seed,
                                  device=device, progress=bar)
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    rows = [[f"K = {k}", f"{v:.2f}"] for k, v in sorted(res.psnr_by_tokens.items())]
    console.table("held-out PSNR (dB), EMA weights", ["tokens", "PSNR"], rows)
    acc = res.source_recovery_acc
    console.kv("summary", [
        ("run", res.run_dir), ("steps", steps_text(res)),
        ("time", f"{res.wall_s:.0f} s, {res.img_per_s:.1f} img/s"), ("PSNR @ K=N", f"{res.psnr:.2f} dB"),
        ("codebook usage", f"{res.codebook_usage:.3f}"), ("source recovery acc", "-" if acc is None else f"{acc:.3f}"),
        ("checkpoint", res.checkpoint), ("pictures", f"{res.run_dir}/preview.png, {res.run_dir}/loss_curve.png"),
    ])
