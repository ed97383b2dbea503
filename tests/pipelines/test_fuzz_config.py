"""Configs fuzzed from the schema: configs/demo.yaml with one known field set to a value the
schema refuses (a wrong type, out of its range, not finite, not one of its choices) is
refused before any Ray starts, with a message naming that field's path; set to a value the
schema allows, it is accepted and holds that value.

The fields, their types and their bounds are read from the pydantic models themselves
(``RunConfig`` and the demo's method options), so a new field is fuzzed without a new test.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipelines.config import METHOD_CONFIGS, ConfigError, RunConfig, load_config
from pipelines.ingest.recipes import RECIPES
from ssl_models.backbones import BACKBONES

REPO = Path(__file__).resolve().parents[2]
DEMO_TREE: dict[str, Any] = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Valid values that the cross-field rules narrow (RunConfig's and DataConfig's validators),
# given the rest of the demo: 128 images over 2 workers, 15 warmup steps, a ResNet.
CROSS_FIELD_VALID: dict[str, st.SearchStrategy] = {
    "train.batch_size": st.integers(1, 4096).map(lambda n: 2 * n),
    "train.num_workers": st.sampled_from([n for n in range(1, 129) if 128 % n == 0]),
    "schedule.steps": st.integers(16, 10**7),
    "schedule.epochs": st.integers(1, 10**4),  # None: no length left (refused)
    "backbone.pool": st.just("cls"),  # "mean" needs a ViT
    "backbone.name": st.sampled_from(sorted(BACKBONES)),
    "data.recipe.name": st.sampled_from(sorted(RECIPES)),
    "data.knn_bank.label_column": st.text(min_size=1, max_size=12),  # kNN needs labels
    "data.knn_query.label_column": st.text(min_size=1, max_size=12),
}
# Strings the schema constrains beyond their type: names checked against a registry.
REGISTRY_STRINGS = {"backbone.name", "data.recipe.name"}
# Not fuzzed: containers (a tuple, a list, a free-form dict) and the union `method` itself.
SKIPPED = {"optim.betas", "train.inject_nonfinite_at", "data.recipe.overrides", "method.name"}


def _section_models() -> dict[str, type[BaseModel]]:
    """Each section of the demo's tree -> its model (the demo's method for `method`)."""
    sections: dict[str, type[BaseModel]] = {"": RunConfig}
    method = METHOD_CONFIGS[DEMO_TREE["method"]["name"]]
    sections["method"] = method
    sections["method.options"] = method.model_fields["options"].annotation

    def walk(model: type[BaseModel], prefix: str, tree: dict[str, Any]) -> None:
        for name, field in model.model_fields.items():
            inner = _strip_none(field.annotation)[0]
            if isinstance(inner, type) and issubclass(inner, BaseModel) and name in tree:
                sections[f"{prefix}{name}"] = inner
                walk(inner, f"{prefix}{name}.", tree[name])

    walk(RunConfig, "", DEMO_TREE)
    return sections


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), nullable  # noqa: UP007
    return annotation, False


def _leaf_kind(annotation: Any) -> str | None:
    """ "int", "float", "bool", "str", "literal" (a path: str or list of str is "str")."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return "literal"
    if annotation in (int, float, bool, str):
        return annotation.__name__
    args = typing.get_args(annotation)
    if args and all(a is str or typing.get_origin(a) in (typing.Annotated, list) for a in args):
        return "str"  # str | list[str], PathStr | list[PathStr]
    return None


def _leaves() -> list[tuple[str, Any, bool, list[Any]]]:
    """(dotted path, annotation, nullable, constraints) of every scalar field of the demo."""
    leaves = []
    for prefix, model in _section_models().items():
        for name, field in model.model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            if path in _section_models() or path in SKIPPED:
                continue
            annotation, nullable = _strip_none(field.annotation)
            if _leaf_kind(annotation) is not None:
                leaves.append((path, annotation, nullable, list(field.metadata)))
    return sorted(leaves, key=lambda leaf: leaf[0])


LEAVES = _leaves()
FINITE = dict(allow_nan=False, allow_infinity=False)
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=16)


def _bounds(constraints: list[Any]) -> dict[str, Any]:
    """{gt, ge, lt, le, pattern, min_length} found among a field's constraints."""
    out: dict[str, Any] = {}
    for c in constraints:
        for name in ("gt", "ge", "lt", "le", "min_length", "pattern"):
            if getattr(c, name, None) is not None:
                out[name] = getattr(c, name)
    return out


def valid_values(
    path: str, annotation: Any, nullable: bool, constraints: list
) -> st.SearchStrategy:
    """Values the schema (and the demo's other fields) accept for `path`."""
    if path in CROSS_FIELD_VALID:
        return CROSS_FIELD_VALID[path]
    kind, b = _leaf_kind(annotation), _bounds(constraints)
    if kind == "literal":
        values = st.sampled_from(typing.get_args(annotation))
    elif kind == "bool":
        values = st.booleans()
    elif kind == "int":
        low = b["gt"] + 1 if "gt" in b else b.get("ge", -(10**9))
        high = b["lt"] - 1 if "lt" in b else b.get("le", 10**9)
        values = st.integers(low, high)
    elif kind == "float":
        values = st.floats(
            min_value=b.get("gt", b.get("ge", -1e9)),
            max_value=b.get("lt", b.get("le", 1e9)),
            exclude_min="gt" in b,
            exclude_max="lt" in b,
            **FINITE,
        )
    elif "pattern" in b:
        values = st.from_regex(b["pattern"], fullmatch=True).filter(lambda s: "\n" not in s)
    else:
        values = TEXT
    return st.one_of(st.none(), values) if nullable else values


