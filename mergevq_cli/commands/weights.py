"""`mergevq weights`: the weights shipped inside the package, how each was trained and what it scores."""

from __future__ import annotations

from .. import console
from ..options import JsonOpt

EXAMPLES = """
Examples:

  mergevq weights                 # the shipped tokenizer and generators: size, steps, data, figures, commands

  mergevq weights --json
"""


def weights(json_: JsonOpt = False) -> None:
    """List the weights that ship with the package (used when there is no --ckpt and no run under runs/): each
    one's parameters, size, steps, data, measured figures and the exact commands that trained it."""
    from mergevq_core.errors import CheckpointError
    from mergevq_core.shipped import SHIPPED_DIR, shipped_weights

    rows = shipped_weights()
    if not rows:
        raise CheckpointError(f"this install ships no weights ({SHIPPED_DIR} is empty)")
    if json_:
        console.print_json({"folder": str(SHIPPED_DIR), "total_bytes": sum(r["bytes"] for r in rows), "weights": rows})
        return
    console.table(f"shipped weights ({SHIPPED_DIR}, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB in all)",
                  ["name", "kind", "params", "size", "dtype", "steps"],
                  [[r["name"], r["kind"], f"{r['params'] / 1e6:.2f}M", f"{r['bytes'] / 1e6:.1f} MB", r["dtype"],
                    f"{r['steps']:,}"] for r in rows])
    for r in rows:
        console.out.print(f"\n[bold]{r['name']}[/]: {r['data']}", highlight=False)
        console.out.print(f"  figures: {_figures(r['figures'])}", highlight=False, markup=False)
        for line in r["commands"]:
            console.out.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)


def _figures(fig: dict) -> str:
    parts = []
    if "psnr_by_tokens" in fig:
        parts.append("PSNR " + " / ".join(f"{v:.2f}" for v in fig["psnr_by_tokens"].values())
                     + f" dB at K {' / '.join(fig['psnr_by_tokens'])}")
    for key, label in (("codebook_usage", "usage"), ("source_recovery_acc", "source recovery"), ("val_loss", "val CE"),
                       ("consistency", "consistency")):
        if isinstance(fig.get(key), (int, float)):
            parts.append(f"{label} {fig[key]:.3f}")
    if "consistency_settings" in fig:
        parts.append(f"({fig['consistency_settings']})")
    return ", ".join(parts)
