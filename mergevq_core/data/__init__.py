"""Data layer: image files, built-in datasets (procedural shapes, bundled photos), views and sampling.

Every sample is a dict `{"image": (3, S, S) in [-1, 1], "label": int (-1 unknown), "index": int}` plus, for
alignment, `"teacher"` (ImageNet-normalised) and `"student"` views; the default collate batches them.
"""

from __future__ import annotations

from .codes import TokenShards, collate_tokens, sha256_file
from .shard_writer import ShardWriter
from .images import IMAGE_EXTENSIONS, ImageFolder, list_images, load_rgb, pil_to_tensor
from .photos import PhotosDataset, photo_paths
from .sampler import ResumableSampler
from .shapes import SHAPE_CLASSES, ShapesDataset, render_shape
from .sources import build_dataset, eval_view, held_out_count, held_out_split, open_images, reopen
from .views import TokenizerViews, recon_view, student_view, teacher_view

__all__ = [
    "IMAGE_EXTENSIONS", "SHAPE_CLASSES", "ImageFolder", "PhotosDataset", "ResumableSampler", "ShapesDataset",
    "TokenizerViews", "build_dataset", "eval_view", "held_out_count", "held_out_split", "list_images", "load_rgb",
    "open_images", "photo_paths", "pil_to_tensor", "recon_view", "render_shape", "reopen", "student_view",
    "teacher_view", "ShardWriter", "TokenShards", "collate_tokens", "sha256_file",
]
