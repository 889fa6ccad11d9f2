"""Raster sampling throughput of whichever mergevq is importable, as `mergevq generate` runs it (llamagen, eager,
fp32 on a CPU), so that two checkouts can be timed alternately in one sitting:

    git worktree add /tmp/old d57b696
    for i in 1 2 3; do
      PYTHONPATH=/tmp/old  python -P scripts/sampling_ab.py --layers 4 --dim 256 --heads 8 --vocab 1024 --n 64 --batch 1
      PYTHONPATH=$PWD      python -P scripts/sampling_ab.py --layers 4 --dim 256 --heads 8 --vocab 1024 --n 64 --batch 1
    done

It prints one JSON line: the code's location, the shape, and the median tokens/s of `--runs` whole generations
(after one warm-up) with CFG 2 unless `--no-cfg`. It knows both sampling interfaces: `Generator.generate` with a
torch.Generator (before the per-sample noise) and `Generator.sample` with `SampleNoise`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("layers", 4), ("dim", 256), ("heads", 8), ("vocab", 1024), ("n", 64), ("batch", 1), ("runs", 5)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--no-cfg", action="store_true")
    ap.add_argument("--compile", action="store_true", help="compiled decode steps (new code only)")
    a = ap.parse_args()

    import mergevq_core
    from mergevq_core.generators import SamplingSettings, build_generator
    from mergevq_core.models.gpt import GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=a.vocab, max_len=a.n, depth=a.layers, dim=a.dim, heads=a.heads, num_classes=1000)
    gen = build_generator("llamagen", cfg).eval()
    with torch.no_grad():
        for head in gen.gpt.heads:  # zero-initialised heads would sample uniformly; any weights time the same
            head.weight.normal_(std=0.02)
    labels = torch.arange(a.batch) % 1000
    settings = SamplingSettings(cfg=1.0 if a.no_cfg else 2.0)

    def once(seed: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            if hasattr(gen, "sample"):
                from mergevq_core.generators import SampleNoise

                noise = SampleNoise.arange(seed, a.batch)
                more = {"compiled": True} if a.compile else {}
                gen.sample(labels, a.n, settings.picker(a.n, noise), settings.guided, noise=noise, **more)
            else:
                g = torch.Generator().manual_seed(seed)
                gen.generate(labels, k=a.n, pick=settings.picker(a.n, g), guided=settings.guided)
        return time.perf_counter() - t

    once(0)
    times = [once(1 + r) for r in range(a.runs)]
    print(json.dumps({"code": mergevq_core.__file__.rsplit("/", 2)[0], "layers": a.layers, "dim": a.dim,
                      "vocab": a.vocab, "n": a.n, "batch": a.batch, "cfg": not a.no_cfg, "compiled": a.compile,
                      "tokens_per_s": a.batch * a.n / statistics.median(times),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
