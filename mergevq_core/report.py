"""The demo's report: `report.md` and `report.html` from the steps' JSON results (demo.json), every picture
copied or drawn under `report/` beside them, so the folder can be moved or shared whole."""

from __future__ import annotations

import html
import os
import platform
import shutil
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # the photographs shown large (scikit-image's names)


class _Doc:
    """One report written twice: Markdown blocks and the same blocks as HTML."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{_inline(text)}</p>")

    def table(self, head: list[str], rows: list[list[Any]]) -> None:
        self.md.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
                       + "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows))
        body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{body}</table>")

    def images(self, items: list[tuple[str, str]]) -> None:
        """(path relative to the report, caption) side by side."""
        self.md.append(" ".join(f"![{c}]({p})" for p, c in items) + "\n\n"
                       + " · ".join(f"*{c}*" for _, c in items) + "\n")
        figs = "".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
                       for p, c in items)
        self.html.append(f'<div class="row">{figs}</div>')

    def code(self, text: str) -> None:
        self.md.append(f"```\n{text}\n```\n")
        self.html.append(f"<pre>{html.escape(text)}</pre>")


def _inline(text: str) -> str:
    """`code` spans of Markdown as <code> in HTML; the rest escaped."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(s)}</code>" if i % 2 else html.escape(s) for i, s in enumerate(parts))


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def _card(name: str) -> dict[str, Any]:
    """The shipped model's export entry (steps, figures), or {} when none ships."""
    import json

    from .shipped import shipped_path

    path = shipped_path(name)
    return json.loads((path / "config.json").read_text())["export"] if path else {}


def _fmt_s(s: float) -> str:
    s = round(s)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _copy(src: str | Path | None, dest_dir: Path, name: str) -> str | None:
    if not src or not Path(src).is_file():
        return None
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest_dir / name)
    return f"report/{name}"


def _recon_figures(rec: dict[str, Any] | None) -> dict[str, dict[int, str]]:
    """photo name → K → the reconstruct command's PNG (original | reconstruction | merge groups)."""
    out: dict[str, dict[int, str]] = {}
    for row in (rec or {}).get("images", []):
        out.setdefault(Path(row["path"]).stem, {})[int(row["tokens"])] = row["output"]
    return out


def _mean_psnr(rec: dict[str, Any] | None) -> dict[int, float]:
    by: dict[int, list[float]] = {}
    for row in (rec or {}).get("images", []):
        by.setdefault(int(row["tokens"]), []).append(float(row["psnr"]))
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def _gif(figs: dict[str, dict[int, str]], dest: Path) -> str | None:
    """An animated GIF of the photos' reconstructions as K grows: one frame per K, the photos side by side."""
    import imageio.v3 as iio
    import numpy as np
    from PIL import Image

    names = [n for n in PHOTOS if n in figs] or sorted(figs)[:4]
    ks = sorted({k for n in names for k in figs[n]})
    if not names or not ks:
        return None
    frames = []
    for k in ks:
        tiles = []
        for n in names:
            if k not in figs[n]:
                return None
            im = np.asarray(Image.open(figs[n][k]).convert("RGB"))
            third = im.shape[1] // 3
            tiles.append(im[:, third:2 * third])  # the reconstruction panel
        frames.append(np.concatenate(tiles, axis=1))
    dest.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(dest, np.stack(frames), duration=900, loop=0)
    return f"report/{dest.name}"


