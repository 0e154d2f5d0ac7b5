"""The figures: a run's training curves, a sweep's error against depth and its trials' curves, an
experiment's curves (the paper's Fig. 6) and its errors beside the paper's. Plain data in, a PNG out.

Training error is drawn thin and validation error bold throughout, as in the paper's figures.
"""
from __future__ import annotations

import math


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (workers and CI have no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, ax, path: str, legend_size: float | None = None) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # a sweep whose one trial has no label: no legend, no warning
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def curves_png(history: list[dict], title: str, path: str) -> None:
    """One run: training and validation error against epoch (the paper's Fig. 4)."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [100 * r["train_error"] for r in history], lw=1, color="C0", label="train error")
    ax.plot(epochs, [100 * r["val_error"] for r in history], lw=2.5, color="C0", label="val error")
    ax.set(xlabel="epoch", ylabel="error (%)", title=title)
    _save(fig, ax, path)


def error_vs_depth(groups: dict[str, list[tuple[int, float]]], title: str, path: str) -> None:
    """A sweep: best validation error against depth, one line per group (e.g. per learning rate)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(groups.items()):
        points = sorted(points)
        ax.plot([d for d, _ in points], [100 * e for _, e in points], marker="o", label=name)
    ax.set(xlabel="depth", ylabel="best validation error (%)", title=title)
    _save(fig, ax, path)


def trial_curves(trials: list[dict], title: str, path: str) -> None:
    """A sweep: every trial's curves; each trial a dict of label, epochs, train_error, val_error."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, t in enumerate(trials):
        ax.plot(t["epochs"], [100 * e for e in t["train_error"]], lw=1, color=f"C{i % 10}")
        ax.plot(t["epochs"], [100 * e for e in t["val_error"]], lw=2.5, color=f"C{i % 10}", label=t["label"])
    ax.set(xlabel="epoch", ylabel="error (%)", title=f"{title}: training (thin) and validation (bold)")
    _save(fig, ax, path, legend_size=7)


def plain_vs_residual(trials: list[dict], title: str, path: str) -> None:
    """An experiment, the paper's Fig. 6: plain nets left, ResNets right (one panel when there is
    one kind); each trial a dict of residual, label, epochs, train_error, val_error."""
    plt = pyplot()
    kinds = sorted({t["residual"] for t in trials})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), sharey=True, squeeze=False)
    for ax, residual in zip(axes[0], kinds):
        for i, t in enumerate(t for t in trials if t["residual"] == residual):
            ax.plot(t["epochs"], [100 * e for e in t["train_error"]], lw=1, color=f"C{i % 10}")
            ax.plot(t["epochs"], [100 * e for e in t["val_error"]], lw=2.5, color=f"C{i % 10}", label=t["label"])
        ax.set(xlabel="epoch", title="ResNets" if residual else "plain nets")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("error (%): thin training, bold validation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def against_paper(labels: list[str], ours: list[float], paper: list[float], title: str, path: str) -> None:
    """Our final validation error beside the paper's (nan: no figure), in %, one pair of bars per net."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels) + 2), 4.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="ours: final validation error")
    ax.bar([i + 0.2 for i in x], [math.nan if p is None else p for p in paper], width=0.4,
           label="paper (its dataset)")
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="error (%)", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
