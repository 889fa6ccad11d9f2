"""Reading image files robustly and serving folders of them as datasets."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError
from .rng import make_generator

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Everything Pillow's decoders are known to raise on bad input (UnidentifiedImageError is an OSError).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError,
    struct.error, zlib.error, Image.DecompressionBombError, UnidentifiedImageError,
)

View = Callable[[Image.Image, torch.Generator], dict[str, torch.Tensor]]


def is_image_file(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """I;16* / I / F grayscale → 8-bit L, scaled by the range the values actually use (16-bit → /257)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            full = 1.0  # normalised floats
        elif lo >= 0.0 and hi <= 255.0:
            full = 255.0
        elif lo >= 0.0 and hi <= 65535.0:
            full = 65535.0
        else:  # arbitrary float range: stretch
            a, full = a - lo, max(hi - lo, 1e-12)
    else:
        a = a.astype(np.int64)
        if img.mode.startswith("I;16"):
            full = 65535.0
        else:  # 32-bit container: smallest of 8/16/32 bits holding the data
            if a.size and a.min() < 0:
                a = a - a.min()
            hi = int(a.max(initial=0))
            full = 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else float(2**32 - 1)
    out = np.clip(np.rint(a.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # (H, W) uint8 → mode L


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")  # applies palette transparency (tRNS) if any
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX


def load_rgb(path: str | Path) -> Image.Image:
    """Decode the (first frame of the) file at `path` fully into an 8-bit RGB image; transparency → white."""
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()  # forces a full decode, so truncation surfaces here
            if img.width < 1 or img.height < 1:
                raise ValueError("empty image")
            return _to_rgb(img)
    except _READ_ERRORS as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) float in [-1, 1]."""
    return pil_to_uint8(img).float().div_(127.5).sub_(1.0)


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) uint8."""
    a = np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # (H, W, 3), a copy
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def _walk_images(folder: Path) -> list[Path]:
    """Image files under `folder`, following symlinks (without looping), hidden entries skipped."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    return sorted(found, key=lambda p: p.as_posix())


def list_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, classes) for the images under `root`, sorted.

    Non-hidden subfolders that contain images are classes (ImageNet layout), labelled by sorted index;
    images lying directly in `root` get label -1 (so a flat folder has all -1 and classes == []).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data folder not found: {base} (set data.root)")
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
        paths: list[Path] = [Path(e.path) for e in entries if e.is_file() and is_image_file(e.name)]
        labels: list[int] = [-1] * len(paths)
        classes: list[str] = []
        for e in entries:
            if e.name.startswith(".") or not e.is_dir():
                continue
            files = _walk_images(Path(e.path))
            if files:
                paths += files
                labels += [len(classes)] * len(files)
                classes.append(e.name)
    except OSError as e:
        raise DataError(f"cannot list data folder {base}: {e.strerror or e}") from None
    if not paths:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images found under {base} (looked for {exts})")
    return paths, labels, classes


class ImageFolder(Dataset):
    """Image files with integer labels; `view(img, generator)` turns each PIL image into tensors.

    Sample: `{**view(img, g), "label": int, "index": i}` with `g` seeded from (seed, epoch, i).
    A file that fails to decode is recorded in `self.skipped`, logged once, and replaced by the next
    readable file (i+1, i+2, ... wrapping). With DataLoader workers, `skipped` fills in each worker's copy.
    """

    def __init__(self, root: str | Path, view: View | None = None, seed: int = 0) -> None:
        paths, labels, classes = list_images(root)
        self._setup(paths, labels, classes, view, seed, Path(root))

    @classmethod
    def from_files(
        cls,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None = None,
        view: View | None = None,
        seed: int = 0,
        classes: Sequence[str] = (),
        root: str | Path | None = None,
    ) -> ImageFolder:
        """A dataset over an explicit file list (labels default to -1)."""
        if not paths:
            raise DataError(f"no images to serve{f' from {root}' if root is not None else ''}")
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} files")
        obj = cls.__new__(cls)
        ImageFolder._setup(obj, [Path(p) for p in paths], labels, classes, view, seed, root)
        return obj

    def _setup(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        classes: Sequence[str],
        view: View | None,
        seed: int,
        root: str | Path | None,
    ) -> None:
        self.paths: list[Path] = list(paths)
        self.labels: list[int] = [int(x) for x in labels] if labels is not None else [-1] * len(self.paths)
        self.classes: list[str] = list(classes)
        self.view = view
        self.seed = int(seed)
        self.epoch = 0
        self.root = Path(root) if root is not None else None
        self.skipped: set[Path] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, i: int) -> tuple[int, Image.Image]:
        n = len(self.paths)
        for k in range(n):
            j = (i + k) % n
            path = self.paths[j]
            if path in self.skipped:
                continue
            try:
                return j, load_rgb(path)
            except DataError as e:
                self.skipped.add(path)
                log.warning("skipping unreadable image: %s", e)
        where = f" under {self.root}" if self.root is not None else ""
        raise DataError(f"none of the {n} image files{where} is readable")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        n = len(self.paths)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        j, img = self._read(i)
        g = make_generator(self.seed, self.epoch, i)
        views = self.view(img, g) if self.view is not None else {"image": pil_to_tensor(img)}
        return {**views, "label": self.labels[j], "index": i}
