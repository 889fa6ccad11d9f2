"""`mergevq benchmark`: speed and memory figures, printed as a table, as JSON and as a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import (BenchOutOpt, BenchPrecisionOpt, DeviceOpt, JsonOpt, RunsOpt, TokenizerOpt, checked_precision,
                       float_list, int_list, positive)

EXAMPLES = """
Examples:

  mergevq benchmark kv-cache                                        # CPU defaults, about 2 minutes

  mergevq benchmark kv-cache --model l --n 1024 --batch 1,16,64 --redundancy 0,0.44,0.75,0.9 --device cuda

  mergevq benchmark kv-cache --ckpt runs/tiny-ar-mergear --batch 1,16 --json
  mergevq benchmark kv-cache --n 256 --batch 1 --compile                 # eager and compiled rows

  mergevq benchmark tokenizer --tokens 9,36,64                     # newest tokenizer run
  mergevq benchmark tokenizer --recipe recipes/gr.yaml --tokens 144,256 --batch 2
  mergevq benchmark tokenizer --precision fp32                     # fp32 rows only (bf16 is slow on most CPUs)

  mergevq benchmark ar --recipe recipes/ar/tiny.yaml --batch 16
  mergevq benchmark ar --layers 12 --dim 768 --heads 12 --vocab 16384 --n 256 --batch 1 --no-train --compile  # GPT-B

  mergevq benchmark lfq --chunk 128,4096                            # exact 2^18 codebook entropy, fwd + bwd
"""

app = typer.Typer(help="Speed and memory benchmarks (tables, --json, PNG plots).", no_args_is_help=True,
                  rich_markup_mode="rich", epilog=EXAMPLES)


def _write(out: Path, name: str, env: dict, rows: list) -> None:
    """Save a benchmark's environment and rows as out/name (JSON)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str))


def _save_and_json(out: Path, name: str, env: dict, rows: list, json_: bool) -> bool:
    """Save the rows as out/name and, with --json, print them: True when that was the command's whole output."""
    _write(out, name, env, rows)
    if json_:
        console.print_json(rows)
    return json_


@app.command("kv-cache", epilog=EXAMPLES)
def kv_cache(
    n: Annotated[str, typer.Option("--n", help="Image tokens N (square grids), comma-separated.")] = "256,1024",
    batch: Annotated[str, typer.Option("--batch", help="Images decoded together, comma-separated.")] = "1,16,64",
    redundancy: Annotated[str, typer.Option("--redundancy", help="Forced share ρ of positions repeating an earlier id.")] = "0,0.44,0.75",
    model: Annotated[str, typer.Option("--model", help="tiny (2 layers, 64-d), b or l (LlamaGen sizes, 2^18 factorised head).")] = "tiny",
    ckpt: Annotated[Optional[Path], typer.Option("--ckpt", help="A trained MergeAR run instead of random weights (its own samples, realised ρ).")] = None,
    window: Annotated[Optional[int], typer.Option("--window", min=1, help="MergeAR window w (default: grid side + 1).")] = None,
    cfg: Annotated[bool, typer.Option("--cfg", help="Classifier-free guidance: two rows per image.")] = False,
    runs: RunsOpt = 10,
    warmups: Annotated[int, typer.Option("--warmups", min=3, help="Warm-up runs per row (>= 3).")] = 3,
    segment: Annotated[int, typer.Option("--segment", min=0, help="Tokens per timed run at stratified positions; 0 = whole generations.")] = 16,
    compile_: Annotated[bool, typer.Option("--compile", help="Also the sliced and MergeAR rows with compiled decode steps (each shape compiles once, in the warm-ups).")] = False,
    out: BenchOutOpt = Path("bench"),
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """MergeAR's compressed KV cache vs a sliced full cache vs a LlamaGen-style static buffer: memory and speed."""
    import math

    from mergevq_core.bench.kvcache import bench_kv_cache, plot_kv
    from mergevq_core.errors import ConfigError

    ns, bs, rhos = int_list(n, "--n"), int_list(batch, "--batch"), float_list(redundancy, "--redundancy", 0, 0.99)
    if not ns or not bs or not rhos:  # the ranges are checked while parsing
        raise ConfigError("--n, --batch and --redundancy need values")

    def on_row(r) -> None:
        if not json_:
            extra = "" if r.cache != "mergear" else f"  ×{r.speedup_vs_sliced:.2f} speed, ×{r.memory_saving_vs_sliced:.2f} memory vs sliced"
            name = r.cache + ("+compile" if r.compiled else "")
            console.out.print(f"  N={r.n} B={r.batch} {name:<16} ρ={r.redundancy:.2f}: {r.ms_per_token_median:.3f} ms/token, "
                              f"peak KV {r.kv_bytes_peak / 2**20:.2f} MiB{extra}", highlight=False)

    try:
        rows, env = bench_kv_cache(ns, bs, rhos, model=model, device=device, runs=runs, warmups=warmups, segment=segment,
                                   window=window, cfg=cfg, ckpt=ckpt, seed=seed, on_row=on_row, compile=compile_)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _write(out, "kv_cache.json", env, [r.to_json() for r in rows])
    plot_kv(rows, out / "kv_cache.png")
    if json_:
        console.print_json([r.to_json() for r in rows])
        return
    fmt = lambda v, f: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)
    gpu = env.get("gpu") is not None
    table = [[str(r.n), str(r.batch), r.cache + ("+compile" if r.compiled else ""), fmt(r.redundancy, "{:.2f}"), fmt(r.kv_bytes_peak / 2**20, "{:.2f}"),
              f"{r.ms_per_token_median:.3f}", f"{r.ms_per_token_p10:.2f}–{r.ms_per_token_p90:.2f}",
              f"{r.tokens_per_s:,.0f}", fmt(r.speedup_vs_sliced, "{:.2f}"), fmt(r.memory_saving_vs_sliced, "{:.2f}")]
             + ([fmt(r.bandwidth_share, "{:.0%}")] if gpu else []) for r in rows]
    dev = env.get("gpu") or f"CPU, {env['threads']} threads"
    console.table(f"KV cache: {env['model']} ({dev}, {'CFG' if cfg else 'no CFG'}), median of {runs} runs; "
                  "speed and memory × against the sliced full cache (all columns: --json)",
                  ["N", "B", "cache", "ρ", "KV MiB", "ms/tok", "p10–p90", "tok/s", "speed×", "mem×"]
                  + (["BW"] if gpu else []), table)
    console.kv("written", [("table", str(out / "kv_cache.json")), ("plot", str(out / "kv_cache.png"))])


