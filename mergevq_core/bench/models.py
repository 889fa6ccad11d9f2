"""`mergevq benchmark tokenizer` and `mergevq benchmark ar`: throughput of the tokenizer at several K (with the
MACs of each) and of a generator's training step and sampling. Same protocol as the kv-cache benchmark: warm-up
runs, then >= 10 timed runs (synchronised on CUDA), median and p10/p90."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from .timing import environment, quantiles, timed

__all__ = ["bench_ar", "bench_tokenizer"]


def _tokenizer(ckpt: str | Path | None, recipe: str | Path | None, device: torch.device):
    from ..runs import load_tokenizer
    from ..config import load_config
    from ..models import build_tokenizer

    if recipe is not None:
        cfg = load_config(recipe)
        torch.manual_seed(0)
        return build_tokenizer(cfg).to(device).prepare_inference(), f"{recipe} (random weights)"
    tok, path = load_tokenizer(ckpt, str(device))
    return tok, str(path)


def _bench_images(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """(batch, 3, size, size) in [-1, 1]: scikit-image's photos (cycled) when installed, else uniform noise."""
    from ..errors import DataError

    try:
        from ..data.photos import photo_paths
        from ..eval.reconstruct import load_images

        photos = load_images(photo_paths()[:batch], size)
    except DataError:
        return torch.rand(batch, 3, size, size, device=device) * 2 - 1, "uniform noise"
    return photos[torch.arange(batch) % len(photos)].to(device), "scikit-image photos"


def bench_tokenizer(ckpt: str | Path | None = None, recipe: str | Path | None = None, tokens: list[int] | None = None,
                    batch: int = 16, runs: int = 10, warmups: int = 3, device: str | None = None,
                    precisions: tuple[str, ...] = ("fp32",)) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Encode and decode images/s at each K and precision (CNN parts channels_last), with the conv + linear
    GMACs per image of each, the mean PSNR of the reconstructions of the batch and, for bf16, its difference to
    fp32's (dB) and the largest pixel difference between the two."""
    from ..dist import pick_device
    from ..eval.complexity import mac_counter
    from ..eval.metrics import psnr
    from ..precision import autocast, check_precision

    precisions = tuple(dict.fromkeys(check_precision(p) for p in precisions))
    dev = pick_device(device)
    tok, what = _tokenizer(ckpt, recipe, dev)
    cfg = tok.cfg
    ks = [cfg.check_keep(k) for k in (tokens or cfg.eval_tokens)]
    size = cfg.model.image_size
    x, images = _bench_images(batch, size, dev)
    rows = []
    for k in ks:
        with torch.no_grad():
            one = x[:1]
            with mac_counter(tok.encoder) as me, mac_counter(tok.code_proj) as mp:
                enc1 = tok.encode(one, tokens=k)
            with mac_counter(tok.decoder) as md:
                tok.decode(enc1.ids, enc1.assign)
            enc = tok.encode(x, tokens=k)
            ref = tok.decode(enc.ids, enc.assign).float().clamp(-1, 1)  # fp32: what bf16 is compared with
            ref_psnr = float(psnr(ref, x).mean())
        for prec in precisions:
            with torch.no_grad(), autocast(prec, dev):
                enc = tok.encode(x, tokens=k)
                recon = tok.decode(enc.ids, enc.assign).float().clamp(-1, 1)
                for _ in range(warmups):
                    tok.encode(x, tokens=k)
                    tok.decode(enc.ids, enc.assign)
                t_enc = [timed(lambda: tok.encode(x, tokens=k), dev) for _ in range(runs)]
                t_dec = [timed(lambda: tok.decode(enc.ids, enc.assign), dev) for _ in range(runs)]
            qe, qd = quantiles(t_enc), quantiles(t_dec)
            p = float(psnr(recon, x).mean())
            rows.append({"tokens": k, "precision": prec, "batch": batch, "encode_img_per_s": batch / qe["median"],
                         "decode_img_per_s": batch / qd["median"], "encode_ms_median": qe["median"] * 1e3,
                         "decode_ms_median": qd["median"] * 1e3, "encode_ms_p10_p90": [qe["p10"] * 1e3, qe["p90"] * 1e3],
                         "decode_ms_p10_p90": [qd["p10"] * 1e3, qd["p90"] * 1e3],
                         "encode_gmacs": (me() + mp()) / 1e9, "decode_gmacs": md() / 1e9, "psnr_db": p,
                         "psnr_diff_vs_fp32_db": p - ref_psnr if prec != "fp32" else None,
                         "max_abs_diff_vs_fp32": float((recon - ref).abs().max()) if prec != "fp32" else None})
    return rows, {"model": what, "image_size": size, "N": cfg.model.n_tokens, "images": images,
                  "channels_last": True, **environment(dev)}


def ar_shape(recipe: str | Path | None = None, *, layers: int | None = None, dim: int | None = None,
             heads: int | None = None, vocab: int | None = None, n: int | None = None,
             classes: int | None = None) -> tuple[Any, Any]:
    """The generator recipe (default recipes/ar/tiny.yaml's values) and its GPTConfig with any shape flag applied
    (layers, width, heads, vocabulary, image tokens N, classes), so that LlamaGen's configurations can be matched."""
    import dataclasses

    from ..config import load_ar_config
    from ..errors import ConfigError
    from ..models.gpt import gpt_config_from_recipe

    cfg = load_ar_config(recipe or Path(__file__).resolve().parents[2] / "recipes/ar/tiny.yaml")
    m = cfg.model
    over = {"depth": layers, "dim": dim, "heads": heads, "vocab_size": vocab, "n_tokens": n, "num_classes": classes}
    flags = dict(zip(over, ("--layers", "--dim", "--heads", "--vocab", "--n", "--classes")))
    for name, v in over.items():
        if v is not None and v < 1:
            raise ConfigError(f"{flags[name]} must be >= 1, got {v}")
    m = dataclasses.replace(m, **{k: v for k, v in over.items() if v is not None})
    if n is not None and math.isqrt(n) ** 2 != n:
        raise ConfigError(f"--n {n}: the token grid must be square")
    return cfg, gpt_config_from_recipe(m, vocab_size=vocab, n_tokens=n, num_classes=classes)


