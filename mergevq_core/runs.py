"""Run folders and the trained models in them: where a run goes, which run is newest, and loading a tokenizer or
a generator back from its checkpoint.

A run folder is `runs/<stem>-<time>/` (or `--out`) with `config.json`, `metrics.jsonl` and `checkpoints/`
(see `checkpoint`). Every command that takes `--ckpt` resolves it here, so a run folder, a checkpoint folder and
"the newest run of this kind" mean the same everywhere, and every kind check goes through `checkpoint.read_meta`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checkpoint as ck
from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from .dist import DistInfo
    from .generators import Generator
    from .models import MergeVQTokenizer

__all__ = [
    "RUNS_DIR", "find_generator_checkpoint", "find_tokenizer_checkpoint", "load_generator", "load_tokenizer",
    "load_tuned_recovery", "newest_run", "resume_config", "run_folder", "tokenizer_of_generator",
]

RUNS_DIR = Path("runs")


def newest_run(kind: str, stem: str | None = None, root: Path = RUNS_DIR, generator: str | None = None) -> Path | None:
    """The most recently checkpointed run folder under `root` of this kind (`tokenizer` or `ar`), recipe stem and
    generator name, or None."""
    best, best_t = None, -1.0
    for pointer in root.glob(f"*/{ck.CKPT_DIR}/latest") if root.is_dir() else []:
        run = pointer.parent.parent
        if stem is not None and not run.name.startswith(f"{stem}-") and run.name != stem:
            continue
        try:
            run_cfg = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if run_cfg.get("kind", "tokenizer") != kind:
            continue
        if generator is not None and run_cfg.get("generator", {}).get("name") != generator:
            continue
        if pointer.stat().st_mtime > best_t:
            best, best_t = run, pointer.stat().st_mtime
    return best


def run_folder(kind: str, stem: str, out: str | Path | None, resume: bool, dist: DistInfo | None = None) -> Path:
    """`out`, else (resuming) the newest run of this kind and stem, else `runs/<stem>-<time>`; under DDP every
    rank gets the folder rank 0 chose."""
    if out is not None:
        run_dir = Path(out)
    elif resume:
        found = newest_run(kind, stem)
        if found is None:
            raise CheckpointError(f"no run of {stem} under {RUNS_DIR}/ to resume (give --out RUN_DIR)")
        run_dir = found
    else:
        run_dir = RUNS_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist is not None and dist.enabled:
        from .dist import broadcast_path

        run_dir = broadcast_path(run_dir)
    return run_dir


def resume_config(run_dir: Path, kind: str) -> dict[str, Any] | None:
    """The raw config a run's latest checkpoint was trained with (None when it has none yet). A checkpoint of
    another kind is refused: each kind resumes with its own command."""
    ckpt = ck.latest_checkpoint(run_dir) if Path(run_dir).exists() else None
    if ckpt is None:
        return None
    return ck.read_meta(ckpt, expect_kind=kind, hint=": resume it with its own command")["config"]


# ----------------------------------------------------------------------------- tokenizers


def find_tokenizer_checkpoint(ckpt: str | Path | None) -> Path:
    """A run, checkpoint or exported folder (or hf-hub: id) → the checkpoint folder; None → the newest tokenizer
    run under runs/, else the shipped tokenizer."""
    if ckpt is None:
        ckpt = newest_run("tokenizer") or _shipped("tokenizer")
    return ck.resolve_checkpoint(ckpt)


def load_tokenizer(ckpt: str | Path | None = None, device: str | None = None, ema: bool = True,
                   channels_last: bool = True) -> tuple[MergeVQTokenizer, Path]:
    """Rebuild a trained tokenizer from its checkpoint (config from meta.json, EMA weights by default), in eval
    mode on `device`, ready for inference: its CNN parts channels_last (`MergeVQTokenizer.prepare_inference`;
    `channels_last=False` for a model to train). Returns (tokenizer, checkpoint folder)."""
    from .config import config_from_saved
    from .dist import pick_device
    from .models import build_tokenizer

    path = find_tokenizer_checkpoint(ckpt)
    meta = ck.read_meta(path, expect_kind="tokenizer")
    tok = build_tokenizer(config_from_saved(meta["config"]))
    ck.load_state_strict(tok, ck.read_tensors(path, "ema" if ema else "tokenizer"), f"{path}")
    return tok.to(pick_device(device)).prepare_inference(channels_last), path


# ----------------------------------------------------------------------------- generators


def find_generator_checkpoint(ckpt: str | Path | None, generator: str) -> Path:
    """A run, checkpoint or exported folder (or hf-hub: id) → its checkpoint; None → the newest run of `generator`
    under runs/, else the shipped one."""
    if ckpt is None:
        ckpt = newest_run("ar", generator=generator) or _shipped(generator)
    return ck.resolve_checkpoint(ckpt)


def _shipped(name: str) -> Path:
    """The weights shipped with the package for `name` (no run of it under runs/), said in one line on stderr
    (stdout stays clean for --json)."""
    import os
    import sys

    from .shipped import shipped_path

    path = shipped_path(name)
    if path is None:
        raise CheckpointError(f"no {name} run under {RUNS_DIR}/ and none shipped: train one or pass --ckpt")
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"note: using the shipped {name} weights ({path.name}; `mergevq weights` describes them): "
                         f"no {name} run under {RUNS_DIR}/, and no --ckpt\n")
    return path


def load_generator(path: Path, device: torch.device | str | None = None,
                   expect: str | None = None) -> tuple[Generator, dict[str, Any]]:
    """Rebuild a generator from its checkpoint folder (config from meta.json), in eval mode on `device`; `expect`
    refuses another generator. Returns (generator, meta)."""
    from .dist import pick_device
    from .generators import build_generator
    from .models.gpt import GPTConfig

    meta = ck.read_meta(path, expect_kind="ar", hint=" (train one with `mergevq train-ar`)")
    if expect is not None:
        ck.read_meta(path, expect_generator=expect)
    try:
        gen = build_generator(meta["generator"], GPTConfig(**meta["gpt"]), **meta.get("options", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/meta.json does not describe a generator: {e}") from None
    ck.load_state_strict(gen, ck.read_tensors(path, "generator"), str(path))
    dev = device if not isinstance(device, (str, type(None))) else pick_device(device)
    return gen.to(dev).eval(), meta


def tokenizer_of_generator(meta: dict[str, Any], override: str | Path | None = None,
                           device: str | None = None) -> tuple[MergeVQTokenizer, Path]:
    """The tokenizer a generator was trained on (recorded in its meta.json, checked by weights hash), or
    `override` if it moved. A recorded checkpoint that was rotated away falls back to its run's latest."""
    from .fileio import sha256_file

    rec = meta.get("tokenizer", {})
    where = override or rec.get("checkpoint")
    if not where:
        raise CheckpointError("the generator checkpoint does not record its tokenizer: pass --tokenizer RUN")
    recorded = Path(where)
    if override is None and not recorded.exists() and recorded.parent.name == ck.CKPT_DIR and recorded.parent.parent.is_dir():
        where = recorded.parent.parent
    try:
        tok, path = load_tokenizer(where, device)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the generator was trained on tokenizer {rec.get('checkpoint')}; pass --tokenizer RUN if it moved)") from None
    if rec.get("hash") and sha256_file(ck.weights_file(path, "ema")) != rec["hash"]:
        raise CheckpointError(f"tokenizer {path} is not the one the generator was trained on (weights hash differs)")
    return tok, path


