"""Pictures of a run: loss and collapse curves (PNG), for people and for MLflow."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipelines.tracking import read_local_metrics  # noqa: E402

CURVES = (
    ("loss", "loss"),
    ("knn_top1", "kNN top-1"),
    ("effective_rank", "effective rank (RankMe)"),
    ("embedding_std", "std of normalised embeddings"),
    ("energy_gap", "energy gap (shuffled - true pairs)"),
    ("lr", "learning rate"),
)


def plot_training_curves(metrics_file: str | Path, out_path: str | Path) -> Path | None:
    """One panel per logged curve against step; None when nothing was logged."""
    records = read_local_metrics(metrics_file)
    panels = [(key, title) for key, title in CURVES if any(key in r for r in records)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "energy_gap":
            ax.axhline(0.0, color="red", linewidth=0.8, linestyle="--")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
