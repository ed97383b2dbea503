"""Views of an image, in two halves: the recipe (data), the CPU half, the device half.

- Recipes (`recipes.py`): `ViewSpec`, `ViewRecipe`, presets `simclr`, `byol`,
  `multicrop`, and `recipe_from_dict` for overrides.
- CPU half (`crops.py`): `crop_views(image, recipe, rng)` -> uint8 (S, S, 3) per view:
  random resized crop + flip, where the full image is; `crop_batch` decodes and crops
  a batch of encoded images straight into (N, S, S, 3) arrays, skipping bad ones.
- Device half (`photometric.py`): `photometric(channels_first(views), spec, generator)`
  on a uint8 (N, 3, S, S) batch -> normalised float32, per-view random parameters.
"""

from pipelines.ingest.crops import (
    CropBox,
    CroppedBatch,
    crop_batch,
    crop_views,
    sample_crop,
    views_from_bytes,
)
from pipelines.ingest.photometric import (
    PhotometricParams,
    apply_photometric,
    channels_first,
    photometric,
    sample_photometric_params,
)
from pipelines.ingest.recipes import (
    ViewRecipe,
    ViewSpec,
    byol,
    multicrop,
    recipe_from_dict,
    simclr,
)

__all__ = [
    "CropBox",
    "CroppedBatch",
    "PhotometricParams",
    "ViewRecipe",
    "ViewSpec",
    "apply_photometric",
    "byol",
    "channels_first",
    "crop_batch",
    "crop_views",
    "multicrop",
    "photometric",
    "recipe_from_dict",
    "sample_crop",
    "sample_photometric_params",
    "simclr",
    "views_from_bytes",
]
