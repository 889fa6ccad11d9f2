"""The functions the CLI calls, one per command: each loads what it needs, runs one pipeline of the core and
returns a typed result (with `to_json()`). No printing: long jobs report through a `progress.Progress`.

This module is the top of the core: nothing in `mergevq_core` imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .progress import SILENT, Progress
from .runs import find_tokenizer_checkpoint, load_tokenizer

if TYPE_CHECKING:
    from .data.tokenize import TokenizeResult
    from .eval.gen_metrics import EvalResult
    from .eval.complexity import ARInfo, ModelInfo
    from .eval.probe import ProbeResult
    from .eval.reconstruct import ReconResult
    from .train.finetune_task import FinetuneResult
    from .train.ar_task import ARTrainResult
    from .train.recovery_task import RecoveryTuneResult
    from .train.tokenizer_task import TrainResult

__all__ = ["evaluate", "finetune", "find_tokenizer_checkpoint", "load_tokenizer", "model_info", "probe", "reconstruct",
           "tokenize", "train_ar", "train_tokenizer", "tune_recovery"]


def model_info(recipe: str | Path, *, tokens: int | None = None, overrides: Sequence[str] = ()) -> ModelInfo | ARInfo:
    """`mergevq info`: parameters per part and MACs at K, counted on the meta device (no data, no memory). A
    generator recipe (kind: ar) gives an `ARInfo` (parameters, KV bytes and FLOPs per token)."""
    from .config import ARRunConfig, load_any_config
    from .eval.complexity import generator_info, tokenizer_info

    cfg = load_any_config(recipe, overrides)
    if isinstance(cfg, ARRunConfig):
        return generator_info(cfg, str(recipe))
    return tokenizer_info(cfg, cfg.merge.keep if tokens is None else cfg.check_keep(tokens), str(recipe))


# ----------------------------------------------------------------------------- training

def train_tokenizer(
    recipe: str | Path, overrides: Sequence[str] = (), *, out: str | Path | None = None, resume: bool = False,
    max_steps: int | None = None, seed: int | None = None, device: str | None = None, progress: Progress = SILENT,
) -> TrainResult:
    """`mergevq train-tokenizer`: stage 1 (see `train.tokenizer_task`), under torchrun in every process.

    The run folder is `out`, else `runs/<recipe>-<time>`; with `resume` and no `out`, the newest run of that
    recipe. On resume the run's saved config is used, with `overrides`, `max_steps` and `seed` applied on top."""
    from .train.launch import launch

    return launch("tokenizer", recipe, overrides, {"train.max_steps": max_steps, "train.seed": seed},
                  out=out, resume=resume, device=device, progress=progress)


def train_ar(
    recipe: str | Path, overrides: Sequence[str] = (), *, shards: str | Path | None = None,
    generator: str | None = None, out: str | Path | None = None, resume: bool = False, max_steps: int | None = None,
    seed: int | None = None, device: str | None = None, init: str | Path | None = None, progress: Progress = SILENT,
) -> ARTrainResult:
    """`mergevq train-ar`: stage 2 (see `train.ar_task`) on token shards, under torchrun in every process.

    `shards`, `generator` and `init` override data.tokens, generator.name and train.init. The run folder is `out`,
    else `runs/<recipe>-<generator>-<time>`; with `resume` and no `out`, the newest run of that recipe and
    generator, whose saved config is used with the overrides on top."""
    from .train.launch import launch

    settings = {"data.tokens": shards, "generator.name": generator, "train.max_steps": max_steps, "train.seed": seed,
                "train.init": init}
    return launch("ar", recipe, overrides, settings, out=out, resume=resume, device=device, progress=progress)


# ----------------------------------------------------------------------------- evaluation and stage-2 data


