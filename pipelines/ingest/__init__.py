"""Streaming ingest: sources -> decode -> views, as Ray Datasets (see docs/INGEST.md).

The device half, `photometric`, is imported from `pipelines.ingest.views` (a package
attribute of that name would hide the `photometric` module).
"""

from pipelines.ingest.dataset import (
    ingest_counts,
    labeled_eval_dataset,
    view_dataset,
)
from pipelines.ingest.decode import UndecodableImage, decode_rgb
from pipelines.ingest.sources import ImageSource, read_raw
from pipelines.ingest.views import (
    ViewRecipe,
    ViewSpec,
    byol,
    crop_views,
    multicrop,
    recipe_from_dict,
    simclr,
)

__all__ = [
    "ImageSource",
    "UndecodableImage",
    "ViewRecipe",
    "ViewSpec",
    "byol",
    "crop_views",
    "decode_rgb",
    "ingest_counts",
    "labeled_eval_dataset",
    "multicrop",
    "read_raw",
    "recipe_from_dict",
    "simclr",
    "view_dataset",
]
