"""`--precision fp32|bf16` for tokenizer inference, channels_last CNN parts, and `train.precision` bf16 on CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mergevq_cli.app import app
from mergevq_core import api
from mergevq_core.errors import ConfigError, DataError
from mergevq_core.precision import autocast, check_precision, train_autocast

from .conftest import ROOT

# tiny.yaml shrunk further: bf16 convolutions are emulated (slow) on CPUs without native bf16
SMALL_TRAIN = (
    "model.encoder.depth=2", "model.decoder.depth=1", "model.recovery.depth=1", "model.encoder.ch=8",
    "model.encoder.dim=16", "model.encoder.heads=2", "model.decoder.ch=8", "model.decoder.dim=16",
    "model.decoder.heads=2", "model.recovery.dim=16", "model.recovery.heads=2", "model.align_head.out_dim=16",
    "quant.dim=8", "loss.disc_ndf=8", "loss.gan_weight=0.1", "loss.gan_start=0", "loss.align_weight=0.1",
    "train.batch_size=2", "train.micro_batch=2", "train.eval_images=2", "train.log_every=1", "train.warmup_steps=1",
    "merge.keep=16",
)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A checkpoint folder holding tiny.yaml's tokenizer with its random initial weights."""
    from safetensors.torch import save_file

    from mergevq_core import checkpoint as ck
    from mergevq_core.config import config_to_dict, load_config
    from mergevq_core.models import build_tokenizer

    cfg = load_config(ROOT / "recipes/tiny.yaml")
    torch.manual_seed(0)
    sd = build_tokenizer(cfg).state_dict()
    path = tmp_path_factory.mktemp("random-tiny")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "ema.safetensors"))
    meta = {"format_version": ck.FORMAT_VERSION, "kind": "tokenizer", "step": 0, "config": config_to_dict(cfg)}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three smooth 40×40 pictures (gradients and a disc)."""
    d = tmp_path_factory.mktemp("pictures")
    yy, xx = np.mgrid[0:40, 0:40] / 39.0
    for i in range(3):
        img = np.stack([xx, yy, ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1 * (i + 1)) * 1.0], -1)
        Image.fromarray((np.roll(img, i, axis=-1) * 255).astype(np.uint8)).save(d / f"p{i}.png")
    return d


def _images(folder, size):
    from mergevq_core.eval.reconstruct import collect_images, load_images

    return load_images(collect_images([folder]), size)


def test_precision_choices_and_autocast():
    assert check_precision(None) == "fp32" and check_precision("BF16") == "bf16"
    for bad in ("fp16", "x"):
        with pytest.raises(ConfigError, match="--precision"):
            check_precision(bad)
    ctx = autocast("bf16", "cpu")
    with ctx:
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    # training: bf16 now autocasts on CPU too, auto keeps fp32 there, fp16 is CUDA-only
    assert train_autocast("bf16", "cpu")._enabled and train_autocast("bf16", "cpu").fast_dtype == torch.bfloat16
    assert not train_autocast("auto", "cpu")._enabled and not train_autocast("fp32", "cpu")._enabled
    with pytest.raises(ConfigError, match="train.precision"):
        train_autocast("fp16", "cpu")


def test_bf16_reconstruction_is_close_to_fp32_but_not_identical(random_run, pictures, tmp_path):
    from mergevq_core.runs import load_tokenizer

    fp = api.reconstruct([pictures], ckpt=random_run, tokens=[16], out=tmp_path / "fp32", save=0, device="cpu")
    bf = api.reconstruct([pictures], ckpt=random_run, tokens=[16], out=tmp_path / "bf16", save=0, device="cpu",
                         precision="bf16")
    assert (fp.precision, bf.precision) == ("fp32", "bf16") and bf.to_json()["precision"] == "bf16"
    assert math.isfinite(bf.mean[16]["psnr"]) and abs(bf.mean[16]["psnr"] - fp.mean[16]["psnr"]) < 0.5
    # the outputs themselves: bf16 changes them, a little
    tok, _ = load_tokenizer(random_run, "cpu")
    x = _images(pictures, tok.cfg.model.image_size)
    with torch.no_grad():
        enc = tok.encode(x, tokens=16)
        ref = tok.decode(enc.ids, enc.assign)
        with autocast("bf16", "cpu"):
            low = tok.decode(enc.ids, enc.assign)
    assert low.dtype == torch.bfloat16 and ref.dtype == torch.float32
    diff = (low.float() - ref).abs().max()
    assert 0 < diff < 0.05


def test_channels_last_gives_the_outputs_of_contiguous(random_run, pictures):
    from mergevq_core.nn import DepthToSpaceUpsample
    from mergevq_core.runs import load_tokenizer

    tok, _ = load_tokenizer(random_run, "cpu", channels_last=False)
    assert tok.decoder.conv_out.weight.is_contiguous()
    x = _images(pictures, tok.cfg.model.image_size)
    with torch.no_grad():
        enc0 = tok.encode(x, tokens=16)
        rec0 = tok.decode(enc0.ids, enc0.assign)
        tok.prepare_inference(channels_last=True)
        enc1 = tok.encode(x, tokens=16)
        rec1 = tok.decode(enc0.ids, enc0.assign)
    cl = torch.channels_last
    assert tok.decoder.conv_out.weight.is_contiguous(memory_format=cl)
    assert tok.encoder.stem.conv_in.weight.is_contiguous(memory_format=cl) and not tok.training
    assert torch.equal(enc1.ids, enc0.ids) and torch.equal(enc1.assign, enc0.assign)
    assert (rec1 - rec0).abs().max() < 1e-4
    # loading for inference gives channels_last by default
    again, _ = load_tokenizer(random_run, "cpu")
    assert again.decoder.levels[0].blocks[0].conv1.weight.is_contiguous(memory_format=cl)
    # depth-to-space keeps channels_last memory and moves exactly the same values
    up = DepthToSpaceUpsample(4)
    h = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        a = up(h)
        b = up.to(memory_format=cl)(h.contiguous(memory_format=cl))
    assert b.is_contiguous(memory_format=cl) and torch.allclose(a, b, atol=1e-6)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mergevq_cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_bad_precision_is_one_line_naming_the_option():
    res = _cli("reconstruct", "x.png", "--precision", "fp16")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "--precision" in lines[0], res.stderr
    # the other commands through Typer's runner: a ConfigError naming the option, before any work
    for args in (["tokenize", "shapes", "--out", "unused", "--precision", "fp16"],
                 ["benchmark", "tokenizer", "--recipe", "recipes/tiny.yaml", "--precision", "x"]):
        bad = CliRunner().invoke(app, args)
        assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError) and "--precision" in str(bad.exception)


def test_benchmark_rows_per_precision(monkeypatch, tmp_path):
    from mergevq_core.bench import models

    monkeypatch.setattr(models, "timed", lambda fn, device: 0.001)  # the timed calls are not what is tested
    rows, env = models.bench_tokenizer(recipe=ROOT / "recipes/tiny.yaml", tokens=[16], batch=1, runs=10, warmups=0,
                                       device="cpu", precisions=("fp32", "bf16"))
    assert [(r["tokens"], r["precision"]) for r in rows] == [(16, "fp32"), (16, "bf16")] and env["channels_last"]
    fp, bf = rows
    assert fp["psnr_diff_vs_fp32_db"] is None and fp["encode_img_per_s"] == pytest.approx(1000)
    assert abs(bf["psnr_diff_vs_fp32_db"]) < 0.5 and bf["max_abs_diff_vs_fp32"] > 0  # bf16 may flip a few code bits
    assert bf["psnr_db"] == pytest.approx(fp["psnr_db"] + bf["psnr_diff_vs_fp32_db"])
    res = CliRunner().invoke(app, ["benchmark", "tokenizer", "--recipe", "recipes/tiny.yaml", "--tokens", "16",
                                   "--batch", "1", "--precision", "fp32", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert [r["precision"] for r in json.loads(res.stdout)] == ["fp32"]


def test_tokenize_records_its_precision(random_run, tmp_path):
    out = tmp_path / "tok"
    res = api.tokenize("shapes", out, ckpt=random_run, limit=2, views="center", batch=2, device="cpu",
                       precision="bf16")
    assert res.precision == "bf16" and json.loads((out / "manifest.json").read_text())["precision"] == "bf16"
    with pytest.raises(DataError, match="precision"):
        api.tokenize("shapes", out, ckpt=random_run, limit=2, views="center", batch=2, device="cpu")


def test_lpips_heads_run_in_float32_under_bf16_autocast():
    from mergevq_core.losses import LPIPS

    torch.manual_seed(0)
    lp = LPIPS(random_trunk=True)
    a, b = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ours = lp(a, b)
        package = lp.net(a, b, normalize=False).mean()
        with autocast("bf16", "cpu"):
            low = lp(a, b)
    assert torch.allclose(ours, package, rtol=1e-6) and low.dtype == torch.float32
    assert low == pytest.approx(float(ours), rel=0.05)


def test_bf16_training_steps_on_cpu(tmp_path):
    res = api.train_tokenizer(ROOT / "recipes/tiny.yaml", (*SMALL_TRAIN, "train.precision=bf16"), out=tmp_path / "b",
                              max_steps=2, device="cpu")
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and res.steps == 2
    assert {"total", "recon", "g_adv", "d_loss", "align"} <= set(losses[-1])
    assert all(math.isfinite(v) for row in losses for v in row.values())
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["train"]["precision"] == "bf16"
    # fp16 needs CUDA: refused before any work
    with pytest.raises(ConfigError, match="train.precision"):
        api.train_tokenizer(ROOT / "recipes/tiny.yaml", (*SMALL_TRAIN, "train.precision=fp16"), out=tmp_path / "h",
                            max_steps=1, device="cpu")
    assert not (tmp_path / "h").exists()


def test_train_precision_default_keeps_cpu_in_fp32():
    from mergevq_core.config import load_config

    cfg = load_config(ROOT / "recipes/tiny.yaml", ["train.precision=auto"])
    assert cfg.train.precision == "auto"
    from mergevq_core.config.training import TrainLoopConfig

    assert TrainLoopConfig().precision == "auto"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(ROOT / "recipes/tiny.yaml", ["train.precision=fp8"])
