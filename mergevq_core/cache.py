"""Where derived data that is expensive to compute and cheap to store is kept between runs: the Inception
statistics of a folder of originals (rFID), the probe's feature shards. Entries are keyed by what they depend on
(the checkpoint's weights, the images, the size, the view), so a stale entry is never read, only left unused.

The root is `$MERGEVQ_CACHE`, else `$XDG_CACHE_HOME/mergevq`, else `~/.cache/mergevq`; commands that use it
take `--cache DIR` to put it elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import checkpoint as ck
from .fileio import sha256_file

__all__ = ["cache_root", "checkpoint_hash", "files_fingerprint", "key_of"]


def cache_root(override: str | Path | None = None) -> Path:
    """The cache folder: `override`, else $MERGEVQ_CACHE, else $XDG_CACHE_HOME/mergevq, else ~/.cache/mergevq."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("MERGEVQ_CACHE"):
        return Path(os.environ["MERGEVQ_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mergevq"


def key_of(*parts: Any) -> str:
    """A short stable key (16 hex digits) of JSON-able `parts`."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_hash(ckpt: Path, names: tuple[str, ...] = ("ema",)) -> str:
    """sha256 of a checkpoint's weight files `names` (`<name>.safetensors`) and its meta.json's config: two
    checkpoints with the same weights and model share their cache entries wherever they live."""
    h = hashlib.sha256()
    for name in names:
        h.update(sha256_file(ck.weights_file(Path(ckpt), name)).encode())
    h.update(json.dumps(ck.read_meta(Path(ckpt)).get("config"), sort_keys=True).encode())
    return h.hexdigest()[:16]


def files_fingerprint(paths: list[Path], root: Path | None = None) -> str:
    """A key of a list of image files: their paths (relative to `root`), sizes and modification times, so that
    adding, removing or rewriting a file changes it. Reads only the directory entries (os.stat)."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        rel = os.path.relpath(p, root) if root is not None else str(p)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
