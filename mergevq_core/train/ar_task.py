"""Stage-2 training: a generator (llamagen | mergear | randar) on token shards from `mergevq tokenize`, as a
`TrainTask` of the one training loop (`loop.fit`).

AdamW with weight decay on matrices only, warmup + decay as a pure function of the step, label drop for
classifier-free guidance, optional label smoothing; the label-drop and order generator is checkpointed per rank.
The validation loss on held-out items is deterministic (no label drop, fixed RandAR orders), so curves of
different runs compare.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import ARRunConfig
from ..errors import CheckpointError, ConfigError, DataError
from .. import checkpoint as ck
from .loop import this_rank
from .optim import adamw
from .task import EvalHook, MicroStep, RunSummary, TrainData, TrainTask

__all__ = ["ARTask", "ARTrainResult", "build_from_config", "open_shards", "shard_summary"]

VAL_ORDER_SEED = 1234


@dataclass
class ARTrainResult:
    run_dir: str
    generator: str
    steps: int
    wall_s: float
    tokens_per_s: float
    val_loss: float
    val_losses: list[tuple[int, float]]
    params: int
    checkpoint: str
    tokenizer: dict[str, Any]
    resumed_from: int | None = None
    final_losses: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["val_losses"] = [{"step": s, "val_loss": v} for s, v in self.val_losses]
        return d


def open_shards(tokens: str | Path | None):
    from ..data.codes import TokenShards

    if tokens is None:
        raise ConfigError("no token shards given: pass --shards DIR (made by `mergevq tokenize`) or set data.tokens")
    path = Path(tokens).expanduser()
    if not path.is_dir():
        raise DataError(f"token shards not found: {path} (make them with `mergevq tokenize DATA --out {path}`)")
    return TokenShards(path)


def shard_summary(shards) -> dict[str, Any]:
    """Counts of K (over every view) and the number of classes, read from the shard files (labels -1 = unknown)."""
    from safetensors import safe_open

    ks: Counter[int] = shards.k_counts()  # over every view
    top = -1
    for f in shards.files:
        with safe_open(str(f), "pt") as t:
            lab = t.get_tensor("label")
            top = max(top, int(lab.max()) if lab.numel() else -1)
    info = shards.manifest.get("dataset", {})
    num_classes = int(info.get("num_classes") or max(top + 1, 1))
    return {"k_counts": dict(sorted(ks.items())), "common_k": ks.most_common(1)[0][0] if ks else shards.n_tokens,
            "num_classes": num_classes, "max_label": top}


def build_from_config(cfg: ARRunConfig, shards, summary: dict[str, Any]):
    """The generator a recipe describes, sized by the shards; checks the recipe agrees with them."""
    from ..generators import build_generator
    from ..models.gpt import gpt_config_from_recipe

    m = cfg.model
    checks = [("model.vocab_size", m.vocab_size, shards.codebook_size), ("model.n_tokens", m.n_tokens, shards.n_tokens)]
    bad = [f"{name}={a} but the shards have {b}" for name, a, b in checks if a is not None and a != b]
    if m.num_classes is not None and summary["max_label"] >= m.num_classes:
        bad.append(f"model.num_classes={m.num_classes} but the shards hold label {summary['max_label']}")
    if bad:
        raise ConfigError("the recipe does not match the token shards: " + "; ".join(bad) + " (fix the recipe or set them to null)")
    gpt_cfg = gpt_config_from_recipe(cfg.model, shards.codebook_size, shards.n_tokens, summary["num_classes"])
    return build_generator(cfg.generator.name, gpt_cfg, **cfg.generator_options(summary["common_k"]))


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class ARTask(TrainTask):
    """A generator (`model`, optimizer `opt`) trained by teacher forcing; `aux_gen` (one per rank) draws the label
    drop and RandAR's orders. The last `data.val_items` shard items are held out."""

    kind = "ar"
    rate_key = "tok_per_s"
    count_key = "tokens"
    loss_key = "ce"
    eval_at_start = True  # the untrained model's loss, for the curve

    def __init__(self, cfg: ARRunConfig, run_dir: Path, dist: Any) -> None:
        super().__init__(cfg, run_dir, dist)
        self.name = cfg.generator.name
        self.val_hist: list[tuple[int, float]] = []
        self.init_from: str | None = None

    @classmethod
    def run_stem(cls, recipe_stem: str, cfg: ARRunConfig) -> str:
        return f"{recipe_stem}-{cfg.generator.name}"

    @property
    def generator(self) -> str | None:
        return self.name

    def train_data(self, per_step: int) -> TrainData:
        from torch.utils.data import Subset

        from ..data.codes import EpochViews, collate_tokens

        shards = self.shards = open_shards(self.cfg.data.tokens)
        self.summary = shard_summary(shards)
        n_val = min(self.cfg.data.val_items, len(shards) // 5)
        if n_val < 1 or len(shards) - n_val < per_step:
            raise DataError(f"{shards.dir} holds {len(shards)} items: too few for a validation split and one batch of {per_step}")
        # one view per item and epoch (a pure function of seed, epoch and item: resume draws the same); the
        # held-out items are always seen in view 0, the centre view, so validation curves compare across epochs
        self.train_set = EpochViews(shards, range(len(shards) - n_val), self.cfg.train.seed)
        self.val_set = Subset(shards, range(len(shards) - n_val, len(shards)))
        self.tokenizer = {"checkpoint": shards.manifest["tokenizer"].get("checkpoint", ""), "hash": shards.tokenizer_hash}
        return TrainData(self.train_set, collate_tokens, "token items")

    def build(self, resume_meta: dict[str, Any] | None) -> None:
        tc = self.cfg.train
        model = self.model = build_from_config(self.cfg, self.shards, self.summary)
        model.to(self.device)
        self.optimizer = adamw(list(model.parameters()), tc, fused=self.cuda)  # type: ignore[arg-type]
        self.aux_gen = torch.Generator().manual_seed(tc.seed + 1 + self.dist.rank)  # label drop and RandAR orders
        self.null = model.gpt.null_class
        self.train_model: nn.Module = model
        if resume_meta is not None:
            self.init_from = resume_meta.get("init")  # a resumed run keeps the checkpoint its first start loaded
        elif tc.init:
            self.init_from = _init_weights(model, tc.init, self.name, self.shards.tokenizer_hash)

    def restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        ck.load_state_strict(self.model, ck.read_tensors(ckpt, "generator"), f"{ckpt}/generator")
        self.optimizer.load_state_dict(state["opt"])
        self.aux_gen.set_state(this_rank(state["aux_gen"], self.dist))
        self.val_hist = [(int(s), float(v)) for s, v in state.get("val_hist", [])]

    def distribute(self, wrap: Callable[..., nn.Module]) -> list[nn.Module]:
        self.train_model = wrap(self.model)
        return [self.train_model]

    def prepare_eval(self) -> None:
        from torch.utils.data import DataLoader

        from ..data.codes import collate_tokens

        self.val_loader = DataLoader(self.val_set, batch_size=self.cfg.train.micro_batch, shuffle=False,
                                     collate_fn=collate_tokens)

    def start_info(self) -> dict[str, Any]:
        return {"params": sum(p.numel() for p in self.model.parameters()), "train_items": len(self.train_set),
                "val_items": len(self.val_set), "generator": self.name, "init": self.init_from,
                "k_counts": self.summary["k_counts"], "views": self.shards.views}

    # ------------------------------------------------------------------ one optimizer step

    def units(self, batch: dict[str, Tensor]) -> int:
        return self.model.targets_count(batch)

    def micro_step(self, batch: dict[str, Tensor], ctx: MicroStep) -> dict[str, Tensor | float]:
        tc = self.cfg.train
        batch = _to(batch, self.device)
        drop = torch.rand(batch["label"].shape[0], generator=self.aux_gen).to(self.device) < tc.label_drop
        batch["label"] = torch.where(drop, torch.full_like(batch["label"], self.null), batch["label"])
        with ctx.autocast:
            loss = self.train_model(batch, self.aux_gen, tc.label_smoothing)
        ctx.backward(loss)
        return {"ce": loss.detach()}

    # ------------------------------------------------------------------ evaluation, checkpoints, result

    @property
    def last_eval_step(self) -> int | None:
        return self.val_hist[-1][0] if self.val_hist else None

    def evaluate(self, step: int, autocast: Any) -> dict[str, Any]:
        model = self.model
        model.eval()
        g = torch.Generator().manual_seed(VAL_ORDER_SEED)
        total_loss, count = 0.0, 0
        with torch.no_grad(), autocast:
            for batch in self.val_loader:
                batch = _to(batch, self.device)
                n = model.targets_count(batch)
                total_loss += float(model.loss(batch, g)) * n
                count += n
        model.train()
        val = total_loss / max(count, 1)
        self.val_hist.append((step, val))
        return {"val_loss": val, "items": len(self.val_set)}

    def eval_hooks(self) -> list[EvalHook]:
        return [self.plot_curves]

    def plot_curves(self, run_dir: Path, rows: list[dict[str, Any]]) -> None:
        from ..eval.plots import plot_ar_curves

        plot_ar_curves(rows, run_dir / "loss_curve.png", title=f"{self.name} ({run_dir.name})")

    def state(self, gather: Callable[[Any], Any]) -> dict[str, Any]:
        return {"opt": self.optimizer.state_dict(), "aux_gen": gather(self.aux_gen.get_state()), "val_hist": self.val_hist}

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        return {"generator": self.model.state_dict()}

    def meta(self) -> dict[str, Any]:
        s, shards = self.summary, self.shards
        return {"generator": self.name, "gpt": asdict(self.model.cfg), "options": self.model.options(),
                "tokenizer": self.tokenizer,
                "tokens": {"dir": str(shards.dir), "k_counts": s["k_counts"], "common_k": s["common_k"],
                           "grid": shards.grid, "views": shards.views, "dataset": shards.manifest.get("dataset", {})},
                "init": self.init_from, "val_loss": self.val_hist[-1][1] if self.val_hist else None}

    def result(self, run: RunSummary) -> ARTrainResult:
        hist = self.val_hist
        return ARTrainResult(
            run_dir=str(run.run_dir), generator=self.name, steps=run.steps, wall_s=run.wall_s, tokens_per_s=run.rate,
            val_loss=hist[-1][1] if hist else float("nan"), val_losses=hist,
            params=sum(p.numel() for p in self.model.parameters()), checkpoint=str(run.checkpoint),
            tokenizer=self.tokenizer, resumed_from=run.resumed_from, final_losses=run.final_losses,
        )


def _init_weights(model: Any, init: str, name: str, tokenizer_hash: str | None) -> str:
    """Load the generator weights of run or checkpoint `init` into `model` (the start of a new run: the optimizer,
    schedule and data order start fresh). It must be the same generator, architecture and tokenizer."""
    src = ck.resolve_checkpoint(Path(init))
    meta = ck.read_meta(src, expect_kind="ar", expect_generator=name, prefix="train.init: ")
    ours = json.loads(json.dumps(asdict(model.cfg)))  # tuples as JSON lists, like meta.json
    regularisers = ("dropout", "token_dropout")  # may change between runs; the rest defines the weights' meaning
    diff = sorted(k for k, v in ours.items() if k not in regularisers and meta.get("gpt", {}).get(k) != v)
    if diff:
        raise CheckpointError(f"train.init: {src} has another architecture ({', '.join(diff)} differ)")
    theirs = meta.get("tokenizer", {}).get("hash")
    if tokenizer_hash and theirs and theirs != tokenizer_hash:
        raise CheckpointError(f"train.init: {src} was trained on another tokenizer's ids than these shards")
    ck.load_state_strict(model, ck.read_tensors(src, "generator"), str(src))
    return str(src)
