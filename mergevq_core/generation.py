"""Class-conditional sampling at the paper's scale: 50 samples of each of 1,000 classes on many GPUs, resumable.

`generate_images` runs the generator of a checkpoint through the `Generator` interface alone (llamagen: plain
cache; mergear: compressed cache with the Position Cache, decoded with the `assign` it yields; randar: parallel
decoding, then the tokenizer's source recovery model predicts `assign`) and decodes with the tokenizer it was
trained on. Samples stream to a `SampleStore` (shards, then one ADM-layout `samples.npz`), so host memory stays
one shard whatever the count and a killed job resumes after its last complete shard. Under torchrun each rank
makes its own shards. Sample j's randomness comes from (seed, j) alone (`generators.SampleNoise`), so the images
do not depend on the number of processes or the batch size. Then: a grid of a few classes, PNGs on request,
streamed gFID / IS / precision / recall and class consistency.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from . import checkpoint as ck
from .errors import CheckpointError, ConfigError
from .progress import SILENT, Progress

if TYPE_CHECKING:
    from .dist import DistInfo
    from .generators import Generator, SamplingSettings
    from .models import MergeVQTokenizer
    from .sample_store import SampleStore

__all__ = ["GenerateResult", "generate_images", "parse_classes", "plan_labels"]


@dataclass
class GenerateResult:
    ckpt: str
    tokenizer: str
    sampler: str
    classes: list[int]
    n_per_class: int | None  # None with --num-samples (classes spread evenly)
    images: list[str]  # PNG per sample, with `png`
    grid: str
    npz: str
    wall_s: float
    ar_s: float  # generator time of the samples made by this call (all processes, summed)
    decode_s: float  # tokenizer decode time, likewise
    tokens_per_s: float
    images_per_s: float
    settings: dict[str, Any]
    tokens: int
    samples: int = 0  # in the output
    made: int = 0  # by this call (the rest were in shards from before)
    other_s: float = 0.0  # sampling time outside the generator and the decode (bookkeeping, writing), per process
    stats: dict[str, Any] = field(default_factory=dict)
    fid: dict[str, Any] | None = None
    inception_score: dict[str, Any] | None = None
    consistency: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None  # a tuned source recovery model (`--recovery`), else None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(self.stats)
        del d["stats"]
        return d


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """`all`, a range `0-99`, a list `1,5,7`, or a mix `0-9,20` → class ids, in the order given."""
    if spec.strip() == "all":
        return list(range(num_classes))
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        try:
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"--classes {spec!r}: give `all`, a range like 0-99 or a list like 1,5,7") from None
    return out


def plan_labels(classes: Sequence[int], per_class: int | None, num_samples: int | None) -> np.ndarray:
    """The label of every sample index, class by class: `per_class` of each, or `num_samples` spread evenly
    (counts differ by at most one, the first classes get the extra ones)."""
    if (per_class is None) == (num_samples is None):
        raise ConfigError("give either --per-class or --num-samples")
    if (per_class is not None and per_class < 1) or (num_samples is not None and num_samples < 1):
        raise ConfigError("--per-class and --num-samples must be >= 1")
    c = len(classes)
    counts = [per_class] * c if per_class is not None else [num_samples // c + (i < num_samples % c) for i in range(c)]
    return np.repeat(np.asarray(classes, dtype=np.int64), counts)


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
    classes: Sequence[int], per_class: int | None = None, sampler: str = "mergear", *, num_samples: int | None = None,
    class_spec: str | None = None, ckpt: str | Path | None = None, settings: SamplingSettings | None = None,
    tokens: int | None = None, steps: int | None = None, seed: int = 0, batch: int = 64, out: str | Path | None = None,
    device: str | None = None, tokenizer: str | Path | None = None, fid: str | None = None,
    inception_weights: str | Path | None = None, with_consistency: bool = False, png: bool = False,
    grid_rows: int = 8, grid_cols: int = 8, shard_size: int = 500, recovery: str | Path | None = None,
    precision: str = "auto", compile: bool = False, progress: Progress = SILENT,
) -> GenerateResult:
    """Samples of `classes` (plus `class_spec`: `all`, ranges, lists) from the newest `sampler` run (or `ckpt`),
    `per_class` each or `num_samples` in all, into `out` (see the module docstring), in batches of `batch` with
    `settings` (default: plain sampling). `tokens` is K (default: the generator's), `steps` RandAR's parallel
    steps. `recovery`: a `tune-recovery` run whose source recovery model replaces the tokenizer's (randar only).
    `precision`: auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16 (autocast and a bf16 KV cache); `compile`: each
    raster decode step through `torch.compile` (llamagen, mergear).
    Every torchrun process calls it. Reports `start("sample", images, done, ckpt=, tokenizer=, sampler=,
    tokens=, steps=, device=)`, `advance(images, rate=AR tokens/s)` per batch, and notes."""
    from .dist import all_reduce_sum, broadcast_path, cleanup, finished, init_distributed
    from .generators import GENERATORS, SamplingSettings
    from .runs import find_generator_checkpoint, load_generator, tokenizer_of_generator

    if sampler not in GENERATORS:
        raise ConfigError(f"--sampler {sampler!r}: choose one of {', '.join(GENERATORS)}")
    if settings is None:  # the sampler's own guidance schedule (linear for randar, as the paper)
        settings = SamplingSettings(cfg_schedule=GENERATORS[sampler].default_cfg_schedule)
    if batch < 1 or grid_rows < 1 or grid_cols < 1:
        raise ConfigError("--batch, --grid-rows and --grid-cols must be >= 1")
    if not classes and not class_spec:
        raise ConfigError("give at least one --class (or --classes all / 0-99 / 1,5,7)")
    dist = init_distributed(device)
    try:
        dev = dist.device
        path = find_generator_checkpoint(ckpt, sampler)
        gen, meta = load_generator(path, dev, expect=sampler)
        num_classes = gen.cfg.num_classes
        wanted = list(classes) + (parse_classes(class_spec, num_classes) if class_spec else [])
        bad = [c for c in wanted if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"--class {bad[0]} is out of range: this generator has classes 0..{num_classes - 1}")
        labels_all = plan_labels(wanted, per_class, num_samples)
        tok, tok_path = tokenizer_of_generator(meta, tokenizer, str(dev))
        if gen.needs_source_recovery and tok.recovery is None:
            raise CheckpointError(f"tokenizer {tok_path} has no source recovery model, which {sampler} needs to decode")
        tuned = _tuned_recovery(recovery, gen, tok, meta, path, sampler, dev) if recovery is not None else None
        k = gen.check_k(tokens)
        steps = gen.check_steps(steps, k)
        from .generators import RasterGenerator
        from .precision import check_precision

        if compile and not isinstance(gen, RasterGenerator):
            raise ConfigError(f"--compile: {sampler}'s parallel steps change shape from step to step; compiled "
                              "decoding covers llamagen and mergear")
        precision = ("bf16" if dev.type == "cuda" else "fp32") if precision == "auto" else check_precision(precision)
        out_dir = Path(out) if out is not None else Path("samples") / f"{sampler}-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = broadcast_path(out_dir)
        sampling = {"cfg": settings.cfg, "cfg_schedule": settings.cfg_schedule, "temperature": settings.temperature,
                    "top_k": settings.top_k, "top_p": settings.top_p, "seed": seed, "steps": steps,
                    "precision": precision}
        store = _open_store(out_dir, path, meta, sampler, wanted, per_class, num_samples, k, sampling, shard_size,
                            len(labels_all), dist, recovery_hash=tuned["hash"] if tuned else None)
        pending = store.pending(dist.rank, dist.world_size)
        todo = sum(len(store.shard_range(s)) for s in store.pending(0, 1))
        progress.start("sample", len(labels_all), len(labels_all) - todo, ckpt=str(path), tokenizer=str(tok_path),
                       sampler=sampler, tokens=k, steps=steps, device=str(dev))
        t_all = time.perf_counter()
        made, ar_s, dec_s = _sample_shards(gen, tok, store, pending, labels_all, k, steps, settings, seed, batch, dev,
                                           progress, precision, compile)
        loop_s = time.perf_counter() - t_all  # this rank's own sampling, before it waits for the others
        made, ar_s, dec_s, loop_s = all_reduce_sum([made, ar_s, dec_s, loop_s], dev)
        finished()  # every shard is on disk
        sample_wall = time.perf_counter() - t_all
        grid_path, npz, pngs = out_dir / "grid.png", out_dir / "samples.npz", []
        if dist.is_main:
            store.finish()
            _save_grid(store, labels_all, grid_rows, grid_cols, grid_path)
            pngs = _save_pngs(store, per_class, out_dir) if png else []
        finished()
        seq_len = gen.seq_len(k)
        made = int(made)
        world = dist.world_size
        result = GenerateResult(
            ckpt=str(path), tokenizer=str(tok_path), sampler=sampler, classes=wanted, n_per_class=per_class,
            images=pngs, grid=str(grid_path), npz=str(npz), wall_s=0.0, ar_s=ar_s, decode_s=dec_s,
            tokens_per_s=made * seq_len / max(ar_s / world, 1e-9) if made else 0.0,
            images_per_s=made / max(sample_wall, 1e-9), settings={**sampling, "batch": batch}, tokens=k,
            samples=len(labels_all), made=made, other_s=max(0.0, loop_s - ar_s - dec_s) / world,
            stats=gen.summarize_stats(store.stats()),
            recovery={k_: v for k_, v in tuned.items() if k_ != "stage1"} if tuned else None,
        )
        if fid is not None:
            _score(result, npz, fid, inception_weights, dev, seed, dist, progress)
        if with_consistency and dist.is_main:
            result.consistency = _consistency(gen, tok, meta, store, k, dev, progress,
                                              stage1=tuned["stage1"] if tuned else None)
        result.wall_s = time.perf_counter() - t_all
        if dist.is_main:
            (out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
        finished()
        return result
    finally:
        cleanup()


def _open_store(out_dir: Path, path: Path, meta: dict[str, Any], sampler: str, classes: list[int],
                per_class: int | None, num_samples: int | None, k: int, sampling: dict[str, Any], shard_size: int,
                total: int, dist: DistInfo, recovery_hash: str | None = None) -> SampleStore:
    """The output folder, refusing one made with other settings (checked on every rank before any shard is
    written). Rank 0 opens it first: a rank reading the folder while rank 0 creates it would see `shards/`
    without the manifest yet and refuse it."""
    from .fileio import sha256_file
    from .sample_store import SampleStore

    # the weights, not where they lie, define the samples
    defining = {"generator_hash": sha256_file(ck.weights_file(path, "generator")),
                "tokenizer_hash": meta.get("tokenizer", {}).get("hash"), "sampler": sampler, "classes": classes,
                "per_class": per_class, "num_samples": num_samples, "tokens": k, **sampling}
    if recovery_hash is not None:  # a tuned source recovery model decodes other images from the same ids
        defining["recovery_hash"] = recovery_hash
    from .dist import finished

    store = SampleStore(out_dir, defining, total, shard_size, is_main=True) if dist.is_main else None
    finished()  # a barrier: every rank sees the manifest rank 0 wrote
    return store if store is not None else SampleStore(out_dir, defining, total, shard_size, is_main=False)


def _sample_shards(gen: Generator, tok: MergeVQTokenizer, store: SampleStore, shards: list[int], labels_all: np.ndarray,
                   k: int, steps: int | None, settings: SamplingSettings, seed: int, batch: int, dev: torch.device,
                   progress: Progress, precision: str = "fp32", compile: bool = False) -> tuple[int, float, float]:
    """Make and write this rank's missing shards, batch by batch: AR decoding (timed alone), then the tokenizer's
    decode. Returns the samples made and the AR and decode seconds."""
    from .eval.fid import to_uint8
    from .generators import SampleNoise

    cuda = dev.type == "cuda"
    bf16 = precision == "bf16"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    kv_dtype = torch.bfloat16 if bf16 else None
    more = {"compiled": True} if compile else {}
    seq_len = gen.seq_len(k)
    made, ar_s, dec_s = 0, 0.0, 0.0
    for s in shards:
        rows = store.shard_range(s)
        images, per_batch = [], []
        for i in range(rows.start, rows.stop, batch):
            idx = torch.arange(i, min(i + batch, rows.stop), device=dev)
            labels = torch.as_tensor(labels_all[i:i + len(idx)], device=dev)
            noise = SampleNoise(seed, idx)
            pick = settings.picker(seq_len, noise)
            _sync(cuda)
            t0 = time.perf_counter()
            with torch.no_grad(), autocast:
                res = gen.sample(labels, k, pick, settings.guided, steps=steps, noise=noise, dtype=kv_dtype, **more)
            _sync(cuda)
            t1 = time.perf_counter()
            with torch.no_grad(), autocast:
                ids = res.ids.clamp_min(0)
                assign = res.assign if res.assign is not None else tok.predict_assign(ids)
                decoded = tok.decode(ids, assign).float()
            images.append(to_uint8(decoded).permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, 3)
            _sync(cuda)
            t2 = time.perf_counter()
            ar_s, dec_s = ar_s + (t1 - t0), dec_s + (t2 - t1)
            per_batch.append(res.stats)
            made += len(idx)
            progress.advance(len(idx), rate=len(idx) * seq_len / max(t1 - t0, 1e-9))
        store.write(s, np.concatenate(images), labels_all[rows.start:rows.stop], seed, per_batch)
    return made, ar_s, dec_s


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _save_grid(store: SampleStore, labels_all: np.ndarray, rows: int, cols: int, path: Path) -> None:
    """The first `cols` samples of each of the first `rows` classes, one row per class (never every sample)."""
    classes = list(dict.fromkeys(labels_all.tolist()))[:rows]
    first = {c: np.flatnonzero(labels_all == c)[:cols] for c in classes}
    cols = min(len(v) for v in first.values())
    wanted = [int(j) for c in classes for j in first[c][:cols]]
    picked: dict[int, np.ndarray] = {}
    for s in sorted({j // store.shard_size for j in wanted}):
        shard = store.read(s, ("index", "images"))
        for j, img in zip(shard["index"].tolist(), shard["images"]):
            if j in wanted:
                picked[j] = img
    grid = torch.from_numpy(np.stack([picked[j] for j in wanted])).permute(0, 3, 1, 2)
    _save_png(_grid(grid, len(classes)), path, scale=max(1, math.ceil(96 / grid.shape[-1])))  # small images: upscaled


def _save_pngs(store: SampleStore, per_class: int | None, out_dir: Path) -> list[str]:
    """One PNG per sample, `images/class{c}_{r}.png` (r: the sample's rank within its class), shard by shard."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    seen: dict[int, int] = {}
    paths = []
    for images, labels in store.chunks():
        for img, c in zip(images, labels.tolist()):
            r = seen.get(c, 0)
            seen[c] = r + 1
            p = out_dir / "images" / f"class{c:04d}_{r:03d}.png"
            _save_png(torch.from_numpy(img).permute(2, 0, 1), p)
            paths.append(str(p))
    return paths


def _score(result: GenerateResult, npz: Path, ref: str, weights: str | Path | None, dev: torch.device, seed: int,
           dist: DistInfo, progress: Progress) -> None:
    """gFID, IS, precision and recall of the finished samples file, streamed (every rank takes a part)."""
    from .eval.gen_metrics import evaluate_samples

    progress.note(f"gFID against {ref} on {result.samples} samples")
    res = evaluate_samples(npz, ref, weights=weights, device=str(dev), seed=seed, dist=dist, progress=progress).to_json()
    result.inception_score = res.pop("inception_score", None)
    result.fid = res


def _tuned_recovery(recovery: str | Path, gen: Generator, tok: MergeVQTokenizer, meta: dict[str, Any], gen_path: Path,
                    sampler: str, dev: torch.device) -> dict[str, Any]:
    """Put the source recovery model of a `tune-recovery` run in place of the tokenizer's (in memory: the
    tokenizer's files, and the weights hash that identifies it, stay as they are). Returns what the result
    records, plus the stage-1 model under `stage1`."""
    from .fileio import sha256_file
    from .runs import load_tuned_recovery

    if not gen.needs_source_recovery:
        raise ConfigError(f"--recovery: {sampler} does not decode with the source recovery model (randar does)")
    model, path, rmeta = load_tuned_recovery(recovery, tok, meta.get("tokenizer", {}).get("hash"))
    stage1, tok.recovery = tok.recovery, model.to(dev)
    gen_hash = rmeta.get("generator_hash")
    return {"checkpoint": str(path), "hash": sha256_file(path / "recovery.safetensors"),
            "tuned_with": rmeta.get("generator_checkpoint"),
            "same_generator": bool(gen_hash) and gen_hash == sha256_file(ck.weights_file(gen_path, "generator")),
            "stage1": stage1}


def _consistency(gen: Generator, tok: MergeVQTokenizer, meta: dict[str, Any], store: SampleStore, k: int,
                 dev: torch.device, progress: Progress, stage1: torch.nn.Module | None = None) -> dict[str, Any]:
    """Class consistency of the samples (streamed from the shards), with the classifier's accuracy on real images
    and on reconstructions at the K the samples are compared at (`reference_k`), and the ceiling a perfect
    generator could reach: with the predicted source when the generator needs source recovery, else the true one."""
    from .eval.consistency import classifier_for, consistency_of_chunks, predicted_source_reference, references_at

    data = meta.get("tokens", {}).get("dataset") or {}
    tuned = None
    if stage1 is not None:  # the classifier's cached figures are the tokenizer's own: its stage-1 recovery model
        tuned, tok.recovery = tok.recovery, stage1
    try:
        clf, report = classifier_for(tok, meta["tokenizer"].get("hash", "") or "unknown", data, gen.cfg.num_classes,
                                     tok.cfg.model.image_size, tok.cfg.merge.keep, dev, note=progress.note)
        ref_k = gen.reference_k(k, tok.cfg.merge.keep)
        ref = references_at(clf, tok, report, ref_k, dev)
    finally:
        if tuned is not None:
            tok.recovery = tuned
    res_c = consistency_of_chunks(clf, store.chunks(), dev)
    predicted, extra = ref["val_acc_recon_predicted"], {}
    if tuned is not None:  # the ceiling with the tuned model, measured now (never cached)
        extra["classifier_val_acc_recon_predicted_stage1"] = predicted
        predicted = predicted_source_reference(clf, tok, report, ref_k, dev)
    return {**res_c, "classifier_val_acc_real": report["val_acc_real"], "classifier_val_acc_recon": ref["val_acc_recon"],
            "classifier_val_acc_recon_predicted": predicted, **extra, "reference_tokens": ref_k,
            "ceiling": predicted if gen.needs_source_recovery else ref["val_acc_recon"]}
