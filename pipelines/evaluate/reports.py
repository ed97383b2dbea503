"""Pictures of a run and of its embeddings (PNG), for people and for MLflow.

- ``plot_training_curves`` / ``plot_curves``: loss, kNN and collapse curves against step.
- ``plot_retrieval_grid``: query images and their nearest neighbours (cosine).
- ``plot_projections``: 2D PCA and t-SNE (van der Maaten & Hinton 2008, scikit-learn)
  of embeddings, coloured by label.
- ``plot_singular_values``: the singular-value spectrum of embeddings, the picture of
  dimensional collapse (Jing et al. 2022, fig. 2), with RankMe (Garrido et al. 2023).

Every figure has a fixed size in pixels (``figsize * DPI``): no tight bounding box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipelines.tracking import read_local_metrics  # noqa: E402
from ssl_models.diagnostics import effective_rank  # noqa: E402

DPI = 100

CURVES = (
    ("loss", "loss"),
    ("knn_top1", "kNN top-1"),
    ("effective_rank", "effective rank (RankMe)"),
    ("embedding_std", "std of normalised embeddings"),
    ("energy_gap", "energy gap (shuffled - true pairs)"),
    ("lr", "learning rate"),
)


def _save(fig: plt.Figure, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI)
    plt.close(fig)
    return out_path


# --- curves across a run ---------------------------------------------------------------------


def plot_curves(records: Sequence[Mapping[str, Any]], out_path: str | Path) -> Path | None:
    """One panel per curve of ``CURVES`` present in ``records`` ({"step": int, key: value}
    dicts), against step, three panels a row; None when none is present."""
    panels = [(key, title) for key, title in CURVES if any(key in r for r in records)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        points = sorted((r["step"], r[key]) for r in records if key in r)
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "energy_gap":
            ax.axhline(0.0, color="red", linewidth=0.8, linestyle="--")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_training_curves(metrics_file: str | Path, out_path: str | Path) -> Path | None:
    """``plot_curves`` of a run's local ``metrics.jsonl``; None when nothing was logged."""
    return plot_curves(read_local_metrics(metrics_file), out_path)


def mlflow_curve_records(tracking_uri: str, run_id: str) -> list[dict[str, Any]]:
    """The ``CURVES`` metrics of an MLflow run as {"step", key: value} records."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    records = []
    for key, _ in CURVES:
        records.extend(
            {"step": m.step, key: m.value} for m in client.get_metric_history(run_id, key)
        )
    return records


# --- retrieval -------------------------------------------------------------------------------


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool = False
) -> torch.Tensor:
    """Indices (Q, k) of the k most cosine-similar rows of ``bank`` (N, D) for each query
    (Q, D); ``exclude_self`` skips each query's own row when queries are bank[:Q]."""
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    if exclude_self:
        similarity[torch.arange(len(queries)), torch.arange(len(queries))] = -float("inf")
    return similarity.topk(min(k, bank.shape[0]), dim=1).indices


def _show(ax: plt.Axes, image: np.ndarray, edge: str | None = None) -> None:
    ax.imshow(np.asarray(image).transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(edge is not None)
        if edge is not None:
            spine.set_color(edge)
            spine.set_linewidth(3)


def plot_retrieval_grid(
    query_images: np.ndarray,
    query_labels: Sequence[int],
    neighbour_images: np.ndarray,
    neighbour_labels: Sequence[Sequence[int]],
    out_path: str | Path,
    class_names: Sequence[str] | None = None,
) -> Path:
    """A row per query: the query, then its neighbours framed green (same label) or red.

    query_images: uint8 (Q, 3, S, S); neighbour_images: uint8 (Q, K, 3, S, S).
    """
    query_images, neighbour_images = np.asarray(query_images), np.asarray(neighbour_images)
    if query_images.ndim != 4 or neighbour_images.ndim != 5:
        raise ValueError(
            "plot_retrieval_grid: query_images must be (Q, 3, S, S) and neighbour_images "
            f"(Q, K, 3, S, S), got {query_images.shape} and {neighbour_images.shape}"
        )
    rows, k = neighbour_images.shape[:2]

    def name(label: int) -> str:
        return class_names[label] if class_names is not None else str(label)

    fig, axes = plt.subplots(rows, k + 1, figsize=(1.1 * (k + 1), 1.25 * rows), squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], query_images[r], edge="black")
        axes[r, 0].set_title(f"query: {name(query_labels[r])}", fontsize=7)
        for j in range(k):
            same = neighbour_labels[r][j] == query_labels[r]
            _show(axes[r, j + 1], neighbour_images[r, j], edge="tab:green" if same else "tab:red")
            axes[r, j + 1].set_title(name(neighbour_labels[r][j]), fontsize=7)
    fig.suptitle(
        "nearest neighbours by cosine similarity (green: same label, red: other)", fontsize=9
    )
    fig.tight_layout()
    return _save(fig, out_path)


