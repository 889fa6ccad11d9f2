"""Labelled train / val splits for the probe and the fine-tuning protocol.

- `shapes`: the built-in procedural set; its train and val streams are disjoint by construction.
- `TRAIN_DIR --val VAL_DIR`: two folders of class subfolders, ImageNet's `train/` and `val/` as they are. The
  val classes are matched to the train classes by name (a val class the train folder lacks is an error).
- one folder alone: split deterministically. The val images are those whose relative path hashes lowest (20%
  unless `n_val` says), so the split never depends on a seed and never moves when files are added elsewhere.

`n_train` / `n_val` cap a folder's splits (taking the lowest hashes, a fixed subset) and set the number of shapes.
Each split carries a fingerprint of exactly which images it holds, which the feature cache keys on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from ..cache import files_fingerprint, key_of
from ..errors import DataError

__all__ = ["LabelledData", "LabelledSplit", "labelled_data"]

DEFAULT_SHAPES = {"train": 5000, "val": 1000}


@dataclass(frozen=True)
class LabelledSplit:
    """One split: `dataset[i]` gives {"image", "label", "index"}; `fingerprint` names exactly its images."""

    name: str  # "train" | "val"
    dataset: Dataset
    count: int
    fingerprint: str
    source: str  # what the user named (`shapes`, a folder)


@dataclass(frozen=True)
class LabelledData:
    train: LabelledSplit
    val: LabelledSplit
    classes: list[str]

    def describe(self) -> dict[str, Any]:
        return {"train": self.train.source, "val": self.val.source, "n_train": self.train.count,
                "n_val": self.val.count, "classes": len(self.classes)}


def _rank(paths: list[Path], root: Path) -> list[int]:
    """Positions into `paths` ordered by the hash of their path relative to `root`."""
    def key(i: int) -> bytes:
        return hashlib.sha1(paths[i].relative_to(root).as_posix().encode("utf-8", "surrogateescape")).digest()

    return sorted(range(len(paths)), key=key)


def _folder(root: Path, what: str) -> tuple[list[Path], list[int], list[str]]:
    from .images import list_images

    if not root.is_dir():
        raise DataError(f"{what} {root}: no such folder (give a folder with one subfolder per class, or `shapes`)")
    paths, labels, classes = list_images(root)
    if len(classes) < 2:
        raise DataError(f"{what} {root} needs at least two class subfolders, found {len(classes)}")
    if -1 in labels:
        raise DataError(f"{what} {root} has images outside class subfolders (e.g. {paths[labels.index(-1)].name})")
    return paths, labels, classes


def _split(name: str, root: Path, paths: list[Path], labels: list[int], keep: list[int], classes: list[str],
           view: Callable | None, seed: int, source: str) -> LabelledSplit:
    from .images import ImageFolder

    keep = sorted(keep)
    files, labs = [paths[i] for i in keep], [labels[i] for i in keep]
    ds = ImageFolder.from_files(files, labs, view=view, seed=seed, classes=classes, root=root)
    return LabelledSplit(name, ds, len(files), key_of(files_fingerprint(files, root), labs), source)


def labelled_data(train: str | Path, val: str | Path | None, size: int, *, n_train: int | None = None,
                  n_val: int | None = None, seed: int = 0, train_view: Callable | None = None,
                  val_view: Callable | None = None) -> LabelledData:
    """The train and val splits (see the module docstring), with `train_view` / `val_view` making each item's
    tensors (default: the evaluation view at `size`: shorter side → size, centre crop, [-1, 1]; shapes are
    rendered at `size` as they are). Views take PIL images (shapes are converted for them)."""
    from .sources import eval_view, open_images

    for opt, n in (("--train", n_train), ("--test", n_val)):
        if n is not None and n < 2:
            raise DataError(f"{opt} {n}: give at least 2 images")
    if str(train) == "shapes":
        if val is not None and str(val) != "shapes":
            raise DataError("--val: `shapes` has its own val stream; give --val only with a train folder")
        splits = []
        for name, n, view in (("train", n_train, train_view), ("val", n_val, val_view)):
            count = n or DEFAULT_SHAPES[name]
            ds, info = open_images("shapes", size, split=name, length=count, seed=seed,
                                   view=None if view is None else _tensor_view(view))
            splits.append(LabelledSplit(name, ds, count, key_of("shapes", name, seed, count, size), "shapes"))
        return LabelledData(splits[0], splits[1], list(info["classes"]))

    train_view, val_view = train_view or eval_view(size), val_view or eval_view(size)

    root = Path(train).expanduser()
    paths, labels, classes = _folder(root, "TRAIN")
    if val is None:  # one folder: a deterministic split by path hash
        order = _rank(paths, root)
        n_v = min(n_val or len(paths) // 5, len(paths) // 2)
        if n_v < 1:
            raise DataError(f"{root} holds {len(paths)} images: too few to split into train and val (give --val)")
        val_idx, train_idx = order[:n_v], order[n_v:]
        if n_train is not None:
            train_idx = train_idx[:n_train]
        tr = _split("train", root, paths, labels, train_idx, classes, train_view, seed, str(train))
        va = _split("val", root, paths, labels, val_idx, classes, val_view, seed, f"{train} (held out)")
        return LabelledData(tr, va, classes)

    vroot = Path(val).expanduser()
    vpaths, vlabels, vclasses = _folder(vroot, "--val")
    unknown = sorted(set(vclasses) - set(classes))
    if unknown:
        raise DataError(f"--val {vroot}: class folder(s) {', '.join(unknown[:5])} are not in {root}")
    to_train = [classes.index(c) for c in vclasses]
    vlabels = [to_train[lab] for lab in vlabels]
    train_idx = _rank(paths, root)[:n_train] if n_train is not None else list(range(len(paths)))
    val_idx = _rank(vpaths, vroot)[:n_val] if n_val is not None else list(range(len(vpaths)))
    tr = _split("train", root, paths, labels, train_idx, classes, train_view, seed, str(train))
    va = _split("val", vroot, vpaths, vlabels, val_idx, classes, val_view, seed, str(val))
    return LabelledData(tr, va, classes)


def _tensor_view(view: Callable) -> Callable:
    """Shapes hand views a (3, H, W) tensor in [-1, 1]; views written for files take PIL images."""
    def apply(image: Any, g: Any) -> Any:
        from torchvision.transforms.functional import to_pil_image

        return view(to_pil_image(((image + 1) / 2).clamp(0, 1)), g)

    return apply
