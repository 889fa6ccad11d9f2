"""One strict tree of frozen dataclasses per recipe kind, loaded from flat YAML recipes.

- `tokenizer`: stage 1 (kind: tokenizer, the default): `RunConfig` and its model presets.
- `ar`: stage 2 (kind: ar): `ARRunConfig` for the generators; imports no model module.
- `training`: `TrainLoopConfig`, the training-loop fields and checks both stages' `train:` sections share.
- `loader`: YAML, `--set` overrides, the strict builder with one-line "did you mean" errors, `CONFIG_KINDS`
  (`kind:` → class) and `load_recipe`, which `load_config` / `load_ar_config` / `load_any_config` wrap.
- `version`: `CONFIG_VERSION` and `upgrade_config`, which keeps an older saved config's behaviour
  (`config_from_saved` reads a checkpoint's config through it).
"""

from .ar import GENERATOR_NAMES, ARDataConfig, ARRunConfig, ARTrainConfig, GeneratorConfig, GPTModelConfig
from .loader import (
    CONFIG_KINDS,
    apply_overrides,
    build_config,
    config_from_dict,
    config_from_saved,
    config_to_dict,
    load_any_config,
    load_ar_config,
    load_config,
    load_recipe,
    parse_override,
    read_yaml,
    recipe_kind,
)
from .tokenizer import (
    MODEL_PRESETS,
    AlignHeadConfig,
    DataConfig,
    DecoderConfig,
    EncoderConfig,
    LossConfig,
    MergeConfig,
    ModelConfig,
    QuantConfig,
    RecoveryConfig,
    RunConfig,
    TrainConfig,
    model_preset,
)
from .training import TrainLoopConfig
from .version import CONFIG_VERSION, upgrade_config

__all__ = [
    # stage 1
    "RunConfig", "ModelConfig", "EncoderConfig", "DecoderConfig", "RecoveryConfig", "AlignHeadConfig", "QuantConfig",
    "MergeConfig", "LossConfig", "DataConfig", "TrainConfig", "MODEL_PRESETS", "model_preset",
    # stage 2
    "ARRunConfig", "GPTModelConfig", "GeneratorConfig", "ARDataConfig", "ARTrainConfig", "GENERATOR_NAMES",
    # shared
    "TrainLoopConfig",
    # loading
    "CONFIG_KINDS", "load_recipe", "load_config", "load_ar_config", "load_any_config", "config_from_dict",
    "config_from_saved", "build_config", "config_to_dict", "apply_overrides", "parse_override", "read_yaml",
    "recipe_kind", "CONFIG_VERSION", "upgrade_config",
]
