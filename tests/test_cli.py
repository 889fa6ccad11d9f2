"""The CLI as a user meets it: help, JSON output, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mergevq_cli.app import app
from mergevq_core.config import load_config
from mergevq_core.models import build_tokenizer

from .conftest import ROOT

runner = CliRunner()
BUILT = ["info", "train-tokenizer", "train-ar", "reconstruct", "tokenize", "tune-recovery", "generate", "probe", "evaluate",
         "benchmark", "demo", "weights", "export"]  # commands that exist; the others are not listed until they work


def mergevq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergevq_cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_help_lists_only_built_commands():
    import typer

    assert sorted(typer.main.get_command(app).commands) == sorted(BUILT)
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and all(cmd in res.output for cmd in BUILT)


@pytest.mark.parametrize("cmd", BUILT)
def test_each_command_has_help(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0 and "Examples" in res.output


def test_info_json_has_the_documented_keys():
    res = runner.invoke(app, ["info", str(ROOT / "recipes" / "tiny.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    # the parts add up to the whole, and the whole is what the recipe's tokenizer really holds
    parts = ("encoder", "decoder", "source_recovery", "align_head")
    assert sum(obj["params"][key] for key in parts) == obj["params"]["total"]
    tok = build_tokenizer(load_config(ROOT / "recipes" / "tiny.yaml"))
    assert obj["params"]["total"] == sum(p.numel() for p in tok.parameters())
    assert obj["params"]["decoder"] == sum(p.numel() for p in tok.decoder.parameters())
    assert set(obj["gmacs"]) >= {"encoder", "decoder"}
    assert obj["tokens"]["N"] == 64 and obj["tokens"]["K"] == 36
    assert sum(obj["schedule"]) == 64 - 36 and obj["codebook_size"] == 2**16


def test_info_tokens_and_set():
    res = runner.invoke(app, ["info", str(ROOT / "recipes" / "tiny.yaml"), "--tokens", "49", "--set", "model.decoder.depth=1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tokens"]["K"] == 49


def test_info_on_a_generator_recipe():
    res = runner.invoke(app, ["info", str(ROOT / "recipes" / "ar" / "mergear-l.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["kind"] == "ar" and obj["generator"] == "mergear" and abs(obj["params"]["total"] / 343e6 - 1) < 0.01
    assert obj["tokens"]["window"] == 17 and obj["kv_bytes_per_token"] == 2 * 24 * 1024 * 2
    res = runner.invoke(app, ["info", str(ROOT / "recipes" / "ar" / "tiny.yaml")])
    assert res.exit_code == 0 and "8 + 8 bits" in res.output


def test_info_table_output():
    res = mergevq("info", "recipes/gr.yaml")
    assert res.returncode == 0
    assert "62.67" in res.stdout and "45.50" in res.stdout  # encoder GMACs at K = 144 under the square schedule


@pytest.mark.parametrize(
    "args, needle",
    [
        (["info", "recipes/missing.yaml"], "recipe not found"),
        (["info", "pyproject.toml"], "malformed YAML"),
        (["info", "recipes/gr.yaml", "--tokens", "150"], "perfect square"),
        (["info", "recipes/gr.yaml", "--set", "model.decodr.depth=2"], "did you mean 'model.decoder'"),
        (["info", "recipes/ar/tiny.yaml", "--set", "generator.window=0"], "generator.window must be >= 1"),
        (["train-ar", "recipes/gr.yaml"], "tokenizer recipe"),
        (["train-tokenizer", "recipes/ar/tiny.yaml"], "kind: ar"),
        (["info", "recipes/tiny.yaml", "--set", "data.root=/data/train"], "data.root is set but data.source is shapes"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, needle):
    res = mergevq(*args)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n  name: x\n")
    res = mergevq("info", str(bad))
    assert res.returncode == 1 and "malformed YAML" in res.stderr and "Traceback" not in res.stderr


def test_debug_shows_traceback():
    res = mergevq("--debug", "info", "recipes/missing.yaml")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_importing_the_package_and_help_stay_light():
    code = "import sys, mergevq_core, mergevq_cli.app; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "False"
