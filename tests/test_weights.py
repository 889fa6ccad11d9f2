"""Shipped weights, `mergevq export` (the Hugging Face layout) and loading from the Hugging Face cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergevq_core import checkpoint as ck
from mergevq_core.errors import CheckpointError
from mergevq_core.export import export
from mergevq_core.generation import generate_images
from mergevq_core.generators import SamplingSettings
from mergevq_core.runs import find_generator_checkpoint, load_generator, load_tokenizer, tokenizer_of_generator
from mergevq_core.shipped import NAMES, shipped_path, shipped_weights

from .test_generate import GENS, pipeline  # noqa: F401 (the fixture: a tokenizer run and its generators)


def test_every_shipped_model_loads_and_is_described():
    rows = {r["name"]: r for r in shipped_weights()}
    assert set(rows) == set(NAMES)
    assert sum(r["bytes"] for r in rows.values()) < 20e6
    tok, _ = load_tokenizer(shipped_path("tokenizer"), "cpu")
    assert rows["tokenizer"]["params"] == sum(v.numel() for v in ck.read_tensors(shipped_path("tokenizer"), "ema").values())
    figs = rows["tokenizer"]["figures"]
    assert figs["float16_check"]["codes_equal"] > 0.99
    assert abs(figs["float16_check"]["psnr_float16"] - figs["float16_check"]["psnr_float32"]) < 0.05
    for name in GENS:
        row = rows[name]
        assert row["kind"] == "generator" and row["dtype"] == "float16" and row["steps"] > 0
        assert any(f"--generator {name}" in c for c in row["commands"]) and "consistency" in row["figures"]
        gen, meta = load_generator(shipped_path(name), "cpu", expect=name)
        gen_tok, path = tokenizer_of_generator(meta)  # the hash check passes: the tokenizer ships once
        assert path == shipped_path("tokenizer").resolve() and gen.cfg.vocab_size == 2 ** tok.cfg.quant.dim
    assert all("/work/" not in c for r in rows.values() for c in r["commands"])  # commands anyone can run


def test_shipped_mergear_scores_the_consistency_its_card_states(tmp_path, monkeypatch, capfd):
    """100 samples at the card's CFG (the card: 500), with the shipped classifier: within sampling noise."""
    monkeypatch.chdir(tmp_path)  # no runs/ here: the shipped weights, said in one line
    card = json.loads((shipped_path("mergear") / ck.EXPORT_CONFIG).read_text())["export"]["figures"]
    res = generate_images([], None, "mergear", num_samples=100, class_spec="all", seed=0, out=tmp_path / "s",
                          settings=SamplingSettings(cfg=card["consistency_cfg"]), device="cpu", with_consistency=True)
    notes = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("note: using the shipped")]
    assert len(notes) == 1, notes  # the generator; its tokenizer is the one it records, not a fallback
    assert abs(res.consistency["consistency"] - card["consistency"]) < 0.15, (res.consistency, card)
    assert not (tmp_path / "runs" / "classifiers").exists()  # the shipped classifier was used, not retrained


def test_a_users_run_takes_precedence_over_the_shipped_weights(pipeline, monkeypatch):
    monkeypatch.chdir(pipeline)
    assert find_generator_checkpoint(None, "llamagen").parent.parent == Path("runs/tiny-llamagen")
    with pytest.raises(CheckpointError, match="checkpoint not found: runs/tiny-nothing"):
        find_generator_checkpoint("runs/tiny-nothing", "llamagen")  # an explicit --ckpt never falls back


def test_export_round_trip_gives_identical_outputs(tiny_tokenizer_run, tmp_path):
    res = export(tiny_tokenizer_run, tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    card = (tmp_path / "tok" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mergevq") and f"steps: {res.step}" in card
    a, _ = load_tokenizer(tiny_tokenizer_run, "cpu")
    b, path = load_tokenizer(tmp_path / "tok", "cpu")
    assert path == tmp_path / "tok"
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ea, eb = a.encode(x), b.encode(x)
        assert torch.equal(ea.ids, eb.ids) and torch.equal(ea.assign, eb.assign)
        assert torch.equal(a.decode(ea.ids, ea.assign), b.decode(eb.ids, eb.assign))
    half = export(tiny_tokenizer_run, tmp_path / "tok16", dtype="float16")
    assert half.bytes < res.bytes * 0.7
    c, _ = load_tokenizer(tmp_path / "tok16", "cpu")
    assert next(c.parameters()).dtype == torch.float32  # stored in half, run in float32
    with pytest.raises(CheckpointError, match="already exists"):
        export(tiny_tokenizer_run, tmp_path / "tok")


def test_an_exported_generator_carries_its_tokenizer_and_samples_the_same(pipeline, tmp_path):
    src = pipeline / "runs" / "tiny-mergear"
    res = export(src, tmp_path / "gen")
    assert res.tokenizer is not None and (tmp_path / "gen" / "tokenizer" / "model.safetensors").is_file()
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "gen", moved)  # the tokenizer is found inside the folder, wherever it goes
    kw = dict(classes=[0, 3], per_class=2, sampler="mergear", settings=SamplingSettings(cfg=2.0), seed=0, batch=4,
              device="cpu")
    a = generate_images(ckpt=src, out=tmp_path / "a", **kw)
    b = generate_images(ckpt=moved, out=tmp_path / "b", **kw)
    assert np.array_equal(np.load(a.npz)["arr_0"], np.load(b.npz)["arr_0"])
    with pytest.raises(CheckpointError, match="holds a mergear generator, not llamagen"):
        load_generator(moved, "cpu", expect="llamagen")


def _hf_cache(tmp_path: Path, folder: Path, repo: str) -> Path:
    """A Hugging Face hub cache holding `folder` as model repository `repo` (the layout huggingface_hub writes)."""
    cache = tmp_path / "hub"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    return cache


def test_a_repository_id_loads_from_the_local_hf_cache_offline(tiny_tokenizer_run, tmp_path):
    export(tiny_tokenizer_run, tmp_path / "tok")
    cache = _hf_cache(tmp_path, tmp_path / "tok", "someone/tiny-tokenizer")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    outs = []
    for spec in ("someone/tiny-tokenizer", "hf-hub:someone/tiny-tokenizer", str(tmp_path / "tok")):
        r = subprocess.run([sys.executable, "-m", "mergevq_cli", "reconstruct", "--photos", "--tokens", "16",
                            "--ckpt", spec, "--out", str(tmp_path / f"r{len(outs)}"), "--json"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append([row["psnr"] for row in json.loads(r.stdout)["images"]])
    assert outs[0] == outs[1] == outs[2]
    r = subprocess.run([sys.executable, "-m", "mergevq_cli", "reconstruct", "--photos", "--ckpt", "hf-hub:someone/absent"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "hf-hub:someone/absent" in r.stderr, r.stderr


def test_a_mistyped_path_never_reaches_the_network(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(CheckpointError, match=r"runs/typo \(no such folder, nor a Hugging Face repository in the local cache"):
        ck.resolve_checkpoint("runs/typo")


def test_weights_and_export_commands(tiny_tokenizer_run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mergevq_cli", "weights", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [w["name"] for w in json.loads(r.stdout)["weights"]] == list(NAMES)
    r = subprocess.run([sys.executable, "-m", "mergevq_cli", "export", str(tiny_tokenizer_run), str(tmp_path / "e"),
                        "--dtype", "int8"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --dtype int8"), r.stderr
