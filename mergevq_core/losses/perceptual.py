"""LPIPS-VGG perceptual loss with a locally loaded torchvision VGG16 trunk (never downloaded).

The `lpips` package supplies the network and its shipped linear heads (lpips/weights/v0.1/vgg.pth); the VGG16
trunk is built randomly (`pnet_rand=True`) and then filled from a torchvision `vgg16` state dict on disk.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lpips
import torch
from torch import Tensor, nn

from ..config import LossConfig
from ..errors import CheckpointError, ConfigError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name


def default_vgg_path() -> Path:
    """$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth, where torchvision would have cached it."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def resolve_vgg_path(vgg_weights: str | Path | None) -> Path:
    return Path(vgg_weights).expanduser() if vgg_weights else default_vgg_path()


def _missing_vgg(path: Path) -> ConfigError:
    return ConfigError(
        f"LPIPS needs VGG16 weights: {path} not found (set loss.vgg_weights, or loss.perceptual_weight=0)"
    )


def check_perceptual(cfg: LossConfig) -> Path | None:
    """The VGG16 file LPIPS will load, or None when the perceptual term is off; raises ConfigError before
    training starts when the file is missing."""
    if cfg.perceptual_weight == 0:
        return None
    path = resolve_vgg_path(cfg.vgg_weights)
    if not path.is_file():
        raise _missing_vgg(path)
    return path


def _load_vgg_trunk(trunk: nn.Module, path: Path) -> None:
    """Copy torchvision `features.{i}.*` into the lpips trunk, whose `slice1..slice5` children keep the
    original `features` index as their name."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged or foreign file
        raise CheckpointError(f"cannot read VGG16 weights {path}: {type(e).__name__}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} is not a torchvision vgg16 state dict")
    new: dict[str, Tensor] = {}
    for key in trunk.state_dict():  # e.g. "slice3.12.weight"
        _, idx, leaf = key.split(".")
        src = f"features.{idx}.{leaf}"
        if src not in sd:
            raise CheckpointError(f"{path} lacks {src}: expected a torchvision vgg16 state dict (loss.vgg_weights)")
        new[key] = sd[src]
    try:
        trunk.load_state_dict(new, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit VGG16: {str(e).splitlines()[0]}") from None


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG (v0.1). `forward(x_hat, x)` takes (B, 3, H, W) images in [-1, 1] and returns the
    batch-mean distance; gradients flow to the inputs only."""

    def __init__(self, vgg_weights: str | Path | None = None, random_trunk: bool = False) -> None:
        super().__init__()
        path = None
        if not random_trunk:
            path = resolve_vgg_path(vgg_weights)
            if not path.is_file():
                raise _missing_vgg(path)
        with warnings.catch_warnings():  # torchvision's deprecated `pretrained=` inside lpips
            warnings.simplefilter("ignore")
            self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if path is not None:
            _load_vgg_trunk(self.net.net, path)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """`lpips.LPIPS.forward` (v0.1, not spatial), with the VGG trunk under the caller's autocast and the feature
        normalisation, squared differences, linear heads and averages in float32 (in bf16 the unit-norm features'
        differences lose most of their digits)."""
        net = self.net
        outs0, outs1 = net.net.forward(net.scaling_layer(x_hat)), net.net.forward(net.scaling_layer(x))
        with torch.autocast(x.device.type, enabled=False):
            val: Tensor | float = 0.0
            for kk in range(net.L):
                f0, f1 = lpips.normalize_tensor(outs0[kk].float()), lpips.normalize_tensor(outs1[kk].float())
                val = val + net.lins[kk]((f0 - f1) ** 2).mean(dim=(2, 3), keepdim=True)
        assert isinstance(val, Tensor)
        return val.mean()
