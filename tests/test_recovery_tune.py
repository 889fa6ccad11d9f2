"""Source recovery fine-tuning after stage 2 (`mergevq tune-recovery`) on a tiny tokenizer → shards → RandAR
pipeline: it learns, an interrupted run resumes exactly, `generate --recovery` decodes with it, and bad input
stops with one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from mergevq_core import api
from mergevq_core.checkpoint import latest_checkpoint, read_meta
from mergevq_core.errors import CheckpointError, ConfigError, DataError
from mergevq_core.fileio import sha256_file
from mergevq_core.generation import generate_images
from mergevq_core.generators import SamplingSettings
from mergevq_core.progress import Progress
from mergevq_core.train.preempt import TrainingInterrupted

from .conftest import ROOT

AR_FAST = ("model.depth=1", "model.dim=32", "model.heads=4", "model.vocab_size=null", "model.n_tokens=null",
           "model.num_classes=null", "train.batch_size=16", "train.micro_batch=16", "train.eval_every=1000",
           "train.ckpt_every=1000", "data.val_items=16")
TUNE = dict(batch=16, micro_batch=16, lr=3e-3, workers=0, device="cpu")


@pytest.fixture(scope="module")
def pipeline(tiny_tokenizer_run, tmp_path_factory):
    """96 shapes tokenized with K drawn per image, a 2-step RandAR (and a MergeAR for the wrong-generator case)."""
    root = tmp_path_factory.mktemp("tune")
    api.tokenize("shapes", root / "tokens", ckpt=tiny_tokenizer_run, tokens_sample=True, limit=96, device="cpu",
                 batch=48, shard_size=48)
    for g in ("randar", "mergear"):
        api.train_ar(ROOT / "recipes/ar/tiny.yaml", AR_FAST, shards=root / "tokens", generator=g,
                     out=root / f"tiny-{g}", max_steps=2 if g == "randar" else 1, device="cpu")
    return root


@pytest.fixture(scope="module")
def tuned(pipeline):
    """A 6-step tuning run (epochs of 5 steps) and its result."""
    res = api.tune_recovery(pipeline / "tiny-randar", max_steps=6, out=pipeline / "rec", **TUNE)
    return pipeline / "rec", res


def test_tuning_learns_and_leaves_the_tokenizer_alone(pipeline, tiny_tokenizer_run, tuned):
    run, res = tuned
    before, after = res.before, res.after
    assert before["step"] == 0 and after["step"] == 6 and res.steps == 6
    assert after["ce_real"] < 0.99 * before["ce_real"] and after["acc_real"] > before["acc_real"], (before, after)
    assert 0 <= after["acc_real"] <= 1 and set(after["acc_real_by_k"]) == set(before["acc_real_by_k"])
    assert 0 < before["ids_changed"] <= 1  # held-out ids replaced by the generator's predictions
    assert res.train_items == 80 and res.val_items == 16  # the generator run's own held-out items
    ckpt = latest_checkpoint(run)
    assert {p.name for p in ckpt.iterdir()} == {"recovery.safetensors", "meta.json", "train_state.pt"}
    meta = read_meta(ckpt, expect_kind="recovery")
    tok_ckpt = latest_checkpoint(tiny_tokenizer_run)
    tok_hash = sha256_file(tok_ckpt / "ema.safetensors")
    assert meta["tokenizer"] == {"checkpoint": str(tok_ckpt), "hash": tok_hash}  # the tokenizer's file is untouched
    assert meta["generator_hash"] == sha256_file(latest_checkpoint(pipeline / "tiny-randar") / "generator.safetensors")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [0, 5, 6]  # before, once per epoch of 5 steps, at the end
    assert all(0 < r["loss"]["changed"] < 1 for r in rows if "loss" in r)  # replace = 0.5 of the ids


class _StopAt(Progress):
    """Sends this process SIGINT after optimizer step `at`, as a scheduler's preemption would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def advance(self, n: int = 1, **fields) -> None:
        if fields.get("step") == self.at:
            signal.raise_signal(signal.SIGINT)


def test_interrupted_run_resumes_exactly(pipeline, tuned):
    full, _ = tuned
    run = pipeline / "stopped"
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGINT at step 2"):
        api.tune_recovery(pipeline / "tiny-randar", max_steps=6, out=run, progress=_StopAt(2), **TUNE)
    assert read_meta(latest_checkpoint(run))["step"] == 2
    res = api.tune_recovery(pipeline / "tiny-randar", max_steps=6, out=run, resume=True, **TUNE)
    assert res.resumed_from == 2 and res.steps == 6
    strip = lambda r: {k: v for k, v in r.items() if k not in ("items_per_s", "elapsed_s")}  # noqa: E731
    a, b = ([strip(json.loads(x)) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, run))
    assert a == b  # losses, lr, the corruption's share, every evaluation
    assert sha256_file(latest_checkpoint(full) / "recovery.safetensors") == sha256_file(latest_checkpoint(run) / "recovery.safetensors")
    with pytest.raises(ConfigError, match="other settings"):
        api.tune_recovery(pipeline / "tiny-randar", max_steps=6, out=run, resume=True, **{**TUNE, "lr": 1e-3})


