"""High-level functions the CLI calls. No printing; each returns plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, config_to_dict, load_config


@dataclass
class ModelInfo:
    recipe: str
    variant: str
    params: dict[str, int]  # encoder (stem + ToMe ViT + code projection), decoder, source_recovery, align_head, total
    gmacs: dict[str, float]  # conv + linear multiply-accumulates per image at K (encoder, source_recovery) and N (decoder)
    gmacs_full: dict[str, float]  # the same with no merging (K = N)
    tokens: dict[str, int]  # N, K, grid
    schedule: list[int]  # merges per encoder block, Σ = N - K
    codebook_size: int
    code_bits: int
    image_size: int
    config: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "variant": self.variant, "params": self.params, "gmacs": self.gmacs,
            "gmacs_full": self.gmacs_full, "tokens": self.tokens, "schedule": self.schedule,
            "codebook_size": self.codebook_size, "code_bits": self.code_bits, "image_size": self.image_size,
        }


def model_info(recipe: str | Path, tokens: int | None = None, overrides: tuple[str, ...] | list[str] = ()) -> ModelInfo:
    """Parameters per part and MACs at K, counted on the meta device (no data, no memory)."""
    cfg = load_config(recipe, overrides)
    keep = cfg.merge.keep if tokens is None else cfg.check_keep(tokens)
    return _tokenizer_info(cfg, keep, str(recipe))


def _tokenizer_info(cfg: RunConfig, keep: int, recipe: str) -> ModelInfo:
    import torch

    from .eval.complexity import count_params, mac_counter
    from .models import build_tokenizer

    with torch.device("meta"):
        tok = build_tokenizer(cfg)
        x = torch.empty(1, 3, cfg.model.image_size, cfg.model.image_size)

        def encoder_macs(k: int) -> tuple[float, float, Any]:
            with mac_counter(tok.encoder) as a, mac_counter(tok.code_proj) as b:
                enc = tok.encode(x, tokens=k)
            rec = 0.0
            if tok.recovery is not None:
                with mac_counter(tok.recovery) as r:
                    tok.recovery_logits(enc.quantized)
                rec = r() / 1e9
            return (a() + b()) / 1e9, rec, enc

        enc_k, rec_k, enc = encoder_macs(keep)
        enc_n, rec_n, _ = encoder_macs(cfg.model.n_tokens)
        with mac_counter(tok.decoder) as d:
            tok.decode_codes(enc.quantized, enc.assign)
        dec = d() / 1e9

    params = {name: count_params(m) for name, m in tok.param_groups().items()}
    params["total"] = count_params(tok)
    return ModelInfo(
        recipe=recipe,
        variant=cfg.model.name,
        params=params,
        gmacs={"encoder": enc_k, "decoder": dec, "source_recovery": rec_k},
        gmacs_full={"encoder": enc_n, "decoder": dec, "source_recovery": rec_n},
        tokens={"N": cfg.model.n_tokens, "K": keep, "grid": cfg.model.grid},
        schedule=list(tok.schedule(keep)),
        codebook_size=cfg.quant.codebook_size,
        code_bits=cfg.quant.dim,
        image_size=cfg.model.image_size,
        config=config_to_dict(cfg),
    )


# ----------------------------------------------------------------------------- training

RUNS_DIR = Path("runs")


def newest_run(kind: str, stem: str | None = None, root: Path = RUNS_DIR) -> Path | None:
    """The most recently written run folder under `root` of this kind (and recipe stem) that holds a checkpoint."""
    import json as _json

    from .train.checkpoint import CKPT_DIR

    best, best_t = None, -1.0
    for pointer in root.glob(f"*/{CKPT_DIR}/latest") if root.is_dir() else []:
        run = pointer.parent.parent
        if stem is not None and not run.name.startswith(f"{stem}-") and run.name != stem:
            continue
        try:
            meta_kind = _json.loads((run / "config.json").read_text()).get("kind", "tokenizer")
        except (OSError, ValueError):
            continue
        if meta_kind == kind and pointer.stat().st_mtime > best_t:
            best, best_t = run, pointer.stat().st_mtime
    return best


def train_tokenizer(
    recipe: str | Path, overrides: tuple[str, ...] | list[str] = (), out: str | Path | None = None,
    resume: bool = False, max_steps: int | None = None, seed: int | None = None, device: str | None = None,
    hooks: Any = None,
) -> Any:
    """Stage-1 training (see `train.tokenizer_loop`). Returns a `TrainResult`.

    The run folder is `out`, else `runs/<recipe>-<time>`; with `resume` and no `out`, the newest run of that
    recipe. On resume the run's saved config is used, with `overrides`, `max_steps` and `seed` applied on top."""
    import time

    from .config import apply_overrides, config_from_dict
    from .errors import CheckpointError
    from .train import checkpoint as ck
    from .train.dist import cleanup, init_distributed
    from .train.tokenizer_loop import fit_tokenizer

    extra = list(overrides)
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    if seed is not None:
        extra.append(f"train.seed={seed}")
    cfg = load_config(recipe, extra)  # validates the recipe even on resume
    stem = Path(recipe).stem
    dist = init_distributed(device)
    try:
        if out is not None:
            run_dir = Path(out)
        elif resume:
            found = newest_run("tokenizer", stem)
            if found is None:
                raise CheckpointError(f"no run of {stem} under {RUNS_DIR}/ to resume (give --out RUN_DIR)")
            run_dir = found
        else:
            run_dir = RUNS_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if dist.enabled:  # every rank must write to the folder rank 0 chose
            import torch.distributed as tdist

            box = [str(run_dir)]
            tdist.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
        if resume:
            ckpt = ck.latest_checkpoint(run_dir) if run_dir.exists() else None
            if ckpt is not None:
                cfg = config_from_dict(apply_overrides(ck.read_meta(ckpt)["config"], extra))
        return fit_tokenizer(cfg, run_dir, dist, resume=resume, hooks=hooks)
    finally:
        cleanup()


# ----------------------------------------------------------------------------- loading trained tokenizers


def find_tokenizer_checkpoint(ckpt: str | Path | None) -> Path:
    """A run folder or checkpoint folder → the checkpoint folder; None → the newest tokenizer run under runs/."""
    from .errors import CheckpointError
    from .train.checkpoint import resolve_checkpoint

    if ckpt is None:
        run = newest_run("tokenizer")
        if run is None:
            raise CheckpointError(
                f"no tokenizer run under {RUNS_DIR}/: train one with `mergevq train-tokenizer recipes/tiny.yaml` or pass --ckpt"
            )
        ckpt = run
    return resolve_checkpoint(Path(ckpt))


def load_tokenizer(ckpt: str | Path | None = None, device: str | None = None, ema: bool = True) -> tuple[Any, Path]:
    """Rebuild a trained tokenizer from its checkpoint (config from meta.json, EMA weights by default), in eval
    mode on `device`. Returns (tokenizer, checkpoint folder)."""
    from .config import config_from_dict
    from .errors import CheckpointError
    from .models import build_tokenizer
    from .train import checkpoint as ck
    from .train.dist import pick_device

    path = find_tokenizer_checkpoint(ckpt)
    meta = ck.read_meta(path)
    if meta.get("kind") != "tokenizer":
        raise CheckpointError(f"{path} is a {meta.get('kind')} checkpoint, not a tokenizer")
    cfg = config_from_dict(meta["config"])
    tok = build_tokenizer(cfg)
    ck.load_state_strict(tok, ck.read_tensors(path, "ema" if ema else "tokenizer"), f"{path}")
    return tok.to(pick_device(device)).eval(), path