# --- projections -----------------------------------------------------------------------------


def pca_2d(embeddings: torch.Tensor) -> np.ndarray:
    """(N, D) -> (N, 2): the L2-normalised (as kNN sees them), centred embeddings on their
    two leading principal axes."""
    x = F.normalize(embeddings.float(), dim=1)
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy()


def tsne_2d(embeddings: torch.Tensor, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) with scikit-learn's t-SNE on L2-normalised embeddings (PCA init)."""
    from sklearn.manifold import TSNE

    x = F.normalize(embeddings.float(), dim=1).numpy()
    perplexity = min(30.0, max(2.0, (len(x) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_projections(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    out_path: str | Path,
    *,
    max_points: int = 2000,
    seed: int = 0,
    with_tsne: bool = True,
    class_names: Sequence[str] | None = None,
) -> Path:
    """PCA (and t-SNE) of up to ``max_points`` embeddings (a seeded sample), coloured by label."""
    if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"plot_projections: embeddings (N, D) and labels (N,) expected, got "
            f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    if embeddings.shape[0] < 3:
        raise ValueError(f"plot_projections: needs at least 3 points, got {embeddings.shape[0]}")
    if embeddings.shape[0] > max_points:
        keep = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))
        embeddings, labels = embeddings[keep[:max_points]], labels[keep[:max_points]]
    panels = [("PCA", pca_2d(embeddings))]
    if with_tsne:
        panels.append(("t-SNE", tsne_2d(embeddings, seed)))
    classes = sorted(int(c) for c in labels.unique())
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.5, 5), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels, strict=True):
        for i, c in enumerate(classes):
            mask = (labels == c).numpy()
            name = class_names[c] if class_names is not None else str(c)
            ax.scatter(*points[mask].T, s=5, alpha=0.7, color=colours(i % colours.N), label=name)
        ax.set_title(f"{title} of {len(labels)} embeddings", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].legend(
        loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=3, title="label"
    )
    fig.tight_layout()
    return _save(fig, out_path)


# --- spectrum --------------------------------------------------------------------------------


def singular_values(embeddings: torch.Tensor) -> np.ndarray:
    """Singular values of the centred, L2-normalised embeddings (N, D), largest first,
    divided by the largest."""
    x = F.normalize(embeddings.float(), dim=1)
    s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    return (s / s[0].clamp_min(1e-12)).numpy()


def plot_singular_values(
    embeddings: Mapping[str, torch.Tensor] | torch.Tensor, out_path: str | Path
) -> Path:
    """Log singular-value spectrum of one or several embeddings (a dict name -> (N, D));
    a collapsed embedding falls off a cliff after its first few values."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = {"embeddings": embeddings}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, z in embeddings.items():
        if z.ndim != 2 or z.shape[0] < 2:
            raise ValueError(
                f"plot_singular_values: {name!r} must be (N >= 2, D), got {tuple(z.shape)}"
            )
        s = singular_values(z)
        ax.semilogy(
            np.arange(1, len(s) + 1),
            np.clip(s, 1e-8, None),
            label=f"{name} (RankMe {effective_rank(z):.1f})",
        )
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.set_title("singular-value spectrum of the embeddings", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)
