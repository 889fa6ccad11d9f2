"""`mergevq probe --protocol finetune`: layer-wise lr decay, exact resume after SIGKILL, torchrun with gloo,
and a resume with other settings refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mergevq_core import api
from mergevq_core.checkpoint import latest_checkpoint, read_meta
from mergevq_core.errors import ConfigError

from .conftest import ROOT

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SMALL = ["--train", "32", "--test", "16", "--batch", "8", "--micro-batch", "8", "--epochs", "2",
         "--set", "train.ckpt_every=2", "--set", "train.log_every=1", "--set", "train.eval_every=3"]


def args(tok, out, *extra):
    return ["probe", "shapes", "--protocol", "finetune", "--ckpt", str(tok), "--out", str(out), "--device", "cpu",
            "--json", *SMALL, *extra]


def popen(*a):
    return subprocess.Popen([sys.executable, "-m", "mergevq_cli", *a], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(r):
    return {k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")}


def test_layer_decay_scales_the_stem_least_and_the_head_not_at_all(tiny_tokenizer_run):
    from mergevq_core.train.finetune_task import FinetuneNet, layer_decay_groups

    tok, _ = api.load_tokenizer(tiny_tokenizer_run, "cpu")
    net = FinetuneNet(tok.encoder, tok.schedule(), 10)
    groups = layer_decay_groups(net, 0.05, 0.5)
    depth = len(tok.encoder.blocks)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(net.head.weight)] == 1.0 and decay[id(net.head.weight)] == 0.05 and decay[id(net.head.bias)] == 0
    assert scale[id(net.encoder.cls_token)] == pytest.approx(0.5 ** (depth + 1)) and decay[id(net.encoder.cls_token)] == 0
    last = net.encoder.blocks[-1].mlp
    assert scale[id(next(last.parameters()))] == pytest.approx(0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_resume_after_sigkill_continues_exactly(tiny_tokenizer_run, tmp_path):
    full = popen(*args(tiny_tokenizer_run, tmp_path / "full"))
    killed = popen(*args(tiny_tokenizer_run, tmp_path / "killed"))
    deadline = time.time() + 120
    while time.time() < deadline:  # SIGKILL once the first checkpoint (step 2) is in place
        if (tmp_path / "killed" / "checkpoints" / "latest").exists():
            break
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    at = read_meta(latest_checkpoint(tmp_path / "killed"))["step"]
    assert at < 8, "the run finished before it could be killed"
    resumed = popen(*args(tiny_tokenizer_run, tmp_path / "killed", "--resume"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    res = json.loads(out)
    assert res["resumed_from"] == at and res["steps"] == 8 and res["protocol"] == "finetune"
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]
    a, b = rows(tmp_path / "full"), rows(tmp_path / "killed")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    after = [(x, y) for x, y in zip(a, b) if x["step"] > at]
    assert any("eval" in x for x, _ in after) and any("loss" in x for x, _ in after)
    assert all(comparable(x) == comparable(y) for x, y in after)  # losses (Mixup, RandAugment, drop path), top-1


def test_torchrun_two_gloo_processes(tiny_tokenizer_run, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547",
           "-m", "mergevq_cli", *args(tiny_tokenizer_run, out, "--micro-batch", "4", "--max-steps", "3")]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(res.stdout)  # rank 0 alone prints
    assert d["steps"] == 3 and 0 <= d["top1"] <= 1
    meta = read_meta(latest_checkpoint(out))
    assert meta["world_size"] == 2 and meta["kind"] == "finetune" and meta["config"]["train"]["micro_batch"] == 4


def test_resume_with_other_settings_is_refused(tiny_tokenizer_run, tmp_path):
    kw = dict(ckpt=tiny_tokenizer_run, n_train=16, n_test=8, batch=8, micro_batch=8, epochs=1, workers=0, device="cpu",
              overrides=("aug.mixup=0", "aug.cutmix=0"))
    first = api.finetune("shapes", out=tmp_path / "r", **kw)
    assert first.steps == 2 and first.n_train == 16
    with pytest.raises(ConfigError, match="train.lr"):
        api.finetune("shapes", out=tmp_path / "r", resume=True, **{**kw, "lr": 1e-2})
    with pytest.raises(ConfigError, match="--resume"):
        api.finetune("shapes", out=tmp_path / "r", **kw)  # an existing run needs --resume
    again = api.finetune("shapes", out=tmp_path / "r", resume=True, **kw)
    assert again.steps == 2 and again.top1 == first.top1
