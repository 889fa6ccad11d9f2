from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergevq_core.config import RunConfig, apply_overrides, config_from_dict, read_yaml

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml"))


def small_config(recipe: Path | str, extra: tuple[str, ...] = ()) -> RunConfig:
    """A tokenizer recipe shrunk to run in a fraction of a second on CPU, keeping its layout:
    same encoder kind, stages and levels, N = 64 tokens (hybrid) or 16 (vit), width 64."""
    base = config_from_dict(read_yaml(recipe))
    enc, dec = base.model.encoder, base.model.decoder
    hybrid = enc.kind == "hybrid"
    overrides = [
        f"model.image_size={(8 if hybrid else 4) * enc.downsample}",
        f"merge.keep={16 if hybrid else 9}",
        "model.encoder.dim=64", "model.encoder.depth=3", "model.encoder.heads=2", "model.encoder.init=random",
        f"model.decoder.ch={64 // dec.ch_mult[-1]}", "model.decoder.dim=64", "model.decoder.depth=1",
        "model.decoder.heads=2", "model.decoder.num_res_blocks=1",
        "model.recovery.dim=32", "model.recovery.heads=2", "model.recovery.depth=1",
        "model.align_head.out_dim=32", "quant.dim=8",
    ]
    if hybrid:
        overrides += [f"model.encoder.ch={64 // enc.ch_mult[-1]}", "model.encoder.num_res_blocks=1"]
    torch.manual_seed(0)
    return config_from_dict(apply_overrides(read_yaml(recipe), [*overrides, *extra]))


# tiny.yaml made smaller still: a few training steps take well under a second each on 2 CPU cores.
FAST_TRAIN = (
    "model.encoder.depth=2", "model.decoder.depth=1", "model.recovery.depth=1", "train.batch_size=4",
    "train.micro_batch=4", "train.eval_images=8", "train.log_every=2", "train.eval_every=1000",
    "train.ckpt_every=4", "train.warmup_steps=2", "loss.gan_weight=0.1", "loss.gan_start=2", "loss.align_weight=0.1",
    "merge.keep=16",
)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test (and every subprocess it starts) caches under a temporary folder, never in ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("cache")
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing reaches the Hugging Face hub (tests that need the cache make one)
    old = os.environ.get("MERGEVQ_CACHE")
    os.environ["MERGEVQ_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MERGEVQ_CACHE", None)
    else:
        os.environ["MERGEVQ_CACHE"] = old


def set_args(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="session")
def tiny_tokenizer_run(tmp_path_factory) -> Path:
    """A 2-step tiny tokenizer run (FAST_TRAIN), shared by the reconstruct/tokenize and generate tests."""
    from mergevq_core import api

    out = tmp_path_factory.mktemp("runs") / "tiny-1"
    api.train_tokenizer(ROOT / "recipes/tiny.yaml", FAST_TRAIN, out=out, max_steps=2, device="cpu")
    return out


@pytest.fixture(scope="session")
def inception_stand_in(tmp_path_factory) -> Path:
    """A small local stand-in for the FID extractor: torch-fidelity's FeatureExtractorInceptionV3 with weight
    loading bypassed and Kaiming-initialised convs (default init makes features vanish), saved as a file."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path
