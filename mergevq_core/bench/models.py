"""`mergevq benchmark tokenizer` and `mergevq benchmark ar`: throughput of the tokenizer at several K (with the
MACs of each) and of a generator's training step and sampling. Same protocol as the kv-cache benchmark: warm-up
runs, then >= 10 timed runs (synchronised on CUDA), median and p10/p90."""

from __future__ import annotations

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
        return build_tokenizer(cfg).to(device).eval(), f"{recipe} (random weights)"
    tok, path = load_tokenizer(ckpt, str(device))
    return tok, str(path)


def bench_tokenizer(ckpt: str | Path | None = None, recipe: str | Path | None = None, tokens: list[int] | None = None,
                    batch: int = 16, runs: int = 10, warmups: int = 3, device: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Encode and decode images/s at each K, with the conv + linear GMACs per image of each."""
    from ..eval.complexity import mac_counter
    from ..dist import pick_device

    dev = pick_device(device)
    tok, what = _tokenizer(ckpt, recipe, dev)
    cfg = tok.cfg
    ks = [cfg.check_keep(k) for k in (tokens or cfg.eval_tokens)]
    size = cfg.model.image_size
    x = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    rows = []
    for k in ks:
        with torch.no_grad(), autocast:
            one = x[:1]
            with mac_counter(tok.encoder) as me, mac_counter(tok.code_proj) as mp:
                enc1 = tok.encode(one, tokens=k)
            with mac_counter(tok.decoder) as md:
                tok.decode(enc1.ids, enc1.assign)
            enc = tok.encode(x, tokens=k)
            for _ in range(warmups):
                tok.encode(x, tokens=k)
                tok.decode(enc.ids, enc.assign)
            t_enc = [timed(lambda: tok.encode(x, tokens=k), dev) for _ in range(runs)]
            t_dec = [timed(lambda: tok.decode(enc.ids, enc.assign), dev) for _ in range(runs)]
        qe, qd = quantiles(t_enc), quantiles(t_dec)
        rows.append({"tokens": k, "batch": batch, "encode_img_per_s": batch / qe["median"],
                     "decode_img_per_s": batch / qd["median"], "encode_ms_p10_p90": [qe["p10"] * 1e3, qe["p90"] * 1e3],
                     "decode_ms_p10_p90": [qd["p10"] * 1e3, qd["p90"] * 1e3],
                     "encode_gmacs": (me() + mp()) / 1e9, "decode_gmacs": md() / 1e9})
    return rows, {"model": what, "image_size": size, "N": cfg.model.n_tokens, **environment(dev)}


def bench_ar(recipe: str | Path, *, batch: int = 16, runs: int = 10, warmups: int = 3, device: str | None = None,
             generators: tuple[str, ...] = ("llamagen", "mergear", "randar"), k: int | None = None,
             steps: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training tokens/s (forward, backward, AdamW step on random token batches) and sampling tokens/s of each
    generator of a recipe's size, random weights, each through `Generator.sample` (llamagen on the sliced cache,
    mergear on its compressed cache, randar in parallel with its cosine schedule, `steps` or the default for K).
    A row's `steps` is the forward passes one sampling call takes."""
    import math

    from ..config import load_ar_config
    from ..dist import pick_device
    from ..generators import SampleNoise, SamplingSettings, build_generator
    from ..models.gpt import gpt_config_from_recipe

    dev = pick_device(device)
    cfg = load_ar_config(recipe)
    gcfg = gpt_config_from_recipe(cfg.model)
    n = gcfg.max_len
    k = k or (math.isqrt(n) * 3 // 4) ** 2  # a merged grid of 3/4 the side, like 144 of 256
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
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
        pick = SamplingSettings(cfg=2.0).picker(seq, noise)
        dt = torch.bfloat16 if dev.type == "cuda" else None

        def sample() -> dict[str, Any]:
            with torch.no_grad(), autocast:
                return gen.sample(labels, k, pick, True, steps=steps, noise=noise, dtype=dt).stats

        passes = sample()["forward_passes"]
        t_sample = quantiles([timed(sample, dev) for _ in range(max(3, runs // 3))])
        gen.train()
        rows.append({"generator": name, "batch": batch, "tokens_per_image": seq, "params": sum(p.numel() for p in gen.parameters()),
                     "train_tokens_per_s": batch * seq / t_train["median"], "train_ms_p10_p90": [t_train["p10"] * 1e3, t_train["p90"] * 1e3],
                     "sample_tokens_per_s": batch * seq / t_sample["median"], "sample_images_per_s": batch / t_sample["median"],
                     "sample_s_p10_p90": [t_sample["p10"], t_sample["p90"]], "cfg": 2.0, "steps": passes})
    return rows, {"recipe": str(recipe), "N": n, "K": k, **environment(dev)}
