"""`mergevq generate`: class-conditional samples from a trained generator, with timing, gFID and consistency."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, class_ids, per_sub_token

EXAMPLES = """
Examples:

  mergevq generate --class 3 --sampler mergear                     # newest mergear run, its tokenizer, 8 samples

  mergevq generate --class 0 --class 1 --class 2 --n 16 --sampler randar --cfg 3 --cfg-schedule linear --steps 12

  mergevq generate --class 207 --sampler llamagen --ckpt runs/llamagen-l --cfg 2 --top-k 0 --top-p 1

  mergevq generate --class 0 --class 1 --per-class 100 --sampler mergear --fid shapes --consistency --json

  mergevq generate --classes all --sampler randar --recovery runs/recovery-randar   # tuned source recovery

  mergevq generate --classes all --sampler mergear --compile --precision bf16 --device cuda   # compiled decoding

  torchrun --nproc-per-node 8 -m mergevq_cli generate --classes all --per-class 50 --sampler mergear \\
      --ckpt runs/mergear-l --cfg 2 --out samples/mergear-50k         # the paper's 50k; run again to resume
  mergevq evaluate samples/mergear-50k/samples.npz --ref VIRTUAL_imagenet256_labeled.npz
"""


class _Bar(console.BarProgress):
    """The sampling bar (AR tokens/s), headed by one line saying what samples."""

    def start(self, stage: str, total: int, done: int = 0, **info) -> None:
        if stage == "sample":  # the later stages (--fid's reference and samples) say what they do in notes
            extra = f", {info['steps']} steps" if info["steps"] else ""
            self.note(f"{info['sampler']} {info['ckpt']} (tokenizer {info['tokenizer']}) on {info['device']}: "
                      f"{total} images, K {info['tokens']}{extra}")
        super().start(stage, total, done)


def generate(
    class_: Annotated[Optional[list[int]], typer.Option("--class", "-c", callback=class_ids, help="Class id to sample (repeatable).")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="More classes: `all`, a range 0-99 or a list 1,5,7.")] = None,
    sampler: Annotated[str, typer.Option("--sampler", help="llamagen, mergear or randar.")] = "mergear",
    per_class: Annotated[Optional[int], typer.Option("--per-class", "--n", min=1, help="Samples per class (default 8; the paper: 50).")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", min=1, help="Samples in all, spread evenly over the classes (instead of --per-class).")] = None,
    ckpt: Annotated[Optional[Path], typer.Option("--ckpt", help="Generator run or checkpoint (default: the newest run of --sampler).")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="Tokenizer run, if it moved since the generator was trained.")] = None,
    recovery: Annotated[Optional[Path], typer.Option("--recovery", help="randar: decode with the source recovery model of this `mergevq tune-recovery` run instead of the tokenizer's.")] = None,
    cfg: Annotated[str, typer.Option("--cfg", help="Guidance scale (1 = off); one value, or one per sub-token: 1.9,2.0.")] = "1.0",
    cfg_schedule: Annotated[str, typer.Option("--cfg-schedule", help="constant, or linear: 1 + (cfg − 1)·decoded/N (RandAR's); default: linear for randar (the paper), constant otherwise.")] = "auto",
    temperature: Annotated[str, typer.Option("--temperature", help="Sampling temperature (per sub-token: 1.1,1.0).")] = "1.0",
    top_k: Annotated[str, typer.Option("--top-k", help="Keep the k most likely ids (0 = all).")] = "0",
    top_p: Annotated[str, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")] = "1.0",
    tokens: Annotated[Optional[int], typer.Option("--tokens", "-k", min=1, help="K: mergear's merge instruction, randar's slots (default: the training data's most common K).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="randar: parallel decoding steps (default 88 for 256 tokens, 64 for 144).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed; the same seed gives the same images.")] = 0,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images decoded together.")] = 64,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: samples/<sampler>-<time>); the same command on it again resumes.")] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Samples per shard file (the unit of resuming; shards go round-robin to processes).")] = 500,
    png: Annotated[bool, typer.Option("--png", help="Also write one PNG per sample under images/.")] = False,
    grid_rows: Annotated[int, typer.Option("--grid-rows", min=1, help="Classes shown in grid.png (one row each).")] = 8,
    grid_cols: Annotated[int, typer.Option("--grid-cols", min=1, help="Samples per class shown in grid.png.")] = 8,
    fid: Annotated[Optional[str], typer.Option("--fid", help="gFID against a folder of real images, `shapes`, or an .npz with mu/sigma.")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option("--inception-weights", help="torch-fidelity Inception weights (needed for IS).")] = None,
    consistency: Annotated[bool, typer.Option("--consistency", help="Score class consistency with a classifier trained on the same data.")] = False,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16: autocast and the KV cache's dtype.")] = "auto",
    compile_: Annotated[bool, typer.Option("--compile", help="llamagen, mergear: each decode step through torch.compile (one static-shape graph; CUDA graphs on GPU). Pays off after its compile time (tens of seconds on a CPU).")] = False,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Sample images of the given classes with LlamaGen, MergeAR or RandAR and decode them with the tokenizer."""
    from mergevq_core.errors import ConfigError
    from mergevq_core.generation import generate_images
    from mergevq_core.generators import GENERATORS, SamplingSettings

    if cfg_schedule == "auto":
        cfg_schedule = GENERATORS[sampler].default_cfg_schedule if sampler in GENERATORS else "constant"
    try:
        top_k_v = per_sub_token(top_k, "--top-k", 0)
        settings = SamplingSettings(
            cfg=per_sub_token(cfg, "--cfg", 0), cfg_schedule=cfg_schedule,
            temperature=per_sub_token(temperature, "--temperature", 0),
            top_k=tuple(int(v) for v in top_k_v) if isinstance(top_k_v, tuple) else int(top_k_v),
            top_p=per_sub_token(top_p, "--top-p", 0, 1),
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if per_class is not None and num_samples is not None:
        raise ConfigError("give either --per-class or --num-samples, not both")
    if precision != "auto":
        from ..options import checked_precision

        precision = checked_precision(precision, device)
    with _Bar("tok/s", quiet=json_) as bar:
        res = generate_images(class_ or [], per_class if num_samples is not None else (per_class or 8), sampler,
                              num_samples=num_samples, class_spec=classes, ckpt=ckpt, settings=settings,
                              tokens=tokens, steps=steps, seed=seed, batch=batch, out=out, device=device,
                              tokenizer=tokenizer, fid=fid, inception_weights=inception_weights,
                              with_consistency=consistency, png=png, grid_rows=grid_rows, grid_cols=grid_cols,
                              shard_size=shard_size, recovery=recovery, precision=precision, compile=compile_,
                              progress=bar)
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    per = f" × {res.n_per_class}" if res.n_per_class is not None else ""
    kept = f", {res.samples - res.made} kept from before" if res.made < res.samples else ""
    share = res.other_s / max(res.wall_s, 1e-9)
    rows = [("samples", f"{res.samples} ({len(res.classes)} classes{per}{kept}) → {res.npz}"),
            *([("source recovery", f"tuned: {res.recovery['checkpoint']}")] if res.recovery else []),
            ("grid", res.grid), ("time", f"{res.wall_s:.2f} s: AR {res.ar_s:.2f} s, tokenizer decode {res.decode_s:.2f} s, "
                                         f"other {res.other_s:.2f} s ({share:.0%})"),
            ("speed", f"{res.tokens_per_s:,.0f} tok/s, {res.images_per_s:.2f} img/s")]
    st = res.stats
    if "peak_cache_slots" in st:  # a compressed cache (mergear) reports its peak
        rows.append(("KV cache", f"peak {st['peak_cache_slots']} slots vs {st['plain_cache_slots']} for a full cache "
                                 f"(w = {st['window']}); distinct ids {st['distinct_ids']:.1f} "
                                 f"[{st['distinct_ids_min']}, {st['distinct_ids_max']}]"))
    if res.fid is not None:
        pr = f"; precision {res.fid['precision']:.3f}, recall {res.fid['recall']:.3f}" if res.fid.get("precision") is not None else ""
        rows.append(("gFID", f"{res.fid['fid']:.2f} ({res.fid['samples']} samples vs {res.fid['reference']}{pr})"))
        isc = res.inception_score or {}
        rows.append(("Inception Score", f"{isc['mean']:.2f} ± {isc['std']:.2f}" if isc.get("available") else f"unavailable: {isc.get('reason')}"))
    if res.consistency is not None:
        c = res.consistency
        pred = c.get("classifier_val_acc_recon_predicted")
        pred_txt = f", {pred:.3f} with the predicted source" if pred is not None else ""
        rows.append(("class consistency", f"{c['consistency']:.3f} (classifier: {c['classifier_val_acc_real']:.3f} on real, "
                                          f"{c['classifier_val_acc_recon']:.3f} on reconstructions at K = {c['reference_tokens']}{pred_txt}; "
                                          f"ceiling for {res.sampler} {c['ceiling']:.3f})"))
    console.kv(f"generate ({res.sampler})", rows)