# ----------------------------------------------------------------------------- tuned source recovery


def load_tuned_recovery(ckpt: str | Path, tok: MergeVQTokenizer, tokenizer_hash: str | None,
                        option: str = "--recovery") -> tuple[torch.nn.Module, Path, dict[str, Any]]:
    """A source recovery model tuned by `mergevq tune-recovery` (a run or checkpoint folder): a copy of
    `tok.recovery` with the tuned weights, in eval mode on its device. Refuses one tuned for another tokenizer
    (`tokenizer_hash`: the weights hash the generator records); `option` names the option in errors. Returns
    (model, checkpoint folder, meta)."""
    import copy

    try:
        path = ck.resolve_checkpoint(Path(ckpt))
    except CheckpointError as e:
        raise CheckpointError(f"{option}: {e}") from None
    meta = ck.read_meta(path, expect_kind="recovery", prefix=f"{option}: ", hint=" (make one with `mergevq tune-recovery`)")
    if tok.recovery is None:
        raise CheckpointError(f"{option}: the tokenizer has no source recovery model to replace")
    theirs = meta.get("tokenizer", {}).get("hash")
    if tokenizer_hash and theirs != tokenizer_hash:
        raise CheckpointError(f"{option}: {path} was tuned for another tokenizer ({meta.get('tokenizer', {}).get('checkpoint')}) "
                              "than this generator's (weights hash differs)")
    model = copy.deepcopy(tok.recovery)
    ck.load_state_strict(model, ck.read_tensors(path, "recovery"), f"{option}: {path}")
    return model.eval(), path, meta
