"""High-level functions the CLI calls. No printing; each returns plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig, config_to_dict, load_config


@dataclass
class ModelInfo:
    recipe: str
    variant: str
    params: dict[str, int]  # encoder (stem + ToMe ViT + code projection), decoder, source_recovery, align_head, total
    gmacs: dict[str, float]  # conv + linear multiply-accumulates per image at K (encoder, source_recovery) and N (decoder)
    gmacs_full: dict[str, float]  # the same with no merging (K = N)
    tokens: dict[str, int]  # N, K, grid
    schedule: list[int]  # merges per encoder block, Σ = N - K
    codebook_size: int
    code_bits: int
    image_size: int
    config: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "variant": self.variant, "params": self.params, "gmacs": self.gmacs,
            "gmacs_full": self.gmacs_full, "tokens": self.tokens, "schedule": self.schedule,
            "codebook_size": self.codebook_size, "code_bits": self.code_bits, "image_size": self.image_size,
        }


def model_info(recipe: str | Path, tokens: int | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Any:
    """Parameters per part and MACs at K, counted on the meta device (no data, no memory). A generator recipe
    (kind: ar) gives an `ARInfo`."""
    from .config import ARRunConfig, load_any_config

    any_cfg = load_any_config(recipe, overrides)
    if isinstance(any_cfg, ARRunConfig):
        return ar_info(any_cfg, str(recipe))
    cfg = any_cfg
    keep = cfg.merge.keep if tokens is None else cfg.check_keep(tokens)
    return _tokenizer_info(cfg, keep, str(recipe))


def _tokenizer_info(cfg: RunConfig, keep: int, recipe: str) -> ModelInfo:
    import torch

    from .eval.complexity import count_params, mac_counter
    from .models import build_tokenizer

    with torch.device("meta"):
        tok = build_tokenizer(cfg)
        x = torch.empty(1, 3, cfg.model.image_size, cfg.model.image_size)

        def encoder_macs(k: int) -> tuple[float, float, Any]:
            with mac_counter(tok.encoder) as a, mac_counter(tok.code_proj) as b:
                enc = tok.encode(x, tokens=k)
            rec = 0.0
            if tok.recovery is not None:
                with mac_counter(tok.recovery) as r:
                    tok.recovery_logits(enc.quantized)
                rec = r() / 1e9
            return (a() + b()) / 1e9, rec, enc

        enc_k, rec_k, enc = encoder_macs(keep)
        enc_n, rec_n, _ = encoder_macs(cfg.model.n_tokens)
        with mac_counter(tok.decoder) as d:
            tok.decode_codes(enc.quantized, enc.assign)
        dec = d() / 1e9

    params = {name: count_params(m) for name, m in tok.param_groups().items()}
    params["total"] = count_params(tok)
    return ModelInfo(
        recipe=recipe,
        variant=cfg.model.name,
        params=params,
        gmacs={"encoder": enc_k, "decoder": dec, "source_recovery": rec_k},
        gmacs_full={"encoder": enc_n, "decoder": dec, "source_recovery": rec_n},
        tokens={"N": cfg.model.n_tokens, "K": keep, "grid": cfg.model.grid},
        schedule=list(tok.schedule(keep)),
        codebook_size=cfg.quant.codebook_size,
        code_bits=cfg.quant.dim,
        image_size=cfg.model.image_size,
        config=config_to_dict(cfg),
    )


@dataclass
class ARInfo:
    recipe: str
    generator: str
    params: dict[str, int]  # trunk (blocks + final norm), embeddings (class + tokens), heads (incl. intra-position
    #                         blocks of a factorised head), generator extras (M table / PI vector), total
    gpt: dict[str, Any]
    tokens: dict[str, Any]  # N, grid, vocabulary, sub-token bits, sequence length
    kv_bytes_per_token: int  # bf16 keys + values over all layers
    gflops_per_token: float  # 2 × matmul parameters read per decoded token (trunk + head), no attention
    config: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "kind": "ar", "generator": self.generator, "params": self.params, "gpt": self.gpt,
                "tokens": self.tokens, "kv_bytes_per_token": self.kv_bytes_per_token,
                "gflops_per_token": self.gflops_per_token}


def ar_info(cfg: Any, recipe: str) -> ARInfo:
    """Parameter counts of a generator recipe on the meta device; vocab/N/classes must be in the recipe."""
    from dataclasses import asdict

    import torch

    from .eval.complexity import count_params
    from .generators import build_generator

    gcfg = cfg.gpt_config()
    with torch.device("meta"):
        gen = build_generator(cfg.generator.name, gcfg, **cfg.generator_options())
    g = gen.gpt
    params = {
        "trunk": count_params(g.blocks) + count_params(g.norm),
        "embeddings": count_params(g.cls_embed) + count_params(g.tok_embed),
        "heads": count_params(g.heads) + count_params(g.factor_blocks) + (count_params(g.factor_norm) if g.factor_norm is not None else 0),
        "generator_extra": sum(p.numel() for n, p in gen.named_parameters() if not n.startswith("gpt.")),
    }
    params["total"] = count_params(gen)
    matmul = params["trunk"] + params["heads"]
    seq = {"llamagen": gcfg.max_len, "mergear": gcfg.max_len + 1, "randar": 2 * gcfg.max_len}[cfg.generator.name]
    return ARInfo(
        recipe=recipe, generator=cfg.generator.name, params=params, gpt={**asdict(gcfg), "hidden": gcfg.hidden},
        tokens={"N": gcfg.max_len, "grid": gen.grid, "vocab_size": gcfg.vocab_size, "sub_bits": list(gcfg.factorized),
                "num_classes": gcfg.num_classes, "train_sequence": seq, **gen.options()},
        kv_bytes_per_token=gcfg.kv_bytes_per_token(2), gflops_per_token=2 * matmul / 1e9, config=config_to_dict(cfg),
    )


# ----------------------------------------------------------------------------- training

RUNS_DIR = Path("runs")


def newest_run(kind: str, stem: str | None = None, root: Path = RUNS_DIR, where: Any = None) -> Path | None:
    """The most recently written run folder under `root` of this kind (and recipe stem) that holds a checkpoint;
    `where(config dict)` can filter further (e.g. by generator name)."""
    import json as _json

    from .train.checkpoint import CKPT_DIR

    best, best_t = None, -1.0
    for pointer in root.glob(f"*/{CKPT_DIR}/latest") if root.is_dir() else []:
        run = pointer.parent.parent
        if stem is not None and not run.name.startswith(f"{stem}-") and run.name != stem:
            continue
        try:
            run_cfg = _json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if where is not None and not where(run_cfg):
            continue
        if run_cfg.get("kind", "tokenizer") == kind and pointer.stat().st_mtime > best_t:
            best, best_t = run, pointer.stat().st_mtime
    return best


def _run_dir(kind: str, stem: str, out: str | Path | None, resume: bool, dist: Any) -> Path:
    """`out`, else (resuming) the newest run of this kind and stem, else `runs/<stem>-<time>`; under DDP every
    rank gets the folder rank 0 chose."""
    import time

    from .errors import CheckpointError

    if out is not None:
        run_dir = Path(out)
    elif resume:
        found = newest_run(kind, stem)
        if found is None:
            raise CheckpointError(f"no run of {stem} under {RUNS_DIR}/ to resume (give --out RUN_DIR)")
        run_dir = found
    else:
        run_dir = RUNS_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.enabled:
        import torch.distributed as tdist

        box = [str(run_dir)]
        tdist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return run_dir


def train_tokenizer(
    recipe: str | Path, overrides: tuple[str, ...] | list[str] = (), out: str | Path | None = None,
    resume: bool = False, max_steps: int | None = None, seed: int | None = None, device: str | None = None,
    hooks: Any = None,
) -> Any:
    """Stage-1 training (see `train.tokenizer_loop`). Returns a `TrainResult`.

    The run folder is `out`, else `runs/<recipe>-<time>`; with `resume` and no `out`, the newest run of that
    recipe. On resume the run's saved config is used, with `overrides`, `max_steps` and `seed` applied on top."""
    from .config import apply_overrides, config_from_dict
    from .train import checkpoint as ck
    from .train.dist import cleanup, finished, init_distributed
    from .train.tokenizer_loop import fit_tokenizer

    extra = list(overrides)
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    if seed is not None:
        extra.append(f"train.seed={seed}")
    cfg = load_config(recipe, extra)  # validates the recipe even on resume
    dist = init_distributed(device)
    try:
        run_dir = _run_dir("tokenizer", Path(recipe).stem, out, resume, dist)
        if resume:
            ckpt = ck.latest_checkpoint(run_dir) if run_dir.exists() else None
            if ckpt is not None:
                cfg = config_from_dict(apply_overrides(ck.read_meta(ckpt)["config"], extra))
        result = fit_tokenizer(cfg, run_dir, dist, resume=resume, hooks=hooks)
        finished()
        return result
    finally:
        cleanup()


