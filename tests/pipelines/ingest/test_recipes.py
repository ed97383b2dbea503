"""Recipes are data: published defaults, overrides, and refusals that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.ingest.recipes import ViewSpec, byol, multicrop, recipe_from_dict, simclr


def test_simclr_defaults_follow_the_paper():
    recipe = simclr(224)
    assert recipe.columns == ["view_0", "view_1"]
    view = recipe.views[0]
    assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (view.jitter_p, view.grayscale_p, view.blur_p) == (0.8, 0.2, 0.5)
    assert view.scale == (0.08, 1.0) and view.blur_kernel == 23
    assert simclr(32).views[0].blur_p == 0.0  # no blur on CIFAR (appendix B.9)


def test_byol_is_asymmetric():
    first, second = byol(224).views
    assert (first.blur_p, second.blur_p) == (1.0, 0.1)
    assert (first.solarize_p, second.solarize_p) == (0.0, 0.2)
    assert (first.brightness, first.contrast, first.saturation, first.hue) == (0.4, 0.4, 0.2, 0.1)


def test_multicrop_global_and_local():
    recipe = multicrop(224, 96, n_local=4)
    sizes = [v.size for v in recipe.views]
    assert sizes == [224, 224, 96, 96, 96, 96]
    assert recipe.views[0].scale == (0.14, 1.0) and recipe.views[-1].scale == (0.05, 0.14)


def test_overrides_everywhere_and_per_view():
    recipe = recipe_from_dict("byol", 96, {"grayscale_p": 0.0, "views": {1: {"solarize_p": 0.5}}})
    assert all(v.grayscale_p == 0.0 for v in recipe.views)
    assert recipe.views[1].solarize_p == 0.5 and recipe.views[0].solarize_p == 0.0
    assert recipe.views[0].blur_kernel == 9  # 10% of 96, odd
    local = recipe_from_dict("multicrop", 160, {"local_size": 64, "n_local": 2})
    assert [v.size for v in local.views] == [160, 160, 64, 64]
    assert recipe_from_dict("simclr", 64, {"size": 128}).views[0].blur_kernel == 13


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="brightnes"):
        recipe_from_dict("simclr", 32, {"brightnes": 0.5})
    with pytest.raises(ValueError, match="views.0: unknown override.*huee"):
        recipe_from_dict("simclr", 32, {"views": {0: {"huee": 0.1}}})
    with pytest.raises(ValueError, match="unknown recipe 'dino'"):
        recipe_from_dict("dino", 32, {})


@pytest.mark.parametrize(
    "field, value",
    [
        ("size", 0),
        ("scale", (0.5, 0.1)),
        ("scale", (0.1, 1.5)),
        ("flip_p", 1.5),
        ("hue", 0.7),
        ("brightness", -1.0),
        ("blur_kernel", 4),
        ("std", (0.2, 0.0, 0.2)),
    ],
)
def test_invalid_fields_name_themselves(field, value):
    with pytest.raises(ValueError, match=f"ViewSpec.{field}="):
        dataclasses.replace(ViewSpec(size=32), **{field: value})


def test_lists_from_yaml_become_tuples():
    spec = ViewSpec(size=32, scale=[0.2, 1.0], mean=[0.5, 0.5, 0.5])
    assert spec.scale == (0.2, 1.0) and hash(spec)