def bench_ar(recipe: str | Path | None = None, *, batch: int = 16, runs: int = 10, warmups: int = 3,
             device: str | None = None, generators: tuple[str, ...] = ("llamagen", "mergear", "randar"),
             k: int | None = None, steps: int | None = None, cfg_scale: float = 2.0, train: bool = True,
             precisions: tuple[str, ...] = ("fp32",), compiled: tuple[bool, ...] = (False,),
             shape: dict[str, int | None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training tokens/s (forward, backward, AdamW step on random token batches) and sampling tokens/s of each
    generator at a recipe's size (random weights; `shape` overrides layers / dim / heads / vocab / n / classes), one
    row per generator × precision × eager/compiled, each through `Generator.sample` (llamagen on the sliced cache,
    mergear on its compressed cache, randar in parallel with its cosine schedule, `steps` or the default for K).
    `cfg_scale` 1 samples without guidance. A row's `steps` is the forward passes one sampling call takes.
    Compiled rows (raster generators only) time decoding after one untimed call has compiled its graph;
    `compile_s` is that call's time. Training is timed eagerly, once per precision."""
    from ..dist import pick_device
    from ..generators import RasterGenerator, SampleNoise, SamplingSettings, build_generator
    from ..precision import autocast as autocast_of, check_precision

    dev = pick_device(device)
    cfg, gcfg = ar_shape(recipe, **(shape or {}))
    n = gcfg.max_len
    k = k or (math.isqrt(n) * 3 // 4) ** 2  # a merged grid of 3/4 the side, like 144 of 256
    g = torch.Generator().manual_seed(0)
    side = math.isqrt(k)
    grid = math.isqrt(n)
    r, c = torch.arange(grid)[:, None] * side // grid, torch.arange(grid)[None, :] * side // grid
    assign = (r * side + c).flatten().expand(batch, -1).contiguous()
    ids = torch.randint(0, gcfg.vocab_size, (batch, k), generator=g)
    batch_t = {"ids": ids, "k": torch.full((batch,), k), "assign": assign, "label": torch.randint(0, gcfg.num_classes, (batch,), generator=g)}
    batch_t = {key: v.to(dev) for key, v in batch_t.items()}
    rows = []
    for name in generators:
        torch.manual_seed(0)
        gen = build_generator(name, gcfg, **({"window": cfg.generator.window} if name == "mergear" else {})).to(dev)
        params = sum(p.numel() for p in gen.parameters())
        for prec in dict.fromkeys(check_precision(p) for p in precisions):
            autocast = autocast_of(prec, dev)
            t_train = None
            if train:
                gen.train()
                opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, fused=dev.type == "cuda")
                ord_gen = torch.Generator().manual_seed(0)

                def train_step() -> None:
                    with autocast:
                        loss = gen(batch_t, ord_gen)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                for _ in range(warmups):
                    train_step()
                t_train = quantiles([timed(train_step, dev) for _ in range(runs)])
            seq = gen.seq_len(k)
            gen.eval()
            labels = batch_t["label"]
            noise = SampleNoise.arange(0, len(labels), device=dev)
            settings = SamplingSettings(cfg=cfg_scale)
            dt = torch.bfloat16 if prec == "bf16" else None
            for comp in compiled:
                if comp and not isinstance(gen, RasterGenerator):
                    continue  # randar's parallel steps are not compiled
                more = {"compiled": True} if comp else {}

                def sample() -> dict[str, Any]:
                    with torch.no_grad(), autocast:
                        return gen.sample(labels, k, settings.picker(seq, noise), settings.guided, steps=steps,
                                          noise=noise, dtype=dt, **more).stats

                t0 = time.perf_counter()
                passes = sample()["forward_passes"]  # compiles, for a compiled row
                first_s = time.perf_counter() - t0
                t_sample = quantiles([timed(sample, dev) for _ in range(max(3, runs // 3))])
                row = {"generator": name, "precision": prec, "compiled": comp, "batch": batch, "tokens_per_image": seq,
                       "params": params, "sample_tokens_per_s": batch * seq / t_sample["median"],
                       "sample_images_per_s": batch / t_sample["median"],
                       "sample_s_p10_p90": [t_sample["p10"], t_sample["p90"]], "cfg": cfg_scale, "steps": passes,
                       "compile_s": first_s if comp else None, "train_tokens_per_s": None, "train_ms_p10_p90": None}
                if t_train is not None and not comp:
                    row.update(train_tokens_per_s=batch * seq / t_train["median"],
                               train_ms_p10_p90=[t_train["p10"] * 1e3, t_train["p90"] * 1e3])
                rows.append(row)
            gen.train()
    env = {"recipe": str(recipe or "recipes/ar/tiny.yaml"), "N": n, "K": k, "layers": gcfg.depth, "dim": gcfg.dim,
           "heads": gcfg.heads, "vocab": gcfg.vocab_size, **environment(dev)}
    return rows, env
