"""`reconstruct` and `tokenize` on a tiny checkpoint trained in the fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mergevq_core import api
from mergevq_core.errors import CheckpointError, ConfigError, DataError

from .conftest import FAST_TRAIN, ROOT


@pytest.fixture(scope="session")
def run(tiny_tokenizer_run):
    return tiny_tokenizer_run


@pytest.fixture(scope="session")
def mixed(tmp_path_factory):
    """PNG, JPEG, grayscale, RGBA, 16-bit and odd-sized files in one folder."""
    d = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)).save(d / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8), "L").save(d / "gray.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(d / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (34, 34), dtype=np.uint16)).save(d / "deep16.png")
    return d


def test_reconstruct_mixed_folder_and_photos(run, mixed, tmp_path):
    res = api.reconstruct([mixed], ckpt=run, tokens=[16, 64], out=tmp_path / "r", photos=True, device="cpu")
    n = 5 + len({r.path for r in res.images if "skimage" in r.path})
    assert len(res.images) == 2 * n and n > 10
    for r in res.images:
        assert os.path.isfile(r.output) and np.isfinite(r.psnr) and -1 <= r.ssim <= 1
    assert set(res.mean) == {16, 64} and all(0 < m["codebook_usage"] <= 1 for m in res.mean.values())
    assert os.path.isfile(res.plot)
    w, h = Image.open(res.images[0].output).size
    assert w > 2.5 * h  # original | reconstruction | merge map


def test_source_predicted_reports_the_gap(run, mixed, tmp_path):
    res = api.reconstruct([mixed], ckpt=run, tokens=[16], source="predicted", out=tmp_path / "p", device="cpu")
    m = res.mean[16]
    assert m["gap_db"] == pytest.approx(m["psnr_gt_source"] - m["psnr"])


def test_newest_run_is_used_and_a_missing_one_is_explained(run, mixed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="mergevq train-tokenizer"):
        api.reconstruct([mixed], out=tmp_path / "x", device="cpu")
    (tmp_path / "runs").mkdir()
    os.symlink(run, tmp_path / "runs" / "tiny-1")
    res = api.reconstruct([mixed / "rgb.png"], out=tmp_path / "y", device="cpu")
    assert res.ckpt.startswith("runs/tiny-1/checkpoints/")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mergevq_cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_json_and_one_line_errors(run, mixed, tmp_path):
    res = _cli("reconstruct", str(mixed / "rgb.png"), "--ckpt", str(run), "--tokens", "16", "--out", str(tmp_path / "c"),
               "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    assert obj["ckpt"] and obj["images"][0]["tokens"] == 16 and {"psnr", "ssim"} <= set(obj["mean"]["16"])
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for args, needle in [
        ([str(corrupt)], "cannot read image"),
        ([str(tmp_path / "missing.png")], "no such file or folder"),
        ([str(mixed / "rgb.png"), "--tokens", "20"], "perfect square"),
        ([str(mixed / "rgb.png"), "--tokens", "100"], "perfect square"),
    ]:
        r = _cli("reconstruct", *args, "--ckpt", str(run), "--out", str(tmp_path / "e"), "--device", "cpu")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], r.stderr


def test_rfid_with_a_local_stand_in_extractor(run, mixed, tmp_path, inception_stand_in):
    res = api.reconstruct([mixed], ckpt=run, tokens=[16], out=tmp_path / "f", fid=True,
                          inception_weights=str(inception_stand_in), device="cpu")
    assert res.mean[16]["rfid"] >= 0


def test_tokenize_then_decode_equals_reconstruct_bit_for_bit(run, mixed, tmp_path):
    from mergevq_core.data.codes import TokenShards
    from mergevq_core.eval.reconstruct import collect_images, load_images

    api.tokenize(mixed, tmp_path / "tok", ckpt=run, tokens=16, device="cpu", batch=1, shard_size=2)
    shards = TokenShards(tmp_path / "tok")
    tok, _ = api.load_tokenizer(run, "cpu")
    files = collect_images([mixed])
    images = load_images(files, tok.cfg.model.image_size)
    assert len(shards) == len(files)
    with torch.no_grad():
        for i in range(len(files)):
            item = shards[i]
            enc = tok.encode(images[i : i + 1], tokens=16)
            assert torch.equal(item["ids"], enc.ids[0]) and torch.equal(item["assign"], enc.assign[0])
            assert torch.equal(tok.decode(item["ids"][None], item["assign"][None]), tok.decode(enc.ids, enc.assign))


def test_tokenize_resumes_and_refuses_another_tokenizer(run, tmp_path, monkeypatch):
    from mergevq_core.data import codes

    full = api.tokenize("shapes", tmp_path / "full", ckpt=run, tokens_sample=True, limit=10, device="cpu", shard_size=4)
    real_write, calls = codes.ShardWriter.write, {"n": 0}

    def dies_after_one(self, *a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_write(self, *a, **k)

    monkeypatch.setattr(codes.ShardWriter, "write", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        api.tokenize("shapes", tmp_path / "part", ckpt=run, tokens_sample=True, limit=10, device="cpu", shard_size=4)
    monkeypatch.setattr(codes.ShardWriter, "write", real_write)
    with pytest.raises(DataError, match="incomplete"):
        codes.TokenShards(tmp_path / "part")
    again = api.tokenize("shapes", tmp_path / "part", ckpt=run, tokens_sample=True, limit=10, device="cpu", shard_size=4)
    assert again.skipped_shards == 1 and again.encoded == 10 - 4 and full.encoded == 10
    a, b = codes.TokenShards(tmp_path / "full"), codes.TokenShards(tmp_path / "part")
    for i in range(10):
        assert all(torch.equal(torch.as_tensor(a[i][key]), torch.as_tensor(b[i][key])) for key in ("ids", "assign", "k", "label"))
    assert len({a[i]["k"] for i in range(10)}) > 1  # K drawn per image

    other = tmp_path / "other"
    api.train_tokenizer(ROOT / "recipes/tiny.yaml", FAST_TRAIN, out=other, max_steps=1, device="cpu", seed=5)
    with pytest.raises(DataError, match="another tokenizer"):
        api.tokenize("shapes", tmp_path / "full", ckpt=other, tokens_sample=True, limit=10, device="cpu", shard_size=4)


def test_bad_tokens_for_tokenize(run, tmp_path):
    with pytest.raises(ConfigError, match="perfect square"):
        api.tokenize("shapes", tmp_path / "t", ckpt=run, tokens=50, limit=4, device="cpu")
