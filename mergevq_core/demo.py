"""`mergevq demo`: the whole pipeline at CPU size, from nothing but the installed package, into one report.

It trains the tiny tokenizer on the built-in shapes, reconstructs the built-in photographs at three K, tokenizes
the shapes, trains MergeAR, LlamaGen and RandAR briefly, samples a grid with each, runs the linear probe and the
KV-cache benchmark, and writes `report.html` and `report.md`. The quick models are shown beside the shipped
weights (`shipped`), which ran the same commands for longer.

Every step is a `mergevq` command run as a child process (`python -m mergevq_cli ... --json`), so the report
states the exact command that reproduces each one. `demo.json` records each finished step (its command, wall time
and JSON result): run the demo again after an interruption and it skips what is done and continues the step it
was in (training steps with `--resume`). `--minutes` scales the step counts, not a deadline.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, MergeVQError
from .fileio import write_atomic

__all__ = ["DemoError", "DemoInterrupted", "DemoProgress", "DemoStep", "plan", "run_demo"]

STATE = "demo.json"
KS = (16, 36, 64)  # the reconstructions' three K (of 64 tokens)
SAMPLERS = ("mergear", "llamagen", "randar")
CFG = {"mergear": 3.0, "llamagen": 6.0, "randar": 9.0}  # the scales the shipped weights' consistency was measured at


class DemoError(MergeVQError):
    """A step failed: the message names it, its command and its log."""


class DemoInterrupted(MergeVQError):
    """Ctrl-C or a signal stopped the demo: the message says how to continue."""

    exit_code = 130


@dataclass
class DemoStep:
    name: str
    title: str
    args: list[str]               # after `mergevq`
    estimate_s: float             # at the default size, on 2 quiet cores: the progress bar's weights
    section: str                  # the report section it belongs to
    run_dir: Path | None = None   # training steps: the run folder (progress from its metrics.jsonl, --resume)
    max_steps: int | None = None
    fresh: Path | None = None     # a folder the step writes whole: removed before a rerun of an unfinished step

    @property
    def command(self) -> str:
        return "mergevq " + shlex.join(self.args)


class DemoProgress:
    """What the demo reports as it goes (the CLI draws it; the default says nothing)."""

    def begin(self, total_s: float, done_s: float) -> None: ...
    def step(self, step: DemoStep) -> None: ...
    def fraction(self, f: float) -> None: ...
    def done(self, step: DemoStep, wall_s: float, skipped: bool) -> None: ...
    def end(self) -> None: ...


def _scaled(n: float, minutes: float, low: int) -> int:
    return max(low, int(round(n * minutes / 15.0)))


def plan(out: Path, minutes: float) -> list[DemoStep]:
    """The demo's steps for `out` at `minutes` (15 by default: about 15 minutes on 2 CPU cores)."""
    from .shipped import shipped_path

    r = out / "recipes"
    tok_steps, ar_steps, limit = _scaled(375, minutes, 20), _scaled(150, minutes, 10), _scaled(3000, minutes, 600)
    ks = ",".join(map(str, KS))
    steps = [
        DemoStep("tokenizer", "train the tokenizer", ["train-tokenizer", str(r / "tiny.yaml"), "--out", str(out / "tokenizer"),
                 "--max-steps", str(tok_steps), "--set", f"train.eval_every={tok_steps}", "--set", f"train.ckpt_every={max(10, tok_steps // 4)}",
                 "--set", "train.eval_images=300", "--json"],
                 1.05 * tok_steps + 25, "tokenizer", run_dir=out / "tokenizer", max_steps=tok_steps),
        DemoStep("reconstruct", f"reconstruct the photos at K {ks}", ["reconstruct", "--photos", "--tokens", ks,
                 "--ckpt", str(out / "tokenizer"), "--out", str(out / "reconstruct"), "--json"], 25, "tokenizer",
                 fresh=out / "reconstruct"),
        DemoStep("tokenize", f"tokenize {limit:,} shapes", ["tokenize", "shapes", "--limit", str(limit), "--views", "flip", "--tokens-sample",
                 "--ckpt", str(out / "tokenizer"), "--out", str(out / "tokens"), "--json"], 10 + limit / 60, "tokens",
                 fresh=out / "tokens"),
    ]
    for name in SAMPLERS:
        steps.append(DemoStep(f"train-{name}", f"train {name}", ["train-ar", str(r / "ar-tiny.yaml"), "--shards", str(out / "tokens"),
                              "--generator", name, "--out", str(out / name), "--max-steps", str(ar_steps),
                              "--set", f"train.eval_every={ar_steps}", "--set", f"train.ckpt_every={max(10, ar_steps // 3)}",
                              "--set", "data.val_items=200", "--json"],
                              0.5 * ar_steps + 15, "generators", run_dir=out / name, max_steps=ar_steps))
    for name in SAMPLERS:
        steps.append(DemoStep(f"generate-{name}", f"sample with {name}", _generate(name, out / name, out / "samples" / name),
                              12, "generators"))
    steps.append(DemoStep("probe", "linear probe", ["probe", "shapes", "--ckpt", str(out / "tokenizer"), "--train", "2000",
                          "--test", "500", "--epochs", "30", "--cache", str(out / "cache"), "--out", str(out / "probe"), "--json"],
                          40, "probe"))
    tok = shipped_path("tokenizer")
    if tok is not None:
        steps.append(DemoStep("reconstruct-shipped", "reconstruct with the shipped tokenizer",
                              ["reconstruct", "--photos", "--tokens", ks, "--ckpt", str(tok), "--out", str(out / "shipped" / "reconstruct"), "--json"],
                              25, "tokenizer", fresh=out / "shipped" / "reconstruct"))
        for name in SAMPLERS:
            gen = shipped_path(name)
            if gen is not None:
                steps.append(DemoStep(f"generate-{name}-shipped", f"sample with the shipped {name}",
                                      _generate(name, gen, out / "shipped" / "samples" / name, consistency=True), 15,
                                      "generators"))
        steps.append(DemoStep("probe-shipped", "linear probe of the shipped tokenizer", ["probe", "shapes", "--ckpt", str(tok),
                              "--train", "2000", "--test", "500", "--epochs", "30", "--cache", str(out / "cache"),
                              "--out", str(out / "shipped" / "probe"), "--json"], 40, "probe"))
    steps.append(DemoStep("kv-cache", "KV-cache benchmark", ["benchmark", "kv-cache", "--n", "256", "--batch", "1,16",
                          "--runs", "10", "--out", str(out / "bench"), "--json"], 60, "speed"))
    return steps


