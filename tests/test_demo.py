"""`mergevq demo` at its smallest size: interrupted in its first training step, resumed, and its report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergevq_core.demo import STATE, plan
from mergevq_core.shipped import shipped_path

MINUTES = "0.05"  # the smallest steps: 20 tokenizer steps, 10 per generator, 600 shapes


def _demo(out: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergevq_cli", "demo", "--out", str(out), "--minutes", MINUTES, *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo stopped by SIGINT once its tokenizer has a checkpoint, then run again to the end."""
    cwd = tmp_path_factory.mktemp("demo")
    out = cwd / "runs" / "demo"
    proc = _demo(out, cwd)
    deadline = time.time() + 300
    while not (out / "tokenizer" / "checkpoints" / "latest").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, as in a terminal
    _, err = proc.communicate(timeout=120)
    first = json.loads((out / STATE).read_text())
    second = _demo(out, cwd, "--json")
    stdout, stderr = second.communicate(timeout=900)
    assert second.returncode == 0, stderr
    return {"out": out, "cwd": cwd, "first_code": proc.returncode, "first_err": err, "first": first,
            "result": json.loads(stdout)}


def test_an_interrupted_demo_resumes_and_finishes(demo):
    assert demo["first_code"] != 0 and "tokenizer" not in demo["first"]["steps"], demo["first_err"]
    assert "mergevq demo" in demo["first_err"].splitlines()[-1]  # says how to continue
    commands = (demo["out"] / "tokenizer" / "commands.txt").read_text()
    assert "resume at step" in commands  # the tokenizer continued from its checkpoint, not from scratch
    state = json.loads((demo["out"] / STATE).read_text())
    assert [s.name for s in plan(demo["out"], float(MINUTES))] == list(state["steps"])  # every step, in order


def test_the_report_shows_every_picture_and_reproducing_command(demo):
    out = demo["out"]
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images and all((out / p).is_file() for p in images)
    assert set(re.findall(r"\]\(([^)]+)\)", md)) == set(images)  # the Markdown shows the same pictures
    for needle in ("grid_mergear_demo.png", "grid_llamagen_demo.png", "grid_randar_demo.png", "recon_chelsea_k16.png",
                   "reconstructions_by_k.gif", "kv_cache.png", "probe_confusion.png"):
        assert f"report/{needle}" in images, needle
    if shipped_path("mergear") is not None:
        assert "report/grid_mergear_shipped.png" in images and "report/recon_chelsea_k36_shipped.png" in images
    state = json.loads((out / STATE).read_text())
    for step in state["steps"].values():
        assert f"<code>{step['command']}</code>" in page.replace("&quot;", '"').replace("&#x27;", "'")
    assert "mergevq train-tokenizer runs/demo/recipes/tiny.yaml --out runs/demo/tokenizer" in md.replace(str(demo["cwd"]) + "/", "")


def test_a_demo_refuses_other_minutes_and_a_foreign_folder(demo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mergevq_cli", "demo", "--out", str(demo["out"]), "--minutes", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "--minutes 3" in r.stderr and f"--minutes {MINUTES}" in r.stderr, r.stderr
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    r = subprocess.run([sys.executable, "-m", "mergevq_cli", "demo", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 1 and "is not empty and holds no demo" in r.stderr, r.stderr
