"""Stage-2 training: a generator (llamagen | mergear | randar) on token shards from `mergevq tokenize`.

The same machinery as stage 1: AdamW with weight decay on matrices only, warmup + decay as a pure function of the
step, label drop for classifier-free guidance, optional label smoothing, gradient clipping, bf16 autocast on CUDA,
DDP under torchrun, atomic checkpoints and an exact `--resume` (data position, label-drop and order generators,
RNG and optimizer state are all checkpointed). The validation loss on held-out items is deterministic (no label
drop, fixed RandAR orders), so curves of different runs compare.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ARRunConfig, config_to_dict
from ..errors import CheckpointError, ConfigError, DataError
from . import checkpoint as ck
from .dist import DistInfo, all_reduce_mean
from .optim import adamw, lr_at, set_lr
from .tokenizer_loop import BatchStream, TrainHooks, TrainingDiverged, _gather_data_state

__all__ = ["ARTrainResult", "fit_ar", "open_shards", "shard_summary"]

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
        raise ConfigError("no token shards given: pass --tokens DIR (made by `mergevq tokenize`) or set data.tokens")
    path = Path(tokens).expanduser()
    if not path.is_dir():
        raise DataError(f"token shards not found: {path} (make them with `mergevq tokenize DATA --out {path}`)")
    return TokenShards(path)


def shard_summary(shards) -> dict[str, Any]:
    """Counts of K and the number of classes, read from the shard files (labels -1 = unknown)."""
    from safetensors import safe_open

    ks: Counter[int] = Counter()
    top = -1
    for f in shards.files:
        with safe_open(str(f), "pt") as t:
            ks.update(t.get_tensor("k").tolist())
            lab = t.get_tensor("label")
            top = max(top, int(lab.max()) if lab.numel() else -1)
    info = shards.manifest.get("dataset", {})
    num_classes = int(info.get("num_classes") or max(top + 1, 1))
    return {"k_counts": dict(sorted(ks.items())), "common_k": ks.most_common(1)[0][0] if ks else shards.n_tokens,
            "num_classes": num_classes, "max_label": top}


def build_from_config(cfg: ARRunConfig, shards, summary: dict[str, Any]):
    """The generator a recipe describes, sized by the shards; checks the recipe agrees with them."""
    from ..generators import build_generator

    m = cfg.model
    checks = [("model.vocab_size", m.vocab_size, shards.codebook_size), ("model.n_tokens", m.n_tokens, shards.n_tokens)]
    bad = [f"{name}={a} but the shards have {b}" for name, a, b in checks if a is not None and a != b]
    if m.num_classes is not None and summary["max_label"] >= m.num_classes:
        bad.append(f"model.num_classes={m.num_classes} but the shards hold label {summary['max_label']}")
    if bad:
        raise ConfigError("the recipe does not match the token shards: " + "; ".join(bad) + " (fix the recipe or set them to null)")
    gpt_cfg = cfg.gpt_config(shards.codebook_size, shards.n_tokens, summary["num_classes"])
    return build_generator(cfg.generator.name, gpt_cfg, **cfg.generator_options(summary["common_k"]))


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _targets_count(batch: dict[str, Tensor], generator: str) -> int:
    """Image tokens predicted in a batch: N per item for raster generators, K for randar."""
    return int(batch["k"].sum()) if generator == "randar" else batch["assign"].numel()


def fit_ar(
    cfg: ARRunConfig, run_dir: Path, dist: DistInfo, resume: bool = False, hooks: TrainHooks | None = None,
) -> ARTrainResult:
    from torch.utils.data import DataLoader, Subset

    from ..data.codes import collate_tokens
    from ..eval.plots import plot_ar_curves

    hooks = hooks or TrainHooks()
    tc, device = cfg.train, dist.device
    run_dir = Path(run_dir)
    ckpt = ck.latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume and ckpt is None:
        raise CheckpointError(f"nothing to resume: {run_dir} holds no checkpoint")
    if not resume and ckpt is not None:
        raise ConfigError(f"{run_dir} already holds a run (step {ck.read_meta(ckpt)['step']}): pass --resume to continue it, or --out for a new folder")
    per_step = tc.micro_batch * dist.world_size
    if tc.batch_size % per_step:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not a multiple of micro_batch × processes = {per_step}")
    accum = tc.batch_size // per_step

    shards = open_shards(cfg.data.tokens)
    summary = shard_summary(shards)
    n_val = min(cfg.data.val_items, len(shards) // 5)
    if n_val < 1 or len(shards) - n_val < per_step:
        raise DataError(f"{shards.dir} holds {len(shards)} items: too few for a validation split and one batch of {per_step}")
    train_set = Subset(shards, range(len(shards) - n_val))
    val_set = Subset(shards, range(len(shards) - n_val, len(shards)))
    stream = BatchStream(train_set, tc.micro_batch, tc.seed, cfg.data.num_workers, dist, collate_tokens, "token items")
    steps_per_epoch = max(1, stream.sampler.batches_per_epoch // accum)
    total = tc.max_steps or tc.epochs * steps_per_epoch

    torch.manual_seed(tc.seed)
    model = build_from_config(cfg, shards, summary)
    name = cfg.generator.name
    cuda = device.type == "cuda"
    model.to(device)
    opt = adamw(list(model.parameters()), tc, fused=cuda)  # type: ignore[arg-type]
    scaler = torch.amp.GradScaler(device.type, enabled=cuda and tc.precision == "fp16")
    aux_gen = torch.Generator().manual_seed(tc.seed + 1 + dist.rank)  # label drop and RandAR orders
    null = model.gpt.null_class
    acc: dict[str, float] = {}
    acc_n, step, wall_before, tokens_before = 0, 0, 0.0, 0
    val_hist: list[tuple[int, float]] = []

    if ckpt is not None:
        meta = ck.read_meta(ckpt)
        if meta.get("kind") != "ar" or meta.get("generator") != name:
            raise CheckpointError(f"{ckpt} is a {meta.get('generator') or meta.get('kind')} checkpoint, not {name}: use another --out")
        init_from = meta.get("init")  # a resumed run keeps the checkpoint its first start loaded
        st = ck.read_train_state(ckpt)
        ck.load_state_strict(model, ck.read_tensors(ckpt, "generator"), f"{ckpt}/generator")
        opt.load_state_dict(st["opt"])
        scaler.load_state_dict(st["scaler"])
        gens = st["aux_gen"]
        aux_gen.set_state(gens[dist.rank] if isinstance(gens, list) and len(gens) == dist.world_size else
                          (gens[0] if isinstance(gens, list) else gens))
        torch.set_rng_state(st["torch_rng"])
        data_state = st["data"]
        if isinstance(data_state, list):
            data_state = data_state[dist.rank] if len(data_state) == dist.world_size else data_state[0]
        stream.load_state(data_state)
        acc, acc_n = dict(st["log_acc"]), int(st["log_n"])
        step, wall_before, tokens_before = int(st["step"]), float(st["wall_s"]), int(st["tokens"])
        val_hist = [(int(s), float(v)) for s, v in st.get("val_hist", [])]
    else:
        init_from = _init_weights(model, tc.init, name, shards.tokenizer_hash) if tc.init else None

    train_model: Any = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if cuda else None)

    tokenizer = {"checkpoint": shards.manifest["tokenizer"].get("checkpoint", ""), "hash": shards.tokenizer_hash}
    metrics_path = run_dir / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        if ckpt is not None and metrics_path.exists():
            rows = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["step"] <= step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if tc.precision == "bf16" else torch.float16,
                              enabled=cuda and tc.precision != "fp32")

    def meta_dict() -> dict[str, Any]:
        return {"kind": "ar", "generator": name, "gpt": asdict(model.cfg), "options": model.options(),
                "config": config_to_dict(cfg), "tokenizer": tokenizer,
                "tokens": {"dir": str(shards.dir), "k_counts": summary["k_counts"], "common_k": summary["common_k"],
                           "grid": shards.grid, "dataset": shards.manifest.get("dataset", {})},
                "world_size": dist.world_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "init": init_from,
                "val_loss": val_hist[-1][1] if val_hist else None}

    def save(at: int) -> Path:
        gens = _gather_gen_state(aux_gen, dist)
        state = {"step": at, "opt": opt.state_dict(), "scaler": scaler.state_dict(), "aux_gen": gens,
                 "torch_rng": torch.get_rng_state(), "data": _gather_data_state(stream.state(), dist), "log_acc": acc,
                 "log_n": acc_n, "wall_s": wall_before + (time.perf_counter() - t0), "tokens": tokens_seen,
                 "val_hist": val_hist}
        if not dist.is_main:
            return run_dir
        path = ck.save_checkpoint(run_dir, at, {"generator": model.state_dict()}, state, meta_dict())
        hooks.on_checkpoint(at, path)
        return path

    val_loader = DataLoader(val_set, batch_size=tc.micro_batch, shuffle=False, collate_fn=collate_tokens)

    def evaluate(at: int) -> float:
        model.eval()
        g = torch.Generator().manual_seed(VAL_ORDER_SEED)
        total_loss, count = 0.0, 0
        with torch.no_grad(), autocast:
            for batch in val_loader:
                batch = _to(batch, device)
                n = _targets_count(batch, name)
                total_loss += float(model.loss(batch, g)) * n
                count += n
        model.train()
        val = total_loss / max(count, 1)
        val_hist.append((at, val))
        row = {"step": at, "eval": {"val_loss": val, "items": len(val_set)}}
        rows.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        plot_ar_curves(rows, run_dir / "loss_curve.png", title=f"{name} ({run_dir.name})")
        hooks.on_eval(at, row["eval"])
        return val

    if dist.is_main:
        hooks.on_start({"run_dir": str(run_dir), "total_steps": total, "start_step": step, "device": str(device),
                        "world_size": dist.world_size, "accum": accum, "batch_size": tc.batch_size,
                        "params": sum(p.numel() for p in model.parameters()),
                        "train_items": len(train_set), "val_items": len(val_set), "generator": name,
                        "resumed": ckpt is not None, "init": init_from, "k_counts": summary["k_counts"]})
    resumed_from = step if ckpt is not None else None
    if dist.is_main and ckpt is None:
        evaluate(0)  # the untrained model's loss, for the curve
    tokens_seen = tokens_before
    t0 = time.perf_counter()
    t_log, tokens_log = t0, tokens_seen
    last_path = ckpt
    model.train()
    while step < total:
        lr = lr_at(step, tc, total)  # type: ignore[arg-type]
        set_lr(opt, lr)
        step_loss = 0.0
        for micro in range(accum):
            batch = _to(stream.next(), device)
            drop = torch.rand(batch["label"].shape[0], generator=aux_gen).to(device) < tc.label_drop
            batch["label"] = torch.where(drop, torch.full_like(batch["label"], null), batch["label"])
            tokens_seen += _targets_count(batch, name) * dist.world_size
            sync = micro == accum - 1
            with (contextlib.nullcontext() if sync or not dist.enabled else train_model.no_sync()), autocast:
                loss = train_model(batch, aux_gen, tc.label_smoothing)
            scaler.scale(loss / accum).backward()
            step_loss += float(loss.detach()) / accum
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        bad = torch.tensor([0.0 if math.isfinite(step_loss) and math.isfinite(float(gnorm)) else 1.0])
        if float(all_reduce_mean(bad.to(device))) > 0 and not scaler.is_enabled():
            where = f"; the last good checkpoint is {last_path}" if last_path else "; no checkpoint was written yet"
            raise TrainingDiverged(f"training diverged at step {step}: loss {step_loss:.4g}, gradient norm {float(gnorm):.4g}{where}")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        terms = {"ce": step_loss, "grad_norm": float(gnorm)}
        for key, v in terms.items():
            acc[key] = acc.get(key, 0.0) + v
        acc_n += 1
        if dist.is_main:
            hooks.on_step(step, {**terms, "lr": lr})
        if step % tc.log_every == 0 or step == total:
            now = time.perf_counter()
            row = {"step": step, "epoch": stream.epoch, "lr": lr, "loss": {k: v / acc_n for k, v in acc.items()},
                   "tok_per_s": (tokens_seen - tokens_log) / max(now - t_log, 1e-9), "elapsed_s": wall_before + now - t0}
            acc, acc_n, t_log, tokens_log = {}, 0, now, tokens_seen
            if dist.is_main:
                rows.append(row)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                hooks.on_log(row)
        if dist.is_main and (step % tc.eval_every == 0 or step == total):
            evaluate(step)
        if step % tc.ckpt_every == 0 or step == total:
            last_path = save(step)

    wall = time.perf_counter() - t0
    if dist.is_main and (not val_hist or val_hist[-1][0] != step):
        evaluate(step)
    final = next((dict(r["loss"]) for r in reversed(rows) if "loss" in r), {})
    return ARTrainResult(
        run_dir=str(run_dir), generator=name, steps=step, wall_s=wall,
        tokens_per_s=(tokens_seen - tokens_before) / wall if wall > 0 else 0.0,
        val_loss=val_hist[-1][1] if val_hist else float("nan"), val_losses=val_hist,
        params=sum(p.numel() for p in model.parameters()), checkpoint=str(last_path), tokenizer=tokenizer,
        resumed_from=resumed_from, final_losses=final,
    )


def _init_weights(model: Any, init: str, name: str, tokenizer_hash: str | None) -> str:
    """Load the generator weights of run or checkpoint `init` into `model` (the start of a new run: the optimizer,
    schedule and data order start fresh). It must be the same generator, architecture and tokenizer."""
    src = ck.resolve_checkpoint(Path(init))
    meta = ck.read_meta(src)
    if meta.get("kind") != "ar":
        raise CheckpointError(f"train.init: {src} is a {meta.get('kind')} checkpoint, not a generator")
    if meta.get("generator") != name:
        raise CheckpointError(f"train.init: {src} is a {meta.get('generator')} generator, not {name}")
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


def _gather_gen_state(gen: torch.Generator, dist: DistInfo) -> Any:
    if not dist.enabled:
        return gen.get_state()
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, gen.get_state())
    return out
