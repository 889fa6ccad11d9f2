"""Build the weights that ship inside the package (mergevq_core/weights/) from trained runs.

    python scripts/ship_weights.py --tokenizer runs/ship/tokenizer --mergear runs/ship/mergear \
        --llamagen runs/ship/llamagen --randar runs/ship/randar

Each run is exported with `mergevq export`'s code in float16. The generators point to the one shipped tokenizer
(`../tokenizer`) instead of carrying a copy. The script then measures what the cards state:
- the tokenizer in float16 against float32 (PSNR on held-out shapes, share of identical codes), so that half
  precision is shown to lose nothing measurable;
- each generator's class consistency, with the CFG scale picked on one seed and measured on another.
The consistency classifier trained for the shipped tokenizer ships too (weights/classifiers/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergevq_core import checkpoint as ck  # noqa: E402
from mergevq_core.export import export, model_card  # noqa: E402
from mergevq_core.fileio import sha256_file  # noqa: E402
from mergevq_core.shipped import SHIPPED_DIR  # noqa: E402


def readable(lines: list[str], base: Path) -> list[str]:
    """The recorded commands with the folder that holds the runs written as `runs/ship` and the repository's own
    path dropped: the same commands, run from the repository root."""
    return [line.replace(str(base.resolve()), "runs/ship").replace(str(ROOT) + "/", "") for line in lines]


def half_check(src: Path, shipped: Path, images: int = 500) -> dict:
    """PSNR at the recipe's K on held-out shapes with the float32 checkpoint and the float16 export, and the
    share of positions whose code ids agree."""
    import torch

    from mergevq_core.data.shapes import ShapesDataset
    from mergevq_core.runs import load_tokenizer

    a, _ = load_tokenizer(src, "cpu")
    b, _ = load_tokenizer(shipped, "cpu")
    ds = ShapesDataset(a.cfg.model.image_size, images, split="val")
    x = torch.stack([ds[i]["image"] for i in range(images)])
    k = a.cfg.merge.keep
    out = {}
    with torch.no_grad():
        ea, eb = a.encode(x, k), b.encode(x, k)
        for name, tok, enc in (("float32", a, ea), ("float16", b, eb)):
            rec = tok.decode(enc.ids, enc.assign).clamp(-1, 1)
            mse = ((rec - x) ** 2).mean(dim=(1, 2, 3)) / 4  # images in [-1, 1]
            out[f"psnr_{name}"] = float((10 * torch.log10(1 / mse)).mean())
        out["codes_equal"] = float((ea.ids == eb.ids).float().mean())
    out["tokens"] = k
    out["images"] = images
    return out


def consistency(ckpt: Path, name: str, cfgs: list[float], samples: int) -> dict:
    from mergevq_core.generation import generate_images
    from mergevq_core.generators import SamplingSettings

    def score(cfg: float, seed: int, n: int) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory() as tmp:
            res = generate_images([], None, name, num_samples=n, class_spec="all", ckpt=ckpt, seed=seed,
                                  settings=SamplingSettings(cfg=cfg), out=Path(tmp) / "s", device="cpu",
                                  with_consistency=True)
            return res.consistency["consistency"], res.consistency

    picks = {cfg: score(cfg, 1, 200)[0] for cfg in cfgs}
    best = max(picks, key=picks.get)
    value, full = score(best, 0, samples)
    print(f"{name}: CFG sweep on seed 1 {picks} → {best}; seed 0, {samples} samples: {value:.3f}", flush=True)
    return {"consistency": value, "consistency_settings": f"{samples} samples, CFG {best:g}, seed 0",
            "consistency_cfg": best, "consistency_samples": samples, "consistency_ceiling": full.get("ceiling")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("tokenizer", "mergear", "llamagen", "randar"):
        ap.add_argument(f"--{name}", required=True, help=f"the {name} run")
    ap.add_argument("--tokenize-command", required=True,
                    help="the `mergevq tokenize` command that made the generators' shards (tokenize keeps no record)")
    ap.add_argument("--dest", default=str(SHIPPED_DIR))
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--cfg", default="2,4,6,9", help="CFG scales to pick from, comma-separated")
    args = ap.parse_args()
    runs = {n: getattr(args, n) for n in ("tokenizer", "mergear", "llamagen", "randar")}
    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)

    base = Path(runs["tokenizer"]).resolve().parent

    def commands(name: str) -> list[str]:
        from mergevq_core.train.loop import COMMANDS_FILE

        path = Path(runs[name]) / COMMANDS_FILE
        lines = readable(path.read_text().splitlines(), base) if path.is_file() else []
        return lines if name == "tokenizer" else readable([f"shards: {args.tokenize_command}"], base) + lines

    export(runs["tokenizer"], dest / "tokenizer", dtype="float16", commands=commands("tokenizer"))
    check = half_check(Path(runs["tokenizer"]), dest / "tokenizer")
    print("float16 check:", check, flush=True)
    _add_figures(dest / "tokenizer", {"float16_check": check}, base)
    tok_hash = sha256_file(dest / "tokenizer" / ck.EXPORT_WEIGHTS)
    for name in ("mergear", "llamagen", "randar"):
        export(runs[name], dest / name, dtype="float16", commands=commands(name))
        inner = dest / name / "tokenizer"
        if sha256_file(inner / ck.EXPORT_WEIGHTS) != tok_hash:
            raise SystemExit(f"{runs[name]} was trained on another tokenizer than {runs['tokenizer']}")
        shutil.rmtree(inner)
        cfg = json.loads((dest / name / ck.EXPORT_CONFIG).read_text())
        cfg["tokenizer"] = {**cfg["tokenizer"], "checkpoint": "../tokenizer", "hash": tok_hash,
                            "trained_on": readable([cfg["tokenizer"].get("trained_on") or ""], base)[0]}
        (dest / name / ck.EXPORT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    cfgs = [float(c) for c in args.cfg.split(",")]
    for name in ("mergear", "llamagen", "randar"):
        _add_figures(dest / name, consistency(dest / name, name, cfgs, args.samples), base)
    from mergevq_core.eval.consistency import CLASSIFIER_DIR

    for folder in CLASSIFIER_DIR.glob(f"*-{tok_hash[:12]}"):  # trained above for the shipped tokenizer
        shutil.copytree(folder, dest / "classifiers" / folder.name)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"shipped weights in {dest}: {total / 1e6:.2f} MB", flush=True)


def _add_figures(folder: Path, figures: dict, base: Path | None = None) -> None:
    cfg = json.loads((folder / ck.EXPORT_CONFIG).read_text())
    cfg["export"]["figures"].update(figures)
    if base is not None:
        cfg["export"]["from"] = readable([cfg["export"]["from"]], base)[0]
    (folder / ck.EXPORT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(cfg))


if __name__ == "__main__":
    main()
