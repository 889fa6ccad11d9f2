"""PNG plots (matplotlib, Agg backend, imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path

NOT_LOSSES = ("grad_norm", "source_acc", "logits_real", "logits_fake", "entropy")


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def plot_training_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """Left: positive loss terms against step (log scale). Right: held-out PSNR per K at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    if train:
        steps = [r["step"] for r in train]
        for key in sorted(train[-1]["loss"]):
            if key in NOT_LOSSES:
                continue
            pts = [(s, r["loss"][key]) for s, r in zip(steps, train) if r["loss"].get(key, 0) > 0]
            if pts:
                ax.plot(*zip(*pts), label=key, lw=1.4 if key == "total" else 1.0)
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    ax.set(xlabel="step", ylabel="loss", title="training losses")
    ax.grid(alpha=0.3)
    if evals:
        for k in sorted({k for r in evals for k in r["eval"]["psnr_by_tokens"]}, key=int):
            pts = [(r["step"], r["eval"]["psnr_by_tokens"][k]) for r in evals if k in r["eval"]["psnr_by_tokens"]]
            ax2.plot(*zip(*pts), "o-", ms=3, label=f"K = {k}")
        ax2.legend(fontsize=7)
    ax2.set(xlabel="step", ylabel="PSNR (dB)", title="held-out PSNR (EMA weights)")
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_ar_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """Training cross-entropy (per logged interval) and held-out validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]["ce"]) for r in rows if "loss" in r and "ce" in r["loss"]]
    evals = [(r["step"], r["eval"]["val_loss"]) for r in rows if "eval" in r and "val_loss" in r["eval"]]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1.0, label="train CE (label drop on)")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=3, lw=1.4, label="validation CE")
    ax.set(xlabel="step", ylabel="CE per token (nats)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