def _generate(name: str, ckpt: Path, out: Path, consistency: bool = False) -> list[str]:
    """A 10 × 10 grid (one row per class). Class consistency only for the shipped weights, whose classifier ships
    with them: the demo's own tokenizer would need one trained first (minutes on a CPU)."""
    return ["generate", "--classes", "all", "--n", "10", "--sampler", name, "--ckpt", str(ckpt), "--cfg", f"{CFG[name]:g}",
            "--grid-rows", "10", "--grid-cols", "10", *(["--consistency"] if consistency else []), "--out", str(out), "--json"]


def _recipes(out: Path) -> None:
    """The packaged tiny recipes, copied into the demo folder so that every command it shows runs as written."""
    src = Path(__file__).parent / "recipes"
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    for name in ("tiny.yaml", "ar-tiny.yaml"):
        if not (out / "recipes" / name).is_file():
            shutil.copyfile(src / name, out / "recipes" / name)


def _state(out: Path, minutes: float) -> dict[str, Any]:
    path = out / STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{path} is damaged ({e}): remove it to start the demo again") from None
        if state.get("minutes") != minutes:
            raise ConfigError(f"--minutes {minutes:g}: {out} holds a demo started with --minutes {state.get('minutes'):g} "
                              f"(run it with that to resume, or give another --out)")
        return state
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the demo")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and holds no demo: give a new folder")
    return {"minutes": minutes, "steps": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _save(out: Path, state: dict[str, Any]) -> None:
    write_atomic(out / STATE, json.dumps(state, indent=2).encode())


def _metrics_step(run_dir: Path) -> int:
    """The last logged step of a training run (0 before its first row)."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="ignore").strip().splitlines()
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError, IndexError):
        return 0


def _run(step: DemoStep, out: Path, progress: DemoProgress) -> tuple[dict[str, Any], float]:
    """Run one step's command as a child process; its JSON result and wall time. stderr goes to logs/<name>.log."""
    args = list(step.args)
    if step.run_dir is not None and (step.run_dir / "checkpoints" / "latest").is_file():
        args.append("--resume")
    elif step.fresh is not None and step.fresh.exists():
        shutil.rmtree(step.fresh)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "COLUMNS": "120", "MERGEVQ_DEMO": "1"}
    t0 = time.perf_counter()
    with open(logs / f"{step.name}.log", "w") as err, open(logs / f"{step.name}.json", "w") as res:
        proc = subprocess.Popen([sys.executable, "-m", "mergevq_cli", *args], stdout=res, stderr=err, env=env)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if step.run_dir is not None and step.max_steps:
                    progress.fraction(min(1.0, _metrics_step(step.run_dir) / step.max_steps))
        except BaseException:  # Ctrl-C reaches the child too (same process group): let it checkpoint and stop
            try:
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
            raise
    wall = time.perf_counter() - t0
    if proc.returncode in (75, 130, -2, -15):  # the child stopped on a signal (and checkpointed, if it trains)
        raise KeyboardInterrupt
    if proc.returncode != 0:
        tail = [ln for ln in (logs / f"{step.name}.log").read_text(errors="ignore").splitlines() if ln.strip()]
        last = tail[-1].strip() if tail else f"exit code {proc.returncode}"
        raise DemoError(f"demo step {step.name!r} failed: {last} (command: {step.command}; log: {logs / step.name}.log)")
    try:
        result = json.loads((logs / f"{step.name}.json").read_text())
    except ValueError:
        raise DemoError(f"demo step {step.name!r} printed no JSON result (log: {logs / step.name}.log)") from None
    return result, wall


