"""`mergevq train-tokenizer`: stage-1 training with progress, checkpoints, evaluation and a summary."""

from __future__ import annotations

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


def train_tokenizer(
    recipe: RecipeArg, out: OutOpt = None, resume: ResumeOpt = False, max_steps: MaxStepsOpt = None,
    set_: SetOpt = None, seed: SeedOpt = None, device: DeviceOpt = "auto", json_: JsonOpt = False,
) -> None:
    """Train a MergeVQ tokenizer (stage 1) from a recipe."""
    from mergevq_core import api
    from mergevq_core.train.tokenizer_loop import TrainHooks

    bar = console.TrainProgress("img/s", ("total", "recon", "source_acc"))

    def on_start(info: dict) -> None:
        if not json_:
            what = "resuming" if info["resumed"] else "training"
            procs = f" × {info['world_size']} processes" if info["world_size"] > 1 else ""
            bar.note(
                f"{what} {info['params'] / 1e6:.2f}M params on {info['device']}{procs}, batch {info['batch_size']}"
                f" (accumulation {info['accum']}), {info['train_images']:,} images → {info['run_dir']}"
            )
            bar.start("train", info["total_steps"], info["start_step"])

    def on_eval(step: int, res: dict) -> None:
        if not json_:
            psnr = ", ".join(f"K={k}: {v:.2f} dB" for k, v in res["psnr_by_tokens"].items())
            acc = res["source_recovery_acc"]
            bar.note(f"step {step}: held-out PSNR {psnr}; codebook usage {res['codebook_usage']:.3f}"
                     + (f"; source recovery {acc:.3f}" if acc is not None else ""))

    hooks = TrainHooks(
        on_start=on_start,
        on_step=(lambda step, terms: None) if json_ else bar.step,
        on_log=(lambda row: None) if json_ else (lambda row: bar.throughput(row["img_per_s"])),
        on_eval=on_eval,
    )
    try:
        res = api.train_tokenizer(recipe, tuple(set_ or ()), out, resume, max_steps, seed, device, hooks)
    finally:
        if bar.task is not None:
            bar.stop()
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    rows = [[f"K = {k}", f"{v:.2f}"] for k, v in sorted(res.psnr_by_tokens.items())]
    console.table("held-out PSNR (dB), EMA weights", ["tokens", "PSNR"], rows)
    acc = res.source_recovery_acc
    console.kv("summary", [
        ("run", res.run_dir), ("steps", f"{res.steps}" + (f" (resumed at {res.resumed_from})" if res.resumed_from is not None else "")),
        ("time", f"{res.wall_s:.0f} s, {res.img_per_s:.1f} img/s"), ("PSNR @ K=N", f"{res.psnr:.2f} dB"),
        ("codebook usage", f"{res.codebook_usage:.3f}"), ("source recovery acc", "-" if acc is None else f"{acc:.3f}"),
        ("checkpoint", res.checkpoint), ("pictures", f"{res.run_dir}/preview.png, {res.run_dir}/loss_curve.png"),
    ])
