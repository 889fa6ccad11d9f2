"""mergevq_core: the MergeVQ engine. Importing it is cheap: torch-heavy names load on first use."""

from __future__ import annotations

from typing import Any

from .config import RunConfig, config_to_dict, load_config
from .errors import CheckpointError, ConfigError, DataError, MergeVQError

_LAZY = {  # the commands' entry points live in `mergevq_core.api`, the top of the core
    "build_tokenizer": "mergevq_core.models",
    "MergeVQTokenizer": "mergevq_core.models",
    "Encoded": "mergevq_core.models",
    "LFQ": "mergevq_core.quant",
    "build_generator": "mergevq_core.generators",
    "load_tokenizer": "mergevq_core.runs",
    "load_generator": "mergevq_core.runs",
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
