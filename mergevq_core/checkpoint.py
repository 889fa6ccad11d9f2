"""Atomic checkpoints that never execute code on load.

A run folder holds `checkpoints/step_0000500/` folders and a `checkpoints/latest` pointer. Each checkpoint is
written into a temporary folder, fsynced and renamed into place, and only then does `latest` move (itself by
write-then-rename), so a crash at any moment leaves the previous checkpoint intact and pointed to.
Contents: `<name>.safetensors` per model, `meta.json` (format version, kind, step, resolved config),
`train_state.pt` (optimizers, scaler, RNG, data position; read with `weights_only=True`).

An exported folder (`mergevq export`, the Hugging Face layout: `config.json` + `model.safetensors` + `README.md`)
reads like a checkpoint too: its `config.json` is the checkpoint's meta.json with an `export` entry, and its one
`model.safetensors` serves the weight names that entry lists (`ema` and `tokenizer`, or `generator`), in float32
whatever dtype it was stored in. Such a folder on the Hugging Face hub is named `hf-hub:owner/name` (fetched through
`huggingface_hub`; its local cache alone with `HF_HUB_OFFLINE=1`), or `owner/name` when it is in the local cache.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError
from .fileio import fsync_dir, write_atomic

FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"  # the Hugging Face layout
HUB_PREFIX = "hf-hub:"  # as timm and open_clip name a Hugging Face repository
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def save_checkpoint(
    run_dir: Path, step: int, tensors: dict[str, dict[str, Tensor]], state: dict[str, Any], meta: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / CKPT_DIR
    final = root / f"step_{step:07d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*"):  # the unfinished write of a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:07d}.", dir=root))
    except OSError as e:
        raise _write_failed(root, step, e) from None
    try:
        for name, sd in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / "train_state.pt")
        with open(tmp / "meta.json", "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "step": step, **meta}, f, indent=2, default=str)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        write_atomic(root / "latest", json.dumps({"step": step, "dir": final.name}).encode())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions, quota: the previous checkpoint and `latest` stand
            raise _write_failed(root, step, e) from None
        raise
    others = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)  # never the one `latest` names
    for old in others[:max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failed(root: Path, step: int, e: OSError) -> CheckpointError:
    try:
        previous = latest_checkpoint(root.parent)
    except CheckpointError:
        previous = None
    kept = f"{previous} (which `latest` names) is intact" if previous else "there is no earlier checkpoint"
    return CheckpointError(f"could not write the checkpoint of step {step} in {root}: {e.strerror or e}; {kept}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` points to, or None when the run has none."""
    pointer = Path(run_dir) / CKPT_DIR / "latest"
    if not pointer.is_file():
        return None
    try:
        target = Path(run_dir) / CKPT_DIR / json.loads(pointer.read_text())["dir"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{pointer} is damaged: {e}") from None
    if not (target / "meta.json").is_file():
        raise CheckpointError(f"{pointer} points to {target.name}, which is incomplete")
    return target


def is_exported(path: Path) -> bool:
    """An exported folder: `model.safetensors` next to a `config.json` (a run folder's config.json has no
    weights beside it)."""
    return (Path(path) / EXPORT_WEIGHTS).is_file() and (Path(path) / EXPORT_CONFIG).is_file()


def _exported_only(path: Path) -> bool:
    """An exported folder that is not also a checkpoint folder (whose meta.json then wins)."""
    return is_exported(path) and not (Path(path) / "meta.json").is_file()


def resolve_checkpoint(path: Path | str) -> Path:
    """A run folder (→ its latest checkpoint), a checkpoint folder, an exported folder, or a Hugging Face
    repository: `hf-hub:owner/name` (downloaded unless HF_HUB_OFFLINE=1), or a bare `owner/name` that is no local
    path (the local Hugging Face cache only, so that a mistyped path never goes to the network)."""
    text = str(path)
    if text.startswith(HUB_PREFIX):
        return _from_hub(text[len(HUB_PREFIX):], local_only=False)
    path = Path(path)
    if (path / "meta.json").is_file() or is_exported(path):
        return path
    if not path.exists():
        if _REPO_ID.fullmatch(text):
            return _from_hub(text, local_only=True)
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a run or checkpoint folder")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no checkpoint yet")
    return ckpt


