"""Writing token shards (the format is described in `codes`): `ShardWriter`, resumable and shared by torchrun
ranks."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError
from ..fileio import write_atomic
from .codes import FORMAT_VERSION, INT16_MAX, KIND, MANIFEST, TOKEN_MODES, is_tmp, read_manifest, shard_file, shard_key, single_view, views_of

__all__ = ["ShardWriter"]


class ShardWriter:
    """Writes (or resumes writing) a token-shards folder, one shard of `shard_size` items at a time.

    Usage: `for i in w.pending(): r = w.item_range(i); ...; w.write(i, ids, assign, labels, indices)`, then
    `w.finish()`. If `out_dir/manifest.json` exists it must come from the same tokenizer (weights hash) and the
    same num_items / shard_size / tokens mode / keep / views / codebook_size / n_tokens / grid / precision, or a
    `DataError` is raised; its finished shards are kept, and so are shard files the manifest does not list yet
    whose header says they are the same tokenizer's shard (written by another torchrun rank before a kill).
    Leftover temporary files of a killed run are deleted.

    Under torchrun rank 0 is the `owner`: it checks the folder, cleans it and keeps the manifest; the other ranks
    open it after rank 0 has (`owner=False`), write only their shard files, and rank 0 `adopt()`s them at the end.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        tokenizer_info: dict[str, Any],
        codebook_size: int,
        n_tokens: int,
        grid: int,
        tokens_mode: str,
        keep: int | None,
        dataset_info: dict[str, Any],
        num_items: int,
        shard_size: int = 4096,
        views: dict[str, Any] | None = None,
        owner: bool = True,
        precision: str = "fp32",
    ) -> None:
        if tokens_mode not in TOKEN_MODES:
            raise ValueError(f"tokens_mode must be one of {', '.join(TOKEN_MODES)}, got {tokens_mode!r}")
        if "hash" not in tokenizer_info:
            raise ValueError("tokenizer_info needs a 'hash' (sha256 of the tokenizer weights file)")
        if codebook_size < 1 or codebook_size > 2**31:
            raise ValueError(f"codebook_size must be in [1, 2^31] (ids are stored as int32), got {codebook_size}")
        if n_tokens < 1 or grid < 1 or num_items < 0 or shard_size < 1:
            raise ValueError(
                f"need n_tokens, grid, shard_size >= 1 and num_items >= 0, got {n_tokens}, {grid}, {shard_size}, {num_items}"
            )
        views = dict(views) if views is not None else single_view()
        if int(views.get("count", 0)) < 1:
            raise ValueError(f"views needs a count >= 1, got {views!r}")
        self.out_dir = Path(out_dir)
        self.codebook_size = int(codebook_size)
        self.n_tokens = int(n_tokens)
        self.shard_size = int(shard_size)
        self.num_items = int(num_items)
        self.num_views = int(views["count"])
        self.num_shards = math.ceil(self.num_items / self.shard_size)
        self.owner = bool(owner)
        self.hash = str(tokenizer_info["hash"])
        fresh: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "tokenizer": {
                "checkpoint": str(tokenizer_info.get("checkpoint", "")),
                "hash": self.hash,
                "config": tokenizer_info.get("config", {}),
            },
            "codebook_size": self.codebook_size,
            "n_tokens": self.n_tokens,
            "grid": int(grid),
            "tokens": {"mode": tokens_mode, "keep": None if keep is None else int(keep)},
            "views": views,
            "precision": str(precision),  # of the encoder pass (`tokenize --precision`)
            "dataset": dataset_info,
            "shard_size": self.shard_size,
            "num_items": self.num_items,
            "shards": {},
            "complete": False,
        }
        path = self.out_dir / MANIFEST
        if self.owner:
            if self.out_dir.exists() and not self.out_dir.is_dir():
                raise DataError(f"--out {self.out_dir} is a file: give a folder for the token shards")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._clean_tmp()
        elif not path.exists():
            raise DataError(f"{self.out_dir} has no {MANIFEST}: rank 0 opens the folder before the other ranks")
        if path.exists():
            old = read_manifest(path)
            self._check_same(old, fresh)
            fresh["shards"] = self._kept_shards(old.get("shards", {}))
            fresh["complete"] = bool(old.get("complete")) and not self._pending_from(fresh["shards"])
        self._manifest = fresh
        if self.owner:
            self._save_manifest()

    # ------------------------------------------------------------------ resume
    def _clean_tmp(self) -> None:
        for p in self.out_dir.iterdir():
            if is_tmp(p.name) and p.is_file():
                try:
                    p.unlink()
                except OSError:
                    pass

    def _check_same(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        old_hash = str(old.get("tokenizer", {}).get("hash", ""))
        new_hash = new["tokenizer"]["hash"]
        if old_hash != new_hash:
            raise DataError(
                f"{self.out_dir} holds shards of another tokenizer ({old_hash[:12]}…, this one is {new_hash[:12]}…): "
                "use a new --out folder"
            )
        checks = {
            "format_version": (old.get("format_version"), new["format_version"]),
            "num_items": (old.get("num_items"), new["num_items"]),
            "shard_size": (old.get("shard_size"), new["shard_size"]),
            "tokens mode": (old.get("tokens", {}).get("mode"), new["tokens"]["mode"]),
            "keep": (old.get("tokens", {}).get("keep"), new["tokens"]["keep"]),
            "views": (views_of(old), new["views"]),
            "codebook_size": (old.get("codebook_size"), new["codebook_size"]),
            "n_tokens": (old.get("n_tokens"), new["n_tokens"]),
            "grid": (old.get("grid"), new["grid"]),
            "precision": (old.get("precision", "fp32"), new["precision"]),  # folders from before it: fp32
        }
        diffs = [f"{name} {a!r} (now {b!r})" for name, (a, b) in checks.items() if a != b]
        if diffs:
            raise DataError(
                f"{self.out_dir} was written with other settings: {', '.join(diffs)}; "
                "use a new --out folder or the same settings to resume"
            )

    def _file_is_ours(self, i: int) -> bool:
        """Whether shard i's file exists and its header says it is this tokenizer's shard i, complete."""
        from safetensors import safe_open

        path = self.out_dir / shard_file(i)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # a garbled file is simply written again
            return False
        return (meta.get("kind") == KIND and meta.get("shard") == str(i) and meta.get("hash") == self.hash
                and meta.get("count") == str(len(self.item_range(i))) and meta.get("views") == str(self.num_views))

    def _kept_shards(self, shards: Any) -> dict[str, dict[str, Any]]:
        """Finished shards: listed by the manifest with their file present, or found on disk by `_file_is_ours`."""
        kept: dict[str, dict[str, Any]] = {}
        shards = shards if isinstance(shards, dict) else {}
        for i in range(self.num_shards):
            entry = shards.get(shard_key(i))
            count = len(self.item_range(i))
            listed = (isinstance(entry, dict) and entry.get("file") == shard_file(i) and entry.get("count") == count
                      and (self.out_dir / shard_file(i)).is_file())
            if listed or self._file_is_ours(i):
                kept[shard_key(i)] = {"file": shard_file(i), "count": count}
        return kept

    def adopt(self) -> None:
        """Owner: record the shards other ranks wrote (their files on disk), then save the manifest."""
        self._manifest["shards"] = self._kept_shards(self._manifest["shards"])
        self._save_manifest()

    # ------------------------------------------------------------------ queries
    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as last written."""
        return copy.deepcopy(self._manifest)

    def _pending_from(self, shards: dict[str, Any]) -> list[int]:
        return [i for i in range(self.num_shards) if shard_key(i) not in shards]

    def pending(self) -> list[int]:
        """Shard indices still to write, ascending."""
        return self._pending_from(self._manifest["shards"])

    def item_range(self, i: int) -> range:
        """Dataset items (positions 0..num_items-1) that shard i covers."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range [0, {self.num_shards})")
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_items))

    # ------------------------------------------------------------------ writing
    def write(self, i: int, ids_list: list[Tensor], assign: Tensor, labels: Tensor, indices: Tensor) -> None:
        """Write shard i and (owner) record it in the manifest.

        ids_list: M·V tensors (K,) of token ids in [0, codebook_size), item-major (item j's V views in order);
        assign: (M, V, N) (or (M, N) with one view) with each row in [0, K) of its view; labels, indices: (M,).
        M must equal `len(item_range(i))`.
        """
        from safetensors.torch import save

        m, v, n = len(self.item_range(i)), self.num_views, self.n_tokens
        if assign.dim() == 2 and v == 1:
            assign = assign[:, None]
        if len(ids_list) != m * v:
            raise ValueError(f"shard {i} covers {m} items of {v} views, got {len(ids_list)} id tensors")
        if tuple(assign.shape) != (m, v, n):
            raise ValueError(f"assign must be ({m}, {v}, {n}), got {tuple(assign.shape)}")
        if tuple(labels.shape) != (m,) or tuple(indices.shape) != (m,):
            raise ValueError(f"labels and indices must be ({m},), got {tuple(labels.shape)} and {tuple(indices.shape)}")
        for j, t in enumerate(ids_list):
            if t.dim() != 1 or t.numel() < 1:
                raise ValueError(f"ids of view {j} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
        k = torch.tensor([t.numel() for t in ids_list], dtype=torch.int64).view(m, v)
        ids = torch.cat([t.detach().to("cpu", torch.int64) for t in ids_list])
        if (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.codebook_size}), got [{int(ids.min())}, {int(ids.max())}]")
        a = assign.detach().to("cpu", torch.int64)
        if (int(a.min()) < 0 or bool((a.max(dim=2).values >= k).any())):
            raise ValueError("assign values must lie in [0, K) of their view")
        kmax = int(k.max())
        tensors = {
            "ids": ids.to(torch.int32).contiguous(),
            "k": k.to(torch.int32).contiguous(),
            "assign": a.to(torch.int16 if kmax <= INT16_MAX else torch.int32).contiguous(),
            "label": labels.detach().to("cpu", torch.int64).contiguous(),
            "index": indices.detach().to("cpu", torch.int64).contiguous(),
        }
        header = {"kind": KIND, "shard": str(i), "hash": self.hash, "count": str(m), "views": str(v)}
        write_atomic(self.out_dir / shard_file(i), save(tensors, metadata=header))
        shards = dict(self._manifest["shards"])
        shards[shard_key(i)] = {"file": shard_file(i), "count": m}
        self._manifest["shards"] = dict(sorted(shards.items()))
        self._manifest["complete"] = False
        if self.owner:
            self._save_manifest()

    def finish(self) -> None:
        """Owner: mark the folder complete (all shards written); readers accept it from then on."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"cannot finish {self.out_dir}: shards {missing[:8]} are not written yet")
        self._manifest["complete"] = True
        self._save_manifest()

    def _save_manifest(self) -> None:
        if not self.owner:
            raise RuntimeError("only the owner (rank 0) writes the manifest")
        data = json.dumps(self._manifest, indent=2).encode("utf-8")
        write_atomic(self.out_dir / MANIFEST, data)
