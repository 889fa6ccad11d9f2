"""End-to-end fine-tuning of the tokenizer's encoder with a classification head (paper A.4, the SimMIM / MAE
protocol) as a `TrainTask` of the one training loop: DDP, bf16 on CUDA, checkpoints and exact resume come from
`loop.fit`; this file supplies the model, timm's augmentation, Mixup / CutMix, losses and layer-decay groups.

Determinism: each image's augmentation draws from a seed derived from (seed, epoch, index) (`FinetuneView`), and
Mixup / CutMix from one derived from (seed, step, micro-batch, rank), each in a private RNG context, so a resumed
run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .. import checkpoint as ck
from ..config.finetune import FinetuneConfig
from ..errors import CheckpointError, ConfigError
from .task import MicroStep, RunSummary, TrainData, TrainTask

__all__ = ["FinetuneNet", "FinetuneResult", "FinetuneTask", "FinetuneView", "layer_decay_groups"]


class FinetuneNet(nn.Module):
    """The encoder at a fixed merge schedule, then LayerNorm + linear over (size-weighted token mean ‖ cls)."""

    def __init__(self, encoder: nn.Module, schedule: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.encoder, self.schedule = encoder, tuple(schedule)
        dim = 2 * encoder.cfg.dim
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        enc = self.encoder(images, self.schedule)
        w = enc.size / enc.size.sum(1, keepdim=True)  # (B, K)
        pooled = (enc.tokens * w[..., None]).sum(1)  # (B, C)
        return self.head(self.norm(torch.cat([pooled, enc.cls], dim=1)))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping: the stem and cls token first, one group per block, then the norm and head in a
        group of their own (BEiT / MAE: the last block's lr is scaled by the decay once, the head's not at all)."""
        return {"stem": r"^encoder\.(?:cls_token|stem)", "blocks": r"^encoder\.blocks\.(\d+)",
                "head": r"^(?:norm|head)\."}


