"""The picture of a sweep: its metric against each swept parameter (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STATUS_COLOURS = {
    "completed": "tab:green",
    "stopped early": "tab:orange",
    "collapsed": "tab:red",
    "failed": "black",
}


def plot_sweep(
    table: dict[str, list], params: list[str], metric: str, out_path: str | Path
) -> Path | None:
    """One panel per swept parameter, trials coloured by status; None when no trial has the metric."""
    rows = [i for i, v in enumerate(table[metric]) if v is not None]
    if not rows or not params:
        return None
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        for status, colour in STATUS_COLOURS.items():
            points = [
                (table[param][i], table[metric][i]) for i in rows if table["status"][i] == status
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(xs, ys, color=colour, label=status, s=30)
        values = [table[param][i] for i in rows]
        if (
            all(isinstance(v, (int, float)) and v > 0 for v in values)
            and max(values) / min(values) > 20
        ):
            ax.set_xscale("log")
        ax.set_xlabel(param, fontsize=9)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
