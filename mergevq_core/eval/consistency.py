"""Class consistency of generated samples: does a classifier see the class that was asked for?

A small CNN is trained on the generator's own labelled data (the built-in shapes, or the image folder the token
shards came from), on real images and on their reconstructions through the same tokenizer, so that it judges
the class and not the tokenizer's blur. Its accuracy on held-out real and reconstructed images is reported next
to the consistency as the ceiling a perfect generator could reach: reconstructions with the true source for
LlamaGen and MergeAR (whose Position Cache yields it), with the source recovery model's predicted source for
RandAR. The classifier is cached per dataset, image size and tokenizer under `runs/classifiers/`, written
atomically (safetensors + JSON); the shipped tokenizer's ships with it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fileio import write_atomic

__all__ = ["SmallCNN", "classifier_for", "consistency_of_chunks", "predicted_source_reference", "references_at"]

CLASSIFIER_DIR = Path("runs") / "classifiers"
PREDICTED_ASSIGN = "canonical"  # how val_acc_recon_predicted decoded: tokenizer.predict_assign(constrained=True)


class SmallCNN(nn.Module):
    """Three conv stages (w, 2w, 4w channels, GroupNorm, SiLU), global pooling and a linear layer."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _labelled_images(data: dict[str, Any], size: int, count: int, split: str) -> tuple[Tensor, Tensor]:
    """Real images in [-1, 1] (M, 3, size, size) with labels (M,) from the shards' dataset description: shapes the
    shards never held (another seed), or a seeded random subset of the image folder."""
    from ..data.sources import reopen

    ds = reopen(data, size, split=split, length=count, seed_offset=7919)
    if data.get("source") == "shapes":
        idx = list(range(count))
    else:
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0 if split == "train" else 1))[:count].tolist()
    items = [ds[i] for i in idx]
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def _reconstruct(tok: Any, images: Tensor, k: int, device: torch.device, batch: int = 256,
                 predicted: bool = False) -> Tensor:
    """Reconstructions at K with the true source, or (`predicted`) with the `assign` the source recovery model
    predicts from the ids alone, as RandAR's samples are decoded."""
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch].to(device)
            if predicted:
                enc = tok.encode(x, tokens=k)
                y = tok.decode(enc.ids, tok.predict_assign(enc.ids))
            else:
                y = tok(x, tokens=k)[0]
            out.append(y.clamp(-1, 1).cpu())
    return torch.cat(out)


def _predicted_source_acc(model: nn.Module, tok: Any, xv: Tensor, yv: Tensor, k: int, device: torch.device) -> float | None:
    """Accuracy on held-out reconstructions decoded with the predicted source: the ceiling for RandAR."""
    if getattr(tok, "recovery", None) is None:
        return None
    return _accuracy(model, _reconstruct(tok, xv, k, device, predicted=True), yv, device)


def _save_meta(folder: Path, meta: dict[str, Any]) -> None:
    """The classifier's meta.json, written atomically; the in-memory `folder` entry stays out of it. A folder that
    cannot be written (the shipped one in a read-only install) keeps what it had: the figures are a cache."""
    try:
        write_atomic(folder / "meta.json", json.dumps({k: v for k, v in meta.items() if k != "folder"}, indent=2).encode())
    except OSError:
        pass


def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 512].to(device)).argmax(1).cpu() for i in range(0, len(images), 512)])
    return float((pred == labels).float().mean())


def _complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file() and (folder / "classifier.safetensors").is_file()


