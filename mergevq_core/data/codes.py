"""Token shards: a dataset tokenized once by a MergeVQ tokenizer, stored for training generators.

A folder holds `manifest.json` and `shard_{i:05d}.safetensors` files. Shard i covers dataset items
[i·S, min((i+1)·S, num_items)) and stores, for its M items seen in V views each (LlamaGen's ten-crop + flip
gives V = 10; one centre view gives V = 1), with K_jv merged tokens per view and N grid positions:

- `ids`    (Σ K_jv,) int32: every view's token ids, concatenated item-major (item j's views 0..V-1, then j+1);
- `k`      (M, V) int32: K_jv, to split `ids`;
- `assign` (M, V, N) int16 (int32 if some K > 32767): which merged token each grid position belongs to;
- `label`  (M,) int64 (-1 unknown) and `index` (M,) int64, the dataset index of the item.

Format 1 (one view, `k` (M,) and `assign` (M, N)) is still read. View 0 is the centre view: validation and
`TokenShards[i]` use it; training draws one view per item per epoch (`EpochViews`).

`shard_writer.ShardWriter` writes them. Every file is written to a temporary file in the folder and renamed into place; the manifest is rewritten
(atomically, fsynced) after each finished shard, and each shard file names its tokenizer, shard and count in
its own header, so a killed run, or one whose torchrun ranks wrote shards the manifest had not recorded yet,
resumes where it stopped: `ShardWriter` on the same folder with the same settings keeps the finished shards and
`pending()` lists the rest. Readers refuse a folder whose manifest does not say `complete`.

Reading memory-maps the shard files and slices one item out of them, so a shuffled epoch over a million items
reads a few hundred bytes per item instead of whole shards, and DataLoader workers share the page cache.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from ..fileio import TMP_PREFIX, TMP_SUFFIX, sha256_file

__all__ = ["FORMAT_VERSION", "MANIFEST", "EpochViews", "TokenShards", "collate_tokens", "read_manifest", "sha256_file",
           "shard_file", "single_view", "views_of"]

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # 1: one view per item, k (M,) and assign (M, N)
KIND = "token-shards"
MANIFEST = "manifest.json"
TOKEN_MODES = ("fixed", "sample")
INT16_MAX = 32767
# temporaries (hidden: ".shard_00003.safetensors.<random>.tmp") come from fileio.write_atomic


def shard_file(i: int) -> str:
    """File name of shard i."""
    return f"shard_{i:05d}.safetensors"


def shard_key(i: int) -> str:
    return f"{i:05d}"


def is_tmp(name: str) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX) and (
        name.startswith(f"{TMP_PREFIX}shard_") or name.startswith(f"{TMP_PREFIX}{MANIFEST}")
    )


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path.parent} has no {MANIFEST}: it is not a token-shards folder (run `mergevq tokenize`)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise DataError(f"{path} is not a token-shards manifest")
    if manifest.get("format_version") not in READ_VERSIONS:
        raise DataError(
            f"{path} has format_version {manifest.get('format_version')!r}; this mergevq reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}"
        )
    return manifest


def single_view() -> dict[str, Any]:
    """The views entry of a folder with one centre view per item (format 1, or `tokenize --views center`)."""
    return {"mode": "center", "count": 1, "crop_range": 1.0}


def views_of(manifest: dict[str, Any]) -> dict[str, Any]:
    views = manifest.get("views")
    return dict(views) if isinstance(views, dict) else single_view()


class _Shard:
    """One shard file, memory-mapped: its small per-item arrays in memory, ids and assign sliced on demand."""

    def __init__(self, path: Path, m: int, n: int, v: int) -> None:
        from safetensors import safe_open

        try:
            self.handle = safe_open(str(path), "pt")
            names = set(self.handle.keys())
            missing = sorted({"ids", "k", "assign", "label", "index"} - names)
            if missing:
                raise DataError(f"{path} lacks tensor {missing[0]!r}: the token-shards folder is damaged")
            k = self.handle.get_tensor("k").long()
            self.label, self.index = self.handle.get_tensor("label"), self.handle.get_tensor("index")
            self.ids, self.assign = self.handle.get_slice("ids"), self.handle.get_slice("assign")
            ids_shape, assign_shape = list(self.ids.get_shape()), list(self.assign.get_shape())
        except DataError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise DataError(f"cannot read {path}: {e}") from e
        self.flat = k.dim() == 1  # format 1: k (M,), assign (M, N)
        k = k.view(-1, 1) if self.flat else k
        ok = (tuple(k.shape) == (m, v) and tuple(self.label.shape) == (m,) and tuple(self.index.shape) == (m,)
              and assign_shape == ([m, n] if self.flat else [m, v, n])
              and len(ids_shape) == 1 and ids_shape[0] == int(k.sum()))
        if not ok:
            raise DataError(f"{path} has inconsistent shapes for {m} items of {v} view(s) and {n} positions")
        self.k = k
        self.offsets = torch.zeros(m * v + 1, dtype=torch.int64)
        torch.cumsum(k.flatten(), 0, out=self.offsets[1:])

    def item(self, j: int, view: int) -> tuple[Tensor, Tensor]:
        v = self.k.shape[1]
        a, b = int(self.offsets[j * v + view]), int(self.offsets[j * v + view + 1])
        ids = self.ids[a:b]
        assign = self.assign[j : j + 1] if self.flat else self.assign[j : j + 1, view : view + 1]
        return ids.long(), assign.reshape(-1).long()


class TokenShards(Dataset):
    """A finished token-shards folder as a dataset of items
    `{"ids": LongTensor (K,), "assign": LongTensor (N,), "k": int, "label": int, "index": int, "view": int}`.

    `ds[i]` is item i's view 0 (the centre view); `ds.get(i, view)` any view. Shard files are memory-mapped when
    first used and the `cache_shards` most recently used stay open (per process: DataLoader workers each keep
    their own, which are not pickled).
    """

    def __init__(self, dir: str | os.PathLike[str], cache_shards: int = 64) -> None:
        self.dir = Path(dir)
        manifest = read_manifest(self.dir / MANIFEST)
        if manifest.get("complete") is not True:
            raise DataError(f"{self.dir} is incomplete: run `mergevq tokenize` again to finish it")
        try:
            self._num_items = int(manifest["num_items"])
            self._shard_size = int(manifest["shard_size"])
            self._n_tokens = int(manifest["n_tokens"])
            int(manifest["codebook_size"])
            str(manifest["tokenizer"]["hash"])
            shards = manifest["shards"]
            self._views = views_of(manifest)
            self._num_views = int(self._views["count"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.dir / MANIFEST} is malformed: missing or bad {e}") from e
        if self._num_views < 1 or (manifest.get("format_version") == 1 and self._num_views != 1):
            raise DataError(f"{self.dir / MANIFEST} is malformed: views {self._views!r}")
        self._num_shards = math.ceil(self._num_items / self._shard_size) if self._shard_size > 0 else 0
        self._files: list[Path] = []
        for i in range(self._num_shards):
            entry = shards.get(shard_key(i)) if isinstance(shards, dict) else None
            want = min(self._shard_size, self._num_items - i * self._shard_size)
            if not isinstance(entry, dict) or entry.get("count") != want:
                raise DataError(f"{self.dir / MANIFEST} lacks shard {i} (or its count is not {want}): the folder is damaged")
            path = self.dir / str(entry.get("file", shard_file(i)))
            if not path.is_file():
                raise DataError(f"{path} is missing: the token-shards folder is damaged")
            self._files.append(path)
        self._manifest = manifest
        self._cache_size = max(1, int(cache_shards))
        self._cache: OrderedDict[int, _Shard] = OrderedDict()

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

    @property
    def num_views(self) -> int:
        """V, views stored per item (1 for format-1 folders)."""
        return self._num_views

    @property
    def views(self) -> dict[str, Any]:
        """How the views were made: `{"mode", "count", "crop_range"}`."""
        return dict(self._views)

    # ------------------------------------------------------------------ loading
    def _shard(self, s: int) -> _Shard:
        hit = self._cache.get(s)
        if hit is not None:
            self._cache.move_to_end(s)
            return hit
        m = min(self._shard_size, self._num_items - s * self._shard_size)
        entry = self._cache[s] = _Shard(self._files[s], m, self._n_tokens, self._num_views)
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

    def get(self, i: int, view: int = 0) -> dict[str, Any]:
        """Item i seen in `view` (0 ≤ view < num_views)."""
        n = self._num_items
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} out of range for {n} items")
        if not 0 <= view < self._num_views:
            raise IndexError(f"view {view} out of range for {self._num_views} views")
        s, j = divmod(i, self._shard_size)
        sh = self._shard(s)
        ids, assign = sh.item(j, view)
        return {"ids": ids, "assign": assign, "k": int(ids.numel()), "label": int(sh.label[j]),
                "index": int(sh.index[j]), "view": view}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i, 0)

    def k_counts(self) -> Counter[int]:
        """How often each K occurs over every item and view (read from the small `k` arrays only)."""
        from safetensors import safe_open

        counts: Counter[int] = Counter()
        for f in self._files:
            with safe_open(str(f), "pt") as t:
                counts.update(t.get_tensor("k").flatten().tolist())
        return counts


class EpochViews(Dataset):
    """Items `indices` of `shards`, each seen in one of its views, drawn anew every epoch: view =
    hash(seed, epoch, item) mod V, a pure function, so a resumed run and every DataLoader worker draw the same
    views. The training loop calls `set_epoch` before each epoch's iterator. One-view shards give view 0."""

    def __init__(self, shards: TokenShards, indices: range | list[int], seed: int) -> None:
        self.shards, self.indices, self.seed, self.epoch = shards, indices, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view_of(self, item: int, epoch: int | None = None) -> int:
        from .rng import derive_seed

        v = self.shards.num_views
        return 0 if v == 1 else derive_seed(self.seed, self.epoch if epoch is None else epoch, item) % v

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i = self.indices[j]
        return self.shards.get(i, self.view_of(i))


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
