"""The weights that ship inside the package: a tiny tokenizer and a MergeAR, LlamaGen and RandAR generator for
the built-in shapes data, trained with the project's own commands and exported with `mergevq export` (half
precision). With no `--ckpt` and no run of their kind under runs/, the commands use them (`runs._shipped`).

`weights/<name>/` is the Hugging Face layout (`checkpoint.is_exported`); the generators record their tokenizer
as `../tokenizer`, so the tokenizer ships once. `weights/classifiers/` holds the consistency classifier for the
shipped tokenizer (`eval.consistency.classifier_for` looks there after runs/classifiers/). `scripts/ship_weights.py`
rebuilds all of it from trained runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import checkpoint as ck

__all__ = ["NAMES", "SHIPPED_DIR", "shipped_path", "shipped_weights"]

SHIPPED_DIR = Path(__file__).parent / "weights"
NAMES = ("tokenizer", "mergear", "llamagen", "randar")


def shipped_path(name: str) -> Path | None:
    """The shipped folder of `name` (`tokenizer` or a generator), or None when the package has none."""
    path = SHIPPED_DIR / name
    return path if ck.is_exported(path) else None


def shipped_weights() -> list[dict[str, Any]]:
    """What ships: per model its name, kind, folder, parameters, bytes on disk, dtype, steps, data, the commands
    that trained it and its measured figures (from its config.json)."""
    from safetensors import safe_open

    rows = []
    for name in NAMES:
        path = shipped_path(name)
        if path is None:
            continue
        config = json.loads((path / ck.EXPORT_CONFIG).read_text())
        ex = config["export"]
        with safe_open(str(path / ck.EXPORT_WEIGHTS), "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        rows.append({
            "name": name, "kind": "generator" if config.get("kind") == "ar" else "tokenizer", "folder": str(path),
            "params": params, "bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
            "dtype": ex.get("dtype"), "steps": ex.get("step"), "data": ex.get("data"),
            "commands": ex.get("commands", []), "figures": ex.get("figures", {}),
        })
    return rows

