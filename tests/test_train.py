"""Stage-1 training: exact resume after SIGKILL, a clean stop on SIGTERM / SIGINT / SIGUSR1, torchrun with gloo, checks
before the first step, NaN guard, checkpoint cadences."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergevq_core.api import train_tokenizer
from mergevq_core.errors import ConfigError
from mergevq_core.checkpoint import latest_checkpoint, read_meta
from mergevq_core.train.preempt import EXIT_PREEMPTED

from .conftest import FAST_TRAIN, ROOT, set_args

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergevq_cli", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def train_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train-tokenizer", "recipes/tiny.yaml", "--out", str(out), "--max-steps", str(steps), "--device", "cpu",
            "--json", *set_args(FAST_TRAIN), *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")}


def test_resume_after_sigkill_continues_exactly(tmp_path):
    steps = 12
    full = cli(*train_args(tmp_path / "full", steps))
    killed = cli(*train_args(tmp_path / "killed", steps))
    deadline = time.time() + 120
    while time.time() < deadline:  # SIGKILL as soon as the first checkpoint (step 4) is in place
        ckpt = latest_checkpoint(tmp_path / "killed") if (tmp_path / "killed" / "checkpoints").exists() else None
        if ckpt is not None:
            break
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    at = read_meta(latest_checkpoint(tmp_path / "killed"))["step"]
    assert at < steps, "the run finished before it could be killed"

    resumed = cli(*train_args(tmp_path / "killed", steps, "--resume"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out)["resumed_from"] == at
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err

    a, b = rows(tmp_path / "full"), rows(tmp_path / "killed")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    after = [(x, y) for x, y in zip(a, b) if x["step"] > at]
    assert after and all(comparable(x) == comparable(y) for x, y in after)  # losses, lr, K, held-out PSNR


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "mergevq_cli", *train_args(out, 3, "--set", "train.batch_size=8")]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = read_meta(latest_checkpoint(out))
    assert meta["world_size"] == 2 and meta["step"] == 3
    assert json.loads(res.stdout)["steps"] == 3  # only rank 0 prints


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(tmp_path):
    out, steps = tmp_path / "ddp", 16
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
           "-m", "mergevq_cli", *train_args(out, steps, "--set", "train.batch_size=8", "--set", "train.ckpt_every=1000")]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_a_logged_step(out, p)
    t = time.time()
    p.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = p.communicate(timeout=120)
    assert time.time() - t < 25, err[-3000:]  # well before torchrun's 30 s SIGKILL: no rank waited in a collective
    meta = read_meta(latest_checkpoint(out))
    assert meta["world_size"] == 2 and meta["step"] < steps
    assert f"interrupted by SIGTERM at step {meta['step']}: checkpoint" in err, err[-3000:]
    assert len(read_train_state_data(latest_checkpoint(out))) == 2  # both ranks' data positions were gathered

    # resumed under torchrun, it ends as a 2-process run that was never stopped
    at, ref = meta["step"], tmp_path / "ref"
    for run, extra in ((out, ("--resume",)), (ref, ())):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519",
               "-m", "mergevq_cli", *train_args(run, steps, "--set", "train.batch_size=8",
                                                "--set", "train.ckpt_every=1000", *extra)]
        res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = rows(ref), rows(out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    after = [(comparable(x), comparable(y)) for x, y in zip(a, b) if x["step"] > at]
    assert after and all(x == y for x, y in after), [(x, y) for x, y in after if x != y][:1]


def read_train_state_data(ckpt: Path) -> list:
    from mergevq_core.checkpoint import read_train_state

    return read_train_state(ckpt)["data"]


@pytest.mark.parametrize("recipe, needles", [
    ("g", ["data.root", "model.encoder.dinov2_weights", "loss.vgg_weights", "loss.teacher_weights"]),
    ("gr", ["data.root", "model.encoder.dinov2_weights"]),
    ("r", ["data.root", "loss.teacher_weights"]),
])
def test_paper_recipes_without_files_stop_before_the_first_step(tmp_path, recipe, needles):
    p = cli("train-tokenizer", f"recipes/{recipe}.yaml", "--out", str(tmp_path / recipe), "--device", "cpu")
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / recipe).exists()


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    with pytest.raises(Exception, match="holds no checkpoint"):
        train_tokenizer(ROOT / "recipes/tiny.yaml", FAST_TRAIN, out=tmp_path / "none", resume=True, max_steps=2, device="cpu")
    train_tokenizer(ROOT / "recipes/tiny.yaml", FAST_TRAIN, out=tmp_path / "a", max_steps=2, device="cpu")
    with pytest.raises(ConfigError, match="--resume"):
        train_tokenizer(ROOT / "recipes/tiny.yaml", FAST_TRAIN, out=tmp_path / "a", max_steps=2, device="cpu")


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch

    from mergevq_core.train import tokenizer_step
    from mergevq_core.train.loop import TrainingDiverged

    calls = {"n": 0}
    real = tokenizer_step.recon_loss

    def poisoned(x_hat, x, kind):
        calls["n"] += 1
        loss = real(x_hat, x, kind)
        return loss * torch.nan if calls["n"] > 5 else loss

    monkeypatch.setattr(tokenizer_step, "recon_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="diverged at step 5.*step_0000004"):
        train_tokenizer(ROOT / "recipes/tiny.yaml", FAST_TRAIN, out=tmp_path / "nan", max_steps=10, device="cpu")
    assert read_meta(latest_checkpoint(tmp_path / "nan"))["step"] == 4


def test_run_folder_contents(tmp_path):
    res = train_tokenizer(ROOT / "recipes/tiny.yaml", FAST_TRAIN, out=tmp_path / "r", max_steps=4, device="cpu")
    run = tmp_path / "r"
    for name in ("config.json", "metrics.jsonl", "loss_curve.png", "preview.png"):
        assert (run / name).is_file(), name
    ck = latest_checkpoint(run)
    assert {p.name for p in ck.iterdir()} == {"tokenizer.safetensors", "ema.safetensors", "disc.safetensors", "meta.json", "train_state.pt"}
    assert res.steps == 4 and set(res.psnr_by_tokens) == {16, 64} and res.psnr == res.psnr_by_tokens[64]
    assert res.final_losses["total"] > 0
    assert 0 < res.codebook_usage <= 1 and 0 <= res.source_recovery_acc <= 1


def wait_for_a_logged_step(run: Path, proc: subprocess.Popen, timeout: float = 120, after: int = 0) -> None:
    """Until metrics.jsonl has a training row past step `after` (a resumed run appends to the stopped one's)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = run / "metrics.jsonl"
        if path.exists() and any('"loss"' in line and json.loads(line).get("step", 0) > after
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.02)
    raise AssertionError("the run logged no step in time")


def stop_with(sig: int, proc: subprocess.Popen, run: Path, steps: int, after: int = 0) -> tuple[int, str]:
    """Send `sig` once the run logged a step past `after`; check the clean stop; return (its step, its stderr line)."""
    wait_for_a_logged_step(run, proc, after=after)
    t = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    took = time.time() - t
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == EXIT_PREEMPTED and len(lines) == 1, err
    at = read_meta(latest_checkpoint(run))["step"]
    assert at < steps, "the run finished before the signal"
    name = signal.Signals(sig).name
    assert f"interrupted by {name} at step {at}: checkpoint {run / 'checkpoints' / f'step_{at:07d}'}" in lines[0], lines[0]
    assert f"--resume (--out {run})" in lines[0] and took < 60, (lines[0], took)
    return at, lines[0]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted 12-step CLI run and its --json result."""
    run = tmp_path_factory.mktemp("full") / "run"
    p = cli(*train_args(run, 12))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return run, json.loads(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_stops_with_a_checkpoint_and_resume_continues_exactly(tmp_path, full_run, sig):
    steps, run = 12, tmp_path / "stopped"
    at, _ = stop_with(sig, cli(*train_args(run, steps, "--set", "train.ckpt_every=1000")), run, steps)
    resumed = cli(*train_args(run, steps, "--resume"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads(out)["resumed_from"] == at
    a, b = rows(full_run[0]), rows(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    after = [(x, y) for x, y in zip(a, b) if x["step"] > at]
    assert after and all(comparable(x) == comparable(y) for x, y in after)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, full_run):
    run = tmp_path / "done"
    shutil.copytree(full_run[0], run)
    before = (run / "metrics.jsonl").read_text()
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    p = cli(*train_args(run, 12, "--resume"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    res = json.loads(out)
    assert (run / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == folders
    assert res["steps"] == res["resumed_from"] == 12
    same = ("psnr", "psnr_by_tokens", "codebook_usage", "source_recovery_acc", "final_losses", "steps")
    assert {k: res[k] for k in same} == {k: full_run[1][k] for k in same}
    p = cli(*[a for a in train_args(run, 12, "--resume") if a != "--json"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "already finished at step 12" in out, out + err


def test_resume_refuses_a_changed_recipe_but_not_a_longer_run(tmp_path, full_run):
    run = tmp_path / "other"
    shutil.copytree(full_run[0], run)
    before = (run / "config.json").read_text()
    p = cli(*train_args(run, 12, "--resume", "--set", "train.lr=0.5"))
    _, err = p.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1, err
    assert f"--resume: {run} was trained with train.lr=0.001, this recipe gives 0.5" in lines[0], lines[0]
    assert (run / "config.json").read_text() == before
    from mergevq_core.config import config_to_dict, load_config
    from mergevq_core.train.loop import refuse_changed_config

    longer = config_to_dict(load_config(ROOT / "recipes/tiny.yaml", [*FAST_TRAIN, "train.max_steps=40"]))
    refuse_changed_config(run, longer)  # a longer run (and other cadences) may be resumed


def test_keep_checkpoints_and_the_minutes_cadence(tmp_path, monkeypatch):
    from mergevq_core import checkpoint

    saved, real = [], checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda run, step, *a, **kw: saved.append(step) or real(run, step, *a, **kw))
    extra = ("train.ckpt_every=1000", "train.ckpt_minutes=1e-6", "train.keep_checkpoints=1")
    train_tokenizer(ROOT / "recipes/tiny.yaml", (*FAST_TRAIN, *extra), out=tmp_path / "r", max_steps=3, device="cpu")
    assert saved == [1, 2, 3]  # the time cadence: every step here
    assert [p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*")] == ["step_0000003"]
    assert read_meta(latest_checkpoint(tmp_path / "r"))["step"] == 3
