"""mergevq_core: the MergeVQ engine. Importing it is cheap: torch-heavy names load on first use."""

from __future__ import annotations

from typing import Any

from .config import RunConfig, config_to_dict, load_config
from .errors import CheckpointError, ConfigError, DataError, MergeVQError

_LAZY = {
    "build_tokenizer": "mergevq_core.models",
    "MergeVQTokenizer": "mergevq_core.models",
    "Encoded": "mergevq_core.models",
    "LFQ": "mergevq_core.quant",
    "model_info": "mergevq_core.api",
    "train_tokenizer": "mergevq_core.api",
}

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "MergeVQError", "RunConfig", "config_to_dict", "load_config",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergevq_core' has no attribute {name!r}")
