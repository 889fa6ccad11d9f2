"""`mergevq probe`: feature shapes, the probe head, the command's JSON."""

from __future__ import annotations

import pytest
import torch

from mergevq_core import api
from mergevq_core.errors import ConfigError, DataError
from mergevq_core.eval.probe import LinearProbe, labelled_split, linear_probe, probe_features


@pytest.mark.parametrize("tokens", [None, 16])
def test_probe_features_have_the_documented_shape(tiny_tokenizer_run, tokens):
    tok, _ = api.load_tokenizer(tiny_tokenizer_run, "cpu")
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    f = probe_features(tok, x, tokens, batch=2)
    assert f.shape == (5, 2 * tok.cfg.model.encoder.dim) and torch.isfinite(f).all()
    # one image's features do not depend on the batch it is in
    torch.testing.assert_close(probe_features(tok, x[3:4], tokens), f[3:4], atol=1e-5, rtol=1e-4)


def test_probe_head_is_parameter_free_bn_plus_linear():
    head = LinearProbe(8, 3)
    assert [n for n, _ in head.named_parameters()] == ["fc.weight", "fc.bias"]
    # separable data: the probe learns it
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 8, generator=g)
    top1, confusion = linear_probe(x[:240], y[:240], x[240:], y[240:], 3, epochs=20, lr=1e-2)
    assert top1 > 0.9 and confusion.sum() == 60 and confusion.shape == (3, 3)


def test_probe_command_json(tiny_tokenizer_run, tmp_path):
    res = api.probe("shapes", ckpt=tiny_tokenizer_run, tokens="16", epochs=2, n_train=40, n_test=20, out=tmp_path, device="cpu")
    d = res.to_json()
    for key in ("top1", "baseline_top1", "tokens", "n_train", "n_test"):
        assert key in d
    assert d["tokens"] == 16 and d["n_train"] == 40 and d["n_test"] == 20
    # the shapes test split holds two images of each of the 10 classes, so top-1 is the mean per-class accuracy
    assert set(d["per_class"]) == set(d["classes"]) and len(d["classes"]) == 10
    assert d["top1"] == pytest.approx(sum(d["per_class"].values()) / 10)
    assert all(v in (0.0, 0.5, 1.0) for v in d["per_class"].values())
    assert (tmp_path / "confusion_shapes_k16.png").is_file()
    with pytest.raises(ConfigError, match="perfect square"):
        api.probe("shapes", ckpt=tiny_tokenizer_run, tokens="15", epochs=1, n_train=4, n_test=2, out=tmp_path, device="cpu")
    with pytest.raises(DataError, match="no such folder"):
        labelled_split("/nonexistent", 32, 4, 2)
