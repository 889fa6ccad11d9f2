"""Strict config loading, overrides and validation."""

from __future__ import annotations

import pytest

from mergevq_core.config import RunConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from mergevq_core.errors import ConfigError

from .conftest import ROOT


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, needle",
    [
        ("modle:\n  name: mergevq-g\n", "did you mean 'model'"),
        ("model:\n  encoder:\n    dpeth: 4\n", "did you mean 'model.encoder.depth'"),
        ("merge:\n  kep: 144\n", "did you mean 'merge.keep'"),
        ("model:\n  name: mergevq-gx\n", "did you mean 'mergevq-g"),
    ],
)
def test_misspelt_key_names_it_and_the_closest_valid_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match="unknown key|is not a tokenizer") as e:
        load_config(write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("merge:\n  keep: 150\n", "not a perfect square"),
        ("merge:\n  keep: 1089\n", "exceeds N=1024"),
        ("model:\n  encoder:\n    depth: 2\nmerge:\n  keep: 100\n", "below 256"),
        ("model:\n  encoder:\n    heads: 7\n", "not divisible"),
        ("model:\n  encoder:\n    dim: 256\n", "ch*ch_mult"),
        ("model:\n  decoder:\n    ch_mult: [1, 2]\n    dim: 128\n", "upsamples"),
        ("merge:\n  schedule: cubic\n", "choose one of linear, square"),
        ("quant:\n  dim: 18\n  groups: 4\n", "must divide"),
        ("train:\n  lr: fast\n", "expected a number"),
        ("model:\n  encoder:\n    ch_mult: 3\n", "expected a list"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("model: [\n", "malformed YAML"),
        ("", "the recipe is empty"),
    ],
)
def test_invalid_recipes_fail_with_one_line(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert needle in str(e.value)


def test_missing_recipe():
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(ROOT / "recipes" / "nope.yaml")


def test_overrides_are_typed_and_validated():
    cfg = load_config(ROOT / "recipes" / "gr.yaml", ["model.decoder.depth=4", "train.betas=[0.9, 0.95]", "merge.keep=100"])
    assert cfg.model.decoder.depth == 4 and cfg.train.betas == (0.9, 0.95) and cfg.merge.keep == 100
    with pytest.raises(ConfigError, match="did you mean 'model.decoder'"):
        load_config(ROOT / "recipes" / "gr.yaml", ["model.decodr.depth=4"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["model.decoder.depth"])
    with pytest.raises(ConfigError, match="not a perfect square"):
        load_config(ROOT / "recipes" / "gr.yaml", ["merge.keep=99"])


def test_presets_fill_unlisted_fields_and_round_trip():
    cfg = config_from_dict({"model": {"name": "mergevq-r", "decoder": {"depth": 3}}})
    assert cfg.model.encoder.kind == "vit" and cfg.model.encoder.dim == 768 and cfg.model.decoder.depth == 3
    assert cfg.model.decoder.ch_mult == (1, 1, 2, 4, 8)  # from the preset, not the dataclass default
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_check_keep():
    cfg = RunConfig()
    assert cfg.check_keep(144) == 144
    for bad in (0, 150, 2025):
        with pytest.raises(ConfigError, match="perfect square"):
            cfg.check_keep(bad)