def classifier_for(tok: Any, tok_hash: str, data: dict[str, Any], num_classes: int, size: int, k: int,
                   device: torch.device, train_count: int = 5000, epochs: int = 8, seed: int = 0,
                   root: Path = CLASSIFIER_DIR, note: Callable[[str], None] = lambda s: None) -> tuple[nn.Module, dict[str, Any]]:
    """The cached classifier for this dataset, size and tokenizer, trained now if missing. Returns it and its
    report: accuracy on held-out real images and on their reconstructions at K."""
    from safetensors.torch import load_file, save

    from ..shipped import SHIPPED_DIR

    key = f"{data.get('source')}-{size}px-{tok_hash[:12]}"
    folder = root / key
    if not _complete(folder) and root == CLASSIFIER_DIR and _complete(SHIPPED_DIR / "classifiers" / key):
        folder = SHIPPED_DIR / "classifiers" / key  # the shipped tokenizer's, trained when its weights were made
    model = SmallCNN(num_classes).to(device)
    if _complete(folder):
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("num_classes") == num_classes:
            model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
            if meta.get("predicted_assign") != PREDICTED_ASSIGN:  # cached before this figure used that decoding
                xv, yv = _labelled_images(data, size, 1000, "val")
                meta["val_acc_recon_predicted"] = _predicted_source_acc(model, tok, xv, yv, k, device)
                meta["predicted_assign"] = PREDICTED_ASSIGN
                meta.pop("at_tokens", None)
                _save_meta(folder, meta)
            return model.eval(), {**meta, "folder": str(folder)}
    note(f"training a {num_classes}-class consistency classifier on {train_count} real + reconstructed images ({key})")
    t0 = time.perf_counter()
    x_real, y = _labelled_images(data, size, train_count, "train")
    x_rec = _reconstruct(tok, x_real, k, device)
    x, y2 = torch.cat([x_real, x_rec]), torch.cat([y, y])
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 127, 128):
            b = perm[i:i + 128]
            xb = x[b]
            flip = torch.rand(len(b), generator=g) < 0.5  # horizontal flips keep every shapes class
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb.to(device)), y2[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    xv, yv = _labelled_images(data, size, 1000, "val")
    meta = {"num_classes": num_classes, "size": size, "tokens": k, "tokenizer_hash": tok_hash, "data": data,
            "train_images": 2 * train_count, "val_acc_real": _accuracy(model, xv, yv, device),
            "val_acc_recon": _accuracy(model, _reconstruct(tok, xv, k, device), yv, device),
            "val_acc_recon_predicted": _predicted_source_acc(model, tok, xv, yv, k, device),
            "predicted_assign": PREDICTED_ASSIGN,
            "train_s": time.perf_counter() - t0}
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "classifier.safetensors", save({k_: v.detach().cpu().contiguous() for k_, v in model.state_dict().items()}))
    _save_meta(folder, meta)
    return model.eval(), {**meta, "folder": str(folder)}


def references_at(model: nn.Module, tok: Any, meta: dict[str, Any], k: int, device: torch.device) -> dict[str, Any]:
    """The classifier's accuracy on held-out reconstructions at K = k, with the true and the predicted source: the
    ceilings for samples decoded at that K. The classifier's own K comes from its report; another K is measured
    once on the same 1,000 held-out images and cached in its meta.json under `at_tokens` (`meta` as
    `classifier_for` returns it, with its folder)."""
    if k == meta.get("tokens"):
        return {key: meta.get(key) for key in ("val_acc_recon", "val_acc_recon_predicted")}
    cached = meta.get("at_tokens", {}).get(str(k))
    if cached is not None:
        return cached
    xv, yv = _labelled_images(meta["data"], meta["size"], 1000, "val")
    ref = {"val_acc_recon": _accuracy(model, _reconstruct(tok, xv, k, device), yv, device),
           "val_acc_recon_predicted": _predicted_source_acc(model, tok, xv, yv, k, device)}
    meta.setdefault("at_tokens", {})[str(k)] = ref
    if meta.get("folder"):
        _save_meta(Path(meta["folder"]), meta)
    return ref


def predicted_source_reference(model: nn.Module, tok: Any, meta: dict[str, Any], k: int, device: torch.device) -> float | None:
    """The classifier's accuracy on its held-out reconstructions at K = k decoded with the source that `tok`'s
    recovery model predicts now, e.g. a tuned one (`generate --recovery`): measured each time, never cached, as
    the cache holds the tokenizer's own figures."""
    xv, yv = _labelled_images(meta["data"], meta["size"], 1000, "val")
    return _predicted_source_acc(model, tok, xv, yv, k, device)


def consistency_of_chunks(model: nn.Module, chunks: Iterable[tuple[Any, Any]], device: torch.device) -> dict[str, Any]:
    """Fraction of samples classified as the class they were generated for, overall and per class, over samples
    that arrive in chunks (memory flat in their number): each chunk is float [-1, 1]
    (M, 3, H, W) images, or uint8 (M, H, W, 3) arrays as a samples file holds them, with their labels (M,)."""
    hits: dict[int, int] = {}
    counts: dict[int, int] = {}
    model.eval()
    with torch.no_grad():
        for images, labels in chunks:
            images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
            if images.dtype == torch.uint8:  # (M, H, W, 3) → [-1, 1] (M, 3, H, W)
                images = images.permute(0, 3, 1, 2).float() / 127.5 - 1
            for i in range(0, len(images), 512):
                pred = model(images[i:i + 512].to(device)).argmax(1).cpu()
                lab = labels[i:i + 512]
                for c, h in zip(lab.tolist(), (pred == lab).tolist()):
                    hits[c] = hits.get(c, 0) + int(h)
                    counts[c] = counts.get(c, 0) + 1
    total = sum(counts.values())
    return {"consistency": sum(hits.values()) / max(total, 1),
            "per_class": {str(c): hits[c] / counts[c] for c in sorted(counts)}, "samples": total}
