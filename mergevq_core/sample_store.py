"""Generated samples on disk: written shard by shard as they are made, resumable, finished into one `samples.npz`.

An output folder holds `manifest.json` (the settings that define the samples, the count and the shard size),
`shards/shard_{s:05d}.npz` (uint8 images (M, H, W, 3), `labels`, `index` = global sample indices, `seed`, and the
sampler's per-batch statistics as JSON) and, once every shard exists, `samples.npz` in the layout the ADM
evaluator reads: `arr_0` uint8 (N, H, W, 3) and `labels` (N,).

Shard s holds samples [s·S, (s+1)·S); under torchrun rank r makes the shards s ≡ r (mod world size). A sample's
randomness depends only on (seed, index), so a shard holds the same images whichever process made it. Every file
is written to a hidden temporary and renamed into place, so a killed run leaves only complete shards, and a run
on the same folder with the same settings makes only the missing ones; other settings are refused.
`samples.npz` is assembled by streaming the shards into the zip member: host memory stays one shard.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ConfigError, DataError
from .fileio import fsync_dir, write_atomic

__all__ = ["SampleStore", "write_npz_streaming"]

FORMAT_VERSION = 1
KIND = "mergevq-samples"
MANIFEST = "manifest.json"


def write_npz_streaming(path: Path, members: dict[str, tuple[tuple[int, ...], np.dtype, Iterator[np.ndarray]]]) -> None:
    """An uncompressed .npz (what `np.savez` writes, what `np.load` reads) whose arrays arrive in row chunks:
    `members[name] = (shape, dtype, chunks)`; the chunks must fill `shape` exactly, in C order. Atomic."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, chunks) in members.items():
                dtype = np.dtype(dtype)
                expected, written = int(np.prod(shape)) * dtype.itemsize, 0
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
                    np.lib.format.write_array_header_1_0(f, header)
                    for chunk in chunks:
                        data = np.ascontiguousarray(chunk, dtype=dtype).tobytes()
                        written += len(data)
                        f.write(data)
                if written != expected:
                    raise ValueError(f"{name}: {written} bytes written for shape {shape}, expected {expected}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class SampleStore:
    """The output folder of one sampling job (see the module docstring). `settings` is everything that defines the
    samples (checkpoints, sampler, labels, K, steps, seed, sampling settings, shard size): an existing folder with
    other settings is refused with one line naming what differs."""

    def __init__(self, out: str | Path, settings: dict[str, Any], total: int, shard_size: int, *,
                 is_main: bool = True) -> None:
        if total < 1:
            raise ConfigError("nothing to sample: give classes and --per-class or --num-samples")
        if shard_size < 1:
            raise ConfigError(f"--shard-size {shard_size}: must be >= 1")
        self.dir = Path(out)
        self.shards_dir = self.dir / "shards"
        self.total, self.shard_size = total, shard_size
        self.manifest = {"kind": KIND, "format_version": FORMAT_VERSION, "total": total, "shard_size": shard_size,
                         "settings": json.loads(json.dumps(settings))}
        old = self._read_manifest()
        if old is not None:
            self._check_same(old)
        elif is_main:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.dir / MANIFEST, json.dumps(self.manifest, indent=2).encode())

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.dir / MANIFEST
        if not path.is_file():
            if self.dir.is_dir() and (self.dir / "shards").exists():
                raise DataError(f"{self.dir} has shards but no {MANIFEST}: use another --out")
            return None
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        if not isinstance(old, dict) or old.get("kind") != KIND or old.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} is not a mergevq samples manifest (format {FORMAT_VERSION}): use another --out")
        return old

    def _check_same(self, old: dict[str, Any]) -> None:
        new = self.manifest
        diff = [k for k in ("total", "shard_size") if old.get(k) != new[k]]
        a, b = old.get("settings", {}), new["settings"]
        diff += sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            shown = ", ".join(f"{k}: {_short(a.get(k, old.get(k)))} → {_short(b.get(k, new.get(k)))}" for k in diff[:3])
            raise ConfigError(f"{self.dir} holds samples made with other settings ({shown}{', …' if len(diff) > 3 else ''}): "
                              "run the same command to continue it, or give another --out")

    # ---------------------------------------------------------------- shards
    @property
    def num_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def shard_range(self, s: int) -> range:
        return range(s * self.shard_size, min((s + 1) * self.shard_size, self.total))

    def shard_path(self, s: int) -> Path:
        return self.shards_dir / f"shard_{s:05d}.npz"

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's shards that are not on disk yet."""
        return [s for s in range(rank, self.num_shards, world_size) if not self.shard_path(s).is_file()]

    def write(self, s: int, images: np.ndarray, labels: np.ndarray, seed: int, stats: list[dict[str, Any]]) -> None:
        """Shard s: uint8 images (M, H, W, 3) and labels (M,) of samples `shard_range(s)`, atomically."""
        idx = np.arange(self.shard_range(s).start, self.shard_range(s).stop, dtype=np.int64)
        if images.shape[0] != len(idx) or labels.shape[0] != len(idx) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"shard {s} needs {len(idx)} uint8 (M, H, W, 3) images and labels, got {images.shape}")
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=labels.astype(np.int64), index=idx,
                 seed=np.full(len(idx), seed, dtype=np.int64), stats=np.array(json.dumps(_jsonable(stats))))
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.shard_path(s), buf.getvalue())

    def read(self, s: int, keys: tuple[str, ...] = ("images", "labels", "index", "seed", "stats")) -> dict[str, Any]:
        """Shard s's arrays named in `keys` (an .npz member is read only when asked for)."""
        try:
            with np.load(self.shard_path(s), allow_pickle=False) as z:
                out = {key: z[key] for key in keys if key != "stats"}
                if "stats" in keys:
                    out["stats"] = json.loads(str(z["stats"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read {self.shard_path(s)}: {e} (delete it and run the same command again)") from None
        return out

    def complete(self) -> bool:
        return all(self.shard_path(s).is_file() for s in range(self.num_shards))

    def stats(self) -> list[dict[str, Any]]:
        """Every batch's sampler statistics, over all shards (whichever run made them)."""
        return [st for s in range(self.num_shards) for st in self.read(s, ("stats",))["stats"]]

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images (M, H, W, 3), labels (M,)) shard by shard, in sample order."""
        for s in range(self.num_shards):
            shard = self.read(s, ("images", "labels"))
            yield shard["images"], shard["labels"]

    def finish(self) -> Path:
        """Assemble `samples.npz` (`arr_0` images, `labels`) from the shards, streaming."""
        if not self.complete():
            missing = [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]
            raise DataError(f"{self.dir}: shard(s) {missing[:5]} are missing: run the same command again")
        first = self.read(0, ("images",))["images"]
        labels = np.concatenate([self.read(s, ("labels",))["labels"] for s in range(self.num_shards)])
        path = self.dir / "samples.npz"
        write_npz_streaming(path, {
            "arr_0": ((self.total, *first.shape[1:]), np.uint8, (img for img, _ in self.chunks())),
            "labels": ((self.total,), np.int64, iter([labels])),
        })
        return path


def _jsonable(value: Any) -> Any:
    """Statistics without tensors or arrays (what a JSON shard field can hold)."""
    if isinstance(value, dict):
        kept = {k: _jsonable(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return _DROP


_DROP = object()


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "…"