def write_report(out: Path, state: dict[str, Any], steps: list[Any], cfg: dict[str, float]) -> tuple[Path, Path]:
    """report.md and report.html in `out` from the demo's state and its steps (`demo.DemoStep`, in order); `cfg`:
    the guidance scale each generator sampled with."""
    import torch

    done = state["steps"]
    res = {k: v["result"] for k, v in done.items()}
    pics = out / "report"
    doc = _Doc()
    doc.h(1, "MergeVQ demo")
    doc.p(f"Started {state.get('started')}; {len(done)} steps in {_fmt_s(state.get('wall_s', 0.0))} of compute on "
          f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"`--minutes {state['minutes']:g}`. The quick models of this demo are shown beside the weights shipped with "
          f"the package (`mergevq weights` says how each was trained).")

    # ------------------------------------------------------------------ tokenizer
    doc.h(2, "Tokenizer")
    tr, rec, rec_s = res.get("tokenizer", {}), res.get("reconstruct"), res.get("reconstruct-shipped")
    if tr:
        psnr = tr.get("psnr_by_tokens", {})
        doc.p(f"Trained {tr.get('steps')} steps in {_fmt_s(tr.get('wall_s', 0))} ({tr.get('img_per_s', 0):.0f} img/s). "
              f"Held-out shapes ({tr.get('eval_images')} images): PSNR "
              + ", ".join(f"{float(v):.2f} dB at K {k}" for k, v in psnr.items())
              + f"; codebook usage {tr.get('codebook_usage', float('nan')):.4f}"
              + (f"; source recovery {tr['source_recovery_acc']:.3f}" if tr.get("source_recovery_acc") is not None else "") + ".")
    mine, theirs = _mean_psnr(rec), _mean_psnr(rec_s)
    if mine:
        doc.p(f"The {len((rec or {}).get('images', [])) // max(1, len(mine))} built-in photographs (never seen in "
              "training, which used only the shapes), mean PSNR in dB:")
        doc.table(["K", "demo tokenizer", "shipped tokenizer"],
                  [[k, f"{mine[k]:.2f}", f"{theirs[k]:.2f}" if k in theirs else "-"] for k in mine])
    figs, figs_s = _recon_figures(rec), _recon_figures(rec_s)
    for name in [n for n in PHOTOS if n in figs]:
        items = []
        for k in sorted(figs[name]):
            p = _copy(figs[name][k], pics, f"recon_{name}_k{k}.png")
            if p:
                items.append((p, f"demo, K {k}"))
        k_mid = sorted(figs_s.get(name, {}))[len(figs_s.get(name, {})) // 2] if figs_s.get(name) else None
        if k_mid is not None:
            p = _copy(figs_s[name][k_mid], pics, f"recon_{name}_k{k_mid}_shipped.png")
            if p:
                items.append((p, f"shipped, K {k_mid}"))
        if items:
            doc.p(f"`{name}`: original | reconstruction | the merged groups (one colour per token).")
            doc.images(items)
    gif = _gif(figs, pics / "reconstructions_by_k.gif")
    if gif:
        doc.p("Reconstructions as K grows (" + ", ".join(str(k) for k in sorted({k for f in figs.values() for k in f})) + " tokens):")
        doc.images([(gif, "demo tokenizer, K cycling")])
    curve = _copy(out / "tokenizer" / "loss_curve.png", pics, "tokenizer_loss.png")
    if curve:
        doc.images([(curve, "tokenizer training curves")])

    # ------------------------------------------------------------------ generators
    doc.h(2, "Generators")
    tk = res.get("tokenize", {})
    if tk:
        doc.p(f"Tokenized {tk['items']:,} shapes × {tk['views']} views ({tk['view_mode']}, K drawn per view) in "
              f"{_fmt_s(tk['wall_s'])}, {tk['views_per_s']:,.0f} views/s.")
    rows = []
    for name in ("mergear", "llamagen", "randar"):
        t, g, gs = res.get(f"train-{name}", {}), res.get(f"generate-{name}", {}), res.get(f"generate-{name}-shipped", {})
        cs = gs.get("consistency") or {}
        card = _card(name)
        rows.append([name, t.get("steps", "-"), _num(t.get("val_loss")), f"{g.get('tokens_per_s', 0):,.0f}" if g else "-",
                     card.get("step", "-"), _num(card.get("figures", {}).get("val_loss")), _num(cs.get("consistency")),
                     _num(cs.get("ceiling"))])
    doc.p("The demo's generators against the shipped ones. Class consistency: the share of the shipped models' samples "
          "(100 each, CFG " + ", ".join(f"{n} {c:g}" for n, c in cfg.items()) + ") that the classifier shipped with them "
          "assigns to the class asked for; chance is 0.100, the ceiling is its accuracy on reconstructed real images.")
    doc.table(["generator", "demo steps", "demo validation CE", "demo tok/s", "shipped steps", "shipped validation CE",
               "shipped consistency", "ceiling"], rows)
    doc.p("A few hundred steps teach a generator little more than each class's colours and textures; the shipped "
          "generators, 800 steps on 10,000 shapes × 10 views, draw the classes (`--minutes` trains longer).")
    for name in ("mergear", "llamagen", "randar"):
        items = []
        for key, label in ((f"generate-{name}", "demo"), (f"generate-{name}-shipped", "shipped")):
            p = _copy(res.get(key, {}).get("grid"), pics, f"grid_{name}_{label}.png")
            if p:
                items.append((p, f"{name}, {label}"))
        if items:
            doc.p(f"{name}: one row per class (0–9), ten samples each.")
            doc.images(items)

    # ------------------------------------------------------------------ probe
    pr, prs = res.get("probe"), res.get("probe-shipped")
    if pr:
        doc.h(2, "Linear probe")
        doc.table(["tokenizer", "top-1", "raw-pixel baseline", "train / test images"],
                  [[label, f"{r['top1']:.3f}", f"{r['baseline_top1']:.3f}" if r.get("baseline_top1") is not None else "-",
                    f"{r['n_train']} / {r['n_test']}"] for label, r in (("demo", pr), ("shipped", prs)) if r])
        p = _copy(pr.get("confusion_png"), pics, "probe_confusion.png")
        if p:
            doc.images([(p, "confusion matrix (demo tokenizer)")])

    # ------------------------------------------------------------------ speed
    kv = res.get("kv-cache")
    if kv:
        doc.h(2, "KV-cache benchmark")
        doc.p("Random-weight tiny generator, N 256, milliseconds per token (median of 10 timed runs) and the KV cache's "
              "peak; MergeAR's speed-up is against the sliced cache of the same batch and ρ.")
        doc.table(["cache", "batch", "ρ", "ms / token", "tok/s", "peak slots", "× sliced"],
                  [[r["cache"], r["batch"], f"{r['redundancy']:.2f}" if r["cache"] == "mergear" else "-", f"{r['ms_per_token_median']:.3f}",
                    f"{r['tokens_per_s']:,.0f}", r["peak_slots"],
                    f"{r['speedup_vs_sliced']:.2f}" if r.get("speedup_vs_sliced") else "-"] for r in kv])
        p = _copy(out / "bench" / "kv_cache.png", pics, "kv_cache.png")
        if p:
            doc.images([(p, "KV-cache benchmark")])

    # ------------------------------------------------------------------ steps
    doc.h(2, "Steps and the commands that reproduce them")
    doc.p("Run from the folder the demo ran in; each writes what the report shows.")
    doc.table(["step", "wall time", "command"],
              [[s.title, _fmt_s(done[s.name]["wall_s"]), f"`{done[s.name]['command']}`"] for s in steps if s.name in done])

    md, page = out / "report.md", out / "report.html"
    md.write_text("\n".join(doc.md))
    page.write_text(_PAGE.format(body="\n".join(doc.html)))
    return page, md


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MergeVQ demo</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1, h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
table {{ border-collapse: collapse; margin: .8em 0; }}
td, th {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
code, pre {{ font: 13px ui-monospace, monospace; background: #f5f5f5; }}
td code {{ white-space: pre-wrap; word-break: break-all; text-align: left; display: block; }}
.row {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }}
img {{ image-rendering: pixelated; max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 13px; color: #555; }}
</style></head><body>
{body}
</body></html>
"""
