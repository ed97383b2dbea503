"""The device half: each op equals torchvision's, parameters follow its distributions."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from ingest_files import encode
from PIL import Image
from torchvision.transforms import ColorJitter

import pipelines.ingest.photometric as pm
from pipelines.ingest.preview import save_views_grid
from pipelines.ingest.recipes import ViewSpec, byol, simclr


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "ours, theirs, low, high",
    [
        (pm.adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
        (pm.adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
        (pm.adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
        (pm.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_jitter_ops_equal_torchvision(batch, ours, theirs, low, high):
    factors = torch.linspace(low, high, len(batch))
    expected = torch.stack([theirs(x, float(f)) for x, f in zip(batch, factors, strict=True)])
    torch.testing.assert_close(ours(batch, factors), expected, atol=1e-5, rtol=0)


def test_blur_grayscale_solarize_equal_torchvision(batch):
    sigma = torch.linspace(0.1, 2.0, len(batch))
    expected = torch.stack(
        [TF.gaussian_blur(x, [9, 9], [float(s)] * 2) for x, s in zip(batch, sigma, strict=True)]
    )
    torch.testing.assert_close(pm.gaussian_blur(batch, sigma, 9), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(pm.grayscale(batch), TF.rgb_to_grayscale(batch), atol=1e-6, rtol=0)
    torch.testing.assert_close(pm.solarize(batch, 0.5), TF.solarize(batch, 0.5))


def test_parameter_statistics_match_torchvision():
    spec = simclr(32).views[0]
    n = 20_000
    params = pm.sample_photometric_params(n, spec, torch.Generator().manual_seed(0))
    jitter = ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    torch.manual_seed(0)
    draws = [
        ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        for _ in range(n)
    ]
    theirs = {
        "brightness": torch.tensor([d[1] for d in draws]),
        "contrast": torch.tensor([d[2] for d in draws]),
        "saturation": torch.tensor([d[3] for d in draws]),
        "hue": torch.tensor([d[4] for d in draws]),
    }
    for name, values in theirs.items():
        ours = getattr(params, name)
        assert abs(ours.mean() - values.mean()) < 0.02, name
        assert abs(ours.std() - values.std()) < 0.02, name
        assert abs(ours.min() - values.min()) < 0.01 and abs(ours.max() - values.max()) < 0.01
    # The order: each op lands in each slot 1/4 of the time, like torch.randperm(4).
    their_order = torch.stack([d[0] for d in draws])
    for slot in range(4):
        ours_freq = torch.bincount(params.order[:, slot], minlength=4) / n
        their_freq = torch.bincount(their_order[:, slot], minlength=4) / n
        assert (ours_freq - their_freq).abs().max() < 0.02
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()
    for name, p in (("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.0), ("solarize", 0.0)):
        assert abs(getattr(params, name).float().mean() - p) < 0.01, name
    sigma = pm.sample_photometric_params(n, simclr(224).views[0]).sigma
    assert abs(sigma.mean() - 1.05) < 0.02 and sigma.min() >= 0.1 and sigma.max() <= 2.0


def test_photometric_batch_shapes_normalisation_and_seed():
    views = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    spec = byol(32).views[1]
    out = pm.photometric(views, spec, torch.Generator().manual_seed(3))
    again = pm.photometric(views, spec, torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32 and out.shape == views.shape
    torch.testing.assert_close(out, again)
    plain = ViewSpec(size=32, jitter_p=0, grayscale_p=0, blur_p=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(pm.photometric(views, plain), views.float() / 127.5 - 1)
    with pytest.raises(ValueError, match="uint8"):
        pm.photometric(views.float(), spec)


def test_views_grid_png(tmp_path, sample_table):
    upscaled = [
        encode(Image.open(io.BytesIO(data)).resize((128, 128)))
        for data in sample_table.column("image").to_pylist()[:4]
    ]
    path = save_views_grid(tmp_path / "grid.png", upscaled, byol(96), seed=0, cell=64)
    grid = Image.open(path)
    assert grid.format == "PNG" and grid.size == (2 * 66, 4 * 66)
    assert np.asarray(grid).std() > 10  # not blank
