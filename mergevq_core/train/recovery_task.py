"""Source recovery fine-tuning after stage 2 (paper A.1, Table A2: "5 (optional)" epochs) as a `TrainTask` of
the one training loop: DDP, checkpoints, SIGTERM and an exact `--resume` come from `loop.fit`.

RandAR generates only the K merged ids; the tokenizer's source recovery model then predicts `assign` from them.
Stage 1 trains that model on the encoder's own ids, so at generation it meets ids of another distribution. Here
it trains again on token shards whose real ids are partly replaced by the trained RandAR's teacher-forced
predictions (`config.recovery.CorruptionConfig`), with the true `assign` as the target: the generator only
predicts, and the rest of the tokenizer is not even loaded after the recovery model is taken from it.

The result is a run folder of its own (kind `recovery`: `recovery.safetensors` + meta.json per checkpoint), which
`generate --recovery RUN` loads in place of the tokenizer's recovery weights. The tokenizer's files never change,
so the weights hash that shards and generators record keeps identifying it.

Determinism: the corruption (orders, draws, which slots) comes from a per-rank torch.Generator checkpointed with
the run, so a resumed run draws what the uninterrupted one would have; evaluation corrupts the held-out items once,
with a fixed seed, so every evaluation of every run scores the same ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint as ck
from ..config.recovery import RecoveryTuneConfig
from ..errors import CheckpointError, ConfigError, DataError
from .loop import this_rank
from .optim import adamw
from .task import MicroStep, RunSummary, TrainData, TrainTask

__all__ = ["RecoveryObjective", "RecoveryTask", "RecoveryTuneResult", "corrupt_ids", "recovery_config",
           "teacher_predictions"]

VAL_SEED = 4321  # the held-out items' generated ids (sampled at temperature 1, every slot)


# ----------------------------------------------------------------------------- the generator's ids


@torch.no_grad()
def teacher_predictions(gen: Any, ids: Tensor, k: Tensor, labels: Tensor, g: torch.Generator, predict: str = "sample",
                        temperature: float = 1.0) -> Tensor:
    """RandAR's id for every slot (B, Kmax), slot order, each predicted in teacher forcing: a random order per item
    drawn from `g`, the true ids decoded before the slot in that order, the item's class (-1: the null class);
    drawn from its logits (`sample` at `temperature`, from `g`) or their argmax, sub-token by sub-token as
    decoding does (`gpt.sample_ids`). Padding slots (past k) hold meaningless ids."""
    from ..generators.sampling import sample_from

    B, kmax = ids.shape
    order = gen.random_order(k, kmax, g)
    h, _ = gen.teacher_hidden(ids, k, gen.labels_for(labels), order)  # (B, Kmax, C) in decoding order
    if predict == "argmax":
        pick = lambda i, lg: lg.float().argmax(-1)  # noqa: E731
    else:
        pick = lambda i, lg: sample_from(lg.float(), temperature, generator=g)  # noqa: E731
    flat = gen.gpt.sample_ids(h.reshape(B * kmax, h.shape[-1]), pick).reshape(B, kmax)
    return torch.empty_like(flat).scatter_(1, order, flat)


def corrupt_ids(ids: Tensor, k: Tensor, predicted: Tensor, replace: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each real slot of ids (B, Kmax) replaced by `predicted` with probability `replace` (drawn from `g`).
    Returns the ids and where they now differ from the real ones (B, Kmax) bool."""
    valid = torch.arange(ids.shape[1], device=ids.device)[None] < k[:, None]
    chosen = (torch.rand(tuple(ids.shape), generator=g) < replace).to(ids.device) & valid
    out = torch.where(chosen, predicted, ids)
    return out, (out != ids) & valid


# ----------------------------------------------------------------------------- the model being tuned