def layer_decay_groups(net: FinetuneNet, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """timm's layer-wise lr decay parameter groups (each with `lr_scale`; no decay on 1-d parameters and cls)."""
    from timm.optim._param_groups import param_groups_layer_decay

    return param_groups_layer_decay(net, weight_decay=weight_decay, layer_decay=layer_decay,
                                    no_weight_decay_list=("encoder.cls_token",))


class FinetuneView:
    """timm's ImageNet training transform (RandomResizedCrop, flip, RandAugment, random erasing) at `size`, into
    [-1, 1], drawing only from a seed taken from the item's generator (global RNGs are left as they were)."""

    def __init__(self, size: int, aug: Any) -> None:
        from timm.data import create_transform

        self.tf = create_transform(
            input_size=size, is_training=True, scale=(aug.scale_min, 1.0), color_jitter=None,
            auto_augment=None if aug.randaug == "none" else aug.randaug, interpolation="bicubic",
            re_prob=aug.reprob, re_mode="pixel", re_count=1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def __call__(self, img: Any, g: torch.Generator) -> dict[str, Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        with _private_rngs(seed):
            return {"image": self.tf(img)}


class _private_rngs:
    """Seed python's, numpy's and torch's CPU RNGs for a block, then put their states back."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.py, self.np, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.torch)


@dataclass
class FinetuneResult:
    run_dir: str
    steps: int
    top1: float  # val top-1 at the last evaluation
    tokens: int
    n_train: int
    n_val: int
    classes: int
    wall_s: float
    img_per_s: float
    checkpoint: str
    resumed_from: int | None = None
    final_losses: dict[str, float] = field(default_factory=dict)
    protocol: str = "finetune"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FinetuneTask(TrainTask):
    kind = "finetune"
    rate_key = "img_per_s"
    count_key = "images"
    loss_key = "loss"

    cfg: FinetuneConfig

    def __init__(self, cfg: FinetuneConfig, run_dir: Path, dist: Any) -> None:
        super().__init__(cfg, run_dir, dist)
        self.last_eval: dict[str, Any] | None = None
        self.last_eval_at: int | None = None

    @classmethod
    def run_stem(cls, recipe_stem: str, cfg: Any) -> str:
        return recipe_stem

    def preflight(self) -> None:
        from ..cache import checkpoint_hash

        path = Path(self.cfg.tokenizer)
        if not (path / "meta.json").is_file():
            raise CheckpointError(f"the tokenizer checkpoint {path} this run fine-tunes is gone (give --ckpt)")
        if checkpoint_hash(path) != self.cfg.tokenizer_hash:
            raise CheckpointError(f"the tokenizer checkpoint {path} changed since this run started")
        mb, aug = self.cfg.train.micro_batch, self.cfg.aug
        if (aug.mixup > 0 or aug.cutmix > 0) and mb % 2:
            raise ConfigError(f"--micro-batch {mb}: Mixup / CutMix need an even micro-batch")

    def _tokenizer(self) -> Any:
        from ..runs import load_tokenizer

        return load_tokenizer(self.cfg.tokenizer, "cpu", channels_last=False)[0]  # trained: left as it was

    def train_data(self, per_step: int) -> TrainData:
        from ..data.labelled import labelled_data

        tok = self._tokenizer()
        self.size = tok.cfg.model.image_size
        d = self.cfg.data
        self.splits = labelled_data(d.train, d.val, self.size, n_train=d.n_train, n_val=d.n_val,
                                    seed=self.cfg.train.seed, train_view=FinetuneView(self.size, self.cfg.aug))
        self._tok = tok
        return TrainData(self.splits.train.dataset)

    def build(self, resume_meta: dict[str, Any] | None) -> None:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        cfg, tc, aug = self.cfg, self.cfg.train, self.cfg.aug
        tok = self._tok
        encoder = tok.encoder  # the EMA weights `load_tokenizer` gives
        encoder.set_drop_path(tc.drop_path)
        net = FinetuneNet(encoder, tok.schedule(cfg.tokens), len(self.splits.classes)).to(self.device)
        del self._tok
        self.model = self.train_net = net
        self.optimizer = torch.optim.AdamW(layer_decay_groups(net, tc.weight_decay, tc.layer_decay), lr=tc.lr,
                                           betas=tc.betas)
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=aug.smoothing,
                               num_classes=len(self.splits.classes))
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif aug.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(aug.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        ck.load_state_strict(self.model, ck.read_tensors(ckpt, "finetune"), f"{ckpt}/finetune")
        self.optimizer.load_state_dict(state["optimizer"])
        meta = ck.read_meta(ckpt)
        self.last_eval, self.last_eval_at = meta.get("last_eval"), meta.get("last_eval_step")

    def distribute(self, wrap: Callable[..., nn.Module]) -> list[nn.Module]:
        self.train_net = wrap(self.model)
        return [self.train_net]

    def start_info(self) -> dict[str, Any]:
        return {"params": sum(p.numel() for p in self.model.parameters()), "train_images": self.splits.train.count,
                "val_images": self.splits.val.count, "tokens": self.cfg.tokens}

    def units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["image"].shape[0])

    def micro_step(self, batch: dict[str, Tensor], ctx: MicroStep) -> dict[str, Tensor | float]:
        from ..data.rng import derive_seed

        x = batch["image"].to(self.device, non_blocking=True)
        y = torch.as_tensor(batch["label"]).to(self.device, non_blocking=True)
        if self.mixup is not None:
            micro = getattr(self, "_micro", 0)
            self._micro = micro + 1
            with _private_rngs(derive_seed(self.cfg.train.seed, ctx.step, micro, self.dist.rank)):
                x, y = self.mixup(x, y)
        with ctx.autocast:
            loss = self.criterion(self.train_net(x).float(), y)
        ctx.backward(loss)
        return {"loss": loss.detach()}

    def begin_step(self, step: int) -> dict[str, Any]:
        self._micro = 0
        return {}

    # ------------------------------------------------------------------ evaluation, checkpoints, result

    @property
    def last_eval_step(self) -> int | None:
        return self.last_eval_at

    @torch.no_grad()
    def evaluate(self, step: int, autocast: Any) -> dict[str, Any]:
        from torch.utils.data import DataLoader

        net = self.model
        net.eval()
        hits = total = 0
        loader = DataLoader(self.splits.val.dataset, batch_size=self.cfg.train.micro_batch,
                            num_workers=self.cfg.data.num_workers, generator=torch.Generator())  # not the global RNG
        for item in loader:
            with autocast:
                pred = net(item["image"].to(self.device)).argmax(1).cpu()
            hits += int((pred == torch.as_tensor(item["label"])).sum())
            total += len(pred)
        net.train()
        self.last_eval, self.last_eval_at = {"top1": hits / max(total, 1), "val_images": total}, step
        return self.last_eval

    def state(self, gather: Callable[[Any], Any]) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        return {"finetune": self.model.state_dict()}

    def meta(self) -> dict[str, Any]:
        return {"tokenizer": self.cfg.tokenizer, "last_eval": self.last_eval, "last_eval_step": self.last_eval_at}

    def result(self, run: RunSummary) -> FinetuneResult:
        ev = self.last_eval or {}
        return FinetuneResult(
            run_dir=str(run.run_dir), steps=run.steps, top1=float(ev.get("top1", float("nan"))), tokens=self.cfg.tokens,
            n_train=self.splits.train.count, n_val=self.splits.val.count, classes=len(self.splits.classes),
            wall_s=run.wall_s, img_per_s=run.rate, checkpoint=str(run.checkpoint), resumed_from=run.resumed_from,
            final_losses=run.final_losses)


def finetune_config(ckpt: Path, data: str, val: str | None, tokens: str | int, world_size: int, *,
                    settings: dict[str, Any], overrides: list[str]) -> FinetuneConfig:
    """The run's config: the tokenizer checkpoint and K, the data, `settings` (`train.lr`...: None = default) and
    `--set` `overrides` on top; warm-up epochs become steps from the training split's size and the process count."""
    import dataclasses

    from ..cache import checkpoint_hash
    from ..config import apply_overrides, build_config, config_from_saved, parse_override
    from ..data.labelled import labelled_data

    tcfg = config_from_saved(ck.read_meta(ckpt, expect_kind="tokenizer")["config"])
    if str(tokens) == "all":
        k = tcfg.model.n_tokens
    else:
        try:
            k = tcfg.check_keep(int(tokens))
        except ValueError:
            raise ConfigError(f"--tokens {tokens!r}: give `all` or a perfect square K") from None
    raw: dict[str, Any] = {"kind": "finetune", "tokenizer": str(ckpt), "tokenizer_hash": checkpoint_hash(ckpt),
                           "tokens": k, "data": {"train": str(data), "val": None if val is None else str(val)},
                           "aug": {}, "train": {}}
    for key, value in settings.items():
        if value is not None:
            section, name = key.split(".")
            raw[section][name] = value
    if "lr" not in raw["train"] and "batch_size" in raw["train"]:
        raw["train"]["lr"] = 5e-4 * raw["train"]["batch_size"] / 256  # the linear scaling rule
    cfg = build_config(FinetuneConfig, apply_overrides(raw, overrides))
    tc = cfg.train
    if tc.micro_batch > tc.batch_size:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, micro_batch=tc.batch_size))
        tc = cfg.train
    n = labelled_data(cfg.data.train, cfg.data.val, tcfg.model.image_size, n_train=cfg.data.n_train,
                      n_val=cfg.data.n_val).train.count
    per_step = tc.micro_batch * world_size
    steps_per_epoch = max(1, (n // per_step) // max(1, tc.batch_size // per_step))
    cadence = {"warmup_steps": round(tc.warmup_epochs * steps_per_epoch)}
    given = {".".join(parse_override(o)[0]) for o in overrides}
    for name, every in (("log_every", max(1, min(50, steps_per_epoch))), ("ckpt_every", steps_per_epoch),
                        ("eval_every", steps_per_epoch * max(1, tc.epochs // 10))):
        if f"train.{name}" not in given:
            cadence[name] = every
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, **cadence))
