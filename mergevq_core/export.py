"""`mergevq export`: a trained tokenizer or generator as a folder people can share, in the Hugging Face layout.

`DIR/config.json` is the checkpoint's meta.json (kind, resolved recipe, generator architecture) plus an `export`
entry: the weight names `model.safetensors` serves, its dtype, the step, the data, the commands that trained it
(the run's commands.txt) and its measured figures. `DIR/README.md` is the model card that says the same for a
reader. A generator is exported with its tokenizer inside (`DIR/tokenizer/`, the same layout), recorded by a
relative path and the hash of its weights file, so one folder (or one hub repository) holds all it needs. Every
command's `--ckpt` reads the folder as it reads a checkpoint (`checkpoint.resolve_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ck
from .errors import CheckpointError
from .fileio import fsync_dir, sha256_file

__all__ = ["ExportResult", "export", "figures_of", "model_card"]

SERVES = {"tokenizer": ["ema", "tokenizer"], "ar": ["generator"]}  # meta kind → the weight names exported
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ExportResult:
    folder: str
    kind: str
    step: int
    dtype: str
    bytes: int
    params: int
    figures: dict[str, Any] = field(default_factory=dict)
    tokenizer: "ExportResult | None" = None

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "tokenizer"}
        d["tokenizer"] = self.tokenizer.to_json() if self.tokenizer else None
        return d


def figures_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The measured figures a checkpoint records: a tokenizer's last evaluation, a generator's validation loss."""
    if meta.get("kind") == "tokenizer":
        ev = meta.get("last_eval") or {}
        keep = ("psnr_by_tokens", "codebook_usage", "source_recovery_acc", "images", "psnr_predicted_by_tokens")
        return {k: ev[k] for k in keep if ev.get(k) is not None}
    return {k: meta[k] for k in ("val_loss",) if meta.get(k) is not None}


def _commands(ckpt: Path) -> list[str]:
    from .train.loop import COMMANDS_FILE

    run = ckpt.parent.parent if ckpt.parent.name == ck.CKPT_DIR else ckpt
    path = run / COMMANDS_FILE
    return path.read_text().splitlines() if path.is_file() else []


def export(src: str | Path, out: str | Path, dtype: str = "float32", figures: dict[str, Any] | None = None,
           commands: list[str] | None = None) -> ExportResult:
    """Write `src` (a run, checkpoint or exported folder of a tokenizer or generator) to `out` in the Hugging
    Face layout, its weights in `dtype`. `figures` add measured figures to the ones the checkpoint records;
    `commands` replace the training commands read from the run's commands.txt. `out` must not exist yet; it
    appears whole or not at all."""
    out = Path(out)
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists: export into a new folder")
    ckpt = ck.resolve_checkpoint(src)
    meta = ck.read_meta(ckpt)
    kind = meta.get("kind", "tokenizer")
    if kind not in SERVES:
        raise CheckpointError(f"{ckpt} is a {ck.KIND_NAMES.get(kind, kind)} checkpoint: export a tokenizer or a generator")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        res = _write(ckpt, meta, kind, tmp, dtype, figures or {}, commands)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    res.folder = str(out)
    if res.tokenizer is not None:
        res.tokenizer.folder = str(out / "tokenizer")
    return res


def _write(ckpt: Path, meta: dict[str, Any], kind: str, folder: Path, dtype: str, figures: dict[str, Any],
           commands: list[str] | None) -> ExportResult:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    sd = ck.read_tensors(ckpt, SERVES[kind][0])
    sd = {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(sd, str(folder / ck.EXPORT_WEIGHTS), metadata={"format": "pt"})  # one key: the same bytes every time
    tok_res = None
    config = {k: v for k, v in meta.items() if k not in ("export", "created")}
    if kind == "ar":
        from .runs import tokenizer_of_generator

        _, tok_path = tokenizer_of_generator(meta)  # checked against the hash the generator recorded
        tok_res = _write(tok_path, ck.read_meta(tok_path), "tokenizer", _mkdir(folder / "tokenizer"), dtype, {}, None)
        config["tokenizer"] = {"checkpoint": "tokenizer", "relative": True,
                               "hash": sha256_file(folder / "tokenizer" / ck.EXPORT_WEIGHTS),
                               "trained_on": meta.get("tokenizer", {}).get("checkpoint")}
    measured = {**figures_of(meta), **figures}
    config["export"] = {
        "weights": SERVES[kind], "dtype": dtype, "step": meta.get("step"), "from": str(ckpt),
        "commands": commands if commands is not None else _commands(ckpt), "figures": measured,
        "data": _data_of(meta),
    }
    (folder / ck.EXPORT_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
    (folder / "README.md").write_text(model_card(config))
    _readable(folder)
    return ExportResult(folder=str(folder), kind=kind, step=int(meta.get("step", 0)), dtype=dtype,
                        bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                        params=sum(v.numel() for v in sd.values()), figures=measured, tokenizer=tok_res)


def _readable(folder: Path) -> None:
    """Permissions as the umask gives new files (the temporary folder and safetensors' file are private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~umask)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _data_of(meta: dict[str, Any]) -> str:
    """What the model was trained on, in words."""
    if meta.get("kind") == "ar":
        t = meta.get("tokens", {})
        ds = t.get("dataset", {})
        n, ks = ds.get("items"), sorted(int(x) for x in (t.get("k_counts") or {}))
        views = t.get("views") if isinstance(t.get("views"), dict) else {"count": t.get("views", 1), "mode": "?"}
        return (f"token shards of the {ds.get('source') or ds.get('root') or 'unrecorded'} data"
                + (f": {n:,} images" if isinstance(n, int) else "")
                + f" × {views.get('count')} views ({views.get('mode')}), K {', '.join(map(str, ks))}")
    data = meta.get("config", {}).get("data", {})
    source = data.get("source", "imagefolder")
    return f"{data.get('root')} (image folder)" if source == "imagefolder" else f"the built-in {source} data"


def model_card(config: dict[str, Any]) -> str:
    """README.md for an exported folder: what it is, how it was trained, what it scores, how to load it."""
    ex = config["export"]
    kind = config.get("kind", "tokenizer")
    name = config.get("generator") if kind == "ar" else config.get("variant", config.get("config", {}).get("model", {}).get("name"))
    what = f"{name} generator" if kind == "ar" else f"{name} tokenizer"
    tags = ["mergevq", "image-generation" if kind == "ar" else "image-tokenizer"]
    lines = ["---", "library_name: mergevq", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# MergeVQ {what}", "",
             f"Written by `mergevq export` from `{ex['from']}` (step {ex['step']}, weights in {ex['dtype']}).", "",
             "## Training", "", f"- data: {ex['data']}", f"- steps: {ex['step']}"]
    if ex.get("commands"):
        lines += ["- commands:", "", "```", *ex["commands"], "```"]
    else:
        lines += ["- commands: not recorded (the run has no commands.txt)"]
    lines += ["", "## Measured figures", ""]
    figs = ex.get("figures") or {}
    if figs:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in figs.items()]
    else:
        lines += ["none recorded"]
    loader = ("mergevq generate --class 0 --sampler " + str(config.get("generator")) if kind == "ar"
              else "mergevq reconstruct --photos") + " --ckpt THIS_FOLDER"
    lines += ["", "## Use", "", "```", loader, "```", "",
              "`THIS_FOLDER` may be this folder's path, or `hf-hub:owner/name` for a copy on the Hugging Face hub.", ""]
    if kind == "ar":
        lines += [f"The tokenizer it was trained on is in `{config['tokenizer']['checkpoint']}/`, in the same layout.", ""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)
