"""mergevq_core: the MergeVQ engine. Importing it is cheap: torch-heavy modules load on first use."""

from .config import RunConfig, config_to_dict, load_config
from .errors import CheckpointError, ConfigError, DataError, MergeVQError

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "MergeVQError", "RunConfig", "config_to_dict", "load_config",
]
__version__ = "0.1.0"