@dataclass
class DemoResult:
    out: str
    report_html: str
    report_md: str
    wall_s: float
    steps: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_demo(out: str | Path = "runs/demo", minutes: float = 15.0, progress: DemoProgress | None = None) -> DemoResult:
    """Run (or resume) the demo into `out` and write its report. Returns where it went and each step's record."""
    from .report import write_report

    if not minutes > 0 or minutes != minutes:
        raise ConfigError(f"--minutes {minutes}: must be > 0")
    progress = progress or DemoProgress()
    out = Path(out)
    state = _state(out, minutes)
    out.mkdir(parents=True, exist_ok=True)
    _recipes(out)
    _save(out, state)
    steps = plan(out, minutes)
    done = state["steps"]
    progress.begin(sum(s.estimate_s for s in steps), sum(s.estimate_s for s in steps if s.name in done))
    again = f"mergevq demo --out {shlex.quote(str(out))}" + (f" --minutes {minutes:g}" if minutes != 15.0 else "")
    for step in steps:
        if step.name in done:
            progress.done(step, done[step.name]["wall_s"], skipped=True)
            continue
        progress.step(step)
        try:
            result, wall = _run(step, out, progress)
        except KeyboardInterrupt:
            raise DemoInterrupted(f"interrupted in step {step.name!r}: run `{again}` to continue from there") from None
        done[step.name] = {"title": step.title, "command": step.command, "section": step.section, "wall_s": wall,
                           "result": result}
        state["wall_s"] = sum(d["wall_s"] for d in done.values())
        _save(out, state)
        progress.done(step, wall, skipped=False)
    progress.end()
    html, md = write_report(out, state, steps, CFG)
    return DemoResult(out=str(out), report_html=str(html), report_md=str(md), wall_s=state.get("wall_s", 0.0),
                      steps={k: {"wall_s": v["wall_s"], "command": v["command"]} for k, v in done.items()})
