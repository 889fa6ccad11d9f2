"""Linear probing of the frozen tokenizer encoder (paper A.4): a parameter-free BatchNorm and a linear layer,
AdamW with a cosine schedule, 90 epochs at batch 1024, on the features of a labelled train split, tested on its
val split, next to the same classifier on raw pixels (area-downsampled to at most 32×32).

Features (`feature_cache.encoder_features`): the encoder's output tokens averaged with their ToMe sizes,
concatenated with the cls token: (M, 2C). By default no merging happens (all N tokens, as the paper probes);
`tokens=K` probes after merging to K tokens. They are extracted once into the feature cache (streamed through
DataLoader workers, split across torchrun ranks) and every epoch reads the cache a few shards at a time, so
ImageNet's 1.28M training images never sit in memory. The head trains on rank 0 (it is cheap next to the
extraction); every rank returns the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..progress import SILENT, Progress
from .feature_cache import FeatureSet

__all__ = ["LinearProbe", "ProbeResult", "linear_probe", "linear_probes", "probe_tokens", "run_probe"]


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters, then a linear layer (MAE's probing head)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.bn(x))


def linear_probes(train: FeatureSet, test: FeatureSet, classes: int, *, members: tuple[str, ...] = ("features",),
                  epochs: int = 90, lr: float = 1e-3, batch: int = 1024, weight_decay: float = 0.0, seed: int = 0,
                  device: torch.device | None = None,
                  on_epoch: Callable[[int, float], None] | None = None) -> dict[str, tuple[float, Tensor]]:
    """One probe per cached member (`features`, `pixels`) of `train`, trained side by side on the same batches
    (one read of the cache per epoch for all); returns {member: (top-1 on `test`, confusion (true × predicted))}.
    Each head starts from the seed's initialisation, so training them together equals training them apart. The
    learning rate follows a per-step cosine from `lr` to 0."""
    dev = device or torch.device("cpu")
    heads, opts = {}, {}
    for m in members:
        torch.manual_seed(seed)
        heads[m] = LinearProbe(train.pixel_dim if m == "pixels" else train.dim, classes).to(dev)
        opts[m] = torch.optim.AdamW(heads[m].parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(train.count / batch)
    step = 0
    for epoch in range(epochs):
        for h in heads.values():
            h.train()
        loss_sum = 0.0
        for xs, y in train.batches(epoch, batch, seed, members):
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            step += 1
            if len(y) < 2:  # BatchNorm needs two samples
                continue
            y = y.to(dev)
            for m, head in heads.items():
                for group in opts[m].param_groups:
                    group["lr"] = lr * scale
                loss = F.cross_entropy(head(xs[m].to(dev)), y)
                opts[m].zero_grad(set_to_none=True)
                loss.backward()
                opts[m].step()
                if m == members[0]:
                    loss_sum += float(loss.detach()) * len(y)
        if on_epoch is not None:
            on_epoch(epoch + 1, loss_sum / train.count)
    confusion = {m: torch.zeros(classes, classes, dtype=torch.long) for m in members}
    with torch.no_grad():
        for h in heads.values():
            h.eval()
        for xs, y in test.sequential(batch, members):
            for m, head in heads.items():
                pred = head(xs[m].to(dev)).argmax(1).cpu()
                confusion[m].index_put_((y, pred), torch.ones_like(pred), accumulate=True)
    return {m: (float(c.diagonal().sum() / c.sum().clamp_min(1)), c) for m, c in confusion.items()}


def linear_probe(train: FeatureSet, test: FeatureSet, classes: int, *, member: str = "features",
                 **kw: Any) -> tuple[float, Tensor]:
    """`linear_probes` for one member: (top-1, confusion)."""
    return linear_probes(train, test, classes, members=(member,), **kw)[member]


@dataclass
class ProbeResult:
    ckpt: str
    data: str
    val: str
    tokens: int
    top1: float
    baseline_top1: float | None  # None with baseline=False
    n_train: int
    n_test: int
    feature_dim: int
    epochs: int
    batch: int
    confusion_png: str | None
    classes: list[str]
    per_class: dict[str, float]
    features_cached: bool  # both splits' features came from the cache
    cache: str
    wall_s: float
    protocol: str = "linear"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def probe_tokens(tok: Any, tokens: str | int) -> int:
    """`all` → N (no merging), else a K the model can keep (ConfigError naming --tokens)."""
    if str(tokens) == "all":
        return int(tok.cfg.model.n_tokens)
    try:
        return int(tok.cfg.check_keep(int(tokens)))
    except ValueError:
        raise ConfigError(f"--tokens {tokens!r}: give `all` or a perfect square K") from None


def plot_confusion(confusion: Tensor, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = (confusion.float() / confusion.sum(1, keepdim=True).clamp_min(1)).numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(classes), 1 + 0.45 * len(classes)), dpi=110)
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if confusion[i, j]:
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5, color="white" if m[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    from .plots import save_figure

    save_figure(fig, path)


def run_probe(tok: Any, ckpt: Path, data: str, *, val: str | None = None, tokens: str | int = "all",
              epochs: int = 90, lr: float = 1e-3, batch: int = 1024, n_train: int | None = None,
              n_test: int | None = None, out: str | Path = "probe", seed: int = 0, cache: str | Path | None = None,
              workers: int = 0, baseline: bool = True, dist: Any = None, progress: Progress = SILENT) -> ProbeResult:
    """The linear probe of `tok`'s frozen encoder trained on `data` and tested on `val` (see `data.labelled`) at
    K = `tokens` (`all`: no merging), next to the same probe on raw pixels; writes the confusion matrix PNG to
    `out`. Features come from (or go to) the cache under `cache`. Under torchrun (`dist`) the ranks split the
    extraction; every rank returns the result."""
    import time

    from ..cache import cache_root, checkpoint_hash
    from ..data.labelled import labelled_data
    from .feature_cache import extract_features

    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: must be >= 1")
    if batch < 2:
        raise ConfigError(f"--batch {batch}: must be >= 2 (BatchNorm)")
    if lr <= 0:
        raise ConfigError(f"--lr {lr}: must be > 0")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be >= 0")
    t0 = time.perf_counter()
    k = probe_tokens(tok, tokens)
    splits = labelled_data(data, val, tok.cfg.model.image_size, n_train=n_train, n_val=n_test, seed=seed)
    key = checkpoint_hash(ckpt)
    sets = [extract_features(tok, key, s, k, cache=cache, batch=min(batch, 256), workers=workers, dist=dist,
                             progress=progress) for s in (splits.train, splits.val)]
    main = dist is None or dist.is_main
    res = None
    if main:
        res = _train_heads(sets, splits, k, epochs=epochs, lr=lr, batch=batch, seed=seed, baseline=baseline,
                           device=next(tok.parameters()).device, progress=progress)
        res.update(ckpt=str(ckpt), data=str(data), val=splits.val.source, cache=str(cache_root(cache)))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        png = out / f"confusion_{Path(str(data)).name}_k{k}.png"
        base = f" (pixels {res['baseline_top1']:.3f})" if res["baseline_top1"] is not None else ""
        plot_confusion(res.pop("confusion"), splits.classes, png, f"linear probe, K = {k}: top-1 {res['top1']:.3f}{base}")
        res["confusion_png"] = str(png)
    if dist is not None and dist.enabled:
        import torch.distributed as tdist

        box = [res]
        tdist.broadcast_object_list(box, src=0)
        res = box[0]
    return ProbeResult(**res, wall_s=time.perf_counter() - t0)


def _train_heads(sets: list[FeatureSet], splits: Any, k: int, *, epochs: int, lr: float, batch: int, seed: int,
                 baseline: bool, device: torch.device, progress: Progress) -> dict[str, Any]:
    """The probe on the features and (with `baseline`) on the pixels; the result fields run_probe completes."""
    train, test = sets
    classes = splits.classes
    progress.start("probe", epochs)
    step = lambda e, loss: progress.advance(1, loss=loss)
    res = linear_probes(train, test, len(classes), members=("features", "pixels") if baseline else ("features",),
                        epochs=epochs, lr=lr, batch=batch, seed=seed, device=device, on_epoch=step)
    top1, confusion = res["features"]
    base = res["pixels"][0] if baseline else None
    per_class = (confusion.diagonal().float() / confusion.sum(1).clamp_min(1)).tolist()
    return dict(tokens=k, top1=top1, baseline_top1=base, n_train=train.count, n_test=test.count,
                feature_dim=train.dim, epochs=epochs, batch=batch, classes=list(classes),
                per_class=dict(zip(classes, per_class)), features_cached=train.cached and test.cached,
                confusion=confusion)
