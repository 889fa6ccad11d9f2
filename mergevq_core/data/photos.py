"""Real photographs shipped inside scikit-image's wheel (`skimage/data/`), served without importing skimage."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import DataError
from .images import ImageFolder, View

PHOTO_NAMES: tuple[str, ...] = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
    "retina.jpg", "ihc.png", "color.png", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png",
    "gravel.png",
)


def photo_dir() -> Path | None:
    """scikit-image's bundled data folder, or None when skimage is not installed."""
    try:
        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        folder = Path(loc) / "data"
        if folder.is_dir():
            return folder
    return None


def photo_paths() -> list[Path]:
    """The bundled photographs that exist, in PHOTO_NAMES order."""
    folder = photo_dir()
    if folder is None:
        raise DataError("data.source=photos needs scikit-image's bundled photos: pip install scikit-image")
    paths = [folder / name for name in PHOTO_NAMES if (folder / name).is_file()]
    if not paths:
        raise DataError(f"no bundled photos found in {folder}: reinstall scikit-image or use data.source=shapes")
    return paths


class PhotosDataset(ImageFolder):
    """ImageFolder over `photo_paths()` with label -1 (grayscale ones come out as RGB)."""

    def __init__(self, view: View | None = None, seed: int = 0) -> None:
        paths = photo_paths()
        self._setup(paths, None, (), view, seed, paths[0].parent)
