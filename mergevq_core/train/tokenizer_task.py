"""Stage-1 training: the MergeVQ tokenizer with its discriminator, EMA, checkpoints and evaluation, as a
`TrainTask` of the one training loop (`loop.fit`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..errors import ConfigError, DataError
from ..tome import KeepSampler
from .. import checkpoint as ck
from .ema import EMA
from .optim import adamw
from .task import EvalHook, MicroStep, RunSummary, TrainData, TrainTask

__all__ = ["TokenizerTask", "TrainResult", "preflight"]


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


def _imagenet_to_signed(x: Tensor) -> Tensor:
    from ..data.views import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean) * 2 - 1


class TokenizerTask(TrainTask):
    """The tokenizer (`model`, optimizer `opt_g`) with an EMA copy for evaluation and the alignment teacher, an
    optional PatchGAN discriminator with LeCam (`opt_d`, from `loss.gan_start`), LPIPS, a DINOv2 or EMA teacher
    and K drawn per step from `keep_gen`."""

    kind = "tokenizer"
    rate_key = "img_per_s"
    count_key = "images"
    loss_key = "total"

    def __init__(self, cfg: RunConfig, run_dir: Path, dist: Any) -> None:
        super().__init__(cfg, run_dir, dist)
        self.align = _uses_align(cfg)
        self.fmt = torch.channels_last if self.cuda else torch.contiguous_format
        self.last_eval: dict[str, Any] | None = None  # restored from meta.json; a resumed run still evaluates anew
        self.last_eval_at: int | None = None
        self.held_out: Tensor | None = None

    def preflight(self) -> None:
        preflight(self.cfg)

    def train_data(self, per_step: int) -> TrainData:
        from ..data import build_dataset

        self.train_set = build_dataset(self.cfg, "train", align=self.align)
        return TrainData(self.train_set)

    def build(self, resume_meta: dict[str, Any] | None) -> None:
        from ..losses import LPIPS, DinoCE, DinoV2Teacher, LeCam, PatchDiscriminator, check_perceptual, check_teacher
        from ..models import build_tokenizer
        from ..models.dinov2_init import init_from_dinov2
        from .tokenizer_step import TokenizerObjective

        cfg, tc, lc, device, fmt = self.cfg, self.cfg.train, self.cfg.loss, self.device, self.fmt
        tok = build_tokenizer(cfg)
        if resume_meta is None and cfg.model.encoder.init == "dinov2":
            init_from_dinov2(tok.encoder, cfg.model.encoder.dinov2_weights)
        tok.to(device, memory_format=fmt)
        lpips = LPIPS(check_perceptual(lc)).to(device) if lc.perceptual_weight > 0 else None
        disc = PatchDiscriminator(ndf=lc.disc_ndf, n_layers=lc.disc_layers).to(device, memory_format=fmt) if lc.gan_weight > 0 else None
        self.lecam = LeCam(lc.lecam_decay).to(device) if disc is not None else None
        align = self.align
        self.teacher = DinoV2Teacher(check_teacher(lc)).to(device) if align and lc.align_teacher == "dinov2" else None
        self.dino_ce = DinoCE(cfg.model.align_head.out_dim).to(device) if align and (lc.align_loss == "ce" or lc.align_teacher == "ema") else None
        self.objective = TokenizerObjective(tok, cfg, lpips, self.dino_ce)
        self.ema = EMA(tok, tc.ema_decay)
        self.model, self.disc = tok, disc
        self.optimizer = adamw(list(tok.parameters()), tc, fused=self.cuda)
        self.opt_d = adamw(list(disc.parameters()), tc, fused=self.cuda) if disc is not None else None
        self.keep_gen = torch.Generator().manual_seed(tc.seed + 1)
        self.keeps = KeepSampler(cfg.merge.keep, cfg.model.n_tokens, cfg.merge.sampler, cfg.merge.candidates, cfg.min_keep)
        self.train_objective: nn.Module = self.objective
        self.train_disc = disc

    def restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        ck.load_state_strict(self.model, ck.read_tensors(ckpt, "tokenizer"), f"{ckpt}/tokenizer")
        ck.load_state_strict(self.ema.model, ck.read_tensors(ckpt, "ema"), f"{ckpt}/ema")
        self.optimizer.load_state_dict(state["opt_g"])
        if self.disc is not None:
            dsd = ck.read_tensors(ckpt, "disc")
            ck.load_state_strict(self.disc, {k[5:]: v for k, v in dsd.items() if k.startswith("disc.")}, f"{ckpt}/disc")
            ck.load_state_strict(self.lecam, {k[6:]: v for k, v in dsd.items() if k.startswith("lecam.")}, f"{ckpt}/lecam")
            self.opt_d.load_state_dict(state["opt_d"])
        if self.dino_ce is not None:
            self.dino_ce.load_state_dict(state["dino_ce"])
        self.keep_gen.set_state(state["keep_gen"])
        self.last_eval = ck.read_meta(ckpt).get("last_eval")  # the result of a resumed run that had finished

    def distribute(self, wrap: Callable[..., nn.Module]) -> list[nn.Module]:
        tok, obj = self.model, self.objective
        unused = (tok.align_head is not None and not obj.uses_align()) or (tok.recovery is not None and not obj.uses_recovery())
        self.train_objective = wrap(obj, find_unused_parameters=unused)
        self.train_disc = wrap(self.disc) if self.disc is not None else None
        return [m for m in (self.train_objective, self.train_disc) if m is not None]

    def prepare_eval(self) -> None:
        from ..data import build_dataset

        val = build_dataset(self.cfg, "val", align=False)
        n = min(self.cfg.train.eval_images, len(val))
        self.held_out = torch.stack([val[i]["image"] for i in range(n)]).to(self.device)

    def start_info(self) -> dict[str, Any]:
        return {"params": sum(p.numel() for p in self.model.parameters()), "train_images": len(self.train_set)}

    # ------------------------------------------------------------------ one optimizer step

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.opt_d] if self.opt_d is not None else [])

    def begin_step(self, step: int) -> dict[str, Any]:
        self.gan_on = self.disc is not None and step >= self.cfg.loss.gan_start
        return {"tokens": self.keeps.sample(self.keep_gen)}

    def units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["image"].shape[0])

    def micro_step(self, batch: dict[str, Tensor], ctx: MicroStep) -> dict[str, Tensor | float]:
        from ..losses import d_loss

        k, disc, autocast = ctx.info["tokens"], self.disc, ctx.autocast
        x = batch["image"].to(self.device, non_blocking=True, memory_format=self.fmt)
        student = batch["student"].to(self.device, non_blocking=True) if self.align else None
        target = None
        if self.align:
            with torch.no_grad(), autocast:
                tv = batch["teacher"].to(self.device, non_blocking=True)
                if self.teacher is not None:
                    target = self.teacher(tv)
                else:  # EMA self-distillation: the EMA tokenizer sees the teacher view in [-1, 1]
                    target = self.ema.model.align_features(_imagenet_to_signed(tv), k)
        if disc is not None:
            disc.requires_grad_(False)
        with autocast:
            loss, terms, recon = self.train_objective(x, k, student, target, disc if self.gan_on else None)
        ctx.backward(loss)
        if self.gan_on:
            disc.requires_grad_(True)
            with autocast:
                dl, dlogs = d_loss(self.train_disc, self.lecam, x, recon.detach(), self.cfg.loss.lecam_weight,
                                   self.cfg.loss.disc_weight)
            ctx.backward(dl)
            terms = {**terms, "d_loss": dl.detach(), **dlogs}
        if self.dino_ce is not None and target is not None:
            self.dino_ce.update_center(target.float())
        return terms

    def after_step(self, ctx: MicroStep) -> None:
        if self.gan_on:
            ctx.scaler.unscale_(self.opt_d)
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), ctx.grad_clip)
            ctx.scaler.step(self.opt_d)
            self.opt_d.zero_grad(set_to_none=True)
        self.ema.update(self.model)

    # ------------------------------------------------------------------ evaluation, checkpoints, result

    @property
    def last_eval_step(self) -> int | None:
        return self.last_eval_at

    def evaluate(self, step: int, autocast: Any) -> dict[str, Any]:
        from ..eval.tokenizer_eval import evaluate_tokenizer, save_preview

        cfg, held_out = self.cfg, self.held_out
        res, previews = evaluate_tokenizer(self.ema.model, held_out, cfg.eval_tokens, cfg.merge.keep, autocast=autocast)
        save_preview(self.run_dir / "preview.png", held_out[:8], previews)
        self.last_eval, self.last_eval_at = res.to_json(), step
        return self.last_eval

    def eval_hooks(self) -> list[EvalHook]:
        return [self.plot_curves]

    def plot_curves(self, run_dir: Path, rows: list[dict[str, Any]]) -> None:
        from ..eval.plots import plot_training_curves

        plot_training_curves(rows, run_dir / "loss_curve.png", title=f"{self.cfg.model.name} ({run_dir.name})")

    def state(self, gather: Callable[[Any], Any]) -> dict[str, Any]:
        state = {"opt_g": self.optimizer.state_dict(), "keep_gen": self.keep_gen.get_state()}
        if self.opt_d is not None:
            state["opt_d"] = self.opt_d.state_dict()
        if self.dino_ce is not None:
            state["dino_ce"] = self.dino_ce.state_dict()
        return state

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        tensors = {"tokenizer": self.model.state_dict(), "ema": self.ema.model.state_dict()}
        if self.disc is not None:
            tensors["disc"] = {**{f"disc.{k}": v for k, v in self.disc.state_dict().items()},
                               **{f"lecam.{k}": v for k, v in self.lecam.state_dict().items()}}
        return tensors

    def meta(self) -> dict[str, Any]:
        return {"variant": self.cfg.model.name, "last_eval": self.last_eval}

    def result(self, run: RunSummary) -> TrainResult:
        ev = self.last_eval or {}
        psnr_k = {int(k): v for k, v in ev.get("psnr_by_tokens", {}).items()}
        return TrainResult(
            run_dir=str(run.run_dir), steps=run.steps, wall_s=run.wall_s, img_per_s=run.rate,
            psnr=psnr_k.get(self.cfg.model.n_tokens, float("nan")), psnr_by_tokens=psnr_k,
            codebook_usage=ev.get("codebook_usage", float("nan")), source_recovery_acc=ev.get("source_recovery_acc"),
            checkpoint=str(run.checkpoint), resumed_from=run.resumed_from, eval_images=ev.get("images", 0),
            final_losses=run.final_losses,
        )