def _from_hub(repo_id: str, local_only: bool) -> Path:
    """The snapshot folder of a Hugging Face model repository written by `mergevq export`."""
    if not _REPO_ID.fullmatch(repo_id):
        raise CheckpointError(f"{HUB_PREFIX}{repo_id}: a Hugging Face repository id is owner/name")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=local_only,
                                        allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except Exception as e:  # not cached, unknown repository, no network, HF_HUB_OFFLINE: one line either way
        if local_only:
            raise CheckpointError(f"checkpoint not found: {repo_id} (no such folder, nor a Hugging Face repository "
                                  f"in the local cache; {HUB_PREFIX}{repo_id} downloads it)") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{HUB_PREFIX}{repo_id}: could not get it from the Hugging Face hub: {reason}") from None
    if not is_exported(folder):
        raise CheckpointError(f"Hugging Face repository {repo_id} holds no {EXPORT_CONFIG} + {EXPORT_WEIGHTS} "
                              "written by `mergevq export`")
    return folder


KIND_NAMES = {"tokenizer": "tokenizer", "ar": "generator", "recovery": "tuned source recovery"}  # meta.json `kind` -> what a user calls it


def read_meta(ckpt: Path, expect_kind: str | None = None, expect_generator: str | None = None,
              prefix: str = "", hint: str = "") -> dict[str, Any]:
    """A checkpoint's meta.json, checked: its format version, and (when given) its kind (`tokenizer` or `ar`) and
    generator name. A mismatch is one `CheckpointError` line, `prefix` before it (e.g. the option that named the
    checkpoint) and `hint` after it (what to do instead)."""
    name = EXPORT_CONFIG if _exported_only(ckpt) else "meta.json"
    try:
        meta = json.loads((Path(ckpt) / name).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt}/{name}: {e}") from None
    if name == EXPORT_CONFIG and isinstance(meta, dict):
        meta = _exported_meta(Path(ckpt), meta)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{ckpt}: checkpoint format {found} is not {FORMAT_VERSION}")
    kind = meta.get("kind", "tokenizer")
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointError(f"{prefix}{ckpt} is a {kind} checkpoint, not a {KIND_NAMES.get(expect_kind, expect_kind)}{hint}")
    if expect_generator is not None and meta.get("generator") != expect_generator:
        raise CheckpointError(f"{prefix}{ckpt} holds a {meta.get('generator')} generator, not {expect_generator}{hint}")
    return meta


def _exported_meta(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """An exported config.json as meta.json reads: the generator's tokenizer, recorded relative to the exported
    folder (`tokenizer/` inside it, `../tokenizer` beside it), made a path."""
    if not isinstance(meta.get("export"), dict):
        raise CheckpointError(f"{folder}/{EXPORT_CONFIG} was not written by `mergevq export`")
    rec = meta.get("tokenizer")
    if isinstance(rec, dict) and rec.get("relative"):
        meta["tokenizer"] = {**rec, "checkpoint": str((folder / rec["checkpoint"]).resolve())}
    return meta


def weights_file(ckpt: Path, name: str) -> Path:
    """The file that holds a checkpoint's `name` weights (`<name>.safetensors`, or an exported folder's
    model.safetensors when it serves that name)."""
    path = Path(ckpt) / f"{name}.safetensors"
    if not path.is_file() and _exported_only(ckpt):
        if name in read_meta(ckpt)["export"].get("weights", []):
            return Path(ckpt) / EXPORT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {name} weights")
    return path


def read_tensors(ckpt: Path, name: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = weights_file(ckpt, name)
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if path.name == EXPORT_WEIGHTS:  # stored in half precision, perhaps: models run in float32
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def read_train_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path}: {first}") from None


def load_state_strict(module: torch.nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """load_state_dict(strict=True) with a one-line error naming the mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''} ({len(keys)})")
        raise CheckpointError(f"{what} does not match the model: {'; '.join(parts)}")
    module.load_state_dict(sd, strict=True)