def train_ar(
    recipe: str | Path, overrides: tuple[str, ...] | list[str] = (), tokens: str | Path | None = None,
    generator: str | None = None, out: str | Path | None = None, resume: bool = False, max_steps: int | None = None,
    seed: int | None = None, device: str | None = None, hooks: Any = None, init: str | Path | None = None,
) -> Any:
    """Stage-2 training (see `train.ar_loop`) on token shards. Returns an `ARTrainResult`.

    `tokens`, `generator` and `init` override data.tokens, generator.name and train.init. The run folder is `out`, else
    `runs/<recipe>-<generator>-<time>`; with `resume` and no `out`, the newest run of that recipe and generator."""
    from .config import ARRunConfig, _build, apply_overrides, load_ar_config
    from .errors import CheckpointError
    from .train import checkpoint as ck
    from .train.ar_loop import fit_ar
    from .train.dist import cleanup, finished, init_distributed

    extra = list(overrides)
    if tokens is not None:
        extra.append(f"data.tokens={Path(tokens)}")
    if generator is not None:
        extra.append(f"generator.name={generator}")
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    if seed is not None:
        extra.append(f"train.seed={seed}")
    if init is not None:
        extra.append(f"train.init={Path(init)}")
    cfg = load_ar_config(recipe, extra)
    dist = init_distributed(device)
    try:
        run_dir = _run_dir("ar", f"{Path(recipe).stem}-{cfg.generator.name}", out, resume, dist)
        if resume:
            ckpt = ck.latest_checkpoint(run_dir) if run_dir.exists() else None
            if ckpt is not None:
                saved = ck.read_meta(ckpt)
                if saved.get("kind") != "ar":
                    raise CheckpointError(f"{ckpt} is a {saved.get('kind')} checkpoint: resume it with its own command")
                cfg = _build(ARRunConfig, apply_overrides(saved["config"], extra))
        result = fit_ar(cfg, run_dir, dist, resume=resume, hooks=hooks)
        finished()
        return result
    finally:
        cleanup()


