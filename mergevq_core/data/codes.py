"""Token shards: a dataset tokenized once by a MergeVQ tokenizer, stored for training generators.

A folder holds `manifest.json` and `shard_{i:05d}.safetensors` files. Shard i covers dataset items
[i·S, min((i+1)·S, num_items)) and stores, for its M items with K_j merged tokens each and N grid positions:

- `ids`    (ΣK_j,) int32: every item's token ids, concatenated in item order;
- `k`      (M,) int32: K_j, to split `ids`;
- `assign` (M, N) int16 (int32 if some K_j > 32767): which merged token each grid position belongs to;
- `label`  (M,) int64 (-1 unknown) and `index` (M,) int64, the dataset index of the item.

Every file is written to a temporary file in the folder and renamed into place, and the manifest is rewritten
(atomically, fsynced) after each finished shard, so a killed run resumes where it stopped: `ShardWriter` on the
same folder with the same settings keeps the finished shards and `pending()` lists the rest. Readers refuse a
folder whose manifest does not say `complete`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from ..fileio import TMP_PREFIX, TMP_SUFFIX, sha256_file, write_atomic

__all__ = ["FORMAT_VERSION", "MANIFEST", "ShardWriter", "TokenShards", "collate_tokens", "sha256_file"]

FORMAT_VERSION = 1
KIND = "token-shards"
MANIFEST = "manifest.json"
TOKEN_MODES = ("fixed", "sample")
INT16_MAX = 32767
# temporaries (hidden: ".shard_00003.safetensors.<random>.tmp") come from fileio.write_atomic


def shard_file(i: int) -> str:
    """File name of shard i."""
    return f"shard_{i:05d}.safetensors"


def _shard_key(i: int) -> str:
    return f"{i:05d}"


def _is_tmp(name: str) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX) and (
        name.startswith(f"{TMP_PREFIX}shard_") or name.startswith(f"{TMP_PREFIX}{MANIFEST}")
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path.parent} has no {MANIFEST}: it is not a token-shards folder (run `mergevq tokenize`)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise DataError(f"{path} is not a token-shards manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {manifest.get('format_version')!r}; this mergevq reads version {FORMAT_VERSION}"
        )
    return manifest


class ShardWriter:
    """Writes (or resumes writing) a token-shards folder, one shard of `shard_size` items at a time.

    Usage: `for i in w.pending(): r = w.item_range(i); ...; w.write(i, ids, assign, labels, indices)`, then
    `w.finish()`. If `out_dir/manifest.json` exists it must come from the same tokenizer (weights hash) and the
    same num_items / shard_size / tokens mode / keep / codebook_size / n_tokens / grid, or a `DataError` is
    raised; its finished shards are kept. Leftover temporary files of a killed run are deleted.
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
        self.out_dir = Path(out_dir)
        self.codebook_size = int(codebook_size)
        self.n_tokens = int(n_tokens)
        self.shard_size = int(shard_size)
        self.num_items = int(num_items)
        self.num_shards = math.ceil(self.num_items / self.shard_size)
        fresh: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "tokenizer": {
                "checkpoint": str(tokenizer_info.get("checkpoint", "")),
                "hash": str(tokenizer_info["hash"]),
                "config": tokenizer_info.get("config", {}),
            },
            "codebook_size": self.codebook_size,
            "n_tokens": self.n_tokens,
            "grid": int(grid),
            "tokens": {"mode": tokens_mode, "keep": None if keep is None else int(keep)},
            "dataset": dataset_info,
            "shard_size": self.shard_size,
            "num_items": self.num_items,
            "shards": {},
            "complete": False,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        path = self.out_dir / MANIFEST
        if path.exists():
            old = _read_manifest(path)
            self._check_same(old, fresh)
            fresh["shards"] = self._kept_shards(old.get("shards", {}))
            fresh["complete"] = bool(old.get("complete")) and not self._pending_from(fresh["shards"])
        self._manifest = fresh
        self._save_manifest()

    # ------------------------------------------------------------------ resume
    def _clean_tmp(self) -> None:
        for p in self.out_dir.iterdir():
            if _is_tmp(p.name) and p.is_file():
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
            "num_items": (old.get("num_items"), new["num_items"]),
            "shard_size": (old.get("shard_size"), new["shard_size"]),
            "tokens mode": (old.get("tokens", {}).get("mode"), new["tokens"]["mode"]),
            "keep": (old.get("tokens", {}).get("keep"), new["tokens"]["keep"]),
            "codebook_size": (old.get("codebook_size"), new["codebook_size"]),
            "n_tokens": (old.get("n_tokens"), new["n_tokens"]),
            "grid": (old.get("grid"), new["grid"]),
        }
        diffs = [f"{name} {a!r} (now {b!r})" for name, (a, b) in checks.items() if a != b]
        if diffs:
            raise DataError(
                f"{self.out_dir} was written with other settings: {', '.join(diffs)}; "
                "use a new --out folder or the same settings to resume"
            )

    def _kept_shards(self, shards: Any) -> dict[str, dict[str, Any]]:
        """Finished shards of an earlier run whose file is present and whose count is right."""
        kept: dict[str, dict[str, Any]] = {}
        if not isinstance(shards, dict):
            return kept
        for i in range(self.num_shards):
            entry = shards.get(_shard_key(i))
            if not isinstance(entry, dict) or entry.get("file") != shard_file(i):
                continue
            if entry.get("count") != len(self.item_range(i)) or not (self.out_dir / shard_file(i)).is_file():
                continue
            kept[_shard_key(i)] = {"file": shard_file(i), "count": len(self.item_range(i))}
        return kept

    # ------------------------------------------------------------------ queries
    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as last written."""
        return copy.deepcopy(self._manifest)

    def _pending_from(self, shards: dict[str, Any]) -> list[int]:
        return [i for i in range(self.num_shards) if _shard_key(i) not in shards]

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
        """Write shard i and record it in the manifest.

        ids_list: M tensors (K_j,) of token ids in [0, codebook_size); assign: (M, N) with row j in [0, K_j);
        labels, indices: (M,). M must equal `len(item_range(i))`.
        """
        from safetensors.torch import save

        m = len(self.item_range(i))
        n = self.n_tokens
        if len(ids_list) != m:
            raise ValueError(f"shard {i} covers {m} items, got {len(ids_list)} id tensors")
        if tuple(assign.shape) != (m, n):
            raise ValueError(f"assign must be ({m}, {n}), got {tuple(assign.shape)}")
        if tuple(labels.shape) != (m,) or tuple(indices.shape) != (m,):
            raise ValueError(f"labels and indices must be ({m},), got {tuple(labels.shape)} and {tuple(indices.shape)}")
        for j, t in enumerate(ids_list):
            if t.dim() != 1 or t.numel() < 1:
                raise ValueError(f"ids of item {j} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
        k = torch.tensor([t.numel() for t in ids_list], dtype=torch.int64)
        ids = torch.cat([t.detach().to("cpu", torch.int64) for t in ids_list])
        if (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.codebook_size}), got [{int(ids.min())}, {int(ids.max())}]")
        a = assign.detach().to("cpu", torch.int64)
        if (int(a.min()) < 0 or bool((a.max(dim=1).values >= k).any())):
            raise ValueError("assign values must lie in [0, K) of their item")
        kmax = int(k.max())
        tensors = {
            "ids": ids.to(torch.int32).contiguous(),
            "k": k.to(torch.int32).contiguous(),
            "assign": a.to(torch.int16 if kmax <= INT16_MAX else torch.int32).contiguous(),
            "label": labels.detach().to("cpu", torch.int64).contiguous(),
            "index": indices.detach().to("cpu", torch.int64).contiguous(),
        }
        write_atomic(self.out_dir / shard_file(i), save(tensors, metadata={"kind": KIND, "shard": str(i)}))
        shards = dict(self._manifest["shards"])
        shards[_shard_key(i)] = {"file": shard_file(i), "count": m}
        self._manifest["shards"] = dict(sorted(shards.items()))
        self._manifest["complete"] = False
        self._save_manifest()

    def finish(self) -> None:
        """Mark the folder complete (all shards written); readers accept it from then on."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"cannot finish {self.out_dir}: shards {missing[:8]} are not written yet")
        self._manifest["complete"] = True
        self._save_manifest()

    def _save_manifest(self) -> None:
        data = json.dumps(self._manifest, indent=2).encode("utf-8")
        write_atomic(self.out_dir / MANIFEST, data)


