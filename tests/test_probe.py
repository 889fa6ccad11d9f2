"""`mergevq probe`: features and their cache, the probe head, train/val folders, torchrun, and `--protocol
finetune` (exact resume after SIGKILL, torchrun, layer decay)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mergevq_core import api
from mergevq_core.errors import ConfigError, DataError
from mergevq_core.eval import feature_cache
from mergevq_core.eval.feature_cache import SHARD_ROWS, FeatureSet, encoder_features
from mergevq_core.eval.probe import LinearProbe, linear_probe, linear_probes

from .conftest import ROOT

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mergevq_cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _torchrun(port, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "mergevq_cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """shapes written as PNG class folders: train/ (8 per class) and val/ (4 per class)."""
    from mergevq_core.data.sources import open_images
    from mergevq_core.eval.fid import to_uint8

    root = tmp_path_factory.mktemp("folders")
    for split, n in (("train", 80), ("val", 40)):
        ds, info = open_images("shapes", 32, split=split, length=n, seed=3)
        for i in range(n):
            item = ds[i]
            d = root / split / info["classes"][item["label"]]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8(item["image"]).permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("tokens", [None, 16])
def test_features_have_the_documented_shape(tiny_tokenizer_run, tokens):
    tok, _ = api.load_tokenizer(tiny_tokenizer_run, "cpu")
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    sched = tok.schedule(tokens or tok.n_tokens)
    f = encoder_features(tok, x, sched)
    assert f.shape == (5, 2 * tok.cfg.model.encoder.dim) and torch.isfinite(f).all()
    # one image's features do not depend on the batch it is in
    torch.testing.assert_close(encoder_features(tok, x[3:4], sched), f[3:4], atol=1e-5, rtol=1e-4)


def test_shuffled_epochs_read_every_row_once_a_window_at_a_time(tmp_path):
    n = 3 * SHARD_ROWS + 17
    i = torch.arange(n)
    feats = torch.stack([i // 1000, i % 1000], 1).float()  # the row number, exact in fp16
    fs = FeatureSet.from_arrays(tmp_path / "fs", feats, i % 7)
    seen = []
    for epoch in (0, 1):
        rows = [x["features"][:, 0] * 1000 + x["features"][:, 1] for x, _ in fs.batches(epoch, 100, seed=0, window=2)]
        assert all(len(r) == 100 for r in rows[:-1])
        order = torch.cat(rows).long()
        assert sorted(order.tolist()) == list(range(n))
        seen.append(order)
    assert not torch.equal(seen[0], seen[1])
    assert torch.equal(torch.cat([y for _, y in fs.sequential(64)]), i % 7)
    small = FeatureSet.from_arrays(tmp_path / "small", feats[:SHARD_ROWS + 5], i[:SHARD_ROWS + 5] % 7)
    for epoch in (0, 1):  # kept in memory (2 shards ≤ the window): the same rows, reshuffled each epoch
        got = torch.cat([x["features"][:, 0] * 1000 + x["features"][:, 1] for x, _ in small.batches(epoch, 64, 0)])
        assert sorted(got.long().tolist()) == list(range(SHARD_ROWS + 5))


def test_probe_head_is_parameter_free_bn_plus_linear(tmp_path):
    head = LinearProbe(8, 3)
    assert [n for n, _ in head.named_parameters()] == ["fc.weight", "fc.bias"]
    g = torch.Generator().manual_seed(0)  # separable data: the probe learns it
    centres = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 8, generator=g)
    train = FeatureSet.from_arrays(tmp_path / "tr", x[:240], y[:240])
    test = FeatureSet.from_arrays(tmp_path / "te", x[240:], y[240:])
    top1, confusion = linear_probe(train, test, 3, epochs=20, lr=1e-2, batch=32)
    assert top1 > 0.9 and confusion.sum() == 60 and confusion.shape == (3, 3)
    assert top1 == pytest.approx(float(confusion.diagonal().sum()) / 60)
    # heads trained side by side on the same batches equal heads trained apart
    both = linear_probes(train, test, 3, members=("features", "pixels"), epochs=20, lr=1e-2, batch=32)
    assert both["features"][0] == top1 and torch.equal(both["features"][1], confusion)
    assert both["pixels"][0] == linear_probe(train, test, 3, member="pixels", epochs=20, lr=1e-2, batch=32)[0]


def test_second_run_reads_the_cache_and_gives_the_same_probe(tiny_tokenizer_run, tmp_path, monkeypatch):
    kw = dict(ckpt=tiny_tokenizer_run, tokens="16", epochs=3, batch=32, n_train=40, n_test=20, out=tmp_path,
              cache=tmp_path / "cache", device="cpu")
    first = api.probe("shapes", **kw)
    assert not first.features_cached and first.n_train == 40 and first.n_test == 20 and first.tokens == 16
    assert set(first.per_class) == set(first.classes) and len(first.classes) == 10
    # the shapes val split holds two images of each of the 10 classes: top-1 is the mean per-class accuracy
    assert first.top1 == pytest.approx(sum(first.per_class.values()) / 10)
    assert (tmp_path / "confusion_shapes_k16.png").is_file()

    def no_extraction(*a, **k):
        raise AssertionError("features extracted again")

    monkeypatch.setattr(feature_cache, "encoder_features", no_extraction)
    second = api.probe("shapes", **kw)
    assert second.features_cached and second.top1 == first.top1 and second.baseline_top1 == first.baseline_top1
    monkeypatch.undo()
    other_k = api.probe("shapes", **{**kw, "tokens": "all", "epochs": 1})  # another K: another cache entry
    assert not other_k.features_cached and other_k.tokens == 64


def test_interrupted_extraction_resumes_at_the_first_missing_shard(tiny_tokenizer_run, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "SHARD_ROWS", 16)
    real, calls = feature_cache._write_shard, []

    def dies_after_two(path, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path.name)
        real(path, *a)

    kw = dict(ckpt=tiny_tokenizer_run, epochs=1, batch=16, n_train=60, n_test=20, out=tmp_path,
              cache=tmp_path / "c", device="cpu")
    monkeypatch.setattr(feature_cache, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        api.probe("shapes", **kw)
    monkeypatch.setattr(feature_cache, "_write_shard", real)
    resumed = api.probe("shapes", **kw)
    monkeypatch.setattr(feature_cache, "SHARD_ROWS", 16)
    fresh = api.probe("shapes", **{**kw, "cache": tmp_path / "fresh"})
    assert resumed.top1 == fresh.top1 and resumed.baseline_top1 == fresh.baseline_top1
    a = sorted((tmp_path / "c" / "probe").glob("*/shard-*.npz"))
    b = sorted((tmp_path / "fresh" / "probe").glob("*/shard-*.npz"))
    assert len(a) == len(b) == 4 + 2
    for x, y in zip(a, b):
        with np.load(x) as u, np.load(y) as v:
            assert np.array_equal(u["labels"], v["labels"]) and np.allclose(u["features"], v["features"], atol=1e-3)


def test_train_and_val_folders(tiny_tokenizer_run, class_folders, tmp_path):
    res = api.probe(str(class_folders / "train"), val=str(class_folders / "val"), ckpt=tiny_tokenizer_run,
                    epochs=2, batch=16, out=tmp_path, cache=tmp_path / "c", device="cpu")
    assert (res.n_train, res.n_test, len(res.classes)) == (80, 40, 10)
    one = api.probe(str(class_folders / "train"), ckpt=tiny_tokenizer_run, epochs=1, batch=16, out=tmp_path,
                    cache=tmp_path / "c", device="cpu")  # one folder: a fixed 20% held out
    assert (one.n_train, one.n_test) == (64, 16)
    bad = tmp_path / "val_other"
    (bad / "zebra").mkdir(parents=True)
    (bad / "circle").mkdir()
    for d in ("zebra", "circle"):
        Image.new("RGB", (32, 32)).save(bad / d / "a.png")
    with pytest.raises(DataError, match="zebra"):
        api.probe(str(class_folders / "train"), val=str(bad), ckpt=tiny_tokenizer_run, epochs=1, out=tmp_path,
                  device="cpu")
    with pytest.raises(DataError, match="no such folder"):
        api.probe("/nonexistent", ckpt=tiny_tokenizer_run, epochs=1, out=tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="perfect square"):
        api.probe("shapes", ckpt=tiny_tokenizer_run, tokens="15", epochs=1, out=tmp_path, device="cpu")


def test_two_gloo_processes_give_the_probe_of_one(tiny_tokenizer_run, class_folders, tmp_path):
    args = ["probe", str(class_folders / "train"), "--val", str(class_folders / "val"), "--ckpt",
            str(tiny_tokenizer_run), "--epochs", "3", "--batch", "16", "--device", "cpu", "--json", "--out",
            str(tmp_path)]
    one = _cli(*args, "--cache", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(29545, *args, "--cache", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 prints
    for key in ("top1", "baseline_top1", "n_train", "n_test", "per_class"):
        assert a[key] == b[key], key
    for x, y in zip(sorted((tmp_path / "one").rglob("shard-*.npz")), sorted((tmp_path / "two").rglob("shard-*.npz"))):
        with np.load(x) as u, np.load(y) as v:
            assert np.array_equal(u["labels"], v["labels"]) and np.allclose(u["features"], v["features"], atol=1e-3)


def test_options_of_the_other_protocol_are_refused(tiny_tokenizer_run, tmp_path):
    for args, needle in [(["--resume"], "--resume applies only to --protocol finetune"),
                         (["--protocol", "finetune", "--no-baseline"], "--no-baseline applies only to --protocol linear"),
                         (["--protocol", "tune"], "--protocol"), (["--batch", "0"], "--batch 0"),
                         (["--workers", "-1"], "--workers -1")]:
        r = _cli("probe", "shapes", "--ckpt", str(tiny_tokenizer_run), "--device", "cpu", "--out", str(tmp_path), *args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode != 0 and needle in r.stderr, (args, r.stderr)
