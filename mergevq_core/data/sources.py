"""Datasets by name: the one place that turns `shapes`, `photos` or a folder into a dataset.

Every command that takes data (`train-tokenizer` through `data.source`, `tokenize`, `probe`, `generate --fid`,
the consistency classifier) resolves it here:
- `shapes`: the procedural shapes set (10 classes, any resolution; `split` picks the train or val stream);
- `photos`: the photographs that ship inside scikit-image (no labels);
- anything else: an image folder, class subfolders giving labels (ImageNet's `train/` as is).

`open_images` returns the dataset and a JSON-able description (`source`, `root` or `seed`, `classes`), which
token shards record so that later code (the consistency classifier) can reopen the same data with `reopen`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["BUILT_IN", "build_dataset", "eval_view", "held_out_count", "held_out_split", "open_images", "reopen"]

BUILT_IN = ("shapes", "photos")
SPLITS = ("train", "val")


def eval_view(size: int) -> Callable[[Any, torch.Generator], dict[str, torch.Tensor]]:
    """The evaluation view `reconstruct` uses: shorter side → size, centre crop, [-1, 1]."""
    from .views import recon_view

    def view(img: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {"image": recon_view(img, size, g, train=False)}

    return view


def open_images(name: str | Path, size: int, *, split: str = "train", length: int | None = None, seed: int = 0,
                view: Callable | None = None, labelled: bool = False) -> tuple[Dataset, dict[str, Any]]:
    """The dataset `name` names (see the module docstring) and its description. `view(img, generator)` makes the
    sample's tensors (default: the evaluation view at `size`; shapes render at `size` themselves). `length`: how
    many shapes to generate (default 10,000). `labelled` refuses data without classes."""
    from .images import ImageFolder
    from .photos import PhotosDataset
    from .shapes import SHAPE_CLASSES, ShapesDataset

    if str(name) == "shapes":
        ds: Dataset = ShapesDataset(size, length=length or 10_000, seed=seed, split=split, view=view)
        return ds, {"source": "shapes", "seed": seed, "classes": list(SHAPE_CLASSES), "num_classes": len(SHAPE_CLASSES)}
    if str(name) == "photos":
        if labelled:
            raise DataError("`photos` has no classes: give `shapes` or a folder with one subfolder per class")
        return PhotosDataset(view=view or eval_view(size), seed=seed), {"source": "photos"}
    p = Path(name).expanduser()
    if not p.is_dir():
        what = "a folder of class subfolders, or `shapes`" if labelled else "an image folder, or `shapes` / `photos` for the built-in sets"
        raise DataError(f"no such folder: {name} (give {what})")
    ds = ImageFolder(p, view=view or eval_view(size), seed=seed)
    if labelled and len(ds.classes) < 2:
        raise DataError(f"{p} needs at least two class subfolders, found {len(ds.classes)}")
    return ds, {"source": "imagefolder", "root": str(p.resolve()), "classes": list(ds.classes), "num_classes": len(ds.classes)}


def reopen(info: dict[str, Any], size: int, *, split: str = "train", length: int | None = None,
           seed_offset: int = 0) -> Dataset:
    """The labelled dataset a description from `open_images` (e.g. a token-shards manifest's) came from; shapes get
    seed + `seed_offset`, so a consumer can draw images the shards never held."""
    source = info.get("source")
    if source == "shapes":
        return open_images("shapes", size, split=split, length=length, seed=int(info.get("seed", 0)) + seed_offset)[0]
    if source == "imagefolder" and info.get("root"):
        return open_images(info["root"], size, split=split, seed=0, labelled=True)[0]
    raise DataError(f"this needs labelled data (shapes or an image folder); the shards came from {source!r}")


# ----------------------------------------------------------------------------- stage-1 training data


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


def _image_folder(cfg: Any, split: str, views: Any) -> Dataset:
    from .images import ImageFolder, list_images

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


def build_dataset(cfg: Any, split: str, align: bool) -> Dataset:
    """The stage-1 dataset a tokenizer recipe's `data.source` names (`RunConfig`), with the training views
    (augmentation only for split "train"; teacher and student views when `align`)."""
    from .views import TokenizerViews

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    views = TokenizerViews(size=cfg.model.image_size, teacher_size=cfg.data.teacher_size,
                           student_size=cfg.data.student_size, train=split == "train", align=align)
    if cfg.data.source == "imagefolder":
        return _image_folder(cfg, split, views)
    length = 50_000 if cfg.data.source == "shapes" else None
    return open_images(cfg.data.source, cfg.model.image_size, split=split, length=length, seed=cfg.train.seed, view=views)[0]