def invalid_values(path: str, annotation: Any, constraints: list) -> st.SearchStrategy:
    """Values the schema refuses for `path`: a wrong type, out of range, not finite..."""
    kind, b = _leaf_kind(annotation), _bounds(constraints)
    containers = st.sampled_from([[1, 2], {"a": 1}])
    if kind == "literal":
        choices = typing.get_args(annotation)
        return st.one_of(containers, st.just(3), TEXT.filter(lambda s: s not in choices))
    if kind == "bool":
        return st.one_of(containers, st.sampled_from(["maybe", 2, 0.5, -1]))
    if kind == "str":
        wrong = st.one_of(containers, st.integers(), st.floats(**FINITE))
        if path in REGISTRY_STRINGS:
            wrong = st.one_of(wrong, TEXT.filter(lambda s: s not in {*BACKBONES, *RECIPES}))
        if "pattern" in b:
            wrong = st.one_of(wrong, st.just(""), TEXT.map(lambda s: s + " x"))
        if "AfterValidator" in repr(annotation) + repr(constraints):  # PathStr
            wrong = st.one_of(wrong, TEXT.map(lambda s: s + "\x00"))  # a NUL byte in a path
        return wrong
    wrong = [containers, st.sampled_from(["many", "1 0", ""])]
    if kind == "int":
        wrong.append(st.floats(**FINITE).filter(lambda x: x != int(x)))
        if "gt" in b or "ge" in b:
            wrong.append(st.integers(max_value=b["gt"] if "gt" in b else b["ge"] - 1))
        if "lt" in b or "le" in b:
            wrong.append(st.integers(min_value=b["lt"] if "lt" in b else b["le"] + 1))
    else:  # float
        wrong.append(st.sampled_from([math.inf, -math.inf, math.nan]))
        if "gt" in b or "ge" in b:
            low = b.get("gt", b.get("ge"))
            wrong.append(st.floats(max_value=low, exclude_max="ge" in b, **FINITE))
        if "lt" in b or "le" in b:
            high = b.get("lt", b.get("le"))
            wrong.append(st.floats(min_value=high, exclude_min="le" in b, **FINITE))
    return st.one_of(*wrong)


@st.composite
def mutation(draw, valid: bool) -> tuple[str, Any]:
    path, annotation, nullable, constraints = draw(st.sampled_from(LEAVES))
    if valid:
        return path, draw(valid_values(path, annotation, nullable, constraints))
    return path, draw(invalid_values(path, annotation, constraints))


def _mutated(path: str, value: Any) -> dict[str, Any]:
    tree = yaml.safe_load(yaml.safe_dump(DEMO_TREE))  # a deep copy
    *sections, leaf = path.split(".")
    node = tree
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def _load(tmp_dir: Path, tree: dict[str, Any]) -> RunConfig:
    """The real entry point (`load_config` on a YAML file), with `ray.init` made to fail."""
    import ray

    path = tmp_dir / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    was_running = ray.is_initialized()
    with mock.patch.object(ray, "init", side_effect=AssertionError("Ray started")):
        try:
            return load_config(path)
        finally:
            assert ray.is_initialized() == was_running, "a config check started Ray"


def test_every_scalar_field_of_the_demo_is_fuzzed():
    paths = {leaf[0] for leaf in LEAVES}
    # A sample across the sections, to see that the walk reaches each.
    assert {
        "name",
        "train.batch_size",
        "optim.base_lr",
        "data.train.path",
        "data.recipe.size",
        "data.knn_bank.label_column",
        "method.options.temperature",
        "checkpoint.storage_path",
        "tracking.tracking_uri",
    } <= paths
    assert len(paths) > 50


@SETTINGS
@given(change=mutation(valid=False))
def test_a_value_the_schema_refuses_is_refused_naming_the_field(change, tmp_path_factory):
    path, value = change
    with pytest.raises(ConfigError) as error:
        _load(tmp_path_factory.getbasetemp(), _mutated(path, value))
    message = str(error.value)
    assert message.startswith("invalid config"), message
    assert path in message, f"{path}={value!r}: {message}"
    assert "Traceback" not in message


@SETTINGS
@given(change=mutation(valid=True))
def test_a_value_the_schema_allows_is_accepted(change, tmp_path_factory):
    path, value = change
    config = _load(tmp_path_factory.getbasetemp(), _mutated(path, value))
    held: Any = config
    for part in path.split("."):
        held = getattr(held, part)
    if path.endswith(("path", "storage_path", "tracking_uri")):
        return  # resolved against the working directory: not the value given
    if isinstance(value, float):
        assert held == pytest.approx(value)
    else:
        assert held == value, path
