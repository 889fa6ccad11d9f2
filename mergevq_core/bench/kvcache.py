"""`mergevq benchmark kv-cache`: MergeAR's compressed KV cache against a plain cache sliced to the live length
and a LlamaGen-style static full-length buffer, on the same weights and the same token sequences.

Without a checkpoint the weights are random, and a forced-redundancy source decides the ids: a share ρ of the
positions repeat an earlier id (the raster-previous or the upper neighbour, so groups are spatially compact
like ToMe's), the others get new, distinct ids. The model still computes every logit and draws a sample at
each step; only the id fed back is the forced one. So kernels, cache bookkeeping and memory are real, and ρ is
exact. With a trained MergeAR checkpoint (`ckpt`) the model's own samples decide, and the realised ρ̂ is
reported.

Timing protocol (reference/ar-generation.md §4): a timed run decodes `segment` consecutive tokens starting at a
stratified position t_r = (r + ½)/R·N of the sequence, after a parallel prefill of x_0..x_{t_r-1} (for MergeAR
followed by the evictions Eq. 12 implies and a compaction, i.e. the cache state of step-by-step decoding);
per-token latency = run time / segment. `segment=0` times whole generations instead. At least 3 warm-up runs
precede R >= 10 timed runs; CUDA timings are synchronised. Memory: the analytic peak (prefix + reps + window
at every step, × rows × bytes per cached token) next to the slots the real cache object allocated over one
full, untimed forced generation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..generators import (
    MergeAR, RasterDecoder, SampleNoise, SamplingSettings, analytic_peak_slots, first_occurrence, mean_context,
)
from ..generators.sampling import Pick
from ..models.gpt import GPT_SIZES, GPTConfig
from .timing import environment, peak_bandwidth, quantiles, sync, timed

__all__ = ["KVRow", "bench_kv_cache", "forced_ids", "BENCH_MODELS"]

CACHES = ("mergear", "sliced", "static")
BENCH_MODELS = {  # name: (GPT size, vocabulary, factorised bits, intra-position blocks)
    "tiny": ("tiny", 2**12, (), 0),  # 2 layers, 64-d: small enough that the cache, not the head, is what differs
    "b": ("b", 2**18, (6, 12), 2),
    "l": ("l", 2**18, (6, 12), 2),
}


@dataclass
class KVRow:
    cache: str
    n: int
    batch: int
    redundancy: float
    window: int
    distinct_ids: float
    peak_slots: int  # analytic peak live slots (per image, max over the batch)
    kv_bytes_peak: int  # analytic: rows × peak slots × bytes per cached token
    kv_bytes_measured: int  # slots the real cache allocated over a full generation × rows × bytes per token
    kv_bytes_allocated: int  # the cache's buffers at the end of the timed runs (capacity, incl. growth margin)
    mean_context: float
    ms_per_token_median: float
    ms_per_token_p10: float
    ms_per_token_p90: float
    ms_per_token_runs: list[float]  # every timed run, in order: the median and quantiles above are of these
    tokens_per_s: float  # image tokens of the whole batch per second (CFG rows not counted twice)
    images_per_s: float
    runs: int
    warmups: int
    segment: int
    speedup_vs_sliced: float | None = None
    speedup_vs_static: float | None = None
    memory_saving_vs_sliced: float | None = None
    memory_saving_vs_static: float | None = None
    bandwidth_share: float | None = None  # GPU: analytic bytes / time as a share of the device's peak
    compiled: bool = False  # decode steps through torch.compile (speedups then against the compiled sliced row)
    speedup_vs_eager: float | None = None  # a compiled row against the same cache decoded eagerly
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def forced_ids(batch: int, n: int, redundancy: float, vocab: int, generator: torch.Generator) -> Tensor:
    """(batch, n) raster ids in which exactly round(ρ·n) positions repeat an earlier id (their raster-previous or
    upper neighbour's) and the others carry new, pairwise distinct ids."""
    if not 0.0 <= redundancy < 1.0:
        raise ValueError(f"redundancy must be in [0, 1), got {redundancy}")
    side = math.isqrt(n)
    dups = round(redundancy * n)
    if dups > n - 1 or vocab < n - dups:
        raise ValueError(f"cannot force {dups} repeats in {n} positions with {vocab} ids")
    out = torch.empty(batch, n, dtype=torch.long)
    for b in range(batch):
        is_dup = torch.zeros(n, dtype=torch.bool)
        is_dup[1 + torch.randperm(n - 1, generator=generator)[:dups]] = True
        fresh = torch.randperm(vocab, generator=generator)[: n - dups]
        up = torch.rand(n, generator=generator) < 0.5
        ids, j = [], 0
        for t in range(n):
            if is_dup[t]:
                src = t - side if (up[t] and t >= side) else t - 1
                ids.append(ids[src])
            else:
                ids.append(int(fresh[j]))
                j += 1
        out[b] = torch.tensor(ids)
    return out


def _model(name: str, n: int, window: int | None, device: torch.device, dtype: torch.dtype, ckpt: Path | None):
    if ckpt is not None:
        from ..runs import load_generator

        gen, _ = load_generator(ckpt, device, expect="mergear")
        if window is not None:
            gen.window = window
        return gen.to(dtype)
    size, vocab, bits, fdepth = BENCH_MODELS[name]
    depth, dim, heads = GPT_SIZES[size]
    if name == "tiny":
        dim, heads = 64, 4
    cfg = GPTConfig(vocab_size=vocab, max_len=n, depth=depth, dim=dim, heads=heads, factorized=bits,
                    factor_depth=fdepth, num_classes=1000)
    torch.manual_seed(0)
    return MergeAR(cfg, window=window).to(device=device, dtype=dtype).eval()


def _pick_forced(gen: Any, ids: Tensor, draw: Pick, rows: int) -> Pick:
    """Draw a sample with the real sampler `draw` (the cost is real), feed the forced id."""
    subs = gen.gpt.split_ids(ids)

    def pick(t: int, i: int, logits: Tensor, /, decoded: int | None = None) -> Tensor:
        draw(t, i, logits, decoded=decoded)
        sub = subs[i][:, t] if isinstance(t, int) else subs[i].index_select(1, t)[:, 0]  # a compiled step's (1,) t
        return sub.repeat(rows // sub.shape[0]) if rows != sub.shape[0] else sub

    return pick


def bench_kv_cache(
    ns: list[int], batches: list[int], redundancies: list[float], *, model: str = "tiny", device: str | None = None,
    runs: int = 10, warmups: int = 3, segment: int = 16, window: int | None = None, cfg: bool = False,
    ckpt: str | Path | None = None, seed: int = 0, on_row: Callable[[KVRow], None] | None = None,
    compile: bool = False,
) -> tuple[list[KVRow], dict[str, Any]]:
    """One row per (N, batch, cache[, ρ]): static and sliced full caches, then MergeAR's compressed cache at each
    forced redundancy ρ (or, with `ckpt`, on a trained MergeAR's own samples). `compile` adds the sliced and MergeAR
    rows again with compiled decode steps (their graphs compile in the warm-ups). `on_row` sees each row as it is
    made; also returns the environment. Protocol: the module docstring."""
    from ..dist import pick_device

    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if runs < 10 or warmups < 3:
        raise ValueError("the protocol needs at least 10 timed runs after at least 3 warm-ups")
    if model not in BENCH_MODELS and ckpt is None:
        raise ValueError(f"--model {model!r}: choose one of {', '.join(BENCH_MODELS)}")
    env = environment(dev)
    rows_out: list[KVRow] = []
    ckpt_path = None
    if ckpt is not None:
        from ..runs import find_generator_checkpoint

        ckpt_path = find_generator_checkpoint(ckpt, "mergear")
        ns = ns[:1]  # the checkpoint fixes N
    for n in ns:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"--n {n}: the token grid must be square")
        gen = _model(model, n, window, dev, dtype, ckpt_path)
        if ckpt_path is not None:
            n = gen.n_tokens
        w = gen.window
        kv_tok = gen.cfg.kv_bytes_per_token(torch.finfo(dtype).bits // 8)
        weight_bytes = sum(p.numel() * p.element_size() for name_, p in gen.named_parameters()
                           if "embed" not in name_)  # read every step (embeddings are gathered)
        g = torch.Generator().manual_seed(seed)
        for batch in batches:
            rows = batch * (2 if cfg else 1)
            labels = torch.randint(0, gen.cfg.num_classes, (batch,), generator=g).to(dev)
            configs: list[dict[str, Any]] = [{"cache": "static", "rho": None}, {"cache": "sliced", "rho": None}]
            for rho in (redundancies if ckpt_path is None else [None]):
                configs.append({"cache": "mergear", "rho": rho})
            for c in configs[2:] + configs[:2]:  # ids and memory (MergeAR: one full, untimed generation)
                c["compiled"] = False
                if ckpt_path is None:
                    c["ids"] = forced_ids(batch, n, c["rho"] or 0.0, gen.cfg.vocab_size, g).to(dev)
                    c["k"] = n - round((c["rho"] or 0.0) * n)
                else:  # a checkpoint: the model's own samples, which the baselines then replay
                    c["ids"], c["k"] = (None if c["cache"] == "mergear" else configs[2]["ids"]), gen.default_k()
                c.update(_memory(gen, labels, c, n, rows, w, cfg, dev, dtype, seed))
            if compile:  # the same ids and memory, decoded by the compiled step
                configs += [{**c, "compiled": True} for c in configs if c["cache"] != "static"]
            # warm-ups, then timed runs round-robin over the rows, so that drift hits them all alike
            for r in range(warmups):
                for c in configs:
                    _time_one(gen, labels, c, n, rows, w, cfg, segment, dev, dtype, seed, r, warmups)
            lat: list[list[float]] = [[] for _ in configs]
            allocated = [0] * len(configs)
            for r in range(runs):
                for i, c in enumerate(configs):
                    sec, dec = _time_one(gen, labels, c, n, rows, w, cfg, segment, dev, dtype, seed, r, runs)
                    lat[i].append(sec)
                    allocated[i] = dec.kv.nbytes()
            made = [_row(c, lat[i], allocated[i], n, batch, rows, w, runs, warmups, segment, dev, kv_tok, weight_bytes)
                    for i, c in enumerate(configs)]
            static = made[0]
            sliced = {r.compiled: r for r in made if r.cache == "sliced"}
            eager = {(r.cache, r.redundancy): r for r in made if not r.compiled}
            for row in made:
                if row.cache == "mergear":
                    for base in (sliced[row.compiled], static):
                        setattr(row, f"speedup_vs_{base.cache}", base.ms_per_token_median / row.ms_per_token_median)
                        setattr(row, f"memory_saving_vs_{base.cache}", base.kv_bytes_peak / row.kv_bytes_peak)
                if row.compiled:
                    same = eager[(row.cache, row.redundancy)] if row.cache == "mergear" else sliced[False]
                    row.speedup_vs_eager = same.ms_per_token_median / row.ms_per_token_median
                rows_out.append(row)
                if on_row is not None:
                    on_row(row)
    return rows_out, {"model": model if ckpt_path is None else str(ckpt_path), "cfg": cfg, **env}


def _picker(gen, c, n, rows, cfg, seed, labels):
    """The real sampler (CFG 2 when `cfg`) with per-sample noise of `seed`; it feeds the forced ids if any."""
    noise = SampleNoise.arange(seed, len(labels), device=labels.device)
    draw = SamplingSettings(cfg=2.0 if cfg else 1.0).picker(n, noise)
    return draw if c["ids"] is None else _pick_forced(gen, c["ids"], draw, rows)


def _memory(gen, labels, c, n, rows, w, cfg, dev, dtype, seed) -> dict[str, Any]:
    """Analytic and measured KV slots of one row. MergeAR: a full generation with the real compressed cache
    (without forced ids, on the model's own samples); a plain cache allocates its full length up front."""
    p = gen.prefix
    measured = p + n - 1
    if c["cache"] == "mergear":
        dec = RasterDecoder(gen, labels, c["k"], cfg, "mergear", w, dtype)
        pick = _picker(gen, c, n, rows, cfg, seed, labels)
        with torch.no_grad():
            dec.prefill(pick)
            for t in range(n - 1):
                dec.step(t, pick)
        measured = dec.stats()["allocated_slots"]  # slots handed out (read once, after the loop)
        if c["ids"] is None:
            c["ids"] = dec.ids.clone()
    rep = first_occurrence(c["ids"])
    distinct = float(rep.sum(1).float().mean())
    if c["cache"] == "mergear":
        return {"peak": int(analytic_peak_slots(rep, w, p).max()), "measured": measured,
                "ctx": mean_context(rep, w, p), "distinct": distinct}
    return {"peak": p + n - 1, "measured": measured, "ctx": p + (n - 1) / 2 + 0.5, "distinct": distinct}


def _time_one(gen, labels, c, n, rows, w, cfg, segment, dev, dtype, seed, r, total):
    """Seconds per token of one timed run (a stratified segment, or a whole generation) and its decoder."""
    seg = segment if segment and segment < n - 1 else 0
    dec = RasterDecoder(gen, labels, c["k"], cfg, c["cache"], w, dtype, compiled=c["compiled"])
    pick = _picker(gen, c, n, rows, cfg, seed + r, labels)
    with torch.no_grad():
        dec.prefill(pick)
        if not seg:
            return timed(lambda: [dec.step(t, pick) for t in range(n - 1)], dev) / (n - 1), dec
        start = min(n - 1 - seg, max(1, int((r + 0.5) / total * (n - 1)) - seg // 2))
        dec.fast_forward(c["ids"][:, :start], pick)
        sync(dev)
        return timed(lambda: [dec.step(t, pick) for t in range(start, start + seg)], dev) / seg, dec


def _row(c, lat, allocated, n, batch, rows, w, runs, warmups, segment, dev, kv_tok, weight_bytes) -> KVRow:
    q = quantiles(lat)
    peak_bw = peak_bandwidth(dev)
    bw_share = (weight_bytes + rows * c["ctx"] * kv_tok) / q["median"] / peak_bw if peak_bw else None
    mergear = c["cache"] == "mergear"
    rho = (c["rho"] if c["rho"] is not None else 1 - c["distinct"] / n) if mergear else float("nan")
    return KVRow(
        cache=c["cache"], n=n, batch=batch, redundancy=float(rho), window=w, distinct_ids=c["distinct"],
        peak_slots=c["peak"], kv_bytes_peak=rows * c["peak"] * kv_tok, kv_bytes_measured=rows * c["measured"] * kv_tok,
        kv_bytes_allocated=allocated, mean_context=c["ctx"], ms_per_token_median=q["median"] * 1e3,
        ms_per_token_p10=q["p10"] * 1e3, ms_per_token_p90=q["p90"] * 1e3, ms_per_token_runs=[t * 1e3 for t in lat],
        tokens_per_s=batch / q["median"],
        images_per_s=batch / (q["mean"] * n), runs=runs, warmups=warmups,
        segment=segment if segment and segment < n - 1 else n - 1, bandwidth_share=bw_share, compiled=c["compiled"],
    )


def plot_kv(rows: list[KVRow], path: Path) -> None:
    """Peak KV bytes and tokens/s against ρ, one line per (N, batch) for MergeAR, dashed for the sliced baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    keys = sorted({(r.n, r.batch) for r in rows})
    for i, (n, batch) in enumerate(keys):
        col = f"C{i % 10}"
        m = sorted((r for r in rows if r.cache == "mergear" and (r.n, r.batch) == (n, batch)), key=lambda r: r.redundancy)
        base = next((r for r in rows if r.cache == "sliced" and (r.n, r.batch) == (n, batch)), None)
        if not m:
            continue
        xs = [r.redundancy for r in m]
        a.plot(xs, [r.kv_bytes_peak / 2**20 for r in m], "o-", color=col, label=f"MergeAR N={n} B={batch}")
        b.plot(xs, [r.tokens_per_s for r in m], "o-", color=col, label=f"MergeAR N={n} B={batch}")
        if base is not None:
            a.plot([min(xs), max(xs)], [base.kv_bytes_peak / 2**20] * 2, "--", color=col, lw=0.8)
            b.plot([min(xs), max(xs)], [base.tokens_per_s] * 2, "--", color=col, lw=0.8)
    a.set(xlabel="redundancy ρ", ylabel="peak KV cache (MiB)", title="memory (dashed: sliced full cache)")
    a.set_yscale("log")
    b.set(xlabel="redundancy ρ", ylabel="image tokens / s", title="decode throughput (dashed: sliced full cache)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=6)
    fig.tight_layout()
    from ..eval.plots import save_figure

    save_figure(fig, path)