# ----------------------------------------------------------------------------- loading trained tokenizers


def find_tokenizer_checkpoint(ckpt: str | Path | None) -> Path:
    """A run folder or checkpoint folder → the checkpoint folder; None → the newest tokenizer run under runs/."""
    from .errors import CheckpointError
    from .train.checkpoint import resolve_checkpoint

    if ckpt is None:
        run = newest_run("tokenizer")
        if run is None:
            raise CheckpointError(
                f"no tokenizer run under {RUNS_DIR}/: train one with `mergevq train-tokenizer recipes/tiny.yaml` or pass --ckpt"
            )
        ckpt = run
    return resolve_checkpoint(Path(ckpt))


def load_tokenizer(ckpt: str | Path | None = None, device: str | None = None, ema: bool = True) -> tuple[Any, Path]:
    """Rebuild a trained tokenizer from its checkpoint (config from meta.json, EMA weights by default), in eval
    mode on `device`. Returns (tokenizer, checkpoint folder)."""
    from .config import config_from_dict
    from .errors import CheckpointError
    from .models import build_tokenizer
    from .train import checkpoint as ck
    from .train.dist import pick_device

    path = find_tokenizer_checkpoint(ckpt)
    meta = ck.read_meta(path)
    if meta.get("kind") != "tokenizer":
        raise CheckpointError(f"{path} is a {meta.get('kind')} checkpoint, not a tokenizer")
    cfg = config_from_dict(meta["config"])
    tok = build_tokenizer(cfg)
    ck.load_state_strict(tok, ck.read_tensors(path, "ema" if ema else "tokenizer"), f"{path}")
    return tok.to(pick_device(device)).eval(), path