class RecoveryObjective(nn.Module):
    """The source recovery model and its loss on batches of mixed K: one recovery pass per K in the batch inside
    one `forward`, so DDP sees a single call per micro-batch."""

    def __init__(self, recovery: nn.Module, code_dim: int) -> None:
        super().__init__()
        self.recovery, self.code_dim = recovery, int(code_dim)

    def groups(self, ids: Tensor, k: Tensor):
        """(rows, logits (b, N, K) float) for each K of ids (B, Kmax) padded with -1, k (B,)."""
        from ..quant import indices_to_codes

        for kk in sorted(set(k.tolist())):
            rows = (k == kk).nonzero(as_tuple=True)[0]
            codes = indices_to_codes(ids[rows, :kk].clamp_min(0), self.code_dim)
            yield rows, self.recovery(codes).float()

    def forward(self, ids: Tensor, k: Tensor, assign: Tensor) -> tuple[Tensor, Tensor]:
        """→ (cross-entropy per grid position against the true assign (B, N), share of positions whose most
        likely slot is right)."""
        ce = assign.new_zeros((), dtype=torch.float32)
        hits = assign.new_zeros((), dtype=torch.float32)
        for rows, logits in self.groups(ids, k):
            target = assign[rows]
            ce = ce + F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            hits = hits + (logits.detach().argmax(-1) == target).sum()
        n = assign.numel()
        return ce / n, hits / n


# ----------------------------------------------------------------------------- result and config