@app.command("tokenizer", epilog=EXAMPLES)
def tokenizer(
    ckpt: TokenizerOpt = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="A tokenizer recipe with random weights instead of a run.")] = None,
    tokens: Annotated[Optional[str], typer.Option("--tokens", "-k", help="K values, comma-separated (default: the recipe's evaluation list).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per call.")] = 16,
    runs: RunsOpt = 10,
    precision: BenchPrecisionOpt = None,
    out: BenchOutOpt = Path("bench"),
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Encode and decode images/s at several K, fp32 and bf16, with the GMACs of each and bf16's PSNR change."""
    from mergevq_core.bench.models import bench_tokenizer

    precisions = ("fp32", "bf16") if precision is None else (precision,)
    precisions = tuple(checked_precision(p, device) for p in precisions)
    rows, env = bench_tokenizer(ckpt=ckpt, recipe=recipe, tokens=int_list(tokens, "--tokens") or None, batch=batch,
                                runs=runs, warmups=3, device=device, precisions=precisions)
    if _save_and_json(out, "tokenizer.json", env, rows, json_):
        return
    diff = lambda v: "-" if v is None else f"{v:+.3f}"
    console.table(f"tokenizer {env['model']}, {env['image_size']} px, batch {batch}, {env.get('gpu') or 'CPU'}, "
                  f"channels_last; median of {runs}; PSNR (dB) on {env['images']}, Δ = bf16 − fp32",
                  ["K", "prec", "enc img/s", "dec img/s", "ms/batch", "enc GMACs", "dec GMACs", "PSNR", "ΔPSNR"],
                  [[str(r["tokens"]), r["precision"], f"{r['encode_img_per_s']:.1f}", f"{r['decode_img_per_s']:.1f}",
                    f"{r['encode_ms_median'] + r['decode_ms_median']:.0f}", f"{r['encode_gmacs']:.3f}",
                    f"{r['decode_gmacs']:.3f}", f"{r['psnr_db']:.2f}", diff(r["psnr_diff_vs_fp32_db"])] for r in rows])


