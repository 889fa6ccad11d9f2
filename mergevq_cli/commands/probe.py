"""`mergevq probe`: the linear probe of the frozen tokenizer encoder (against a raw-pixel baseline), or with
`--protocol finetune` the encoder fine-tuned end to end with a head."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, MaxStepsOpt, ResumeOpt, TokenizerOpt, positive, tokens_or_all
from .train_tokenizer import TrainBar, steps_text

EXAMPLES = """
Examples:

  mergevq probe shapes                          # newest tokenizer run, all tokens (no merging), as the paper

  mergevq probe shapes --tokens 9 --json        # after merging to 9 tokens

  torchrun --nproc-per-node 8 -m mergevq_cli probe /data/imagenet/train --val /data/imagenet/val \\
      --ckpt runs/gr-20261130-120000 --workers 8          # features cached: a second run only trains the head

  mergevq probe shapes --protocol finetune --epochs 30 --batch 64 --set aug.mixup=0 --set aug.cutmix=0

  torchrun --nproc-per-node 8 -m mergevq_cli probe /data/imagenet/train --val /data/imagenet/val \\
      --protocol finetune --ckpt runs/r-20261130-120000 --out runs/ft-r --workers 10    # 100 epochs, batch 1024

  mergevq probe shapes --protocol finetune --out runs/ft-r --resume      # after a preemption
"""

_LINEAR_ONLY = ("--cache", "--no-baseline")
_FINETUNE_ONLY = ("--micro-batch", "--resume", "--max-steps", "--set")


def probe(
    data: Annotated[str, typer.Argument(help="`shapes`, or a folder with one subfolder per class (ImageNet's train/).",
                                        show_default=False)],
    val: Annotated[Optional[str], typer.Option("--val", help="A folder of class subfolders to test on (ImageNet's "
                                               "val/); default: shapes' val stream, or 20% of DATA held out.")] = None,
    ckpt: TokenizerOpt = None,
    protocol: Annotated[str, typer.Option("--protocol", help="linear: BN + linear head on frozen features; "
                                          "finetune: the encoder and a head trained end to end.")] = "linear",
    tokens: Annotated[str, typer.Option("--tokens", "-k", callback=tokens_or_all, help="`all` (no merging) or K merged tokens.")] = "all",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Epochs (linear: 90, finetune: 100).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", callback=positive, help="Peak learning rate (linear: 1e-3; finetune: "
                                                "5e-4 × batch / 256).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Global batch size.")] = 1024,
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", min=1, help="finetune: images per process per "
                                                       "forward (default 128; accumulation makes up --batch).")] = None,
    n_train: Annotated[Optional[int], typer.Option("--train", min=1, help="Training images (shapes: generated, default "
                                                   "5000; a folder: at most, default all).")] = None,
    n_test: Annotated[Optional[int], typer.Option("--test", min=1, help="Test images (shapes: default 1000; a folder: at "
                                                  "most, default all).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image-decoding DataLoader workers.")] = 0,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="linear: feature cache folder (default "
                                                  "$MERGEVQ_CACHE or ~/.cache/mergevq).")] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="linear: skip the raw-pixel probe.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="linear: folder for the confusion matrix (default "
                                                "probe/); finetune: the run folder.")] = None,
    resume: ResumeOpt = False,
    max_steps: MaxStepsOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="finetune: override a setting of the "
                                                      "protocol (repeatable), e.g. aug.mixup=0, "
                                                      "train.layer_decay=0.75.")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Linear probe (BN + linear, AdamW, cosine) on frozen encoder features, or end-to-end fine-tuning."""
    from mergevq_core import api

    if protocol not in ("linear", "finetune"):
        raise typer.BadParameter(f"--protocol {protocol!r}: choose linear or finetune")
    given = {"--cache": cache is not None, "--no-baseline": no_baseline, "--micro-batch": micro_batch is not None,
             "--resume": resume, "--max-steps": max_steps is not None, "--set": bool(set_)}
    wrong = [o for o in (_FINETUNE_ONLY if protocol == "linear" else _LINEAR_ONLY) if given[o]]
    if wrong:
        other = "finetune" if protocol == "linear" else "linear"
        raise typer.BadParameter(f"{wrong[0]} applies only to --protocol {other}")
    if protocol == "finetune":
        _finetune(api, data, val, ckpt, tokens, epochs, lr, batch, micro_batch, n_train, n_test, workers, out, resume,
                  max_steps, set_, seed, device, json_)
        return
    with console.BarProgress("img/s", quiet=json_) as bar:
        res = api.probe(data, val=val, ckpt=ckpt, tokens=tokens, epochs=90 if epochs is None else epochs, lr=1e-3 if lr is None else lr, batch=batch,
                        n_train=n_train, n_test=n_test, out=out or Path("probe"), seed=seed, cache=cache,
                        workers=workers, baseline=not no_baseline, device=device, progress=bar)
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    base = "-" if res.baseline_top1 is None else f"{res.baseline_top1:.3f}"
    console.kv(f"linear probe ({res.data} → {res.val})", [
        ("tokenizer", res.ckpt), ("tokens", f"{res.tokens}" + (" (all, no merging)" if tokens == "all" else "")),
        ("split", f"{res.n_train:,} train / {res.n_test:,} test, {len(res.classes)} classes, {res.epochs} epochs, "
                  f"batch {res.batch}"),
        ("top-1", f"{res.top1:.3f} (features {res.feature_dim}-d)"), ("raw-pixel baseline", base),
        ("features", "from the cache" if res.features_cached else f"extracted and cached in {res.cache}"),
        ("confusion matrix", res.confusion_png), ("time", f"{res.wall_s:.1f} s"),
    ])


def _describe(what: str, procs: str, info: dict[str, Any]) -> str:
    return (f"fine-tuning: {what} {info['params'] / 1e6:.2f}M params at K = {info['tokens']} on {info['device']}"
            f"{procs}, batch {info['batch_size']} (accumulation {info['accum']}), {info['train_images']:,} train / "
            f"{info['val_images']:,} val images → {info['run_dir']}")


def _eval_line(step: int, res: dict[str, Any]) -> str:
    return f"step {step}: val top-1 {res['top1']:.3f} ({res['val_images']:,} images)"


def _finetune(api: Any, data: str, val: str | None, ckpt: Path | None, tokens: str, epochs: int | None,
              lr: float | None, batch: int, micro_batch: int | None, n_train: int | None, n_test: int | None,
              workers: int, out: Path | None, resume: bool, max_steps: int | None, set_: list[str] | None, seed: int,
              device: str, json_: bool) -> None:
    with TrainBar("img/s", ("loss",), json_, _describe, _eval_line) as bar:
        res = api.finetune(data, val=val, ckpt=ckpt, tokens=tokens, epochs=epochs, lr=lr, batch=batch,
                           micro_batch=micro_batch, n_train=n_train, n_test=n_test, workers=workers, out=out,
                           resume=resume, max_steps=max_steps, seed=seed, overrides=tuple(set_ or ()), device=device,
                           progress=bar)
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    console.kv(f"fine-tuning ({data})", [
        ("run", res.run_dir), ("steps", steps_text(res)), ("tokens", str(res.tokens)),
        ("split", f"{res.n_train:,} train / {res.n_val:,} val, {res.classes} classes"),
        ("val top-1", f"{res.top1:.3f}"), ("time", f"{res.wall_s:.0f} s, {res.img_per_s:.1f} img/s"),
        ("checkpoint", res.checkpoint),
    ])
