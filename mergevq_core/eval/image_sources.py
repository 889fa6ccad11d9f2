"""Image sets read batch by batch, so that 50,000 samples never sit in memory at once.

A source knows how many uint8 images it holds and serves any row range `[start, stop)` as (B, 3, H, W) chunks
of at most `batch` images (each rank of a torchrun job reads its own range). Three kinds:
- `NpzImages`: a samples `.npz` in the ADM evaluator layout (`arr_0`: uint8 (N, H, W, 3), optional `labels`) or
  the legacy key `images` today's `generate` writes. np.savez stores members uncompressed: the array's rows are
  read straight from the file at their offset (read_magic / read_array_header_* give the header); a compressed
  member (np.savez_compressed) is streamed through zipfile instead. Memory stays flat in N either way.
- `DatasetImages`: `shapes` or a folder of images (recursive), via `data.sources.open_images`, which resizes
  and centre-crops to the sample size.
- `TensorImages`: an in-memory uint8 (M, 3, H, W) tensor (what `generate` holds before it writes the npz).
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

__all__ = ["DatasetImages", "ImageSource", "NpzImages", "TensorImages", "npz_keys", "open_images_source",
           "read_npz_array"]

IMAGE_KEYS = ("arr_0", "images")  # ADM's samples / reference batches, then the legacy `generate` key
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip local file header: signature, ..., name and extra lengths


class ImageSource:
    """`count` uint8 images of side `size`; `batches(start, stop, batch)` yields (B, 3, H, W) with B ≤ batch."""

    name: str
    count: int
    size: int

    def batches(self, start: int, stop: int, batch: int) -> Iterator[Tensor]:
        raise NotImplementedError


def npz_keys(path: Path) -> list[str]:
    """The array names in an .npz, read from the zip directory alone (no array is loaded)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as an .npz: {e}") from None


def read_npz_array(path: Path, key: str) -> np.ndarray:
    """One (small) member of an .npz, loaded whole: `mu`, `sigma`, `features`, `labels`."""
    try:
        with np.load(path) as z:
            return np.asarray(z[key])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read array {key!r} of {path}: {e}") from None


class NpzImages(ImageSource):
    """The uint8 (N, H, W, 3) images of an .npz member (`arr_0`, else `images`), read in row chunks."""

    def __init__(self, path: str | Path, key: str | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataError(f"samples file not found: {self.path}")
        keys = npz_keys(self.path)
        key = key or next((k for k in IMAGE_KEYS if k in keys), None)
        if key is None or key not in keys:
            raise DataError(f"{self.path} holds no images: expected uint8 (N, H, W, 3) under 'arr_0' or 'images', "
                            f"found {keys}")
        self.key, self.name = key, str(self.path)
        with zipfile.ZipFile(self.path) as zf:
            info = zf.getinfo(f"{key}.npy")
            with zf.open(info) as member:
                shape, fortran, dtype = self._header(member)
                header_len = member.tell()
            self.stored = info.compress_type == zipfile.ZIP_STORED
            self._data_at = self._member_offset(info) + header_len if self.stored else header_len
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise DataError(f"{self.path}: '{key}' must be C-order uint8 (N, H, W, 3) images, got {dtype} {shape}"
                            + (" in Fortran order" if fortran else ""))
        self.count, self.height, self.width = int(shape[0]), int(shape[1]), int(shape[2])
        self.size = self.height
        self._row = self.height * self.width * 3  # bytes per image

    def _header(self, f) -> tuple[tuple[int, ...], bool, np.dtype]:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(f)
            if version == (2, 0):
                return np.lib.format.read_array_header_2_0(f)
        except ValueError as e:
            raise DataError(f"{self.path}: '{self.key}' is not a .npy array: {e}") from None
        raise DataError(f"{self.path}: unsupported .npy format version {version}")

    def _member_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes start in the file: after its local header, name and extra field."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            sig, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise DataError(f"{self.path}: damaged zip header for '{self.key}'")
        return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def batches(self, start: int, stop: int, batch: int) -> Iterator[Tensor]:
        start, stop = max(0, start), min(stop, self.count)
        if start >= stop:
            return
        if self.stored:
            with open(self.path, "rb") as f:
                f.seek(self._data_at + start * self._row)
                yield from self._chunks(f, start, stop, batch)
        else:
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
                f.seek(self._data_at + start * self._row)  # forward: reads and discards in bounded pieces
                yield from self._chunks(f, start, stop, batch)

    def _chunks(self, f, start: int, stop: int, batch: int) -> Iterator[Tensor]:
        for i in range(start, stop, batch):
            b = min(batch, stop - i)
            buf = f.read(b * self._row)
            if len(buf) != b * self._row:
                raise DataError(f"{self.path}: '{self.key}' is truncated at image {i}")
            x = np.frombuffer(buf, dtype=np.uint8).reshape(b, self.height, self.width, 3)  # (B, H, W, 3)
            yield torch.from_numpy(x.copy()).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


class DatasetImages(ImageSource):
    """A dataset from `open_images` (`image` in [-1, 1] at `size`) as uint8 chunks; `workers` DataLoader workers."""

    def __init__(self, ds: torch.utils.data.Dataset, name: str, size: int, workers: int = 0) -> None:
        self.ds, self.name, self.size, self.workers = ds, name, size, workers
        self.count = len(ds)  # type: ignore[arg-type]

    def batches(self, start: int, stop: int, batch: int) -> Iterator[Tensor]:
        from torch.utils.data import DataLoader, Subset

        from .fid import to_uint8

        part = Subset(self.ds, range(max(0, start), min(stop, self.count)))
        if len(part) == 0:
            return
        for b in DataLoader(part, batch_size=batch, num_workers=self.workers, shuffle=False):
            yield to_uint8(b["image"])


class TensorImages(ImageSource):
    """uint8 (M, 3, H, W) images already in memory."""

    def __init__(self, images: Tensor, name: str = "tensor") -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise DataError(f"images must be uint8 (M, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.name = images, name
        self.count, self.size = int(images.shape[0]), int(images.shape[-1])

    def batches(self, start: int, stop: int, batch: int) -> Iterator[Tensor]:
        for i in range(max(0, start), min(stop, self.count), batch):
            yield self.images[i:min(i + batch, stop)]


def _first_image_side(folder: Path) -> int:
    from ..data.images import list_images, load_rgb

    paths, _, _ = list_images(folder)
    return min(load_rgb(paths[0]).size)


def open_images_source(spec: str | Path, *, size: int | None = None, count: int | None = None, seed: int = 0,
                       workers: int = 0, what: str = "samples") -> ImageSource:
    """An .npz of images, a folder of images or `shapes` (`count` val images, seeded by `seed`). A folder is
    resized and centre-cropped to `size` (default: its first image's shorter side); `shapes` needs `size`."""
    from ..data.sources import open_images

    text = str(spec)
    p = Path(text).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataError(f"{what} file not found: {p}")
        return NpzImages(p)
    if text == "shapes":
        if size is None:
            raise DataError("`shapes` needs an image size (--size)")
        ds, _ = open_images("shapes", size, split="val", length=max(count or 10_000, 2), seed=seed)
        return DatasetImages(ds, "shapes", size, workers)
    if p.is_dir():
        side = size or _first_image_side(p)
        ds, _ = open_images(p, side, seed=seed)
        return DatasetImages(ds, str(p), side, workers)
    raise DataError(f"{what} {text!r}: give an .npz of uint8 (N, H, W, 3) images, a folder of images, or `shapes`")
