"""Atomic checkpoints, strict loading, and files that never execute code."""

from __future__ import annotations

import errno
import json
import pathlib
import sys

import pytest
import torch
from torch import nn

from mergevq_core.errors import CheckpointError
from mergevq_core import checkpoint as ck


def _save(run, step, value=1.0, **kw):
    return ck.save_checkpoint(run, step, {"model": {"w": torch.full((2, 3), value)}}, {"step": step, "opt": {"lr": 0.1}},
                              {"kind": "tokenizer"}, **kw)


def test_round_trip_and_latest(tmp_path):
    path = _save(tmp_path, 10, 2.0)
    assert ck.latest_checkpoint(tmp_path) == path == ck.resolve_checkpoint(tmp_path)
    assert torch.equal(ck.read_tensors(path, "model")["w"], torch.full((2, 3), 2.0))
    assert ck.read_train_state(path) == {"step": 10, "opt": {"lr": 0.1}}
    meta = ck.read_meta(path)
    assert meta["step"] == 10 and meta["kind"] == "tokenizer" and meta["format_version"] == ck.FORMAT_VERSION


def test_keeps_only_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in (tmp_path / ck.CKPT_DIR).glob("step_*")) == ["step_0000003", "step_0000004"]


def test_pruning_never_deletes_the_checkpoint_latest_points_to(tmp_path):
    _save(tmp_path, 8)  # a later step left behind, e.g. by a crash before `latest` moved
    path = _save(tmp_path, 5, keep_last=1)  # a resume of step 4 that saved step 5
    assert ck.latest_checkpoint(tmp_path) == path and path.is_dir()
    assert [p.name for p in (tmp_path / ck.CKPT_DIR).glob("step_*")] == ["step_0000005"]


def test_configs_saved_before_the_preemption_fields_still_load():
    from mergevq_core.config import config_from_dict, config_to_dict, load_recipe

    from .conftest import ROOT

    for recipe, kind in (("recipes/tiny.yaml", None), ("recipes/ar/tiny.yaml", "ar")):
        old = config_to_dict(load_recipe(ROOT / recipe))
        for key in ("ckpt_minutes", "keep_checkpoints"):
            del old["train"][key]
        cfg = config_from_dict(old, kind=kind)
        assert cfg.train.ckpt_minutes is None and cfg.train.keep_checkpoints == 2


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 5)

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(CheckpointError, match=f"step 6 .*No space left on device; {good} .* is intact"):
        _save(tmp_path, 6)
    assert ck.latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / ck.CKPT_DIR).iterdir() if p.name.startswith(".")] == []  # no debris


def test_train_state_refuses_pickled_code(tmp_path):
    path = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, path / "train_state.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        ck.read_train_state(path)


def test_damaged_files_give_one_line_errors(tmp_path):
    path = _save(tmp_path, 1)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        ck.read_tensors(path, "model")
    with pytest.raises(CheckpointError, match="no other weights"):
        ck.read_tensors(path, "other")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        ck.read_meta(path)
    with pytest.raises(CheckpointError, match="not found"):
        ck.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ck.resolve_checkpoint(tmp_path / "empty")


def test_strict_loading_names_the_keys():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    sd = model.state_dict()
    ck.load_state_strict(model, sd, "ok")
    bad = {**sd, "extra.weight": torch.zeros(1)}
    bad.pop("1.bias")
    bad["0.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match=r"missing: 1\.bias.*unexpected: extra\.weight.*wrong shape: 0\.weight"):
        ck.load_state_strict(model, bad, "ckpt")


def test_training_on_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from mergevq_cli import app as app_module

    real, calls = ck.torch.save, []

    def fills_up(*a, **k):  # the first checkpoint fits, the second finds the disk full
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ck.torch, "save", fills_up)
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["mergevq", "train-tokenizer", "recipes/tiny.yaml", "--out", str(run), "--max-steps",
                                      "2", "--set", "train.ckpt_every=1", "--set", "train.eval_images=8", "--json"])
    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exc:
        app_module.main()
    assert exc.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "step 2" in lines[0] and "No space left" in lines[0] and "step_0000001" in lines[0]
    assert ck.latest_checkpoint(run).name == "step_0000001"
    assert not [p for p in (run / ck.CKPT_DIR).iterdir() if p.name.startswith(".")]


def test_a_file_given_as_a_checkpoint_folder_says_so(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match="is a file, not a run or checkpoint folder"):
        ck.resolve_checkpoint(f)
    with pytest.raises(CheckpointError, match="holds no checkpoint yet"):
        ck.resolve_checkpoint(tmp_path)