@app.command("ar", epilog=EXAMPLES)
def ar(
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="A generator recipe (kind: ar) giving the model size (default recipes/ar/tiny.yaml).")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", min=1, help="Transformer blocks (instead of the recipe's).")] = None,
    dim: Annotated[Optional[int], typer.Option("--dim", min=1, help="Model width.")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", min=1, help="Attention heads.")] = None,
    vocab: Annotated[Optional[int], typer.Option("--vocab", min=2, help="Codebook size V.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="Image tokens N (a square).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per training step and per sampling call.")] = 16,
    generators: Annotated[str, typer.Option("--generators", help="Comma-separated: llamagen, mergear, randar.")] = "llamagen,mergear,randar",
    cfg: Annotated[bool, typer.Option("--cfg/--no-cfg", help="Sample with classifier-free guidance (scale 2, two rows per image).")] = True,
    train: Annotated[bool, typer.Option("--train/--no-train", help="Also time the training step.")] = True,
    compile_: Annotated[bool, typer.Option("--compile", help="Add compiled-decoding rows (llamagen, mergear) beside the eager ones.")] = False,
    precision: BenchPrecisionOpt = None,
    runs: RunsOpt = 10,
    out: BenchOutOpt = Path("bench"),
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Training and sampling tokens/s of llamagen, mergear and randar (random weights): eager vs compiled, fp32 vs bf16."""
    from mergevq_core.bench.models import bench_ar
    from mergevq_core.errors import ConfigError
    from mergevq_core.generators import GENERATORS

    names = tuple(g.strip() for g in generators.split(",") if g.strip())
    bad = [g for g in names if g not in GENERATORS]
    if not names or bad:
        raise ConfigError(f"--generators {generators!r}: choose from {', '.join(GENERATORS)}")
    precisions = ("fp32", "bf16") if precision is None else (precision,)
    precisions = tuple(checked_precision(p, device) for p in precisions)
    rows, env = bench_ar(recipe, batch=batch, runs=runs, warmups=3, device=device, generators=names,
                         cfg_scale=2.0 if cfg else 1.0, train=train, precisions=precisions,
                         compiled=(False, True) if compile_ else (False,),
                         shape={"layers": layers, "dim": dim, "heads": heads, "vocab": vocab, "n": n})
    if _save_and_json(out, "ar.json", env, rows, json_):
        return
    fmt = lambda v, f: "-" if v is None else f.format(v)
    console.table(f"generators: {env['layers']} layers, {env['dim']}-d, {env['heads']} heads, V {env['vocab']}, "
                  f"N {env['N']}, K {env['K']}; batch {batch}, {'CFG 2' if cfg else 'no CFG'}, {env.get('gpu') or 'CPU'}",
                  ["generator", "precision", "decoding", "params M", "train tok/s", "sample tok/s", "sample img/s",
                   "AR steps", "compile s"],
                  [[r["generator"], r["precision"], "compiled" if r["compiled"] else "eager", f"{r['params'] / 1e6:.2f}",
                    fmt(r["train_tokens_per_s"], "{:,.0f}"), f"{r['sample_tokens_per_s']:,.0f}",
                    f"{r['sample_images_per_s']:.2f}", str(r["steps"]), fmt(r["compile_s"], "{:.1f}")] for r in rows])


@app.command("lfq", epilog=EXAMPLES)
def lfq(
    dim: Annotated[int, typer.Option("--dim", min=1, help="Code bits D (codebook 2^D; the paper: 18).")] = 18,
    tokens: Annotated[int, typer.Option("--tokens", "-k", min=1, help="Tokens per image.")] = 256,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per call.")] = 2,
    chunk: Annotated[str, typer.Option("--chunk", help="Codes per accumulation chunk, comma-separated.")] = "128,4096",
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per chunk size.")] = 10,
    budget: Annotated[float, typer.Option("--budget", callback=positive, help="Seconds one forward + backward may take.")] = 30.0,
    out: BenchOutOpt = Path("bench"),
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Time of LFQ's exact codebook entropy (forward + backward) per chunk size, against a budget."""
    from mergevq_core.bench.lfq import bench_entropy
    from mergevq_core.errors import ConfigError

    chunks = int_list(chunk, "--chunk") or []
    if not chunks:
        raise ConfigError("--chunk needs a value")
    try:
        rows, env = bench_entropy(dim=dim, batch=batch, tokens=tokens, chunks=tuple(chunks), runs=runs,
                                  budget_s=budget, device=device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if _save_and_json(out, "lfq.json", env, rows, json_):
        return
    console.table(f"LFQ codebook entropy, 2^{dim} codes, ({batch}, {tokens}, {dim}), {env.get('gpu') or 'CPU'}; median of {runs}",
                  ["chunk", "fwd+bwd s", "p10–p90 s", f"within {budget:g} s"],
                  [[str(r["chunk"]), f"{r['median_s']:.3f}", f"{r['p10_s']:.3f}–{r['p90_s']:.3f}",
                    "yes" if r["within_budget"] else "NO"] for r in rows])
