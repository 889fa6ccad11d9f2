"""Class-conditional sampling with a trained generator, decoding through the tokenizer it was trained on.

`generate_images` runs the sampler of the checkpoint (llamagen: plain cache sliced to the live length; mergear:
compressed cache with the Position Cache, decoded with the `assign` it yields; randar: parallel decoding, then
the tokenizer's source recovery model predicts `assign`), writes a grid (one row per class), the single images
and an `.npz` of uint8 samples, and optionally measures gFID / IS and class consistency.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import CheckpointError, ConfigError

__all__ = ["GenerateResult", "find_generator_checkpoint", "generate_images", "load_generator"]


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


def find_generator_checkpoint(ckpt: str | Path | None, sampler: str) -> Path:
    """A run or checkpoint folder → its checkpoint; None → the newest generator run of `sampler` under runs/."""
    from .api import RUNS_DIR, newest_run
    from .train.checkpoint import resolve_checkpoint

    if ckpt is None:
        run = newest_run("ar", where=lambda cfg: cfg.get("generator", {}).get("name") == sampler)
        if run is None:
            raise CheckpointError(
                f"no {sampler} generator run under {RUNS_DIR}/: train one with "
                f"`mergevq train-ar recipes/ar/tiny.yaml --tokens tokens/tiny --generator {sampler}` or pass --ckpt"
            )
        ckpt = run
    return resolve_checkpoint(Path(ckpt))


def load_generator(path: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """Rebuild a generator from its checkpoint folder (config from meta.json); eval mode on `device`."""
    from .generators import build_generator
    from .models.gpt import GPTConfig
    from .train import checkpoint as ck

    meta = ck.read_meta(path)
    if meta.get("kind") != "ar":
        raise CheckpointError(f"{path} is a {meta.get('kind')} checkpoint, not a generator (train one with `mergevq train-ar`)")
    try:
        gen = build_generator(meta["generator"], GPTConfig(**meta["gpt"]), **meta.get("options", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/meta.json does not describe a generator: {e}") from None
    ck.load_state_strict(gen, ck.read_tensors(path, "generator"), str(path))
    return gen.to(device).eval(), meta


def _tokenizer_for(meta: dict[str, Any], override: str | Path | None, device: str | None):
    from .api import load_tokenizer
    from .data.codes import sha256_file

    rec = meta.get("tokenizer", {})
    where = override or rec.get("checkpoint")
    if not where:
        raise CheckpointError("the generator checkpoint does not record its tokenizer: pass --tokenizer RUN")
    recorded = Path(where)
    if override is None and not recorded.exists() and recorded.parent.name == "checkpoints" and recorded.parent.parent.is_dir():
        where = recorded.parent.parent  # that checkpoint was rotated away: its run's latest, if the hash still matches
    try:
        tok, path = load_tokenizer(where, device)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the generator was trained on tokenizer {rec.get('checkpoint')}; pass --tokenizer RUN if it moved)") from None
    if rec.get("hash") and sha256_file(path / "ema.safetensors") != rec["hash"]:
        raise CheckpointError(f"tokenizer {path} is not the one the generator was trained on (weights hash differs)")
    return tok, path


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
    classes: list[int], n: int, sampler: str, ckpt: str | Path | None, settings: Any, tokens: int | None = None,
    steps: int | None = None, seed: int = 0, batch: int = 64, out: str | Path | None = None, device: str | None = None,
    tokenizer: str | Path | None = None, fid: str | None = None, inception_weights: str | Path | None = None,
    with_consistency: bool = False, on_start: Callable[[dict[str, Any]], None] | None = None,
    on_batch: Callable[[int, float], None] | None = None, note: Callable[[str], None] = lambda s: None,
) -> GenerateResult:
    from .eval.fid import to_uint8
    from .generators import GENERATORS, default_steps
    from .train.dist import pick_device

    if sampler not in GENERATORS:
        raise ConfigError(f"--sampler {sampler!r}: choose one of {', '.join(GENERATORS)}")
    if n < 1 or batch < 1:
        raise ConfigError("--n and --batch must be >= 1")
    if not classes:
        raise ConfigError("give at least one --class")
    dev = pick_device(device)
    path = find_generator_checkpoint(ckpt, sampler)
    gen, meta = load_generator(path, dev)
    if meta["generator"] != sampler:
        raise CheckpointError(f"{path} holds a {meta['generator']} generator; --sampler {sampler} needs a {sampler} checkpoint")
    num_classes = gen.cfg.num_classes
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"--class {bad[0]} is out of range: this generator has classes 0..{num_classes - 1}")
    tok, tok_path = _tokenizer_for(meta, tokenizer, str(dev))
    if sampler == "randar" and tok.recovery is None:
        raise CheckpointError(f"tokenizer {tok_path} has no source recovery model, which randar needs to decode")
    k = tokens if tokens is not None else gen.default_k()
    if sampler != "llamagen":
        if k < 1 or math.isqrt(k) ** 2 != k or k > gen.n_tokens:
            raise ConfigError(f"--tokens {k}: K must be a perfect square up to N={gen.n_tokens}")
    if sampler == "randar":
        steps = steps or default_steps(k)
        if not 1 <= steps <= k:
            raise ConfigError(f"--steps {steps}: randar decodes K={k} tokens in 1..{k} steps")
    labels_all = torch.tensor([c for c in classes for _ in range(n)], dtype=torch.long)
    total = len(labels_all)
    out_dir = Path(out) if out is not None else Path("samples") / f"{sampler}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=dev).manual_seed(seed)
    order_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    cuda = dev.type == "cuda"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    kv_dtype = torch.bfloat16 if cuda else None
    seq_len = k if sampler == "randar" else gen.n_tokens
    if on_start is not None:
        on_start({"ckpt": str(path), "tokenizer": str(tok_path), "total": total, "sampler": sampler, "tokens": k,
                  "steps": steps, "device": str(dev)})
    samples, ar_s, dec_s, peak, distinct, fwd = [], 0.0, 0.0, 0, [], 0
    t_all = time.perf_counter()
    for i in range(0, total, batch):
        labels = labels_all[i:i + batch].to(dev)
        pick = settings.picker(seq_len, g)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            if sampler == "randar":
                res = gen.generate(labels, k=k, pick=pick, guided=settings.guided, steps=steps, generator=order_gen, dtype=kv_dtype)
            else:
                res = gen.generate(labels, k=k, pick=pick, guided=settings.guided, dtype=kv_dtype)
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
        if "peak_live_slots" in res.stats:
            peak = max(peak, res.stats["peak_live_slots"])
            distinct += res.stats["distinct_ids"]
        fwd += res.stats.get("forward_passes", seq_len)
        if on_batch is not None:
            on_batch(len(labels), len(labels) * seq_len / max(t1 - t0, 1e-9))
    wall = time.perf_counter() - t_all
    fake = torch.cat(samples)
    paths = []
    for j, img in enumerate(fake):
        c, r = int(labels_all[j]), j % n
        p = out_dir / "images" / f"class{c:04d}_{r:03d}.png"
        _save_png(img, p)
        paths.append(str(p))
    grid_path = out_dir / "grid.png"
    _save_png(_grid(fake, len(classes)), grid_path, scale=max(1, math.ceil(96 / fake.shape[-1])))  # small images: upscaled to view
    import numpy as np

    npz = out_dir / "samples.npz"
    with open(npz.with_name(".samples.npz.tmp"), "wb") as f:
        np.savez(f, images=fake.permute(0, 2, 3, 1).numpy(), labels=labels_all.numpy())
    npz.with_name(".samples.npz.tmp").replace(npz)
    stats: dict[str, Any] = {"forward_passes_per_batch": fwd / max(1, math.ceil(total / batch))}
    if sampler == "mergear":
        stats.update({"peak_cache_slots": peak, "plain_cache_slots": gen.prefix + gen.n_tokens - 1,
                      "distinct_ids": sum(distinct) / len(distinct), "distinct_ids_min": min(distinct),
                      "distinct_ids_max": max(distinct), "window": gen.window})
    result = GenerateResult(
        ckpt=str(path), tokenizer=str(tok_path), sampler=sampler, classes=list(classes), n_per_class=n, images=paths,
        grid=str(grid_path), npz=str(npz), wall_s=wall, ar_s=ar_s, decode_s=dec_s,
        tokens_per_s=total * seq_len / max(ar_s, 1e-9), images_per_s=total / max(wall, 1e-9),
        settings={"cfg": settings.cfg, "cfg_schedule": settings.cfg_schedule, "temperature": settings.temperature,
                  "top_k": settings.top_k, "top_p": settings.top_p, "seed": seed, "steps": steps, "batch": batch},
        tokens=k, stats=stats,
    )
    if fid is not None:
        from .eval.gen_metrics import gfid, inception_score

        note(f"gFID against {fid} on {total} samples")
        result.fid = gfid(fake, fid, inception_weights, dev, seed)
        result.inception_score = inception_score(fake, inception_weights, dev)
    if with_consistency:
        from .eval.consistency import classifier_for, consistency, references_at

        data = meta.get("tokens", {}).get("dataset") or {}
        clf, report = classifier_for(tok, meta["tokenizer"].get("hash", "") or "unknown", data, num_classes,
                                     tok.cfg.model.image_size, tok.cfg.merge.keep, dev, note=note)
        res_c = consistency(clf, fake.float() / 127.5 - 1, labels_all, dev)
        # the references at the K these samples were decoded with (llamagen's N ids carry no K of their own)
        ref_k = k if sampler != "llamagen" else tok.cfg.merge.keep
        ref = references_at(clf, tok, report, ref_k, dev)
        predicted = ref["val_acc_recon_predicted"]
        result.consistency = {**res_c, "classifier_val_acc_real": report["val_acc_real"],
                              "classifier_val_acc_recon": ref["val_acc_recon"],
                              "classifier_val_acc_recon_predicted": predicted, "reference_tokens": ref_k,
                              # what a perfect generator of this sampler could score: randar decodes with the
                              # predicted source, the raster samplers with the true one
                              "ceiling": predicted if sampler == "randar" else ref["val_acc_recon"]}
    (out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
    return result