# ----------------------------------------------------------------------------- reconstruct


def reconstruct(
    paths: list[str | Path], ckpt: str | Path | None = None, tokens: list[int] | None = None, source: str = "gt",
    out: str | Path = "recon", fid: bool = False, inception_weights: str | None = None, photos: bool = False,
    device: str | None = None, batch: int = 16, on_start: Any = None, on_batch: Any = None,
) -> Any:
    """Reconstruct image files at each K in `tokens` (default: the checkpoint's merge.keep). `source` is `gt`
    (the encoder's own merge assignment) or `predicted` (the source recovery model's, from the ids alone).
    Returns an `eval.reconstruct.ReconResult`; pictures go to `out`."""
    from .data.photos import photo_paths
    from .errors import ConfigError
    from .eval.reconstruct import collect_images, load_images, plot_quality_vs_tokens, reconstruct_images, summarise

    if source not in ("gt", "predicted"):
        raise ConfigError(f"--source {source!r}: choose gt or predicted")
    files = collect_images([Path(p) for p in paths] + (photo_paths() if photos else []))
    tok, path = load_tokenizer(ckpt, device)
    cfg = tok.cfg
    ks = sorted(set(tokens)) if tokens else [cfg.merge.keep]
    for k in ks:
        cfg.check_keep(k)
    if source == "predicted" and tok.recovery is None:
        raise ConfigError(f"--source predicted needs a source recovery model; {path} was trained without one")
    if fid and len(files) < 2:
        raise ConfigError("--fid needs at least 2 images (give a folder)")
    weights = None
    if fid:
        from .eval.fid import resolve_inception_weights

        weights = resolve_inception_weights(inception_weights)  # fails early, before any work
    images = load_images(files, cfg.model.image_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from .eval.quality import lpips_if_available

    lpips = lpips_if_available(cfg.loss.vgg_weights)
    if lpips is not None:
        lpips = lpips.to(next(tok.parameters()).device)
    if on_start is not None:
        on_start(len(files), ks, path)
    records, recons, seen = reconstruct_images(tok, files, images, ks, source, out, lpips, batch,
                                               on_batch or (lambda n: None))
    mean = summarise(records, ks)
    for k in ks:
        mean[k]["codebook_usage"] = len(seen[k]) / tok.quantizer.codebook_size
        if fid:
            from .eval.fid import frechet_distance, to_uint8

            mean[k]["rfid"] = frechet_distance(to_uint8(images), to_uint8(recons[k]), weights, next(tok.parameters()).device)
    from .eval.reconstruct import ReconResult

    res = ReconResult(ckpt=str(path), source=source, out=str(out), images=records, mean=mean)
    if len(ks) > 1:
        res.plot = str(out / "quality_vs_tokens.png")
        plot_quality_vs_tokens(mean, Path(res.plot), f"{cfg.model.name} ({path.parent.parent.name}), {len(files)} images")
    return res


# ----------------------------------------------------------------------------- tokenize


def _token_dataset(data: str | Path, size: int, limit: int | None, seed: int) -> tuple[Any, dict[str, Any]]:
    """A folder of images (labels from class subfolders), or the built-in `shapes` / `photos` sets, all in the
    evaluation view (shorter side → size, centre crop) that `reconstruct` uses."""
    from torch.utils.data import Subset

    from .data import SHAPE_CLASSES, ImageFolder, PhotosDataset, ShapesDataset
    from .data.views import recon_view
    from .errors import DataError

    def view(img: Any, g: Any) -> dict[str, Any]:
        return {"image": recon_view(img, size, g, train=False)}

    p = Path(data)
    if p.is_dir():
        ds = ImageFolder(p, view=view, seed=seed)
        info = {"source": "imagefolder", "root": str(p.resolve()), "classes": list(ds.classes), "num_classes": len(ds.classes)}
    elif str(data) == "shapes":
        ds = ShapesDataset(size, length=limit or 10_000, seed=seed, split="train")
        info = {"source": "shapes", "seed": seed, "classes": list(SHAPE_CLASSES), "num_classes": len(SHAPE_CLASSES)}
    elif str(data) == "photos":
        ds, info = PhotosDataset(view=view, seed=seed), {"source": "photos"}
    else:
        raise DataError(f"no such folder: {data} (give an image folder, or `shapes` / `photos` for the built-in sets)")
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    info["items"] = len(ds)
    return ds, info


def tokenize(
    data: str | Path, out: str | Path, ckpt: str | Path | None = None, tokens: int | None = None,
    tokens_sample: bool = False, limit: int | None = None, device: str | None = None, batch: int = 64,
    shard_size: int = 4096, seed: int = 0, on_start: Any = None, on_batch: Any = None,
) -> dict[str, Any]:
    """Encode a dataset once into token shards for stage 2 (ids in canonical order, `assign`, K, label).
    Finished shards are kept, so an interrupted run resumes; shards of another tokenizer are refused.
    With `tokens_sample`, each image's K is drawn by the recipe's keep-count sampler from a generator seeded by
    (seed, image index), so a resumed run draws the same K."""
    import time

    import torch

    from .data.codes import ShardWriter, sha256_file
    from .data.rng import make_generator
    from .tome import KeepSampler

    tok, path = load_tokenizer(ckpt, device)
    cfg = tok.cfg
    keep = cfg.check_keep(tokens) if tokens is not None else cfg.merge.keep
    ds, info = _token_dataset(data, cfg.model.image_size, limit, seed)
    writer = ShardWriter(
        out, {"checkpoint": str(path), "hash": sha256_file(path / "ema.safetensors"), "config": config_to_dict(cfg)},
        codebook_size=tok.quantizer.codebook_size, n_tokens=cfg.model.n_tokens, grid=cfg.model.grid,
        tokens_mode="sample" if tokens_sample else "fixed", keep=keep, dataset_info=info, num_items=len(ds),
        shard_size=shard_size,
    )
    sampler = KeepSampler(keep, cfg.model.n_tokens, cfg.merge.sampler, cfg.merge.candidates, cfg.min_keep) if tokens_sample else None
    dev = next(tok.parameters()).device
    pending = writer.pending()
    if on_start is not None:
        on_start(len(ds), sum(len(writer.item_range(i)) for i in pending), path)
    t0, done = time.perf_counter(), 0
    with torch.no_grad():
        for shard in pending:
            idx = list(writer.item_range(shard))
            ks = [sampler.sample(make_generator(seed, i)) if sampler else keep for i in idx]
            ids: list[Any] = [None] * len(idx)
            assign = torch.empty(len(idx), cfg.model.n_tokens, dtype=torch.long)
            labels = torch.empty(len(idx), dtype=torch.long)
            for k in sorted(set(ks)):
                group = [j for j, kk in enumerate(ks) if kk == k]
                for s in range(0, len(group), batch):
                    part = group[s : s + batch]
                    items = [ds[idx[j]] for j in part]
                    x = torch.stack([it["image"] for it in items]).to(dev)
                    enc = tok.encode(x, tokens=k)
                    for n, j in enumerate(part):
                        ids[j] = enc.ids[n].cpu()
                        assign[j] = enc.assign[n].cpu()
                        labels[j] = int(items[n]["label"])
                    done += len(part)
                    if on_batch is not None:
                        on_batch(len(part))
            writer.write(shard, ids, assign, labels, torch.tensor(idx))
    writer.finish()
    wall = time.perf_counter() - t0
    total_shards = -(-len(ds) // shard_size)
    return {"out": str(out), "ckpt": str(path), "items": len(ds), "encoded": done,
            "skipped_shards": total_shards - len(pending), "wall_s": wall,
            "img_per_s": done / wall if wall > 0 else 0.0, "tokens": "sample" if tokens_sample else keep}


# ----------------------------------------------------------------------------- probe


def probe(data: str, ckpt: str | Path | None = None, tokens: str | int = "all", epochs: int = 90, lr: float = 1e-3,
          n_train: int = 5000, n_test: int = 1000, out: str | Path = "probe", seed: int = 0, device: str | None = None,
          on_stage: Any = None, on_advance: Any = None) -> Any:
    """Linear probe of the frozen encoder (see `eval.probe`) and the same probe on raw pixels. Returns a ProbeResult."""
    import time

    from .errors import ConfigError
    from .eval.probe import ProbeResult, labelled_split, linear_probe, plot_confusion, probe_features

    if epochs < 1 or n_train < 2 or n_test < 1:
        raise ConfigError("--epochs >= 1, --train >= 2 and --test >= 1")
    t0 = time.perf_counter()
    tok, path = load_tokenizer(ckpt, device)
    if str(tokens) == "all":
        k = tok.cfg.model.n_tokens
    else:
        try:
            k = tok.cfg.check_keep(int(tokens))
        except ValueError:
            raise ConfigError(f"--tokens {tokens!r}: give `all` or a perfect square K") from None
    size = tok.cfg.model.image_size
    x_tr, y_tr, x_te, y_te, classes = labelled_split(data, size, n_train, n_test, seed)
    if on_stage is not None:
        on_stage("features", len(x_tr) + len(x_te))
    f_tr = probe_features(tok, x_tr, k, on_batch=on_advance)
    f_te = probe_features(tok, x_te, k, on_batch=on_advance)
    if on_stage is not None:
        on_stage("probe", 2 * epochs)
    step = (lambda e, loss: on_advance(1)) if on_advance is not None else None
    top1, confusion = linear_probe(f_tr, y_tr, f_te, y_te, len(classes), epochs, lr, seed=seed, on_epoch=step)
    base, _ = linear_probe(x_tr.flatten(1), y_tr, x_te.flatten(1), y_te, len(classes), epochs, lr, seed=seed, on_epoch=step)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"confusion_{Path(str(data)).name}_k{k}.png"
    plot_confusion(confusion, classes, png, f"linear probe, K = {k}: top-1 {top1:.3f} (pixels {base:.3f})")
    per_class = (confusion.diagonal().float() / confusion.sum(1).clamp_min(1)).tolist()
    return ProbeResult(ckpt=str(path), data=str(data), tokens=k, top1=top1, baseline_top1=base, n_train=len(x_tr),
                       n_test=len(x_te), feature_dim=int(f_tr.shape[1]), epochs=epochs, confusion_png=str(png),
                       classes=classes, per_class=dict(zip(classes, per_class)), wall_s=time.perf_counter() - t0)
