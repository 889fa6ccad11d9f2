"""Every recipe loads; the paper-scale recipes have the paper's sizes (Table A1), counted without data."""

from __future__ import annotations

import pytest

from mergevq_core.api import model_info
from mergevq_core.config import ARRunConfig, load_any_config
from mergevq_core.models.gpt import gpt_config_from_recipe

from .conftest import ROOT, TOKENIZER_RECIPES

AR_RECIPES = sorted((ROOT / "recipes" / "ar").glob("*.yaml"))


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.parent.name + "/" + p.stem)
def test_every_recipe_loads(recipe):
    cfg = load_any_config(recipe)
    if isinstance(cfg, ARRunConfig):
        assert recipe.parent.name == "ar"
        gpt_config_from_recipe(cfg.model)  # every AR recipe states its vocabulary, N and classes, so `mergevq info` works
    else:
        assert cfg.merge.keep <= cfg.model.n_tokens


def test_recipes_exist():
    assert {p.stem for p in TOKENIZER_RECIPES} >= {"g", "gr", "r", "tiny"}
    assert {p.stem for p in AR_RECIPES} == {"llamagen-l", "mergear-l", "randar-l", "tiny"}


@pytest.mark.parametrize("name", ["llamagen-l", "mergear-l", "randar-l"])
def test_ar_recipes_are_llamagen_l(name):
    info = model_info(ROOT / "recipes" / "ar" / f"{name}.yaml")
    assert info.generator == name.split("-")[0]
    assert abs(info.params["total"] / 343e6 - 1) < 0.01, info.params  # paper Table A2: 343M
    g = info.gpt
    assert (g["depth"], g["dim"], g["heads"], g["hidden"], g["factorized"]) == (24, 1024, 16, 2816, (6, 12))


# (recipe, encoder M, decoder M, encoder GMACs, decoder GMACs, schedule); tolerances from the issue: 1% / 3%.
# Table A1's FLOPs are those of the release's linear merge schedule (the one pinned here): under the paper's square
# schedule, which the recipes use, MergeVQ (G) counts 92.8 GMACs, 4.8% under the table's 97.5.
PAPER = [
    ("g", 62.3, 82.8, 97.5, 169.2, [101, 90, 84, 78, 72, 66, 61, 55, 49, 43, 37, 32]),
    ("gr", 62.7, 83.4, 46.4, 65.6, [12, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 5]),
]


@pytest.mark.parametrize("name, enc, dec, enc_g, dec_g, schedule", PAPER)
def test_paper_sizes(name, enc, dec, enc_g, dec_g, schedule):
    info = model_info(ROOT / "recipes" / f"{name}.yaml", overrides=("merge.schedule=linear",))
    assert info.params["encoder"] / 1e6 == pytest.approx(enc, rel=0.01)
    assert info.params["decoder"] / 1e6 == pytest.approx(dec, rel=0.01)
    assert info.gmacs["encoder"] == pytest.approx(enc_g, rel=0.03)
    assert info.gmacs["decoder"] == pytest.approx(dec_g, rel=0.03)
    assert info.schedule == schedule
    assert info.codebook_size == 2**18
    assert info.params["total"] == sum(v for k, v in info.params.items() if k != "total")


def test_r_encoder_size():
    info = model_info(ROOT / "recipes" / "r.yaml")
    assert info.params["encoder"] / 1e6 == pytest.approx(86.6, rel=0.02)
    assert info.tokens == {"N": 256, "K": 36, "grid": 16}
    assert sum(info.schedule) == 256 - 36


def test_info_at_other_k_changes_only_the_encoder_side():
    a = model_info(ROOT / "recipes" / "gr.yaml", tokens=64)
    b = model_info(ROOT / "recipes" / "gr.yaml", tokens=256)
    assert a.gmacs["encoder"] < b.gmacs["encoder"] and a.gmacs["decoder"] == b.gmacs["decoder"]
    assert b.schedule == [0] * 12 and sum(a.schedule) == 256 - 64
