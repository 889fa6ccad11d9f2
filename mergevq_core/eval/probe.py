"""Linear probing of the frozen tokenizer encoder (paper A.4): a parameter-free BatchNorm and a linear layer,
AdamW with a cosine schedule, on features of a labelled train/test split, next to the same classifier on raw
pixels.

Features: the encoder's output tokens averaged with their ToMe sizes (how many original tokens each holds), so
that a merged token weighs what it covers, concatenated with the cls token: (M, 2C). By default no merging
happens (all N tokens, as the paper probes); `tokens=K` probes after merging to K tokens (the R-style setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..progress import SILENT, Progress

__all__ = ["ProbeResult", "labelled_split", "linear_probe", "probe_features", "run_probe"]


@torch.no_grad()
def probe_features(tok: Any, images: Tensor, tokens: int | None = None, batch: int = 256,
                   on_batch: Callable[[int], None] | None = None) -> Tensor:
    """images (M, 3, H, W) in [-1, 1] → features (M, 2C): size-weighted mean of the K output tokens ‖ cls token."""
    dev = next(tok.parameters()).device
    schedule = tok.schedule(tokens if tokens is not None else tok.n_tokens)
    out = []
    for i in range(0, images.shape[0], batch):
        enc = tok.encoder(images[i:i + batch].to(dev), schedule)
        w = enc.size / enc.size.sum(1, keepdim=True)  # (B, K)
        pooled = (enc.tokens * w[..., None]).sum(1)  # (B, C)
        out.append(torch.cat([pooled, enc.cls], dim=1).float().cpu())
        if on_batch is not None:
            on_batch(min(batch, images.shape[0] - i))
    return torch.cat(out)


def labelled_split(data: str, size: int, n_train: int, n_test: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """(train images, train labels, test images, test labels, class names) of `shapes` (its train and val
    streams) or a folder with one subfolder per class (a seeded split)."""
    from ..data.sources import open_images

    def stack(ds: Any, idx: Any) -> tuple[Tensor, Tensor]:
        items = [ds[i] for i in idx]
        return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])

    if data == "shapes":
        tr, info = open_images("shapes", size, split="train", length=n_train, seed=seed)
        te, _ = open_images("shapes", size, split="val", length=n_test, seed=seed)
        return (*stack(tr, range(len(tr))), *stack(te, range(len(te))), info["classes"])
    ds, info = open_images(data, size, seed=seed, labelled=True)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test_ = min(n_test, len(ds) // 5)
    test_idx, train_idx = order[:n_test_], order[n_test_:n_test_ + n_train]
    if not test_idx or not train_idx:
        raise DataError(f"{data} holds {len(ds)} images: too few for a train/test split")
    return (*stack(ds, train_idx), *stack(ds, test_idx), info["classes"])


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


def linear_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, classes: int, epochs: int = 90,
                 lr: float = 1e-3, batch: int = 256, weight_decay: float = 0.0, seed: int = 0,
                 on_epoch: Callable[[int, float], None] | None = None) -> tuple[float, Tensor]:
    """Train the probe on fixed features; returns the test top-1 and the confusion matrix (true × predicted)."""
    torch.manual_seed(seed)
    model = LinearProbe(x_train.shape[1], classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch)
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        loss_sum = 0.0
        for i in range(0, len(x_train), batch):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            b = perm[i:i + batch]
            if len(b) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(x_train[b]), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(b)
            step += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, loss_sum / len(x_train))
    model.eval()
    with torch.no_grad():
        pred = model(x_test).argmax(1)
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    confusion.index_put_((y_test, pred), torch.ones_like(pred), accumulate=True)
    return float((pred == y_test).float().mean()), confusion


@dataclass
class ProbeResult:
    ckpt: str
    data: str
    tokens: int
    top1: float
    baseline_top1: float
    n_train: int
    n_test: int
    feature_dim: int
    epochs: int
    confusion_png: str
    classes: list[str]
    per_class: dict[str, float]
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plot_confusion(confusion: Tensor, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = confusion.float() / confusion.sum(1, keepdim=True).clamp_min(1)
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


def run_probe(tok: Any, ckpt: Path, data: str, *, tokens: str | int = "all", epochs: int = 90, lr: float = 1e-3,
              n_train: int = 5000, n_test: int = 1000, out: str | Path = "probe", seed: int = 0,
              progress: Progress = SILENT) -> ProbeResult:
    """The linear probe of `tok`'s frozen encoder on `data` at K = `tokens` (`all`: no merging), next to the same
    probe on raw pixels; writes the confusion matrix PNG to `out`."""
    import time

    if epochs < 1 or n_train < 2 or n_test < 1:
        raise ConfigError("--epochs >= 1, --train >= 2 and --test >= 1")
    t0 = time.perf_counter()
    if str(tokens) == "all":
        k = tok.cfg.model.n_tokens
    else:
        try:
            k = tok.cfg.check_keep(int(tokens))
        except ValueError:
            raise ConfigError(f"--tokens {tokens!r}: give `all` or a perfect square K") from None
    x_tr, y_tr, x_te, y_te, classes = labelled_split(data, tok.cfg.model.image_size, n_train, n_test, seed)
    progress.start("features", len(x_tr) + len(x_te), ckpt=str(ckpt), tokens=k)
    f_tr = probe_features(tok, x_tr, k, on_batch=progress.advance)
    f_te = probe_features(tok, x_te, k, on_batch=progress.advance)
    progress.start("probe", 2 * epochs)
    step = lambda e, loss: progress.advance(1)
    top1, confusion = linear_probe(f_tr, y_tr, f_te, y_te, len(classes), epochs, lr, seed=seed, on_epoch=step)
    base, _ = linear_probe(x_tr.flatten(1), y_tr, x_te.flatten(1), y_te, len(classes), epochs, lr, seed=seed, on_epoch=step)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"confusion_{Path(str(data)).name}_k{k}.png"
    plot_confusion(confusion, classes, png, f"linear probe, K = {k}: top-1 {top1:.3f} (pixels {base:.3f})")
    per_class = (confusion.diagonal().float() / confusion.sum(1).clamp_min(1)).tolist()
    return ProbeResult(ckpt=str(ckpt), data=str(data), tokens=k, top1=top1, baseline_top1=base, n_train=len(x_tr),
                       n_test=len(x_te), feature_dim=int(f_tr.shape[1]), epochs=epochs, confusion_png=str(png),
                       classes=classes, per_class=dict(zip(classes, per_class)), wall_s=time.perf_counter() - t0)
