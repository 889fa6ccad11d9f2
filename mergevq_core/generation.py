"""Class-conditional sampling with a trained generator, decoding through the tokenizer it was trained on.

`generate_images` runs the generator of the checkpoint through the `Generator` interface alone (llamagen: plain
cache sliced to the live length; mergear: compressed cache with the Position Cache, decoded with the `assign` it
yields; randar: parallel decoding, then the tokenizer's source recovery model predicts `assign`), writes a grid
(one row per class), the single images and an `.npz` of uint8 samples, and optionally measures gFID / IS and
class consistency.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import CheckpointError, ConfigError
from .progress import SILENT, Progress

if TYPE_CHECKING:
    from .generators import Generator, SamplingSettings
    from .models import MergeVQTokenizer

__all__ = ["GenerateResult", "generate_images"]


@dataclass
class GenerateResult:
    ckpt: str
    tokenizer: str
    sampler: str
    classes: list[int]
    n_per_class: int
    images: list[str]
    grid: str
    npz: str
    wall_s: float
    ar_s: float
    decode_s: float
    tokens_per_s: float
    images_per_s: float
    settings: dict[str, Any]
    tokens: int
    stats: dict[str, Any] = field(default_factory=dict)
    fid: dict[str, Any] | None = None
    inception_score: dict[str, Any] | None = None
    consistency: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(self.stats)
        del d["stats"]
        return d


def _save_png(img: Tensor, path: Path, scale: int = 1) -> None:
    """(3, H, W) uint8 → PNG, nearest-upscaled by an integer `scale`."""
    from PIL import Image

    if scale > 1:
        img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp)
    tmp.replace(path)


def _grid(images: Tensor, rows: int, pad: int = 2) -> Tensor:
    """uint8 (M, 3, H, W), M = rows × cols → one (3, rows·(H+pad)+pad, cols·(W+pad)+pad) image, white padding."""
    m, c, h, w = images.shape
    cols = m // rows
    out = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(m):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return out


def generate_images(
    classes: list[int], n: int, sampler: str, *, ckpt: str | Path | None = None,
    settings: SamplingSettings | None = None, tokens: int | None = None, steps: int | None = None, seed: int = 0,
    batch: int = 64, out: str | Path | None = None, device: str | None = None, tokenizer: str | Path | None = None,
    fid: str | None = None, inception_weights: str | Path | None = None, with_consistency: bool = False,
    progress: Progress = SILENT,
) -> GenerateResult:
    """`n` samples of each class from the newest `sampler` run (or `ckpt`), decoded by its tokenizer (or
    `tokenizer`), in batches of `batch` with `settings` (default: plain sampling). `tokens` is K (default: the
    generator's), `steps` RandAR's parallel steps. Reports `start("sample", images, ckpt=, tokenizer=, sampler=,
    tokens=, steps=, device=)`, `advance(images, rate=AR tokens/s)` per batch, and notes."""
    from .dist import pick_device
    from .generators import GENERATORS, SamplingSettings
    from .runs import find_generator_checkpoint, load_generator, tokenizer_of_generator

    settings = settings if settings is not None else SamplingSettings()
    if sampler not in GENERATORS:
        raise ConfigError(f"--sampler {sampler!r}: choose one of {', '.join(GENERATORS)}")
    if n < 1 or batch < 1:
        raise ConfigError("--n and --batch must be >= 1")
    if not classes:
        raise ConfigError("give at least one --class")
    dev = pick_device(device)
    path = find_generator_checkpoint(ckpt, sampler)
    gen, meta = load_generator(path, dev, expect=sampler)
    num_classes = gen.cfg.num_classes
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"--class {bad[0]} is out of range: this generator has classes 0..{num_classes - 1}")
    tok, tok_path = tokenizer_of_generator(meta, tokenizer, str(dev))
    if gen.needs_source_recovery and tok.recovery is None:
        raise CheckpointError(f"tokenizer {tok_path} has no source recovery model, which {sampler} needs to decode")
    k = gen.check_k(tokens)
    steps = gen.check_steps(steps, k)
    labels_all = torch.tensor([c for c in classes for _ in range(n)], dtype=torch.long)
    total = len(labels_all)
    out_dir = Path(out) if out is not None else Path("samples") / f"{sampler}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    progress.start("sample", total, ckpt=str(path), tokenizer=str(tok_path), sampler=sampler, tokens=k, steps=steps,
                   device=str(dev))
    t_all = time.perf_counter()
    fake, per_batch, ar_s, dec_s = _sample_all(gen, tok, labels_all, k, steps, settings, seed, batch, dev, progress)
    wall = time.perf_counter() - t_all
    paths, grid_path, npz = _write_samples(fake, labels_all, n, len(classes), out_dir)
    seq_len = gen.seq_len(k)
    result = GenerateResult(
        ckpt=str(path), tokenizer=str(tok_path), sampler=sampler, classes=list(classes), n_per_class=n, images=paths,
        grid=str(grid_path), npz=str(npz), wall_s=wall, ar_s=ar_s, decode_s=dec_s,
        tokens_per_s=total * seq_len / max(ar_s, 1e-9), images_per_s=total / max(wall, 1e-9),
        settings={"cfg": settings.cfg, "cfg_schedule": settings.cfg_schedule, "temperature": settings.temperature,
                  "top_k": settings.top_k, "top_p": settings.top_p, "seed": seed, "steps": steps, "batch": batch},
        tokens=k, stats=gen.summarize_stats(per_batch),
    )
    if fid is not None:
        from .eval.gen_metrics import gfid, inception_score

        progress.note(f"gFID against {fid} on {total} samples")
        result.fid = gfid(fake, fid, inception_weights, dev, seed)
        result.inception_score = inception_score(fake, inception_weights, dev)
    if with_consistency:
        result.consistency = _consistency(gen, tok, meta, fake, labels_all, k, dev, progress)
    (out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
    return result


def _sample_all(gen: Generator, tok: MergeVQTokenizer, labels_all: Tensor, k: int, steps: int | None,
                settings: SamplingSettings, seed: int, batch: int, dev: torch.device,
                progress: Progress) -> tuple[Tensor, list[dict[str, Any]], float, float]:
    """Every label's sample, batch by batch: AR decoding (timed alone), then the tokenizer's decode. Returns uint8
    images (M, 3, H, W), each batch's decoding statistics, and the AR and decode seconds."""
    from .eval.fid import to_uint8

    g = torch.Generator(device=dev).manual_seed(seed)
    order_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    cuda = dev.type == "cuda"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    kv_dtype = torch.bfloat16 if cuda else None
    seq_len = gen.seq_len(k)
    samples, per_batch, ar_s, dec_s = [], [], 0.0, 0.0
    for i in range(0, len(labels_all), batch):
        labels = labels_all[i:i + batch].to(dev)
        pick = settings.picker(seq_len, g)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            res = gen.sample(labels, k, pick, settings.guided, steps=steps, generator=order_gen, dtype=kv_dtype)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        with torch.no_grad(), autocast:
            ids = res.ids.clamp_min(0)
            assign = res.assign if res.assign is not None else tok.predict_assign(ids)
            images = tok.decode(ids, assign).float()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        ar_s, dec_s = ar_s + (t1 - t0), dec_s + (t2 - t1)
        samples.append(to_uint8(images).cpu())
        per_batch.append(res.stats)
        progress.advance(len(labels), rate=len(labels) * seq_len / max(t1 - t0, 1e-9))
    return torch.cat(samples), per_batch, ar_s, dec_s


def _write_samples(fake: Tensor, labels_all: Tensor, n: int, rows: int, out_dir: Path) -> tuple[list[str], Path, Path]:
    """One PNG per sample, the grid (one row per class) and `samples.npz` (uint8 images (M, H, W, 3), labels)."""
    import numpy as np

    paths = []
    for j, img in enumerate(fake):
        c, r = int(labels_all[j]), j % n
        p = out_dir / "images" / f"class{c:04d}_{r:03d}.png"
        _save_png(img, p)
        paths.append(str(p))
    grid_path = out_dir / "grid.png"
    _save_png(_grid(fake, rows), grid_path, scale=max(1, math.ceil(96 / fake.shape[-1])))  # small images: upscaled to view
    npz = out_dir / "samples.npz"
    with open(npz.with_name(".samples.npz.tmp"), "wb") as f:
        np.savez(f, images=fake.permute(0, 2, 3, 1).numpy(), labels=labels_all.numpy())
    npz.with_name(".samples.npz.tmp").replace(npz)
    return paths, grid_path, npz


def _consistency(gen: Generator, tok: MergeVQTokenizer, meta: dict[str, Any], fake: Tensor, labels_all: Tensor,
                 k: int, dev: torch.device, progress: Progress) -> dict[str, Any]:
    """Class consistency of the samples, with the classifier's accuracy on real images and on reconstructions at
    the K the samples are compared at (`reference_k`), and the ceiling a perfect generator could reach: with the
    predicted source when the generator needs source recovery, else with the true one."""
    from .eval.consistency import classifier_for, consistency, references_at

    data = meta.get("tokens", {}).get("dataset") or {}
    clf, report = classifier_for(tok, meta["tokenizer"].get("hash", "") or "unknown", data, gen.cfg.num_classes,
                                 tok.cfg.model.image_size, tok.cfg.merge.keep, dev, note=progress.note)
    res_c = consistency(clf, fake.float() / 127.5 - 1, labels_all, dev)
    ref_k = gen.reference_k(k, tok.cfg.merge.keep)
    ref = references_at(clf, tok, report, ref_k, dev)
    predicted = ref["val_acc_recon_predicted"]
    return {**res_c, "classifier_val_acc_real": report["val_acc_real"], "classifier_val_acc_recon": ref["val_acc_recon"],
            "classifier_val_acc_recon_predicted": predicted, "reference_tokens": ref_k,
            "ceiling": predicted if gen.needs_source_recovery else ref["val_acc_recon"]}