def reconstruct(paths: Sequence[str | Path], *, ckpt: str | Path | None = None, tokens: list[int] | None = None,
                source: str = "gt", out: str | Path = "recon", fid: bool = False, inception_weights: str | None = None,
                photos: bool = False, device: str | None = None, batch: int = 16, workers: int = 0,
                save: int | None = None, save_all: bool = False, cache: str | Path | None = None,
                precision: str = "fp32", progress: Progress = SILENT) -> ReconResult:
    """`mergevq reconstruct`: image files and folders (plus scikit-image's photos) through the tokenizer at each K
    (see `eval.reconstruct.reconstruct_files`), streamed; pictures of the first `save` images (default 32, or all
    with `save_all`) and `per_image.jsonl` go to `out`; the originals' rFID statistics are cached under `cache`
    (default `cache.cache_root()`). `precision`: fp32 or bf16 (autocast, see `precision`). Under torchrun every
    process calls this and the ranks split the images."""
    from .data.photos import photo_paths
    from .dist import cleanup, finished, init_distributed
    from .eval.reconstruct import collect_images, reconstruct_files
    from .precision import check_precision

    precision = check_precision(precision)
    files = collect_images([Path(p) for p in paths] + (photo_paths() if photos else []))
    dist = init_distributed(device)
    try:
        tok, path = load_tokenizer(ckpt, str(dist.device))
        weights = None
        if fid:
            from .eval.fid import resolve_inception_weights

            weights = resolve_inception_weights(inception_weights)  # fails early, before any work
        res = reconstruct_files(tok, path, files, tokens=tokens, source=source, out=out, fid_weights=weights,
                                batch=batch, workers=workers, save=save, save_all=save_all, cache=cache, dist=dist,
                                progress=progress if dist.is_main else SILENT, precision=precision)
        finished()
        return res
    finally:
        cleanup()


def tokenize(data: str | Path, out: str | Path, *, ckpt: str | Path | None = None, tokens: int | None = None,
             tokens_sample: bool = False, views: str = "ten-crop", crop_range: float | None = None,
             limit: int | None = None, device: str | None = None, batch: int = 64, shard_size: int = 4096,
             workers: int = 0, seed: int = 0, precision: str = "fp32", progress: Progress = SILENT) -> TokenizeResult:
    """`mergevq tokenize`: encode a dataset once into token shards for stage 2 (see `data.tokenize`), in
    `precision` (fp32 or bf16 autocast). Under torchrun every process calls this; the ranks split the shards and
    all return the result."""
    from .data.tokenize import tokenize_dataset
    from .dist import cleanup, finished, init_distributed
    from .precision import check_precision

    precision = check_precision(precision)
    dist = init_distributed(device)
    try:
        tok, path = load_tokenizer(ckpt, str(dist.device))
        res = tokenize_dataset(tok, path, data, out, tokens=tokens, tokens_sample=tokens_sample, views=views,
                               crop_range=crop_range, limit=limit, batch=batch, shard_size=shard_size,
                               workers=workers, seed=seed, dist=dist, progress=progress if dist.is_main else SILENT,
                               precision=precision)
        finished()
        return res
    finally:
        cleanup()


def probe(data: str, *, val: str | None = None, ckpt: str | Path | None = None, tokens: str | int = "all",
          epochs: int = 90, lr: float = 1e-3, batch: int = 1024, n_train: int | None = None,
          n_test: int | None = None, out: str | Path = "probe", seed: int = 0, cache: str | Path | None = None,
          workers: int = 0, baseline: bool = True, device: str | None = None,
          progress: Progress = SILENT) -> ProbeResult:
    """`mergevq probe`: linear probe of the frozen encoder and the same probe on raw pixels, trained on `data`
    and tested on `val` (see `eval.probe`). Under torchrun every process calls this; the ranks split the feature
    extraction and all return the result."""
    from .dist import cleanup, finished, init_distributed
    from .eval.probe import run_probe

    dist = init_distributed(device)
    try:
        tok, path = load_tokenizer(ckpt, str(dist.device))
        res = run_probe(tok, path, data, val=val, tokens=tokens, epochs=epochs, lr=lr, batch=batch, n_train=n_train,
                        n_test=n_test, out=out, seed=seed, cache=cache, workers=workers, baseline=baseline,
                        dist=dist, progress=progress if dist.is_main else SILENT)
        finished()
        return res
    finally:
        cleanup()


