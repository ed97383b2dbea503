"""Each report is a non-empty PNG of the expected size, drawn from real inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.evaluate.reports import (
    DPI,
    nearest_neighbours,
    plot_curves,
    plot_projections,
    plot_retrieval_grid,
    plot_singular_values,
    plot_training_curves,
    singular_values,
)


def png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5, f"{path.name} is blank"
        return image.size


def clustered(n: int = 300, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 5
    centres = torch.randn(5, dim, generator=generator) * 3
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def test_training_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"step": s, "loss": 5 - s / 10, "effective_rank": 10 + s, "lr": 0.1} for s in range(1, 30)
    ] + [{"step": 10, "knn_top1": 0.3}, {"step": 20, "knn_top1": 0.4}]
    metrics.write_text("\n".join(json.dumps(r) for r in records))
    path = plot_training_curves(metrics, tmp_path / "curves.png")
    assert png_size(path) == (3 * 4 * DPI, int(2 * 3.2 * DPI))  # loss, kNN, rank | lr
    assert plot_curves([{"step": 1, "other": 1.0}], tmp_path / "none.png") is None


def test_retrieval_grid(tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 255, (3, 3, 32, 32), dtype=np.uint8)
    neighbours = rng.integers(0, 255, (3, 5, 3, 32, 32), dtype=np.uint8)
    path = plot_retrieval_grid(
        queries, [0, 1, 2], neighbours, [[0, 1, 0, 0, 2]] * 3, tmp_path / "grid.png", list("abc")
    )
    assert png_size(path) == (int(1.1 * 6 * DPI), int(1.25 * 3 * DPI))
    with pytest.raises(ValueError, match=r"\(Q, K, 3, S, S\)"):
        plot_retrieval_grid(queries, [0], neighbours[0], [[0]], tmp_path / "bad.png")


def test_nearest_neighbours_are_by_cosine():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 1.0]])
    assert nearest_neighbours(torch.tensor([[1.0, 0.0]]), bank, 2).tolist() == [[0, 2]]
    assert nearest_neighbours(bank[:1], bank, 1, exclude_self=True).tolist() == [[2]]


def test_projections(tmp_path):
    z, labels = clustered()
    path = plot_projections(z, labels, tmp_path / "projection.png", max_points=200)
    assert png_size(path) == (int((5.5 * 2 + 1.5) * DPI), 5 * DPI)
    pca_only = plot_projections(z, labels, tmp_path / "pca.png", with_tsne=False)
    assert png_size(pca_only) == (int((5.5 + 1.5) * DPI), 5 * DPI)


def test_singular_values_show_collapse(tmp_path):
    z, _ = clustered()
    g = torch.Generator().manual_seed(0)
    # Rank one: every row is +-v, scaled away from 0 so normalising does not amplify noise.
    scale = (torch.rand(300, 1, generator=g) + 0.5) * torch.randn(300, 1, generator=g).sign()
    collapsed = scale @ torch.randn(1, 16, generator=g) + 1e-4 * torch.randn(300, 16, generator=g)
    assert singular_values(collapsed)[1] < 1e-2 < singular_values(z)[1]
    path = plot_singular_values({"healthy": z, "collapsed": collapsed}, tmp_path / "sv.png")
    assert png_size(path) == (6 * DPI, 4 * DPI)
