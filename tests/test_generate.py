"""`mergevq generate` end to end on a tiny tokenizer → shards → generator pipeline built in the fixture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mergevq_core import api
from mergevq_core.errors import CheckpointError, ConfigError, DataError
from mergevq_core.generation import generate_images
from mergevq_core.generators import SamplingSettings
from mergevq_core.shipped import shipped_path

from .conftest import ROOT

GENS = ("llamagen", "mergear", "randar")
JSON_KEYS = {"ar_s", "ckpt", "classes", "consistency", "decode_s", "fid", "forward_passes_per_batch", "grid", "images",
             "images_per_s", "inception_score", "n_per_class", "npz", "sampler", "settings", "tokenizer", "tokens",
             "tokens_per_s", "wall_s", "samples", "made", "other_s", "recovery"}
AR_FAST = ("model.depth=1", "model.dim=32", "model.heads=4", "model.vocab_size=null", "model.n_tokens=null",
           "model.num_classes=null", "train.batch_size=16", "train.micro_batch=16", "train.eval_every=1000",
           "train.ckpt_every=1000", "data.val_items=16")


@pytest.fixture(scope="module")
def pipeline(tiny_tokenizer_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    api.tokenize("shapes", root / "tokens", ckpt=tiny_tokenizer_run, tokens_sample=True, limit=96, device="cpu",
                 batch=48, shard_size=48)
    for g in GENS:
        api.train_ar(ROOT / "recipes/ar/tiny.yaml", AR_FAST, shards=root / "tokens", generator=g,
                     out=root / "runs" / f"tiny-{g}", max_steps=2, device="cpu")
    return root


def run(pipeline, sampler, tmp_path, **kw):
    args = dict(classes=[0, 3], per_class=2, sampler=sampler, ckpt=pipeline / "runs" / f"tiny-{sampler}",
                settings=SamplingSettings(cfg=2.0, top_k=50), steps=None, seed=0, batch=3, out=tmp_path / sampler,
                device="cpu")
    args.update(kw)
    return generate_images(**args)


@pytest.mark.parametrize("sampler", GENS)
def test_each_sampler_writes_grid_images_and_npz(pipeline, tmp_path, sampler):
    res = run(pipeline, sampler, tmp_path, png=True)
    assert len(res.images) == 4 and all((tmp_path / sampler / "images").joinpath(p.split("/")[-1]).is_file() for p in res.images)
    with np.load(res.npz) as z:  # the ADM evaluator's layout
        assert z["arr_0"].shape == (4, 32, 32, 3) and z["arr_0"].dtype == np.uint8 and z["labels"].tolist() == [0, 0, 3, 3]
    from PIL import Image

    assert Image.open(res.grid).size == (3 * (2 * 34 + 2),) * 2  # 2 classes × 2 samples of 32 px, 2 px gaps, ×3 to view
    obj = res.to_json()
    mergear_keys = {"peak_cache_slots", "plain_cache_slots", "distinct_ids", "distinct_ids_min", "distinct_ids_max",
                    "window"}
    assert set(obj) == JSON_KEYS | (mergear_keys if sampler == "mergear" else set())
    assert obj["sampler"] == sampler
    # tokens/s counts the image tokens each sampler decodes (N raster ids, K randar ids) over the AR time alone
    seq = obj["tokens"] if sampler == "randar" else 64
    assert obj["tokens_per_s"] == pytest.approx(4 * seq / obj["ar_s"]) and obj["wall_s"] > obj["ar_s"] + obj["decode_s"]
    from mergevq_core.generators import default_steps

    steps = default_steps(obj["tokens"]) if sampler == "randar" else None
    assert obj["settings"]["steps"] == steps
    assert obj["forward_passes_per_batch"] == (steps if sampler == "randar" else 64)  # batches of 3 and 1 images
    if sampler == "mergear":
        assert obj["plain_cache_slots"] == 2 + 64 - 1 and obj["window"] == 8 + 1  # the grid side + 1
        assert 1 + obj["distinct_ids_max"] <= obj["peak_cache_slots"] <= 2 + obj["window"] + obj["distinct_ids_max"]
        assert obj["distinct_ids_min"] <= obj["distinct_ids"] <= obj["distinct_ids_max"]
    assert json.loads((tmp_path / sampler / "result.json").read_text())["sampler"] == sampler


@pytest.mark.parametrize("sampler", ["mergear", "randar"])
def test_same_seed_same_images(pipeline, tmp_path, sampler):
    a = run(pipeline, sampler, tmp_path / "a", settings=SamplingSettings(temperature=1.0))
    b = run(pipeline, sampler, tmp_path / "b", settings=SamplingSettings(temperature=1.0))
    c = run(pipeline, sampler, tmp_path / "c", settings=SamplingSettings(temperature=1.0), seed=1)
    load = lambda r: np.load(r.npz)["arr_0"]
    assert np.array_equal(load(a), load(b)) and not np.array_equal(load(a), load(c))


def test_compiled_decoding_gives_the_eager_images(pipeline, tmp_path):
    """`generate --compile` (inductor, one graph per batch shape) against eager decoding, same seed."""
    eager = run(pipeline, "mergear", tmp_path / "eager", batch=4)
    compiled = run(pipeline, "mergear", tmp_path / "compiled", batch=4, compile=True)
    assert np.array_equal(np.load(eager.npz)["arr_0"], np.load(compiled.npz)["arr_0"])
    assert compiled.settings["precision"] == "fp32"


def test_newest_run_of_the_sampler_is_used(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(pipeline)
    res = run(pipeline, "randar", tmp_path, ckpt=None)
    assert "tiny-randar" in res.ckpt
    monkeypatch.chdir(tmp_path)  # no mergear run here: the shipped one, with its own tokenizer
    res = run(pipeline, "mergear", tmp_path, ckpt=None)
    assert Path(res.ckpt) == shipped_path("mergear") and Path(res.tokenizer) == shipped_path("tokenizer").resolve()


@pytest.mark.parametrize("extra, needle", [
    (["--class", "10"], "--class 10 is out of range: this generator has classes 0..9"),
    (["--class", "1", "--sampler", "maskgit"], "--sampler 'maskgit'"),
    (["--class", "1", "--ckpt", "TOKENIZER"], "is a tokenizer checkpoint, not a generator"),
    (["--class", "1", "--sampler", "randar", "--ckpt", "MERGEAR"], "holds a mergear generator"),
    (["--class", "1", "--tokens", "10"], "--tokens 10: K must be a perfect square"),
    (["--class", "1", "--sampler", "randar", "--ckpt", "RANDAR", "--compile"], "--compile: randar's parallel steps"),
    (["--class", "1", "--precision", "fp16"], "--precision 'fp16'"),
])
def test_bad_input_is_one_line(pipeline, tiny_tokenizer_run, extra, needle):
    args = [a.replace("TOKENIZER", str(tiny_tokenizer_run)).replace("MERGEAR", str(pipeline / "runs" / "tiny-mergear"))
            .replace("RANDAR", str(pipeline / "runs" / "tiny-randar")) for a in extra]
    if "--ckpt" not in args:
        args += ["--ckpt", str(pipeline / "runs" / "tiny-mergear")]
    if "--sampler" not in args:
        args += ["--sampler", "mergear"]
    res = subprocess.run([sys.executable, "-m", "mergevq_cli", "generate", *args, "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and needle in lines[0], res.stderr


def test_gfid_is_and_consistency(pipeline, tiny_tokenizer_run, tmp_path, inception_stand_in, monkeypatch):
    from mergevq_core.eval import consistency as cons
    from mergevq_core.eval.gen_metrics import gfid, inception_score
    from mergevq_core.runs import load_tokenizer

    real, made = cons.classifier_for, []  # a quick classifier: the cached-classifier path is what is tested here

    def quick(*a, **k):
        made.append(real(*a, **{**k, "train_count": 128, "epochs": 1, "root": tmp_path / "clf"}))
        return made[-1]

    monkeypatch.setattr(cons, "classifier_for", quick)
    res = run(pipeline, "mergear", tmp_path, fid="shapes", inception_weights=inception_stand_in, with_consistency=True)
    with np.load(res.npz) as z:
        images, labels = torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2), torch.from_numpy(z["labels"])
    cpu = torch.device("cpu")
    # the metrics are those of the saved samples
    # streamed from the samples file: the same FID as the in-memory way on the same samples (the acceptance's 1e-3)
    assert res.fid["fid"] == pytest.approx(gfid(images, "shapes", inception_stand_in, cpu, 0)["fid"], abs=1e-3)
    assert res.fid["reference_images"] == 4 and res.fid["samples"] == 4
    assert 0 <= res.fid["precision"] <= 1 and 0 <= res.fid["recall"] <= 1
    assert res.inception_score == pytest.approx(inception_score(images, inception_stand_in, cpu))
    c = res.consistency
    clf, report = made[0]
    with torch.no_grad():
        hit = (clf(images.float() / 127.5 - 1).argmax(1) == labels).float()
    assert c["consistency"] == pytest.approx(float(hit.mean())) and c["samples"] == 4
    assert c["per_class"] == pytest.approx({"0": float(hit[:2].mean()), "3": float(hit[2:].mean())})
    # the classifier's accuracies, recomputed on its 1,000 held-out images and their reconstructions at K = 16
    xv, yv = cons._labelled_images(report["data"], 32, 1000, "val")
    tok, _ = load_tokenizer(tiny_tokenizer_run, "cpu")
    with torch.no_grad():
        acc = lambda x: float((torch.cat([clf(x[i:i + 250]) for i in range(0, 1000, 250)]).argmax(1) == yv).float().mean())
        assert c["classifier_val_acc_real"] == pytest.approx(acc(xv))
        recon, predicted = [], []
        for i in range(0, 1000, 250):
            enc = tok.encode(xv[i:i + 250], tokens=16)
            recon.append(tok.decode_codes(enc.quantized, enc.assign).clamp(-1, 1))
            predicted.append(tok.decode(enc.ids, tok.predict_assign(enc.ids)).clamp(-1, 1))
        assert c["classifier_val_acc_recon"] == pytest.approx(acc(torch.cat(recon)), abs=2e-3)
        assert c["classifier_val_acc_recon_predicted"] == pytest.approx(acc(torch.cat(predicted)), abs=2e-3)
    assert len(list((tmp_path / "clf").glob("*/classifier.safetensors"))) == 1
    assert c["ceiling"] == c["classifier_val_acc_recon"]  # mergear decodes with the true (Position Cache) source
    again = run(pipeline, "mergear", tmp_path / "again", fid=None, with_consistency=True)  # cached: loads, no training
    assert again.consistency["classifier_val_acc_real"] == c["classifier_val_acc_real"]
    rand = run(pipeline, "randar", tmp_path / "r", fid=None, with_consistency=True).consistency
    assert rand["ceiling"] == c["classifier_val_acc_recon_predicted"]  # randar decodes with the predicted source
    assert rand["reference_tokens"] == c["reference_tokens"] == 16  # the test tokenizer's K
    # samples decoded at another K are compared with reconstructions at that K, measured once and cached
    r49 = run(pipeline, "randar", tmp_path / "r49", fid=None, with_consistency=True, tokens=49).consistency
    assert r49["reference_tokens"] == 49 and r49["ceiling"] == r49["classifier_val_acc_recon_predicted"]
    cached = json.loads(next((tmp_path / "clf").glob("*/meta.json")).read_text())
    assert cached["at_tokens"]["49"]["val_acc_recon_predicted"] == r49["ceiling"] and "folder" not in cached


def test_fid_statistics_file(pipeline, tmp_path, inception_stand_in):
    from mergevq_core.eval.gen_metrics import gfid, load_reference, save_fid_stats

    real = load_reference("shapes", 32, 6)
    stats = save_fid_stats(tmp_path / "ref.npz", real, inception_stand_in, torch.device("cpu"))
    fake = load_reference("shapes", 32, 6, seed=1)
    by_stats = gfid(fake, str(stats), inception_stand_in, torch.device("cpu"))["fid"]
    by_images = gfid(fake, "shapes", inception_stand_in, torch.device("cpu"))["fid"]
    assert by_stats == pytest.approx(by_images, rel=1e-6)
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="must hold arrays 'mu'"):
        gfid(fake, str(tmp_path / "bad.npz"), inception_stand_in, torch.device("cpu"))


def test_config_errors_without_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="at least one --class"):
        generate_images([], 1, "mergear", settings=SamplingSettings(), device="cpu")


# ----------------------------------------------------------------------------- the 50k protocol at small size


def cli_generate(pipeline, out, *extra, procs=1, per_class=2, timeout=300):
    """`mergevq generate --classes all ...` on the tiny mergear, in 1 process or under torchrun (gloo)."""
    args = ["--classes", "all", "--per-class", str(per_class), "--sampler", "mergear", "--ckpt", str(pipeline / "runs" / "tiny-mergear"),
            "--cfg", "2", "--shard-size", "6", "--out", str(out), "--device", "cpu", *extra]
    launcher = [sys.executable, "-m", "mergevq_cli"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "mergevq_cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "generate", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def arr(out):
    with np.load(out / "samples.npz") as z:
        return z["arr_0"], z["labels"]


def test_images_do_not_depend_on_processes_or_batch(pipeline, tmp_path):
    one = cli_generate(pipeline, tmp_path / "A", "--batch", "4")
    assert one.returncode == 0, one.stderr
    two = cli_generate(pipeline, tmp_path / "B", "--batch", "4", procs=2)
    assert two.returncode == 0, two.stderr
    other = cli_generate(pipeline, tmp_path / "C", "--batch", "7")
    assert other.returncode == 0, other.stderr
    (a, la), (b, lb), (c, lc) = arr(tmp_path / "A"), arr(tmp_path / "B"), arr(tmp_path / "C")
    assert a.shape == (20, 32, 32, 3) and la.tolist() == [c_ for c_ in range(10) for _ in range(2)]
    assert a.tobytes() == b.tobytes() == c.tobytes() and la.tolist() == lb.tolist() == lc.tolist()
    assert len(list((tmp_path / "B" / "shards").glob("shard_*.npz"))) == 4  # 20 samples in shards of 6
    from PIL import Image

    assert Image.open(tmp_path / "A" / "grid.png").size == (3 * (2 * 34 + 2), 3 * (8 * 34 + 2))  # 8 of 10 classes


def test_sigkill_then_rerun_finishes_the_same_images_without_rewriting(pipeline, tmp_path):
    ref = cli_generate(pipeline, tmp_path / "full", "--batch", "2", per_class=4)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "part"
    args = [sys.executable, "-m", "mergevq_cli", "generate", "--classes", "all", "--per-class", "4", "--sampler", "mergear",
            "--ckpt", str(pipeline / "runs" / "tiny-mergear"), "--cfg", "2", "--shard-size", "6", "--batch", "2",
            "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "shards" / "shard_00000.npz"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard_*.npz")}
    assert "shard_00000.npz" in done and not (out / "samples.npz").exists()
    again = cli_generate(pipeline, out, "--batch", "2", per_class=4)
    assert again.returncode == 0, again.stderr
    assert all((out / "shards" / name).stat().st_mtime_ns == t for name, t in done.items())  # not rewritten
    assert arr(out)[0].tobytes() == arr(tmp_path / "full")[0].tobytes()
    # other settings on the same folder: one line, nothing touched
    bad = cli_generate(pipeline, out, "--batch", "2", "--cfg", "3", per_class=4)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode != 0 and len(lines) == 1 and "other settings (cfg: 2.0 → 3.0)" in lines[0], bad.stderr


def test_classes_and_counts(tmp_path):
    from mergevq_core.generation import parse_classes, plan_labels

    assert parse_classes("all", 4) == [0, 1, 2, 3] and parse_classes("2-4,7", 10) == [2, 3, 4, 7]
    assert plan_labels([5, 6, 7], None, 8).tolist() == [5, 5, 5, 6, 6, 6, 7, 7]  # spread evenly, first ones get more
    assert plan_labels([1, 2], 3, None).tolist() == [1, 1, 1, 2, 2, 2]
    for bad in ("x", "5-2", "1,,a"):
        with pytest.raises(ConfigError, match="--classes"):
            parse_classes(bad, 10)
    with pytest.raises(ConfigError, match="either --per-class or --num-samples"):
        plan_labels([1], 2, 3)
