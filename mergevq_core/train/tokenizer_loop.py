"""Stage-1 training: the MergeVQ tokenizer with its discriminator, EMA, checkpoints and evaluation.

Runs as one process or under torchrun (DDP). Every random choice comes from seeded generators whose state is
checkpointed, and the data order is a pure function of (seed, epoch, position), so `--resume` continues the
exact run: on CPU the metrics after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..config import RunConfig, config_to_dict
from ..errors import CheckpointError, ConfigError, DataError, MergeVQError
from ..tome import KeepSampler
from . import checkpoint as ck
from .dist import DistInfo, all_reduce_mean
from .ema import EMA
from .optim import adamw, lr_at, set_lr



class TrainingDiverged(MergeVQError):
    """A loss or gradient became NaN/inf; nothing was saved after the last good checkpoint."""


@dataclass
class TrainHooks:
    """Callbacks for a front end (the CLI's progress bar); all run on rank 0 only."""

    on_start: Callable[[dict[str, Any]], None] = lambda info: None
    on_step: Callable[[int, dict[str, float]], None] = lambda step, terms: None
    on_log: Callable[[dict[str, Any]], None] = lambda row: None
    on_eval: Callable[[int, dict[str, Any]], None] = lambda step, res: None
    on_checkpoint: Callable[[int, Path], None] = lambda step, path: None


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    wall_s: float
    img_per_s: float
    psnr: float  # held-out PSNR (dB) at K = N
    psnr_by_tokens: dict[int, float]
    codebook_usage: float
    source_recovery_acc: float | None
    checkpoint: str
    resumed_from: int | None = None
    eval_images: int = 0
    final_losses: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["psnr_by_tokens"] = {str(k): v for k, v in self.psnr_by_tokens.items()}
        return d


# ----------------------------------------------------------------------------- checks before the first step


def preflight(cfg: RunConfig) -> None:
    """Every missing file or folder, in one line, before anything is built."""
    from ..losses import check_perceptual, check_teacher

    problems = []
    if cfg.data.source == "imagefolder":
        if cfg.data.root is None:
            problems.append("data.root is not set (an image folder, e.g. ImageNet train/: --set data.root=PATH)")
        elif not Path(cfg.data.root).expanduser().is_dir():
            problems.append(f"data folder not found: {cfg.data.root} (set data.root)")
        if cfg.data.val_root is not None and not Path(cfg.data.val_root).expanduser().is_dir():
            problems.append(f"validation folder not found: {cfg.data.val_root} (set data.val_root)")
    enc = cfg.model.encoder
    if enc.init == "dinov2":
        if enc.dinov2_weights is None:
            problems.append("model.encoder.init=dinov2 needs DINOv2 weights (set model.encoder.dinov2_weights=PATH, or model.encoder.init=random)")
        elif not Path(enc.dinov2_weights).expanduser().is_file():
            problems.append(f"DINOv2 init weights not found: {enc.dinov2_weights} (set model.encoder.dinov2_weights)")
    for check in (check_perceptual, check_teacher):
        try:
            check(cfg.loss)
        except (ConfigError, DataError) as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("cannot start training: " + "; ".join(problems))


def _uses_align(cfg: RunConfig) -> bool:
    return cfg.loss.align_weight > 0 and cfg.model.align_head.kind != "none" and cfg.loss.align_teacher != "none"


# ----------------------------------------------------------------------------- data


class BatchStream:
    """Endless micro-batches over epochs with an exact, checkpointable position."""

    def __init__(self, dataset, micro_batch: int, seed: int, num_workers: int, dist: DistInfo,
                 collate_fn: Callable | None = None, what: str = "training images") -> None:
        from ..data import ResumableSampler

        self.dataset = dataset
        self.sampler = ResumableSampler(len(dataset), micro_batch, seed=seed, rank=dist.rank,
                                        world_size=dist.world_size, shuffle=True, drop_last=True)
        if self.sampler.batches_per_epoch < 1:
            raise DataError(f"{len(dataset)} {what} are fewer than one batch of {micro_batch} per process")
        self.kwargs = dict(batch_size=micro_batch, num_workers=num_workers, drop_last=True, collate_fn=collate_fn,
                           pin_memory=dist.device.type == "cuda", persistent_workers=False)
        self.epoch, self.done = 0, 0
        self._it = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.done}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.done = int(state["epoch"]), int(state["batches_done"])
        self._it = None

    def next(self) -> dict[str, Tensor]:
        while True:
            if self._it is None:
                self.sampler.set_position(self.epoch, self.done)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch)
                self._it = iter(DataLoader(self.dataset, sampler=self.sampler, **self.kwargs))
            try:
                batch = next(self._it)
                self.done += 1
                return batch
            except StopIteration:
                self.epoch, self.done, self._it = self.epoch + 1, 0, None