@dataclass
class RecoveryTuneResult:
    run_dir: str
    steps: int
    wall_s: float
    items_per_s: float
    checkpoint: str
    generator: str  # the RandAR checkpoint whose predictions were used
    tokenizer: dict[str, Any]
    before: dict[str, Any]  # the evaluation of the stage-1 recovery model (step 0)
    after: dict[str, Any]  # the last evaluation
    evals: list[dict[str, Any]] = field(default_factory=list)
    corrupt: dict[str, Any] = field(default_factory=dict)
    train_items: int = 0
    val_items: int = 0
    resumed_from: int | None = None
    final_losses: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def recovery_config(ckpt: Path, world_size: int, *, shards: str | Path | None = None, tokenizer: str | Path | None = None,
                    settings: dict[str, Any], overrides: list[str]) -> RecoveryTuneConfig:
    """The run's config: the RandAR checkpoint `ckpt`, the tokenizer it records (or `tokenizer`, checked by weights
    hash), the shards (default: the generator's), `settings` (`corrupt.replace`, `train.lr`...: None = default)
    and `--set` `overrides` on top; the log / eval / checkpoint cadence from the training split's size (one
    evaluation and checkpoint per epoch) unless overridden."""
    from ..config import apply_overrides, build_config, parse_override
    from ..data.codes import TokenShards
    from ..fileio import sha256_file
    from ..runs import tokenizer_of_generator

    meta = ck.read_meta(ckpt, expect_kind="ar", prefix="--ckpt: ")
    if meta.get("generator") != "randar":
        raise CheckpointError(f"--ckpt: {ckpt} holds a {meta.get('generator')} generator; source recovery is tuned "
                              "with a randar generator (the one that decodes with it)")
    tok, tok_path = tokenizer_of_generator(meta, tokenizer, "cpu")
    if tok.recovery is None:
        raise CheckpointError(f"tokenizer {tok_path} has no source recovery model to tune (model.recovery.enabled=false)")
    del tok
    tok_hash = meta.get("tokenizer", {}).get("hash") or sha256_file(ck.weights_file(tok_path, "ema"))
    where = shards if shards is not None else meta.get("tokens", {}).get("dir")
    if not where:
        raise ConfigError("--shards: the generator records no token shards; pass --shards DIR")
    if not Path(where).is_dir():
        said = "" if shards is not None else " (the generator's training shards; pass --shards DIR if they moved)"
        raise DataError(f"--shards {where}: no such folder{said}")
    data = TokenShards(where)
    if data.tokenizer_hash != tok_hash:
        raise DataError(f"--shards {where} were made by another tokenizer than the generator's ({tok_path}): "
                        "tokenize with that tokenizer")
    val_items = int(meta.get("config", {}).get("data", {}).get("val_items") or 512)
    raw: dict[str, Any] = {
        "kind": "recovery", "generator": str(ckpt), "generator_hash": sha256_file(ck.weights_file(Path(ckpt), "generator")),
        "tokenizer": str(tok_path), "tokenizer_hash": tok_hash,
        "data": {"tokens": str(where), "val_items": val_items}, "corrupt": {}, "train": {},
    }
    for key, value in settings.items():
        if value is not None:
            section, name = key.split(".")
            raw[section][name] = value
    cfg = build_config(RecoveryTuneConfig, apply_overrides(raw, overrides))
    tc = cfg.train
    if tc.micro_batch > tc.batch_size:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, micro_batch=tc.batch_size))
        tc = cfg.train
    per_step = tc.micro_batch * world_size
    if tc.batch_size % per_step:
        procs = f" × {world_size} processes" if world_size > 1 else ""
        raise ConfigError(f"--batch {tc.batch_size}: not a multiple of --micro-batch {tc.micro_batch}{procs}")
    n_val = min(cfg.data.val_items, len(data) // 5)
    n_train = len(data) - n_val
    if n_val < 1 or n_train < per_step:
        raise DataError(f"--shards {where} holds {len(data)} items: too few for a held-out split and one batch of {per_step}")
    steps_per_epoch = max(1, (n_train // per_step) // max(1, tc.batch_size // per_step))
    given = {".".join(parse_override(o)[0]) for o in overrides}
    cadence = {name: every for name, every in (("log_every", max(1, min(20, steps_per_epoch))),
                                               ("ckpt_every", steps_per_epoch), ("eval_every", steps_per_epoch))
               if f"train.{name}" not in given}
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, **cadence))


# ----------------------------------------------------------------------------- the task


def _train_items(shards: Any, indices: range, seed: int) -> Any:
    """The training items, each in one of its views per epoch (as `train-ar` sees them)."""
    from ..data.codes import EpochViews

    return EpochViews(shards, indices, seed)


class RecoveryTask(TrainTask):
    """`model` is a `RecoveryObjective` around the tokenizer's recovery model (AdamW `optimizer`); `gen` the
    frozen RandAR; `aux_gen` (one per rank) draws the corruption. The last `data.val_items` shard items are held
    out (by default as many as the generator's run held out, so that they are the items it never saw)."""

    kind = "recovery"
    rate_key = "items_per_s"
    count_key = "items"
    loss_key = "ce"
    eval_at_start = True  # step 0 scores the stage-1 model: the "before" of every figure

    cfg: RecoveryTuneConfig

    def __init__(self, cfg: RecoveryTuneConfig, run_dir: Path, dist: Any) -> None:
        super().__init__(cfg, run_dir, dist)
        self.evals: list[dict[str, Any]] = []

    def preflight(self) -> None:
        from ..fileio import sha256_file

        cfg = self.cfg
        for what, folder, name, want, option in (
            ("generator", cfg.generator, "generator", cfg.generator_hash, "--ckpt"),
            ("tokenizer", cfg.tokenizer, "ema", cfg.tokenizer_hash, "--tokenizer"),
        ):
            try:
                path = ck.weights_file(Path(folder), name)
            except CheckpointError:
                raise CheckpointError(f"the {what} checkpoint {folder} this run tunes with is gone (give {option})") from None
            if sha256_file(path) != want:
                raise CheckpointError(f"the {what} checkpoint {folder} changed since this run started")

    def train_data(self, per_step: int) -> TrainData:
        from torch.utils.data import Subset

        from ..data.codes import collate_tokens
        from .ar_task import open_shards

        shards = self.shards = open_shards(self.cfg.data.tokens)
        if shards.tokenizer_hash != self.cfg.tokenizer_hash:
            raise DataError(f"{shards.dir} were made by another tokenizer than {self.cfg.tokenizer}")
        n_val = min(self.cfg.data.val_items, len(shards) // 5)
        if n_val < 1 or len(shards) - n_val < per_step:
            raise DataError(f"{shards.dir} holds {len(shards)} items: too few for a held-out split and one batch of {per_step}")
        self.train_set = _train_items(shards, range(len(shards) - n_val), self.cfg.train.seed)
        self.val_set = Subset(shards, range(len(shards) - n_val, len(shards)))  # view 0, the centre view
        return TrainData(self.train_set, collate_tokens, "token items")

    def build(self, resume_meta: dict[str, Any] | None) -> None:
        from ..runs import load_generator, load_tokenizer

        tc = self.cfg.train
        tok, _ = load_tokenizer(self.cfg.tokenizer, "cpu")  # EMA weights: the recovery model generation uses
        if tok.recovery is None:
            raise CheckpointError(f"tokenizer {self.cfg.tokenizer} has no source recovery model")
        if tok.n_tokens != self.shards.n_tokens:
            raise DataError(f"{self.shards.dir} has N={self.shards.n_tokens} positions, the tokenizer {tok.n_tokens}")
        self.recovery_cfg, self.code_dim = asdict(tok.cfg.model.recovery), tok.quantizer.dim
        recovery = tok.recovery
        del tok
        self.model = RecoveryObjective(recovery, self.code_dim).to(self.device)
        self.model.requires_grad_(True)
        self.train_obj: nn.Module = self.model
        self.optimizer = adamw(list(self.model.parameters()), tc, fused=self.cuda)  # type: ignore[arg-type]
        gen, _ = load_generator(Path(self.cfg.generator), self.device, expect="randar")
        self.gen = gen.requires_grad_(False).eval()
        self.aux_gen = torch.Generator().manual_seed(tc.seed + 1 + self.dist.rank)

    def restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        ck.load_state_strict(self.model.recovery, ck.read_tensors(ckpt, "recovery"), f"{ckpt}/recovery")
        self.optimizer.load_state_dict(state["opt"])
        self.aux_gen.set_state(this_rank(state["aux_gen"], self.dist))
        self.evals = list(state.get("evals", []))

    def distribute(self, wrap: Callable[..., nn.Module]) -> list[nn.Module]:
        self.train_obj = wrap(self.model)
        return [self.train_obj]

    def prepare_eval(self) -> None:
        """The held-out items with their real ids and, once, every slot replaced by RandAR's sampled prediction."""
        from torch.utils.data import DataLoader

        from ..data.codes import collate_tokens

        g = torch.Generator().manual_seed(VAL_SEED)
        self.val_batches = []
        for batch in DataLoader(self.val_set, batch_size=self.cfg.train.micro_batch, shuffle=False,
                                collate_fn=collate_tokens):
            ids, k = batch["ids"].to(self.device), batch["k"].to(self.device)
            pred = teacher_predictions(self.gen, ids, k, batch["label"].to(self.device), g, "sample", 1.0)
            gen_ids, _ = corrupt_ids(ids, k, pred, 1.0, g)
            self.val_batches.append({"ids": batch["ids"], "generated": gen_ids.cpu(), "k": batch["k"],
                                     "assign": batch["assign"]})

    def start_info(self) -> dict[str, Any]:
        return {"params": sum(p.numel() for p in self.model.parameters()), "train_items": len(self.train_set),
                "val_items": len(self.val_set), "generator": self.cfg.generator, "corrupt": asdict(self.cfg.corrupt)}

    # ------------------------------------------------------------------ one optimizer step

    def units(self, batch: dict[str, Tensor]) -> int:
        return int(batch["k"].shape[0])

    def micro_step(self, batch: dict[str, Tensor], ctx: MicroStep) -> dict[str, Tensor | float]:
        c = self.cfg.corrupt
        ids, k = batch["ids"].to(self.device, non_blocking=True), batch["k"].to(self.device, non_blocking=True)
        assign = batch["assign"].to(self.device, non_blocking=True)
        changed = 0.0
        with ctx.autocast:
            if c.replace > 0:
                pred = teacher_predictions(self.gen, ids, k, batch["label"].to(self.device), self.aux_gen, c.predict,
                                           c.temperature)
                ids, diff = corrupt_ids(ids, k, pred, c.replace, self.aux_gen)
                changed = float(diff.sum()) / max(1, int(k.sum()))
            ce, acc = self.train_obj(ids, k, assign)
        ctx.backward(ce)
        return {"ce": ce.detach(), "acc": acc.detach(), "changed": changed}

    # ------------------------------------------------------------------ evaluation, checkpoints, result

    @property
    def last_eval_step(self) -> int | None:
        return self.evals[-1]["step"] if self.evals else None

    @torch.no_grad()
    def evaluate(self, step: int, autocast: Any) -> dict[str, Any]:
        """On the held-out items, real ids and generated ids: the share of grid positions whose predicted slot is
        right, decoded as generation decodes (`canonical_assign`, the most likely canonical `assign`), overall and
        per K, and the cross-entropy."""
        from ..tome import canonical_assign

        obj = self.model
        obj.eval()
        sums: dict[str, dict[int, list[float]]] = {"real": {}, "generated": {}}  # K -> [hits, positions, ce]
        changed = slots = 0
        for b in self.val_batches:
            k, assign = b["k"].to(self.device), b["assign"].to(self.device)
            changed += int(((b["generated"] != b["ids"]) & (torch.arange(b["ids"].shape[1])[None] < b["k"][:, None])).sum())
            slots += int(b["k"].sum())
            for name in ("real", "generated"):
                with autocast:
                    groups = list(obj.groups(b["ids" if name == "real" else "generated"].to(self.device), k))
                for rows, logits in groups:
                    target, kk = assign[rows], int(k[rows[0]])
                    pred = canonical_assign(logits.log_softmax(-1))
                    acc = sums[name].setdefault(kk, [0.0, 0.0, 0.0])
                    acc[0] += float((pred == target).sum())
                    acc[1] += target.numel()
                    acc[2] += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        obj.train()
        out: dict[str, Any] = {}
        for name, per_k in sums.items():
            hits, n, ce = (sum(v[i] for v in per_k.values()) for i in range(3))
            out[f"acc_{name}"] = hits / max(n, 1)
            out[f"ce_{name}"] = ce / max(n, 1)
            out[f"acc_{name}_by_k"] = {str(kk): v[0] / v[1] for kk, v in sorted(per_k.items())}
        out["ids_changed"] = changed / max(slots, 1)  # of the generated ids: the share that differ from the real
        out["items"] = len(self.val_set)
        self.evals.append({"step": step, **out})
        return out

    def state(self, gather: Callable[[Any], Any]) -> dict[str, Any]:
        return {"opt": self.optimizer.state_dict(), "aux_gen": gather(self.aux_gen.get_state()), "evals": self.evals}

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        return {"recovery": self.model.recovery.state_dict()}

    def meta(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"generator": "randar", "generator_checkpoint": cfg.generator, "generator_hash": cfg.generator_hash,
                "tokenizer": {"checkpoint": cfg.tokenizer, "hash": cfg.tokenizer_hash},
                "recovery": {"config": self.recovery_cfg, "code_dim": self.code_dim, "n_tokens": self.shards.n_tokens},
                "tokens": {"dir": str(self.shards.dir)}, "corrupt": asdict(cfg.corrupt),
                "first_eval": self.evals[0] if self.evals else None, "last_eval": self.evals[-1] if self.evals else None}

    def result(self, run: RunSummary) -> RecoveryTuneResult:
        evals = self.evals
        return RecoveryTuneResult(
            run_dir=str(run.run_dir), steps=run.steps, wall_s=run.wall_s, items_per_s=run.rate,
            checkpoint=str(run.checkpoint), generator=self.cfg.generator,
            tokenizer={"checkpoint": self.cfg.tokenizer, "hash": self.cfg.tokenizer_hash},
            before=evals[0] if evals else {}, after=evals[-1] if evals else {}, evals=evals,
            corrupt=asdict(self.cfg.corrupt), train_items=len(self.train_set), val_items=len(self.val_set),
            resumed_from=run.resumed_from, final_losses=run.final_losses)
