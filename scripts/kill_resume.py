"""SIGKILL a tiny training run at random moments, resume it each time, and compare its end with an uninterrupted
run: the final metrics row must be identical and no incomplete checkpoint folder may remain.

    python scripts/kill_resume.py --kills 5 --steps 24 --out /tmp/kill-resume
    python scripts/kill_resume.py --stage ar --shards tokens/tiny --kills 5

Stage 1 uses recipes/tiny.yaml shrunk as the tests shrink it; stage 2 recipes/ar/tiny.yaml on the given shards.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ("model.encoder.depth=2", "model.decoder.depth=1", "model.recovery.depth=1", "train.batch_size=4",
          "train.micro_batch=4", "train.eval_images=8", "train.log_every=2", "train.eval_every=1000",
          "train.ckpt_every=2", "train.warmup_steps=2", "loss.gan_weight=0.1", "loss.gan_start=2",
          "loss.align_weight=0.1", "merge.keep=16")
STAGE2 = ("model.depth=2", "model.dim=64", "model.heads=4", "train.batch_size=16", "train.micro_batch=16",
          "train.warmup_steps=2", "train.log_every=2", "train.eval_every=1000", "train.ckpt_every=2")


def command(a: argparse.Namespace, run: Path, *extra: str) -> list[str]:
    if a.stage == "tokenizer":
        head, sets = ["train-tokenizer", "recipes/tiny.yaml"], STAGE1
    else:
        head, sets = ["train-ar", "recipes/ar/tiny.yaml", "--shards", str(a.shards), "--generator", a.generator], STAGE2
    args = [x for s in sets for x in ("--set", s)]
    return [sys.executable, "-m", "mergevq_cli", *head, "--out", str(run), "--max-steps", str(a.steps), "--device",
            "cpu", "--json", *args, *extra]


def last_row(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    drop = ("img_per_s", "tok_per_s", "elapsed_s")
    return {k: v for k, v in rows[-1].items() if k not in drop}


def logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max(steps, default=0)


def incomplete(run: Path) -> list[str]:
    ck = run / "checkpoints"
    if not ck.exists():
        return []
    return [p.name for p in ck.iterdir() if p.is_dir() and (p.name.startswith(".") or not (p / "meta.json").is_file())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("tokenizer", "ar"), default="tokenizer")
    ap.add_argument("--shards", type=Path, help="stage 2: token shards")
    ap.add_argument("--generator", default="mergear")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kill-resume"))
    a = ap.parse_args()
    if a.stage == "ar" and a.shards is None:
        ap.error("--stage ar needs --shards")
    rng = random.Random(a.seed)
    shutil.rmtree(a.out, ignore_errors=True)
    full, killed = a.out / "full", a.out / "killed"
    t = time.time()
    subprocess.run(command(a, full), cwd=ROOT, check=True, capture_output=True)
    print(f"uninterrupted: {a.steps} steps in {time.time() - t:.1f} s")
    moments = []
    targets = sorted(rng.sample(range(2, a.steps - 1), a.kills))  # the logged step each kill waits for
    for i, target in enumerate(targets):
        extra = ("--resume",) if (killed / "checkpoints").exists() else ()
        p = subprocess.Popen(command(a, killed, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and logged_step(killed) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))  # somewhere inside a step, an evaluation or a checkpoint write
        finished = p.poll() is not None
        p.send_signal(signal.SIGKILL)
        p.wait()
        latest = killed / "checkpoints" / "latest"
        step = json.loads(latest.read_text())["step"] if latest.exists() else None
        moments.append({"kill": i + 1, "at_logged_step": logged_step(killed), "finished_first": finished,
                        "checkpoint_step": step, "incomplete": incomplete(killed)})
        print(moments[-1])
    res = subprocess.run(command(a, killed, *(("--resume",) if (killed / "checkpoints").exists() else ())), cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"the last resume failed: {res.stderr.strip().splitlines()[-1:]}")
    same = last_row(full) == last_row(killed)
    print(json.dumps({"final_rows_equal": same, "final": last_row(killed), "incomplete_at_end": incomplete(killed),
                      "kills": moments}, indent=1))
    sys.exit(0 if same and not incomplete(killed) else 1)


if __name__ == "__main__":
    main()