def _held_out(dataset, n: int) -> Tensor:
    n = min(n, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


# ----------------------------------------------------------------------------- the loop


def fit_tokenizer(
    cfg: RunConfig, run_dir: Path, dist: DistInfo, resume: bool = False, hooks: TrainHooks | None = None,
) -> TrainResult:
    from ..data import build_dataset
    from ..eval.plots import plot_training_curves
    from ..eval.tokenizer_eval import evaluate_tokenizer, save_preview
    from ..losses import LPIPS, DinoCE, DinoV2Teacher, LeCam, PatchDiscriminator, check_perceptual, check_teacher, d_loss
    from ..models import build_tokenizer
    from ..models.dinov2_init import init_from_dinov2
    from .tokenizer_step import TokenizerObjective

    hooks = hooks or TrainHooks()
    tc, lc, device = cfg.train, cfg.loss, dist.device
    run_dir = Path(run_dir)
    ckpt = ck.latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume and ckpt is None:
        raise CheckpointError(f"nothing to resume: {run_dir} holds no checkpoint")
    if not resume and ckpt is not None:
        raise ConfigError(f"{run_dir} already holds a run (step {ck.read_meta(ckpt)['step']}): pass --resume to continue it, or --out for a new folder")
    preflight(cfg)
    per_step = tc.micro_batch * dist.world_size
    if tc.batch_size % per_step:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not a multiple of micro_batch × processes = {per_step}")
    accum = tc.batch_size // per_step
    align = _uses_align(cfg)
    train_set = build_dataset(cfg, "train", align=align)
    stream = BatchStream(train_set, tc.micro_batch, tc.seed, cfg.data.num_workers, dist)
    steps_per_epoch = max(1, stream.sampler.batches_per_epoch // accum)
    total = tc.max_steps or tc.epochs * steps_per_epoch

    torch.manual_seed(tc.seed)
    tok = build_tokenizer(cfg)
    if ckpt is None and cfg.model.encoder.init == "dinov2":
        init_from_dinov2(tok.encoder, cfg.model.encoder.dinov2_weights)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    tok.to(device, memory_format=fmt)
    lpips = LPIPS(check_perceptual(lc)).to(device) if lc.perceptual_weight > 0 else None
    disc = PatchDiscriminator(ndf=lc.disc_ndf, n_layers=lc.disc_layers).to(device, memory_format=fmt) if lc.gan_weight > 0 else None
    lecam = LeCam(lc.lecam_decay).to(device) if disc is not None else None
    teacher = DinoV2Teacher(check_teacher(lc)).to(device) if align and lc.align_teacher == "dinov2" else None
    dino_ce = DinoCE(cfg.model.align_head.out_dim).to(device) if align and (lc.align_loss == "ce" or lc.align_teacher == "ema") else None
    objective = TokenizerObjective(tok, cfg, lpips, dino_ce)
    ema = EMA(tok, tc.ema_decay)
    opt_g = adamw(list(tok.parameters()), tc, fused=cuda)
    opt_d = adamw(list(disc.parameters()), tc, fused=cuda) if disc is not None else None
    scaler = torch.amp.GradScaler(device.type, enabled=cuda and tc.precision == "fp16")
    keep_gen = torch.Generator().manual_seed(tc.seed + 1)
    keeps = KeepSampler(cfg.merge.keep, cfg.model.n_tokens, cfg.merge.sampler, cfg.merge.candidates, cfg.min_keep)
    acc: dict[str, float] = {}
    acc_n, step, wall_before, images_before = 0, 0, 0.0, 0

    if ckpt is not None:  # restore everything the next step depends on
        st = ck.read_train_state(ckpt)
        ck.load_state_strict(tok, ck.read_tensors(ckpt, "tokenizer"), f"{ckpt}/tokenizer")
        ck.load_state_strict(ema.model, ck.read_tensors(ckpt, "ema"), f"{ckpt}/ema")
        opt_g.load_state_dict(st["opt_g"])
        if disc is not None:
            dsd = ck.read_tensors(ckpt, "disc")
            ck.load_state_strict(disc, {k[5:]: v for k, v in dsd.items() if k.startswith("disc.")}, f"{ckpt}/disc")
            ck.load_state_strict(lecam, {k[6:]: v for k, v in dsd.items() if k.startswith("lecam.")}, f"{ckpt}/lecam")
            opt_d.load_state_dict(st["opt_d"])
        if dino_ce is not None:
            dino_ce.load_state_dict(st["dino_ce"])
        scaler.load_state_dict(st["scaler"])
        keep_gen.set_state(st["keep_gen"])
        torch.set_rng_state(st["torch_rng"])
        data_state = st["data"]
        if isinstance(data_state, list):  # one entry per rank of the run that saved it
            data_state = data_state[dist.rank] if len(data_state) == dist.world_size else data_state[0]
        stream.load_state(data_state)
        acc, acc_n = dict(st["log_acc"]), int(st["log_n"])
        step, wall_before, images_before = int(st["step"]), float(st["wall_s"]), int(st["images"])

    model = objective
    disc_train = disc
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        unused = (tok.align_head is not None and not objective.uses_align()) or (tok.recovery is not None and not objective.uses_recovery())
        ids = [device.index] if cuda else None
        model = DDP(objective, device_ids=ids, find_unused_parameters=unused)
        disc_train = DDP(disc, device_ids=ids) if disc is not None else None

    metrics_path = run_dir / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    held_out = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        if ckpt is not None and metrics_path.exists():  # drop what the interrupted run logged after its checkpoint
            rows = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["step"] <= step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        held_out = _held_out(build_dataset(cfg, "val", align=False), tc.eval_images).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if tc.precision == "bf16" else torch.float16,
                              enabled=cuda and tc.precision != "fp32")

    def save(at: int) -> Path:
        state = {
            "step": at, "opt_g": opt_g.state_dict(), "scaler": scaler.state_dict(), "keep_gen": keep_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "data": _gather_data_state(stream.state(), dist), "log_acc": acc,
            "log_n": acc_n, "wall_s": wall_before + (time.perf_counter() - t0), "images": images,
        }
        tensors = {"tokenizer": tok.state_dict(), "ema": ema.model.state_dict()}
        if disc is not None:
            state["opt_d"] = opt_d.state_dict()
            tensors["disc"] = {**{f"disc.{k}": v for k, v in disc.state_dict().items()},
                               **{f"lecam.{k}": v for k, v in lecam.state_dict().items()}}
        if dino_ce is not None:
            state["dino_ce"] = dino_ce.state_dict()
        if not dist.is_main:
            return run_dir
        meta = {"kind": "tokenizer", "variant": cfg.model.name, "config": config_to_dict(cfg), "world_size": dist.world_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "last_eval": last_eval}
        path = ck.save_checkpoint(run_dir, at, tensors, state, meta)
        hooks.on_checkpoint(at, path)
        return path

    def evaluate(at: int) -> dict[str, Any]:
        res, previews = evaluate_tokenizer(ema.model, held_out, cfg.eval_tokens, cfg.merge.keep, autocast=autocast)
        save_preview(run_dir / "preview.png", held_out[:8], previews)
        row = {"step": at, "eval": res.to_json()}
        rows.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        plot_training_curves(rows, run_dir / "loss_curve.png", title=f"{cfg.model.name} ({run_dir.name})")
        hooks.on_eval(at, row["eval"])
        return row["eval"]

    if dist.is_main:
        hooks.on_start({"run_dir": str(run_dir), "total_steps": total, "start_step": step, "device": str(device),
                        "world_size": dist.world_size, "accum": accum, "batch_size": tc.batch_size,
                        "params": sum(p.numel() for p in tok.parameters()), "train_images": len(train_set),
                        "resumed": ckpt is not None})
    resumed_from = step if ckpt is not None else None
    last_eval: dict[str, Any] | None = None
    images = images_before
    t0 = time.perf_counter()
    t_log, images_log = t0, images
    tok.train()
    last_path = ckpt
    while step < total:
        k = keeps.sample(keep_gen)
        lr = lr_at(step, tc, total)
        set_lr(opt_g, lr)
        if opt_d is not None:
            set_lr(opt_d, lr)
        gan_on = disc is not None and step >= lc.gan_start
        step_terms: dict[str, float] = {}
        for micro in range(accum):
            batch = stream.next()
            x = batch["image"].to(device, non_blocking=True, memory_format=fmt)
            student = batch["student"].to(device, non_blocking=True) if align else None
            target = None
            if align:
                with torch.no_grad(), autocast:
                    tv = batch["teacher"].to(device, non_blocking=True)
                    if teacher is not None:
                        target = teacher(tv)
                    else:  # EMA self-distillation: the EMA tokenizer sees the teacher view in [-1, 1]
                        target = ema.model.align_features(_imagenet_to_signed(tv), k)
            sync = micro == accum - 1
            with (contextlib.nullcontext() if sync or not dist.enabled else model.no_sync()):
                if disc is not None:
                    disc.requires_grad_(False)
                with autocast:
                    loss, terms, recon = model(x, k, student, target, disc if gan_on else None)
                scaler.scale(loss / accum).backward()
            if gan_on:
                disc.requires_grad_(True)
                with (contextlib.nullcontext() if sync or not dist.enabled else disc_train.no_sync()), autocast:
                    dl, dlogs = d_loss(disc_train, lecam, x, recon.detach(), lc.lecam_weight)
                scaler.scale(dl / accum).backward()
                terms = {**terms, "d_loss": dl.detach(), **dlogs}
            if dino_ce is not None and target is not None:
                dino_ce.update_center(target.float())
            for name, v in terms.items():
                step_terms[name] = step_terms.get(name, 0.0) + float(v.detach() if isinstance(v, Tensor) else v) / accum
        scaler.unscale_(opt_g)
        gnorm = torch.nn.utils.clip_grad_norm_(tok.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        bad = torch.tensor([0.0 if math.isfinite(step_terms["total"]) and math.isfinite(float(gnorm)) else 1.0])
        if float(all_reduce_mean(bad.to(device))) > 0 and not scaler.is_enabled():
            where = f"; the last good checkpoint is {last_path}" if last_path else "; no checkpoint was written yet"
            raise TrainingDiverged(
                f"training diverged at step {step}: total loss {step_terms['total']:.4g}, gradient norm {float(gnorm):.4g} "
                f"(terms: {', '.join(f'{n}={v:.3g}' for n, v in step_terms.items())}){where}"
            )
        scaler.step(opt_g)
        if gan_on:
            scaler.unscale_(opt_d)
            torch.nn.utils.clip_grad_norm_(disc.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            scaler.step(opt_d)
            opt_d.zero_grad(set_to_none=True)
        scaler.update()
        opt_g.zero_grad(set_to_none=True)
        ema.update(tok)
        step += 1
        images += tc.batch_size
        step_terms["grad_norm"] = float(gnorm)
        for name, v in step_terms.items():
            acc[name] = acc.get(name, 0.0) + v
        acc_n += 1
        if dist.is_main:
            hooks.on_step(step, {**step_terms, "lr": lr, "tokens": k})
        if step % tc.log_every == 0 or step == total:
            now = time.perf_counter()
            row = {"step": step, "epoch": stream.epoch, "lr": lr, "tokens": k,
                   "loss": {n: v / acc_n for n, v in acc.items()},
                   "img_per_s": (images - images_log) / max(now - t_log, 1e-9), "elapsed_s": wall_before + now - t0}
            acc, acc_n, t_log, images_log = {}, 0, now, images
            if dist.is_main:
                rows.append(row)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                hooks.on_log(row)
        if dist.is_main and (step % tc.eval_every == 0 or step == total):
            last_eval = evaluate(step)
        if step % tc.ckpt_every == 0 or step == total:
            last_path = save(step)

    wall = time.perf_counter() - t0
    if last_eval is None and dist.is_main:  # resumed at the end: evaluate what is there
        last_eval = evaluate(step)
    final = next((dict(r["loss"]) for r in reversed(rows) if "loss" in r), {})
    psnr_k = {int(kk): v for kk, v in (last_eval or {}).get("psnr_by_tokens", {}).items()}
    return TrainResult(
        run_dir=str(run_dir), steps=step, wall_s=wall,
        img_per_s=(images - images_before) / wall if wall > 0 else 0.0,
        psnr=psnr_k.get(cfg.model.n_tokens, float("nan")), psnr_by_tokens=psnr_k,
        codebook_usage=(last_eval or {}).get("codebook_usage", float("nan")),
        source_recovery_acc=(last_eval or {}).get("source_recovery_acc"),
        checkpoint=str(last_path), resumed_from=resumed_from, eval_images=(last_eval or {}).get("images", 0),
        final_losses=final,
    )


def _imagenet_to_signed(x: Tensor) -> Tensor:
    from ..data.views import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean) * 2 - 1


def _gather_data_state(state: dict[str, int], dist: DistInfo) -> list[dict[str, int]] | dict[str, int]:
    """Each rank's data position (they advance in lockstep, so rank 0's is everyone's; kept per rank anyway)."""
    if not dist.enabled:
        return state
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, state)
    return out

