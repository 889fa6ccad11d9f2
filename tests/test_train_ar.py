"""Stage-2 training on synthetic token shards: every generator learns, exact resume after SIGKILL and after
clean stops on SIGTERM and SIGINT, torchrun with gloo, and one-line errors for recipes and shards that do not fit."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mergevq_core.api import train_ar
from mergevq_core.data.shard_writer import ShardWriter
from mergevq_core.errors import ConfigError, MergeVQError
from mergevq_core.checkpoint import latest_checkpoint, read_meta

from .conftest import ROOT, set_args

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
N, VOCAB, CLASSES = 16, 64, 4
# recipes/ar/tiny.yaml shrunk: 2 layers of width 32 on 4×4 grids of a 2^6 codebook (two 2^3 sub-tokens)
FAST = ("model.depth=2", "model.dim=32", "model.heads=4", "model.vocab_size=null", "model.n_tokens=null",
        "model.num_classes=null", "model.factorized=[3,3]", "train.batch_size=16", "train.micro_batch=16",
        "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2", "train.eval_every=1000", "train.ckpt_every=4",
        "data.val_items=32")


def make_shards(out: Path, items: int = 192, seed: int = 0, views: int = 2) -> Path:
    """Merged grids like a tokenizer's: K ∈ {4, 9, 16} coarse blocks, ids that depend on the class and the block;
    each item in `views` views (its own K and noise each), as `tokenize --views flip` stores them."""
    g = torch.Generator().manual_seed(seed)
    w = ShardWriter(out, {"checkpoint": "synthetic-tokenizer", "hash": "0" * 64}, codebook_size=VOCAB, n_tokens=N,
                    grid=4, tokens_mode="sample", keep=None, dataset_info={"source": "synthetic", "num_classes": CLASSES},
                    num_items=items, shard_size=64, views={"mode": "synthetic", "count": views, "crop_range": 1.0})
    r = torch.arange(4)
    for i in w.pending():
        idx = list(w.item_range(i))
        ids, assign, labels = [], torch.empty(len(idx), views, N, dtype=torch.long), torch.empty(len(idx), dtype=torch.long)
        for j, _ in enumerate(idx):
            label = int(torch.randint(0, CLASSES, (1,), generator=g))
            for v in range(views):
                s = int(torch.randint(2, 5, (1,), generator=g))
                rows, cols = r[:, None] * s // 4, r[None, :] * s // 4
                assign[j, v] = (rows * s + cols).flatten()
                noise = torch.randint(0, 2, (s * s,), generator=g)
                ids.append((label * 16 + torch.arange(s * s) * 3 + noise) % VOCAB)
            labels[j] = label
        w.write(i, ids, assign, labels, torch.tensor(idx))
    w.finish()
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "tok")


def fast(shards: Path, *extra: str) -> tuple[str, ...]:
    return (*FAST, f"data.tokens={shards}", *extra)


@pytest.mark.parametrize("generator", ["llamagen", "mergear", "randar"])
def test_each_generator_learns_and_records_its_tokenizer(tmp_path, shards, generator):
    res = train_ar(ROOT / "recipes/ar/tiny.yaml", fast(shards), generator=generator, out=tmp_path / "r",
                   max_steps=24, device="cpu")
    first, last = res.val_losses[0][1], res.val_loss
    assert res.val_losses[0][0] == 0 and math.isclose(first, 2 * math.log(8), rel_tol=1e-4)  # zero-initialised heads
    assert last < 0.9 * first, res.val_losses  # 24 steps: a clear fall, far from converged
    run = tmp_path / "r"
    for name in ("config.json", "metrics.jsonl", "loss_curve.png"):
        assert (run / name).is_file(), name
    meta = read_meta(latest_checkpoint(run))
    assert meta["kind"] == "ar" and meta["generator"] == generator and meta["step"] == 24
    assert meta["tokenizer"] == {"checkpoint": "synthetic-tokenizer", "hash": "0" * 64}
    assert meta["tokens"]["k_counts"] and meta["gpt"]["vocab_size"] == VOCAB and meta["gpt"]["num_classes"] == CLASSES
    assert {p.name for p in latest_checkpoint(run).iterdir()} == {"generator.safetensors", "meta.json", "train_state.pt"}


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergevq_cli", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def args(shards: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train-ar", "recipes/ar/tiny.yaml", "--generator", "randar", "--out", str(out), "--max-steps", str(steps),
            "--device", "cpu", "--json", *set_args(fast(shards)), *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_continues_exactly(tmp_path, shards):
    steps = 40  # randar: random orders and label drop both come from the checkpointed generator
    full = cli(*args(shards, tmp_path / "full", steps))
    killed = cli(*args(shards, tmp_path / "killed", steps))
    deadline = time.time() + 120
    while time.time() < deadline:
        if (tmp_path / "killed" / "checkpoints" / "latest").exists():
            break
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    at = read_meta(latest_checkpoint(tmp_path / "killed"))["step"]
    assert at < steps, "the run finished before it could be killed"
    resumed = cli(*args(shards, tmp_path / "killed", steps, "--resume"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out)["resumed_from"] == at
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    a, b = rows(tmp_path / "full"), rows(tmp_path / "killed")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")}
    after = [(x, y) for x, y in zip(a, b) if x["step"] > at]
    assert after and all(strip(x) == strip(y) for x, y in after)  # losses, lr, validation loss


def test_signals_stop_with_a_checkpoint_and_resume_continues_exactly(tmp_path, shards):
    """SIGTERM, then SIGINT on the resumed run, then a resume to the end: the same rows as an uninterrupted run."""
    from .test_train import stop_with

    steps, run = 40, tmp_path / "stopped"
    full = cli(*args(shards, tmp_path / "full", steps))
    stops = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        resume = ("--resume",) if stops else ()
        at, _ = stop_with(sig, cli(*args(shards, run, steps, "--set", "train.ckpt_every=1000", *resume)), run, steps,
                          after=stops[-1] if stops else 0)
        stops.append(at)
    assert stops[0] < stops[1]
    resumed = cli(*args(shards, run, steps, "--resume"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out)["resumed_from"] == stops[1]
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    a, b = rows(tmp_path / "full"), rows(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")}
    after = [(x, y) for x, y in zip(a, b) if x["step"] > stops[0]]
    assert after and all(strip(x) == strip(y) for x, y in after)  # losses, lr, validation loss


def test_torchrun_two_processes_gloo(tmp_path, shards):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29527",
           "-m", "mergevq_cli", *args(shards, out, 3, "--generator", "mergear", "--set", "train.micro_batch=8")]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = read_meta(latest_checkpoint(out))
    assert meta["world_size"] == 2 and meta["step"] == 3 and meta["generator"] == "mergear"
    assert json.loads(res.stdout)["steps"] == 3  # only rank 0 prints


@pytest.mark.parametrize("extra, needle", [
    (("--set", "model.vocab_size=128"), "model.vocab_size=128 but the shards have 64"),
    (("--shards", "/nonexistent/shards"), "token shards not found"),
    (("--generator", "maskgit"), "generator.name='maskgit'"),
])
def test_bad_input_is_one_line(tmp_path, shards, extra, needle):
    p = cli(*args(shards, tmp_path / "x", 2, *extra))
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and needle in lines[0], err


def test_tokens_is_the_deprecated_name_of_shards(tmp_path, shards):
    base = ["train-ar", "recipes/ar/tiny.yaml", "--out", str(tmp_path / "x"), "--device", "cpu"]
    p = cli(*base, "--tokens", "/nonexistent/shards")
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 2, err
    assert lines[0] == "--tokens DIR is deprecated for train-ar: use --shards DIR"
    assert "token shards not found: /nonexistent/shards" in lines[1]
    p = cli(*base, "--shards", str(shards), "--tokens", str(shards))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "--shards and --tokens both given" in err and "deprecated for" not in err, err
    p = cli("train-ar", "--help")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "--shards" in out and not re.search(r"--tokens(?![-\w])", out)  # hidden


def test_recipe_kinds_do_not_mix(tmp_path, shards):
    with pytest.raises(ConfigError, match="tokenizer recipe"):
        train_ar(ROOT / "recipes/tiny.yaml", (), shards=shards, out=tmp_path / "a", device="cpu")
    from mergevq_core.api import train_tokenizer

    with pytest.raises(ConfigError, match="kind: ar"):
        train_tokenizer(ROOT / "recipes/ar/tiny.yaml", (), out=tmp_path / "b", device="cpu")
    train_ar(ROOT / "recipes/ar/tiny.yaml", fast(shards), generator="llamagen", out=tmp_path / "c", max_steps=1, device="cpu")
    with pytest.raises(MergeVQError, match="holds a llamagen generator, not mergear"):
        train_ar(ROOT / "recipes/ar/tiny.yaml", fast(shards), generator="mergear", out=tmp_path / "c", resume=True,
                 max_steps=2, device="cpu")


def test_init_starts_a_new_run_from_trained_weights(tmp_path, shards):
    a = train_ar(ROOT / "recipes/ar/tiny.yaml", fast(shards), generator="mergear", out=tmp_path / "a", max_steps=12,
                 device="cpu")
    b = train_ar(ROOT / "recipes/ar/tiny.yaml", fast(shards, "model.dropout=0.1"), generator="mergear",
                 out=tmp_path / "b", max_steps=4, device="cpu", init=tmp_path / "a")  # regularisers may change
    # step 0 of the new run evaluates exactly the weights it started from; its optimizer and schedule are fresh
    assert b.val_losses[0] == (0, a.val_loss) and b.resumed_from is None and b.steps == 4
    assert read_meta(latest_checkpoint(tmp_path / "b"))["init"] == str(latest_checkpoint(tmp_path / "a"))
    with pytest.raises(MergeVQError, match="a mergear generator, not randar"):
        train_ar(ROOT / "recipes/ar/tiny.yaml", fast(shards), generator="randar", out=tmp_path / "c", max_steps=1,
                 device="cpu", init=tmp_path / "a")
    with pytest.raises(MergeVQError, match=r"another architecture \(dim"):
        train_ar(ROOT / "recipes/ar/tiny.yaml", fast(shards, "model.dim=64"), generator="mergear", out=tmp_path / "d",
                 max_steps=1, device="cpu", init=tmp_path / "a")
    with pytest.raises(MergeVQError, match="checkpoint not found"):
        train_ar(ROOT / "recipes/ar/tiny.yaml", fast(shards), generator="mergear", out=tmp_path / "e", max_steps=1,
                 device="cpu", init=tmp_path / "missing")


def test_training_sees_one_view_per_item_per_epoch(shards):
    """Through the training loop's batch stream (with a DataLoader worker, which gets the epoch too), each item
    comes in the view `EpochViews` draws for that epoch, and both views occur."""
    from mergevq_core.data.codes import EpochViews, TokenShards, collate_tokens
    from mergevq_core.dist import DistInfo
    from mergevq_core.train.loop import BatchStream

    ds = TokenShards(shards)
    assert ds.num_views == 2
    ev = EpochViews(ds, range(len(ds)), seed=3)
    stream = BatchStream(ev, 16, seed=3, num_workers=1, dist=DistInfo(0, 1, 0, torch.device("cpu")),
                         collate_fn=collate_tokens)
    seen = {0: [], 1: []}
    for epoch in (0, 1):
        for _ in range(stream.sampler.batches_per_epoch):
            b = stream.next()
            for row, i in enumerate(b["index"].tolist()):
                v = ev.view_of(i, epoch)
                want = ds.get(i, v)
                assert int(b["k"][row]) == want["k"] and torch.equal(b["ids"][row, : want["k"]], want["ids"])
                seen[epoch].append((i, v))
    assert {v for _, v in seen[0]} == {0, 1} and dict(seen[0]) != dict(seen[1])
