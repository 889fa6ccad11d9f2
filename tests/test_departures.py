"""The departures from the paper and the public release, each a config value: the new defaults, the values an older
saved config (config version 1, no `version` key) keeps, and the numbers each option pins."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergevq_core.config import (
    CONFIG_VERSION, apply_overrides, config_from_dict, config_from_saved, config_to_dict, load_recipe, read_yaml,
    upgrade_config,
)
from mergevq_core.errors import ConfigError
from mergevq_core.models import build_tokenizer
from mergevq_core.models.decoder import AdaGN

from .conftest import ROOT, small_config

V2_TOKENIZER_KEYS = (("model", "norm_eps"), ("model", "init_scheme"), ("model", "decoder", "adagn_unbiased"))


def version1(cfg) -> dict:
    """The dict a checkpoint saved before config versions: no `version` and none of the keys version 2 added."""
    d = config_to_dict(cfg)
    del d["version"]
    for *sections, name in V2_TOKENIZER_KEYS:
        node = d
        for s in sections:
            node = node[s]
        del node[name]
    return d


@pytest.fixture(scope="module")
def tiny_cfg():
    return small_config(ROOT / "recipes/tiny.yaml")


# ------------------------------------------------------------------ config versions
def test_recipes_are_current_and_round_trip(tiny_cfg):
    cfg = load_recipe(ROOT / "recipes/gr.yaml")
    assert cfg.version == CONFIG_VERSION == 2
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_saved(config_to_dict(cfg)) == cfg  # a saved current config is taken as it is
    ar = load_recipe(ROOT / "recipes/ar/randar-l.yaml")
    assert ar.version == 2 and config_from_saved(config_to_dict(ar), kind="ar") == ar


def test_a_version1_config_keeps_its_behaviour(tiny_cfg):
    old = version1(tiny_cfg)
    old["loss"]["disc_weight"] = 0.8  # stored, never applied before version 2
    cfg = config_from_saved(old)
    assert cfg.version == 2
    assert (cfg.model.norm_eps, cfg.model.init_scheme, cfg.model.decoder.adagn_unbiased) == (1e-6, "all-trunc-normal", False)
    assert cfg.loss.disc_weight == 1.0
    # everything else as stored; a recipe (config_from_dict) without `version` is current
    assert cfg.merge == tiny_cfg.merge and cfg.model.encoder == tiny_cfg.model.encoder
    new = config_from_dict(old)
    assert (new.model.norm_eps, new.model.init_scheme, new.model.decoder.adagn_unbiased) == (1e-5, "release", True)
    assert new.loss.disc_weight == 0.8
    # a recipe may ask for version 1; a newer version than this toolkit's is refused
    assert config_from_dict({**old, "version": 1}) == cfg
    with pytest.raises(ConfigError, match="version=3"):
        config_from_dict({**old, "version": 3})


def test_a_version1_checkpoint_loads_with_its_own_norms(tiny_cfg, tmp_path):
    import json

    from safetensors.torch import save_file

    from mergevq_core import checkpoint as ck
    from mergevq_core.runs import load_tokenizer

    old = version1(tiny_cfg)
    torch.manual_seed(0)
    sd = build_tokenizer(config_from_saved(old)).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ema.safetensors"))
    meta = {"format_version": ck.FORMAT_VERSION, "kind": "tokenizer", "step": 1, "config": old}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    tok, _ = load_tokenizer(tmp_path, "cpu")
    assert {m.eps for m in tok.encoder.blocks.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert not tok.decoder.levels[0].adagn.unbiased and tok.cfg.loss.disc_weight == 1.0


def test_an_override_on_resume_wins_over_the_upgrade(tiny_cfg):
    saved = version1(tiny_cfg)
    cfg = config_from_dict(apply_overrides(upgrade_config(saved), ["loss.disc_weight=0.8"]))  # launch's resume path
    assert cfg.loss.disc_weight == 0.8 and cfg.model.norm_eps == 1e-6


def test_new_keys_take_set_overrides():
    keys = ["model.norm_eps=1e-6", "model.init_scheme=all-trunc-normal", "model.decoder.adagn_unbiased=false",
            "loss.disc_weight=0.5", "loss.align_loss=kl", "merge.schedule=linear"]
    cfg = load_recipe(ROOT / "recipes/tiny.yaml", keys)
    assert (cfg.model.norm_eps, cfg.model.init_scheme, cfg.model.decoder.adagn_unbiased) == (1e-6, "all-trunc-normal", False)
    assert (cfg.loss.disc_weight, cfg.loss.align_loss, cfg.merge.schedule) == (0.5, "kl", "linear")
    with pytest.raises(ConfigError, match="model.init_scheme"):
        load_recipe(ROOT / "recipes/tiny.yaml", ["model.init_scheme=kaiming"])
    ar = load_recipe(ROOT / "recipes/ar/tiny.yaml", ["generator.prefix_rope=zero", "generator.name=mergear"])
    assert ar.generator_options()["prefix_rope"] == "zero"
    with pytest.raises(ConfigError, match="generator.prefix_rope"):
        load_recipe(ROOT / "recipes/ar/tiny.yaml", ["generator.prefix_rope=none"])


def test_info_reads_the_new_keys():
    from mergevq_core.api import model_info

    info = model_info(ROOT / "recipes/tiny.yaml", overrides=("model.init_scheme=all-trunc-normal", "model.norm_eps=1e-6"))
    assert info.config["model"]["init_scheme"] == "all-trunc-normal" and info.config["version"] == 2


# ------------------------------------------------------------------ 1. AdaGN variance and LayerNorm eps
@pytest.mark.parametrize("unbiased", [True, False])
def test_adagn_std_formula(unbiased):
    torch.manual_seed(0)
    ada = AdaGN(3, 4, unbiased=unbiased)
    with torch.no_grad():  # scale = std of z's first bit, shift = mean of its second
        ada.scale.weight.zero_()
        ada.scale.weight[:, 0] = 1.0
        ada.scale.bias.zero_()
        ada.shift.weight.zero_()
        ada.shift.weight[:, 1] = 1.0
    x, z = torch.randn(2, 4, 5, 5), torch.randn(2, 3, 3, 3)
    n = 9
    z0 = z[:, 0].flatten(1)
    var = ((z0 - z0.mean(1, keepdim=True)) ** 2).sum(1) / (n - 1 if unbiased else n)  # hand-written
    std = (var + 1e-6).sqrt()
    normed = F.group_norm(x, 4, eps=1e-6)  # 4 channels: one group each
    want = normed * std[:, None, None, None] + z[:, 1].flatten(1).mean(1)[:, None, None, None]
    torch.testing.assert_close(ada(x, z), want)


def test_layer_norm_eps_and_adagn_by_version(tiny_cfg):
    def norms(tok):
        lns = [m for part in (tok.encoder.blocks, tok.decoder.blocks) for m in part.modules() if isinstance(m, nn.LayerNorm)]
        return {m.eps for m in lns}, {m.unbiased for m in tok.modules() if isinstance(m, AdaGN)}

    assert norms(build_tokenizer(tiny_cfg)) == ({1e-5}, {True})
    assert norms(build_tokenizer(config_from_saved(version1(tiny_cfg)))) == ({1e-6}, {False})


# ------------------------------------------------------------------ 2. merge schedule
def test_square_schedule_is_the_recipes_and_square_decreasing():
    from mergevq_core.tome import merge_schedule

    for name, n, keep in (("g", 1024, 256), ("gr", 256, 144), ("r", 256, 36)):
        cfg = load_recipe(ROOT / f"recipes/{name}.yaml")
        assert (cfg.merge.schedule, cfg.model.n_tokens, cfg.merge.keep) == ("square", n, keep)
        sched = merge_schedule(n, keep, 12, "square")
        total, weights = n - keep, [(12 - l) ** 2 for l in range(12)]
        assert sum(sched) == total and sched == sorted(sched, reverse=True)
        for r, w in zip(sched, weights):  # r_l = total · (12 - l)² / Σ (12 - j)², to the unit
            assert abs(r - total * w / sum(weights)) <= 1
    assert merge_schedule(1024, 256, 12, "square") == [171, 143, 119, 96, 76, 58, 43, 29, 18, 10, 4, 1]
    assert load_recipe(ROOT / "recipes/tiny.yaml").merge.schedule == "linear"


# ------------------------------------------------------------------ 3. alignment loss
def test_alignment_is_the_papers_cross_entropy():
    from mergevq_core.config import LossConfig
    from mergevq_core.losses import DinoCE

    assert LossConfig().align_loss == "ce"
    for name in ("g", "gr", "r"):
        assert load_recipe(ROOT / f"recipes/{name}.yaml").loss.align_loss == "ce"
    torch.manual_seed(0)
    ce = DinoCE(5)
    ce.center.fill_(0.3)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    p_t = torch.softmax((t - 0.3) / 0.04, -1)  # centred, sharpened teacher
    want = -(p_t * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()
    torch.testing.assert_close(ce(s, t), want)
    ce.update_center(t)
    torch.testing.assert_close(ce.center, 0.9 * torch.full((1, 5), 0.3) + 0.1 * t.mean(0, keepdim=True))


# ------------------------------------------------------------------ 4. discriminator loss weight
def test_disc_weight_scales_the_discriminator_gradient():
    from mergevq_core.losses import LeCam, PatchDiscriminator, d_loss

    x_real, x_fake = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    grads, losses = [], []
    for w in (1.0, 0.8):
        torch.manual_seed(0)
        disc = PatchDiscriminator(ndf=8, n_layers=2)
        loss, logs = d_loss(disc, LeCam(), x_real, x_fake, lecam_weight=0.5, weight=w)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in disc.parameters()]))
        losses.append((loss.item(), logs["d_hinge"]))
    torch.testing.assert_close(grads[1], 0.8 * grads[0])
    assert losses[1][0] == pytest.approx(0.8 * losses[0][0]) and losses[1][1] == pytest.approx(losses[0][1])


def test_the_trainer_passes_disc_weight():
    import inspect

    from mergevq_core.train import tokenizer_task

    src = inspect.getsource(tokenizer_task.TokenizerTask.micro_step)
    assert "self.cfg.loss.disc_weight" in src


# ------------------------------------------------------------------ 5. generator FFN dropout
def test_ffn_path_applies_dropout_once():
    from mergevq_core.models.gpt import Block, gpt_tiny

    p = 0.3
    cfg = dataclasses.replace(gpt_tiny(64, 16), dropout=p)
    torch.manual_seed(0)
    block = Block(cfg).train()
    ffn_drops = [m for m in block.ffn.modules() if isinstance(m, nn.Dropout)]
    assert len(ffn_drops) == 1 and ffn_drops[0].p == p  # SwiGLU's, after w2
    x = torch.randn(2, 5, cfg.dim)
    cos, sin = torch.ones(5, cfg.head_dim // 2), torch.zeros(5, cfg.head_dim // 2)
    torch.manual_seed(1)
    out = block(x, cos, sin)
    torch.manual_seed(1)  # by hand: one dropout on the attention output, one on the FFN output (LlamaGen)
    h = x + F.dropout(block.attn(block.attn_norm(x), cos, sin), p)
    f = block.ffn
    n = block.ffn_norm(h)
    want = h + F.dropout(f.w2(F.silu(f.w1(n)) * f.w3(n)), p)
    torch.testing.assert_close(out, want)


# ------------------------------------------------------------------ 6. initialisation
def _std_ratio(w: torch.Tensor, want: float) -> float:
    return float(w.detach().float().std()) / want


def test_release_init_leaves_the_cnn_at_pytorch_defaults(tiny_cfg):
    def convs(tok):
        conv = tok.encoder.stem.stages[0].conv1  # a stem ResBlock conv
        lin = tok.encoder.blocks[0].mlp.fc1  # a transformer Linear
        return conv, lin

    torch.manual_seed(0)
    conv, lin = convs(build_tokenizer(tiny_cfg))
    fan_in = conv.weight[0].numel()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=√5): U(−1/√fan_in, 1/√fan_in), std = bound/√3
    assert conv.weight.abs().max() <= bound and abs(_std_ratio(conv.weight, bound / math.sqrt(3)) - 1) < 0.1
    assert abs(_std_ratio(lin.weight, 0.02) - 1) < 0.1 and not lin.bias.any()
    torch.manual_seed(0)
    conv, lin = convs(build_tokenizer(config_from_saved(version1(tiny_cfg))))  # all-trunc-normal
    assert abs(_std_ratio(conv.weight, 0.02) - 1) < 0.1 and abs(_std_ratio(lin.weight, 0.02) - 1) < 0.1


def test_release_init_covers_decoder_blocks_and_recovery(tiny_cfg):
    torch.manual_seed(0)
    tok = build_tokenizer(tiny_cfg)
    for lin in (tok.decoder.blocks[0].attn.qkv, tok.recovery.blocks[0].cross.q):
        assert abs(_std_ratio(lin.weight, 0.02) - 1) < 0.15
    code = tok.code_proj.proj  # the code projection (a 1×1 conv in the release) keeps PyTorch's default
    assert abs(_std_ratio(code.weight, 1 / math.sqrt(3 * code.in_features)) - 1) < 0.15


# ------------------------------------------------------------------ 7. RandAR guidance
def test_linear_cfg_counts_tokens_decoded_so_far(monkeypatch):
    from mergevq_core.generators import GENERATORS, SampleNoise, SamplingSettings, build_generator, randar_schedule
    from mergevq_core.generators import cfg_scale_at, sampling
    from mergevq_core.models.gpt import gpt_tiny

    assert [cfg_scale_at(4.0, "linear", d, 16) for d in (0, 4, 8, 15)] == [1.0, 1.75, 2.5, 1 + 3 * 15 / 16]
    assert cfg_scale_at(4.0, "constant", 7, 16) == 4.0
    assert GENERATORS["randar"].default_cfg_schedule == "linear"
    assert GENERATORS["llamagen"].default_cfg_schedule == GENERATORS["mergear"].default_cfg_schedule == "constant"

    scales: list[float] = []
    real_guide = sampling.guide
    monkeypatch.setattr(sampling, "guide", lambda logits, s: scales.append(s) or real_guide(logits, s))
    torch.manual_seed(0)
    g = build_generator("randar", gpt_tiny(64, 16)).eval()
    noise = SampleNoise.arange(0, 2)
    settings = SamplingSettings(cfg=3.0, cfg_schedule="linear")
    g.sample(torch.tensor([1, 2]), 16, settings.picker(16, noise), guided=True, steps=6, noise=noise)
    want, done = [], 0
    for m in randar_schedule(16, 6):  # a step's tokens share 1 + (s − 1)·(decoded before the step)/N
        want += [1 + 2 * done / 16] * m
        done += m
    assert scales == pytest.approx(want) and len(set(scales)) == 6


def test_generate_cli_defaults_to_the_samplers_schedule():
    import inspect

    from mergevq_cli.commands import generate

    assert inspect.signature(generate.generate).parameters["cfg_schedule"].default == "auto"
    assert "default_cfg_schedule" in inspect.getsource(generate.generate)


# ------------------------------------------------------------------ 8. prefix rotation
@pytest.mark.parametrize("name", ["llamagen", "mergear"])
@pytest.mark.parametrize("mode", ["identity", "zero"])
def test_prefix_rope(name, mode):
    from mergevq_core.generators import build_generator
    from mergevq_core.models.gpt import gpt_tiny
    from mergevq_core.nn.rope import apply_rope

    torch.manual_seed(0)
    g = build_generator(name, gpt_tiny(64, 16), prefix_rope=mode).eval()
    assert g.options()["prefix_rope"] == mode
    assert build_generator(name, g.cfg, **g.options()).prefix_rope == mode  # the checkpoint round trip
    p = g.prefix
    labels, k = torch.tensor([1, 2]), torch.tensor([9, 9])
    x = torch.cat([g.prefix_embeds(labels, k), g.gpt.embed_ids(torch.randint(0, 64, (2, 5)))], 1)
    cos, sin = g._rope(5)
    attn = g.gpt.blocks[0].attn
    q, kk, _ = attn.wqkv(g.gpt.blocks[0].attn_norm(x)).view(2, p + 5, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    qr, kr = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
    logits = qr @ kr.transpose(-1, -2)  # (B, H, L, L)
    if mode == "zero":  # LlamaGen: the prefix's q and k are zero, so every logit involving it is 0
        assert not qr[:, :, :p].any() and not kr[:, :, :p].any()
        assert not logits[..., :p].any() and not logits[..., :p, :].any()
        assert logits[..., p:, p:].abs().min() > 0
    else:
        torch.testing.assert_close(qr[:, :, :p], q[:, :, :p])
        torch.testing.assert_close(kr[:, :, :p], kk[:, :, :p])
        assert logits[..., p:, :p].abs().min() > 0


def test_old_generator_options_mean_identity():
    from mergevq_core.generators import build_generator
    from mergevq_core.models.gpt import gpt_tiny

    g = build_generator("randar", gpt_tiny(64, 16), default_tokens=9)  # meta.json options saved before the key
    assert g.prefix_rope == "identity"
    with torch.no_grad():
        g.gpt.heads[0].weight.normal_(std=0.5)  # zero-initialised heads would make every logit 0
    zero = build_generator("randar", gpt_tiny(64, 16), default_tokens=9, prefix_rope="zero")
    zero.load_state_dict(g.state_dict())
    ids, order = torch.randint(0, 64, (1, 9)), torch.arange(9)[None]
    with torch.no_grad():
        a, _ = g.teacher_logits(ids, torch.tensor([9]), torch.tensor([1]), order)
        b, _ = zero.teacher_logits(ids, torch.tensor([9]), torch.tensor([1]), order)
    assert not torch.allclose(a, b)  # same weights, another attention pattern


# ------------------------------------------------------------------ 9. the LlamaGen baseline's tokens
def test_llamagen_recipe_says_how_to_train_the_release_baseline():
    text = (ROOT / "recipes/ar/llamagen-l.yaml").read_text()
    assert "--tokens 256" in text and "merge_num" in text
    assert read_yaml(ROOT / "recipes/ar/llamagen-l.yaml")["generator"]["name"] == "llamagen"