class TokenShards(Dataset):
    """A finished token-shards folder as a dataset of items
    `{"ids": LongTensor (K,), "assign": LongTensor (N,), "k": int, "label": int, "index": int}`.

    Shards are loaded on first use and the `cache_shards` most recently used stay in memory (per process:
    DataLoader workers each keep their own cache, which is not pickled).
    """

    def __init__(self, dir: str | os.PathLike[str], cache_shards: int = 4) -> None:
        self.dir = Path(dir)
        manifest = _read_manifest(self.dir / MANIFEST)
        if manifest.get("complete") is not True:
            raise DataError(f"{self.dir} is incomplete: run `mergevq tokenize` again to finish it")
        try:
            self._num_items = int(manifest["num_items"])
            self._shard_size = int(manifest["shard_size"])
            self._n_tokens = int(manifest["n_tokens"])
            int(manifest["codebook_size"])
            str(manifest["tokenizer"]["hash"])
            shards = manifest["shards"]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.dir / MANIFEST} is malformed: missing or bad {e}") from e
        self._num_shards = math.ceil(self._num_items / self._shard_size) if self._shard_size > 0 else 0
        self._files: list[Path] = []
        for i in range(self._num_shards):
            entry = shards.get(_shard_key(i)) if isinstance(shards, dict) else None
            want = min(self._shard_size, self._num_items - i * self._shard_size)
            if not isinstance(entry, dict) or entry.get("count") != want:
                raise DataError(f"{self.dir / MANIFEST} lacks shard {i} (or its count is not {want}): the folder is damaged")
            path = self.dir / str(entry.get("file", shard_file(i)))
            if not path.is_file():
                raise DataError(f"{path} is missing: the token-shards folder is damaged")
            self._files.append(path)
        self._manifest = manifest
        self._cache_size = max(1, int(cache_shards))
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()

    # ------------------------------------------------------------------ properties
    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest."""
        return copy.deepcopy(self._manifest)

    @property
    def files(self) -> list[Path]:
        """The shard files, in order."""
        return list(self._files)

    @property
    def codebook_size(self) -> int:
        return int(self._manifest["codebook_size"])

    @property
    def n_tokens(self) -> int:
        """N, grid positions per item (the length of `assign`)."""
        return self._n_tokens

    @property
    def grid(self) -> int:
        return int(self._manifest["grid"])

    @property
    def tokenizer_hash(self) -> str:
        return str(self._manifest["tokenizer"]["hash"])

    # ------------------------------------------------------------------ loading
    def _load(self, s: int) -> dict[str, Tensor]:
        hit = self._cache.get(s)
        if hit is not None:
            self._cache.move_to_end(s)
            return hit
        from safetensors.torch import load_file

        path = self._files[s]
        try:
            t = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise DataError(f"cannot read {path}: {e}") from e
        m = min(self._shard_size, self._num_items - s * self._shard_size)
        try:
            k = t["k"].long()
            ok = (
                tuple(k.shape) == (m,) and tuple(t["assign"].shape) == (m, self._n_tokens)
                and tuple(t["label"].shape) == (m,) and tuple(t["index"].shape) == (m,)
                and t["ids"].dim() == 1 and t["ids"].numel() == int(k.sum())
            )
        except KeyError as e:
            raise DataError(f"{path} lacks tensor {e}: the token-shards folder is damaged") from e
        if not ok:
            raise DataError(f"{path} has inconsistent shapes for {m} items of {self._n_tokens} positions")
        offsets = torch.zeros(m + 1, dtype=torch.int64)
        torch.cumsum(k, 0, out=offsets[1:])
        entry = {"ids": t["ids"], "offsets": offsets, "k": k, "assign": t["assign"], "label": t["label"], "index": t["index"]}
        self._cache[s] = entry
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ Dataset
    def __len__(self) -> int:
        return self._num_items

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = self._num_items
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} out of range for {n} items")
        s, j = divmod(i, self._shard_size)
        sh = self._load(s)
        a, b = int(sh["offsets"][j]), int(sh["offsets"][j + 1])
        return {
            "ids": sh["ids"][a:b].long(),
            "assign": sh["assign"][j].long(),
            "k": b - a,
            "label": int(sh["label"][j]),
            "index": int(sh["index"][j]),
        }


def collate_tokens(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Batch TokenShards items: `ids` (B, Kmax) long padded with -1, `k` (B,), `assign` (B, N), `label` (B,),
    `index` (B,), all long."""
    if not items:
        raise ValueError("collate_tokens needs at least one item")
    k = torch.tensor([int(it["ids"].numel()) for it in items], dtype=torch.int64)
    ids = torch.full((len(items), int(k.max())), -1, dtype=torch.int64)
    for row, it in enumerate(items):
        ids[row, : it["ids"].numel()] = it["ids"]
    return {
        "ids": ids,
        "k": k,
        "assign": torch.stack([it["assign"].long() for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.int64),
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64),
    }
