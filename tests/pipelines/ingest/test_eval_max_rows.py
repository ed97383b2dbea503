"""`eval_image_dataset(max_rows=...)`: the kNN bank cap (`data.knn_bank_max`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest.dataset import labeled_eval_dataset
from pipelines.ingest.sources import ImageSource

CLASSES, PER_CLASS = 4, 40


@pytest.fixture(scope="module")
def class_sorted_tree(tmp_path_factory):
    """A class-per-folder tree: in file order, the first 40 images are all class 0."""
    root = tmp_path_factory.mktemp("sorted")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"c{c}").mkdir()
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i:03d}.png")
    return root


def test_the_cap_keeps_that_many_images_from_across_the_classes(ray_session, class_sorted_tree):
    source = ImageSource(str(class_sorted_tree), label_column="folder", rows_per_unit=40)
    batch = labeled_eval_dataset(source, 8, counter="cap", max_rows=50).take_batch(1000)
    assert batch["image"].shape == (50, 3, 8, 8)
    # File order would give 40 of class 0 and 10 of class 1.
    assert len(set(batch["label"].tolist())) >= 3


def test_a_cap_above_the_corpus_keeps_everything(ray_session, class_sorted_tree):
    source = ImageSource(str(class_sorted_tree), label_column="folder", rows_per_unit=40)
    batch = labeled_eval_dataset(source, 8, counter="cap", max_rows=10_000).take_batch(1000)
    assert len(batch["label"]) == CLASSES * PER_CLASS


def test_a_cap_below_one_is_refused(class_sorted_tree):
    source = ImageSource(str(class_sorted_tree), label_column="folder")
    with pytest.raises(ValueError, match="max_rows=0"):
        labeled_eval_dataset(source, 8, max_rows=0)