def finetune(data: str, *, val: str | None = None, ckpt: str | Path | None = None, tokens: str | int = "all",
             epochs: int | None = None, lr: float | None = None, batch: int | None = None,
             micro_batch: int | None = None, n_train: int | None = None, n_test: int | None = None,
             workers: int | None = None, out: str | Path | None = None, resume: bool = False,
             max_steps: int | None = None, seed: int | None = None, overrides: Sequence[str] = (),
             device: str | None = None, progress: Progress = SILENT) -> FinetuneResult:
    """`mergevq probe --protocol finetune`: the encoder plus a head trained end to end on `data`, tested on `val`
    (see `train.finetune_task`); options left None take the protocol's defaults (`config.finetune`), `overrides`
    are `--set` pairs on its config. The run folder is `out`, else `runs/finetune-<tokenizer run>-<time>`."""
    from .train.finetune_task import finetune_config
    from .train.launch import launch_finetune

    path = find_tokenizer_checkpoint(ckpt)
    settings = {"train.epochs": epochs, "train.lr": lr, "train.batch_size": batch, "train.micro_batch": micro_batch,
                "train.max_steps": max_steps, "train.seed": seed, "data.n_train": n_train, "data.n_val": n_test,
                "data.num_workers": workers}

    def make(world_size: int):
        return finetune_config(path, data, val, tokens, world_size, settings=settings, overrides=list(overrides))

    return launch_finetune(make, f"finetune-{path.parent.parent.name}", out=out, resume=resume, device=device,
                           progress=progress)


def evaluate(samples: str | Path | None, ref: str | Path, *, save_stats: str | Path | None = None,
             inception_weights: str | Path | None = None, batch: int = 64, size: int | None = None,
             count: int | None = None, seed: int = 0, precision_recall: bool = True, workers: int = 0,
             device: str | None = None, progress: Progress = SILENT) -> EvalResult:
    """`mergevq evaluate`: gFID, IS and precision / recall of a samples .npz or folder against a reference, both
    streamed in batches (see `eval.gen_metrics.evaluate_samples`); with `samples` None, only the reference's
    statistics, saved at `save_stats`. Under torchrun every process calls this and the ranks split the images."""
    from .dist import cleanup, finished, init_distributed
    from .eval.gen_metrics import evaluate_samples

    dist = init_distributed(device)
    try:
        res = evaluate_samples(samples, ref, weights=inception_weights, batch=batch, seed=seed,
                               precision_recall=precision_recall, size=size, count=count, save_stats=save_stats,
                               workers=workers, dist=dist, progress=progress)
        finished()
        return res
    finally:
        cleanup()


# ----------------------------------------------------------------------------- source recovery after stage 2


def tune_recovery(ckpt: str | Path | None = None, *, shards: str | Path | None = None, tokenizer: str | Path | None = None,
                  replace: float | None = None, predict: str | None = None, temperature: float | None = None,
                  epochs: int | None = None, lr: float | None = None, batch: int | None = None,
                  micro_batch: int | None = None, val_items: int | None = None, workers: int | None = None,
                  max_steps: int | None = None, seed: int | None = None, overrides: Sequence[str] = (),
                  out: str | Path | None = None, resume: bool = False, device: str | None = None,
                  progress: Progress = SILENT) -> RecoveryTuneResult:
    """`mergevq tune-recovery`: fine-tune the tokenizer's source recovery model on the ids of the RandAR run `ckpt`
    (default: the newest randar run), see `train.recovery_task`; options left None take the defaults
    (`config.recovery`, paper Table A2), `overrides` are `--set` pairs on its config. The run folder is `out`, else
    `runs/recovery-<generator run>-<time>`; `generate --recovery RUN` decodes with it. Under torchrun every
    process calls this."""
    from .runs import find_generator_checkpoint
    from .train.launch import launch_configured
    from .train.recovery_task import RecoveryTask, recovery_config

    path = find_generator_checkpoint(ckpt, "randar")
    settings = {"corrupt.replace": replace, "corrupt.predict": predict, "corrupt.temperature": temperature,
                "train.epochs": epochs, "train.lr": lr, "train.batch_size": batch, "train.micro_batch": micro_batch,
                "train.max_steps": max_steps, "train.seed": seed, "data.val_items": val_items,
                "data.num_workers": workers}

    def make(world_size: int):
        return recovery_config(path, world_size, shards=shards, tokenizer=tokenizer, settings=settings,
                               overrides=list(overrides))

    run = path.parent.parent.name if path.parent.name == "checkpoints" else path.name
    return launch_configured(RecoveryTask, make, f"recovery-{run}", out=out, resume=resume, device=device,
                             progress=progress)
