from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from mergevq_core.config import LossConfig
from mergevq_core.errors import ConfigError
from mergevq_core.losses import (
    LPIPS,
    DinoCE,
    DinoV2Teacher,
    LeCam,
    PatchDiscriminator,
    check_perceptual,
    check_teacher,
    d_loss,
    default_vgg_path,
    generator_adv_loss,
    hinge_d_loss,
    kl_align,
    recon_loss,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a loss test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# ----------------------------------------------------------------------------- reconstruction


def test_recon_values_and_gradient() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.5, 2.0], [1.0, 5.0]], requires_grad=True)
    # diffs 0.5, 0, -2, 1
    assert recon_loss(x_hat, x, "l1").item() == pytest.approx((0.5 + 0 + 2 + 1) / 4)
    l2 = recon_loss(x_hat, x, "l2")
    assert l2.item() == pytest.approx((0.25 + 0 + 4 + 1) / 4)
    l2.backward()
    torch.testing.assert_close(x_hat.grad, 2 * (x_hat.detach() - x) / x.numel())
    with pytest.raises(ValueError):
        recon_loss(x_hat, x, "l3")


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(random_trunk=True)


def test_lpips_random_trunk(random_lpips: LPIPS) -> None:
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert random_lpips(x, x).item() == pytest.approx(0.0, abs=1e-7)
    x_hat = y.clone().requires_grad_(True)
    d = random_lpips(x_hat, x)
    assert d.dim() == 0 and d.item() > 0
    d.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in random_lpips.parameters())


def test_lpips_stays_eval(random_lpips: LPIPS) -> None:
    random_lpips.train()
    assert not random_lpips.training and not any(m.training for m in random_lpips.modules())


def test_lpips_missing_vgg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert default_vgg_path() == tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(ConfigError, match="loss.vgg_weights") as e:
        LPIPS()
    assert str(default_vgg_path()) in str(e.value)
    with pytest.raises(ConfigError, match="loss.vgg_weights"):
        LPIPS(vgg_weights=tmp_path / "nope.pth")