def test_generate_decodes_with_the_tuned_model(pipeline, tuned, tmp_path):
    run, _ = tuned
    kw = dict(classes=[0, 3], per_class=2, sampler="randar", ckpt=pipeline / "tiny-randar",
              settings=SamplingSettings(temperature=1.0), seed=0, batch=4, device="cpu")
    base = generate_images(out=tmp_path / "stage1", **kw)
    res = generate_images(out=tmp_path / "tuned", recovery=run, **kw)
    assert base.recovery is None and res.to_json()["recovery"]["checkpoint"] == str(latest_checkpoint(run))
    assert res.recovery["same_generator"] is True
    assert res.recovery["hash"] == sha256_file(latest_checkpoint(run) / "recovery.safetensors")
    load = lambda r: np.load(r.npz)["arr_0"]  # noqa: E731
    assert not np.array_equal(load(base), load(res))  # the same ids, placed by another model
    # what decodes is the tuned model, loaded beside the tokenizer's own, which stays the stage-1 one
    from mergevq_core.runs import load_generator, load_tuned_recovery, tokenizer_of_generator

    _, meta = load_generator(latest_checkpoint(pipeline / "tiny-randar"), "cpu")
    tok, _ = tokenizer_of_generator(meta, None, "cpu")
    stage1 = {n: p.clone() for n, p in tok.recovery.state_dict().items()}
    model, _, _ = load_tuned_recovery(run, tok, meta["tokenizer"]["hash"])
    assert any(not torch.equal(p, stage1[n]) for n, p in model.state_dict().items())
    assert all(torch.equal(p, stage1[n]) for n, p in tok.recovery.state_dict().items())
    again = generate_images(out=tmp_path / "tuned", recovery=run, **kw)  # the same folder: kept, nothing made
    assert again.made == 0
    with pytest.raises(ConfigError, match="made with other settings"):
        generate_images(out=tmp_path / "tuned", **kw)  # stage-1 images are not mixed into a tuned folder


def test_bad_input_is_one_line(pipeline, tuned, tiny_tokenizer_run):
    randar, mergear = str(pipeline / "tiny-randar"), str(pipeline / "tiny-mergear")
    p = subprocess.run([sys.executable, "-m", "mergevq_cli", "tune-recovery", "--ckpt", randar, "--replace", "1.5",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]  # the CLI: one line, no traceback, exit 1
    assert p.returncode == 1 and len(lines) == 1 and "--replace 1.5: must be in [0, 1]" in lines[0], p.stderr
    with pytest.raises(CheckpointError, match="--recovery: .* is a tokenizer checkpoint, not a tuned source recovery"):
        generate_images([1], 1, "randar", ckpt=randar, recovery=tiny_tokenizer_run, device="cpu", out=pipeline / "g")
    kw = dict(max_steps=1, out=pipeline / "bad", **TUNE)
    with pytest.raises(CheckpointError, match="holds a mergear generator; source recovery is tuned with a randar"):
        api.tune_recovery(mergear, **kw)
    with pytest.raises(DataError, match="--shards /nonexistent: no such folder"):
        api.tune_recovery(randar, shards="/nonexistent", **kw)
    with pytest.raises(ConfigError, match="--predict='top': choose one of sample, argmax"):
        api.tune_recovery(randar, predict="top", **kw)
    with pytest.raises(ConfigError, match="--batch 24: not a multiple of --micro-batch 16"):
        api.tune_recovery(randar, **{**kw, "batch": 24})
    with pytest.raises(ConfigError, match="--recovery: mergear does not decode with the source recovery model"):
        generate_images([1], 1, "mergear", ckpt=mergear, recovery=tuned[0], device="cpu", out=pipeline / "g")
    with pytest.raises(CheckpointError, match="--recovery: checkpoint not found: /nonexistent"):
        generate_images([1], 1, "randar", ckpt=randar, recovery="/nonexistent", device="cpu", out=pipeline / "g")


def test_teacher_predictions_are_the_teacher_forced_argmax_in_slot_order():
    from mergevq_core.generators import build_generator
    from mergevq_core.models.gpt import gpt_tiny
    from mergevq_core.train.recovery_task import corrupt_ids, teacher_predictions

    torch.manual_seed(0)
    gen = build_generator("randar", gpt_tiny(vocab_size=64, max_len=16, factorized=(3, 3))).eval()
    for p in gen.parameters():  # the zero-initialised heads would make every argmax 0
        torch.nn.init.normal_(p, std=0.5)
    k = torch.tensor([16, 9])
    ids = torch.randint(0, 64, (2, 16))
    ids[1, 9:] = -1
    labels = torch.tensor([1, -1])
    pred = teacher_predictions(gen, ids, k, labels, torch.Generator().manual_seed(3), "argmax")
    order = gen.random_order(k, 16, torch.Generator().manual_seed(3))  # the same draw
    logits, _ = gen.teacher_logits(ids, k, gen.labels_for(labels), order)
    want = gen.gpt.join_ids([lg.argmax(-1) for lg in logits])  # independent sub-token heads: per-head argmax
    assert torch.equal(pred.gather(1, order)[0], want[0]) and torch.equal(pred.gather(1, order)[1, :9], want[1, :9])
    same, diff = corrupt_ids(ids, k, pred, 0.0, torch.Generator())
    assert torch.equal(same, ids) and not diff.any()
    every, diff = corrupt_ids(ids, k, pred, 1.0, torch.Generator())
    assert torch.equal(every[0], pred[0]) and torch.equal(every[1, :9], pred[1, :9]) and (every[1, 9:] == -1).all()
    assert torch.equal(diff, (pred != ids) & (torch.arange(16)[None] < k[:, None]))
