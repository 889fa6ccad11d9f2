"""Data layer: image files, built-in datasets (procedural shapes, bundled photos), views and sampling.

Every sample is a dict `{"image": (3, S, S) in [-1, 1], "label": int (-1 unknown), "index": int}` plus, for
alignment, `"teacher"` (ImageNet-normalised) and `"student"` views; the default collate batches them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch.utils.data import Dataset

from ..config import RunConfig
from ..errors import DataError
from .images import IMAGE_EXTENSIONS, ImageFolder, list_images, load_rgb, pil_to_tensor
from .photos import PhotosDataset, photo_paths
from .sampler import ResumableSampler
from .shapes import SHAPE_CLASSES, ShapesDataset, render_shape
from .views import TokenizerViews, recon_view, student_view, teacher_view
from .codes import ShardWriter, TokenShards, collate_tokens, sha256_file

__all__ = [
    "IMAGE_EXTENSIONS", "SHAPE_CLASSES", "ImageFolder", "PhotosDataset", "ResumableSampler", "ShapesDataset",
    "TokenizerViews", "build_dataset", "held_out_split", "list_images", "load_rgb", "photo_paths",
    "pil_to_tensor", "recon_view", "render_shape", "student_view", "teacher_view",
    "ShardWriter", "TokenShards", "collate_tokens", "sha256_file",
]

SPLITS = ("train", "val")


def held_out_count(n: int) -> int:
    """Validation images held out of an n-image folder: 1%, at least 8, at most 1000, at most half."""
    return min(max(n // 100, 8), 1000, n // 2)


def held_out_split(paths: list[Path], root: Path) -> tuple[list[int], list[int]]:
    """(train, val) positions into `paths`. The val images are those whose relative path hashes lowest, so
    the split is deterministic, independent of the run seed and stable when files are added elsewhere."""
    def key(i: int) -> bytes:
        try:
            rel = paths[i].relative_to(root).as_posix()
        except ValueError:
            rel = paths[i].as_posix()
        return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).digest()

    ranked = sorted(range(len(paths)), key=key)
    val = set(ranked[: held_out_count(len(paths))])
    return [i for i in range(len(paths)) if i not in val], sorted(val)


def _image_folder(cfg: RunConfig, split: str, views: TokenizerViews) -> ImageFolder:
    data, seed = cfg.data, cfg.train.seed
    if split == "val" and data.val_root:
        return ImageFolder(data.val_root, view=views, seed=seed)
    if not data.root:
        raise DataError("data.root is not set: point it at an image folder (e.g. ImageNet train/) with --set data.root=PATH")
    if data.val_root:  # a separate validation folder: train on all of data.root
        return ImageFolder(data.root, view=views, seed=seed)
    root = Path(data.root).expanduser()
    paths, labels, classes = list_images(root)
    train_idx, val_idx = held_out_split(paths, root)
    keep = train_idx if split == "train" else val_idx
    if not keep:
        raise DataError(f"{root} has {len(paths)} image(s): too few to hold out a validation split (set data.val_root)")
    return ImageFolder.from_files(
        [paths[i] for i in keep], [labels[i] for i in keep], view=views, seed=seed, classes=classes, root=root
    )


def build_dataset(cfg: RunConfig, split: str, align: bool) -> Dataset:
    """The dataset `cfg.data.source` names, with TokenizerViews (train augmentation only for split "train")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    views = TokenizerViews(
        size=cfg.model.image_size,
        teacher_size=cfg.data.teacher_size,
        student_size=cfg.data.student_size,
        train=split == "train",
        align=align,
    )
    source = cfg.data.source
    if source == "shapes":
        return ShapesDataset(size=cfg.model.image_size, split=split, seed=cfg.train.seed, view=views)
    if source == "photos":
        return PhotosDataset(view=views, seed=cfg.train.seed)
    return _image_folder(cfg, split, views)