def test_lpips_loads_local_vgg(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    # the trunk only needs features.*; a small stand-in keeps the file ~60 MB instead of 530 MB
    sd = {k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}
    sd["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    m = LPIPS(vgg_weights=path)
    torch.testing.assert_close(getattr(m.net.net.slice3, "12").weight, sd["features.12.weight"])
    torch.testing.assert_close(getattr(m.net.net.slice5, "28").bias, sd["features.28.bias"])
    torch.testing.assert_close(getattr(m.net.net.slice1, "0").weight, sd["features.0.weight"])
    assert not any(p.requires_grad for p in m.parameters())


def test_check_perceptual(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert check_perceptual(LossConfig(perceptual_weight=0.0)) is None
    with pytest.raises(ConfigError, match="loss.vgg_weights"):
        check_perceptual(LossConfig(perceptual_weight=0.7))
    f = tmp_path / "vgg.pth"
    f.write_bytes(b"")
    assert check_perceptual(LossConfig(perceptual_weight=0.7, vgg_weights=str(f))) == f
    default_vgg_path().parent.mkdir(parents=True)
    default_vgg_path().write_bytes(b"")
    assert check_perceptual(LossConfig(perceptual_weight=1.0)) == default_vgg_path()


# ----------------------------------------------------------------------------- adversarial


def test_patch_discriminator_shape_and_size() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator()
    n = sum(p.numel() for p in d.parameters())
    assert abs(n - 2.77e6) / 2.77e6 < 0.01
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64 // 8 - 2, 64 // 8 - 2)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert abs(convs[3].weight.std().item() - 0.02) < 0.002
    assert all(c.bias is None or c.bias.abs().sum() == 0 for c in convs)


def test_hinge_d_loss_values_and_gradients() -> None:
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)).item() == 0.0
    real = torch.zeros(2, 1, 3, 3, requires_grad=True)
    fake = torch.zeros(2, 1, 3, 3, requires_grad=True)
    loss = hinge_d_loss(real, fake)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # push real up, fake down


def test_generator_adv_loss() -> None:
    logits = torch.tensor([[1.0, 3.0], [-1.0, -2.0]]).view(2, 1, 1, 2).requires_grad_(True)
    m = torch.tensor([2.0, -1.5])
    expected = (F.softplus(-m[0]) + F.softplus(-m[1])) / 2
    loss = generator_adv_loss(logits)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert (logits.grad < 0).all()


def test_lecam_ema_and_regulariser() -> None:
    lecam = LeCam(decay=0.9)
    real = torch.tensor([1.0, 3.0])  # mean 2
    fake = torch.tensor([-1.0, -3.0])  # mean -2
    lecam.update(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2)
    assert lecam.ema_fake.item() == pytest.approx(-0.2)
    lecam.update(real * 2, fake * 0)  # means 4, 0
    assert lecam.ema_real.item() == pytest.approx(0.9 * 0.2 + 0.1 * 4)  # 0.58
    assert lecam.ema_fake.item() == pytest.approx(0.9 * -0.2)  # -0.18
    r = torch.tensor([0.0, 1.0])
    f = torch.tensor([0.0, 1.0])
    # relu(r + 0.18)^2 = 0.0324, 1.3924; relu(0.58 - f)^2 = 0.3364, 0
    expected = (0.18**2 + 1.18**2) / 2 + (0.58**2) / 2
    assert lecam(r, f).item() == pytest.approx(expected, rel=1e-5)
    sd = lecam.state_dict()
    assert {"ema_real", "ema_fake", "decay"} <= set(sd)
    other = LeCam()
    other.load_state_dict(sd)
    assert other.ema_real.item() == pytest.approx(0.58) and other.decay.item() == pytest.approx(0.9)


def test_d_loss_combines_hinge_and_lecam() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(ndf=8, n_layers=2)
    lecam = LeCam()
    x_real = torch.randn(2, 3, 32, 32)
    x_fake = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss, logs = d_loss(disc, lecam, x_real, x_fake, lecam_weight=0.5)
    assert set(logs) == {"d_hinge", "lecam", "logits_real", "logits_fake"}
    assert loss.item() == pytest.approx(logs["d_hinge"] + 0.5 * logs["lecam"], rel=1e-5)
    assert lecam.ema_real.item() == pytest.approx(0.001 * logs["logits_real"], rel=1e-4)
    loss.backward()
    assert x_fake.grad is None
    assert all(p.grad is not None for p in disc.parameters())


# ----------------------------------------------------------------------------- alignment


def test_kl_align() -> None:
    torch.manual_seed(0)
    t = torch.randn(3, 5, requires_grad=True)
    assert kl_align(t.detach().clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(3, 5, requires_grad=True)
    T = 4.0
    p = torch.softmax(t.detach() / T, -1)
    q = torch.softmax(s.detach() / T, -1)
    manual = (p * (p.log() - q.log())).sum(-1).mean() * T * T
    loss = kl_align(s, t, T)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_dino_ce_center_and_loss() -> None:
    torch.manual_seed(0)
    ce = DinoCE(4, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9)
    t = torch.randn(3, 4, requires_grad=True)
    s = torch.randn(3, 4, requires_grad=True)
    ce.update_center(t)
    c1 = 0.1 * t.detach().mean(0, keepdim=True)
    torch.testing.assert_close(ce.center, c1)
    ce.update_center(t * 2)
    c2 = 0.9 * c1 + 0.1 * 2 * t.detach().mean(0, keepdim=True)
    torch.testing.assert_close(ce.center, c2)
    loss = ce(s, t)
    p = torch.softmax((t.detach() - c2) / 0.04, -1)
    manual = -(p * torch.log_softmax(s.detach() / 0.1, -1)).sum(-1).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    loss.backward()
    assert s.grad is not None and t.grad is None
    assert "center" in ce.state_dict()


TINY = dict(embed_dim=64, depth=2, num_heads=2)


def _tiny_dinov2(img_size: int = 224) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0, **TINY).eval()


def test_dinov2_teacher_from_local_file(tmp_path: Path) -> None:
    src = _tiny_dinov2()
    path = tmp_path / "tiny.pth"
    torch.save(src.state_dict(), path)
    teacher = DinoV2Teacher(path, arch="vit_small_patch14_dinov2", **TINY)
    x = torch.randn(2, 3, 224, 224)
    out = teacher(x)
    assert out.shape == (2, 64) and teacher.dim == 64
    with torch.no_grad():
        torch.testing.assert_close(out, src.forward_features(x)[:, 0])
    assert not out.requires_grad and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training


def test_dinov2_teacher_resamples_pos_embed(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "tiny518.safetensors"
    save_file(_tiny_dinov2(518).state_dict(), str(path))  # the published DINOv2 grid (37×37)
    teacher = DinoV2Teacher(path, arch="vit_small_patch14_dinov2", **TINY)
    assert teacher.model.pos_embed.shape == (1, 1 + 16 * 16, 64)
    assert teacher(torch.randn(1, 3, 224, 224)).shape == (1, 64)


def test_dinov2_teacher_missing_and_check(tmp_path: Path) -> None:
    missing = tmp_path / "dinov2.pth"
    with pytest.raises(ConfigError, match="loss.teacher_weights") as e:
        DinoV2Teacher(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(ConfigError, match="loss.teacher_weights"):
        check_teacher(LossConfig(align_teacher="dinov2"))
    with pytest.raises(ConfigError, match="loss.teacher_weights"):
        check_teacher(LossConfig(align_teacher="dinov2", teacher_weights=str(missing)))
    assert check_teacher(LossConfig(align_teacher="dinov2", align_weight=0.0)) is None
    assert check_teacher(LossConfig(align_teacher="ema")) is None
    assert check_teacher(LossConfig(align_teacher="none")) is None
    missing.write_bytes(b"")
    assert check_teacher(LossConfig(align_teacher="dinov2", teacher_weights=str(missing))) == missing


def test_kl_temperature_scaling_matches_math() -> None:
    # T² keeps gradient magnitudes comparable across temperatures (Hinton et al.); sanity-check the factor
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    p = torch.softmax(t / 2, -1)
    q = torch.softmax(s / 2, -1)
    assert kl_align(s, t, 2.0).item() == pytest.approx(4 * float((p * (p / q).log()).sum()), rel=1e-6)
    assert math.isfinite(kl_align(s * 1e4, t * 1e4, 1.0).item())


def test_lpips_rejects_foreign_file(tmp_path: Path) -> None:
    from mergevq_core.errors import CheckpointError

    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="features.0.weight"):
        LPIPS(vgg_weights=path)
