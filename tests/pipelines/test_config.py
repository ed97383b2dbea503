"""The run config: every ready config validates; bad ones are refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config, resolve_paths
from pipelines.ingest.recipes import RECIPES
from ssl_models.methods import METHODS, method_options

REPO = Path(__file__).resolve().parents[2]
MINIMAL = ["data.train.path=data/cifar10-sample/train.parquet", "schedule.steps=10"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_ready_configs_validate(path):
    config = load_config(path)
    assert config.name
    assert config.data.recipe.build().views


def test_overrides_are_typed_and_nested():
    config = load_config(None, [*MINIMAL, "train.batch_size=64", "method.options.temperature=0.5"])
    assert config.train.batch_size == 64
    assert config.method.options.temperature == 0.5
    # The options are a mapping of every option, defaults included: build_method(**options).
    assert dict(config.method.options) == method_options("simclr") | {"temperature": 0.5}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.batch_sze=64"], "train.batch_sze: unknown key"),
        (["train.batch_size=many"], "train.batch_size: Input should be a valid integer"),
        (
            ["train.batch_size=1", "train.num_workers=2"],
            "train.batch_size (1) is smaller than train.num_workers (2)",
        ),
        (
            ["optim.warmup_steps=10"],
            "optim.warmup_steps (10) must be shorter than the run (10 steps)",
        ),
        (["method.name=simclrr"], "method: unknown method 'simclrr'; accepted: barlow_twins, byol"),
        (
            ["method.options.tau=0.1"],
            "method.options.tau: unknown key; 'simclr' accepts: proj_hidden_dim",
        ),
        (
            ["method.options.temperature=cold"],
            "method.options.temperature: Input should be a valid number",
        ),
        (
            ["method.name=byol", "method.options.proj_dim=2.5"],
            "method.options.proj_dim: Input should be a valid integer",
        ),
        (["method.options.gather=maybe"], "method.options.gather: Input should be a valid boolean"),
        (
            ["data.recipe.name=dino"],
            "unknown recipe 'dino'; accepted: byol, ijepa, mae, multicrop, simclr",
        ),
        (["backbone.name=resnet19"], "unknown backbone 'resnet19'"),
        (["backbone.pool=mean"], "pool 'mean' needs a ViT backbone, not 'resnet18'"),
        (["optim.name=adam"], "optim.name: Input should be 'sgd', 'adamw' or 'lars'"),
        (["data.recipe.overrides.jitter_strength=2"], "unknown override(s) ['jitter_strength']"),
        (["data.knn_bank.path=x"], "knn_bank and knn_query must be given together"),
        (["name=my run"], "name: String should match pattern"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*MINIMAL, *overrides])
    assert message in str(error.value)


def test_an_int_is_accepted_for_a_float_option():
    config = load_config(None, [*MINIMAL, "method.options.temperature=1"])
    assert config.method.options.temperature == 1.0
    assert isinstance(config.method.options.temperature, float)


@pytest.mark.parametrize(("method", "recipe"), [("simclr", "simclr"), ("byol", "byol")])
def test_the_recipe_defaults_to_the_methods_own(method, recipe):
    config = load_config(None, [*MINIMAL, f"method.name={method}"])
    assert config.data.recipe.name == recipe == METHODS[method].recipe
    assert config.data.recipe.build().name == recipe
    # A recipe named in the config wins over the method's.
    named = load_config(None, [*MINIMAL, f"method.name={method}", "data.recipe.name=multicrop"])
    assert named.data.recipe.name == "multicrop"


def test_every_method_declares_a_registered_recipe():
    assert {cls.recipe for cls in METHODS.values()} <= set(RECIPES)


def test_missing_data_source_is_named():
    with pytest.raises(ConfigError, match="data: Field required"):
        load_config(None, ["schedule.steps=10"])


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.batch_size"])


def test_paths_resolve_once_against_the_directory_the_command_runs_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(
        None,
        [
            "data.train.path=[shards/a.parquet, s3://bucket/b.parquet]",
            "data.knn_bank={path: bank.parquet, label_column: label}",
            "data.knn_query={path: ../query.parquet, label_column: label}",
            "checkpoint.storage_path=runs",
            "tracking.tracking_uri=sqlite:///runs/mlflow.db",
            "schedule.steps=10",
        ],
    )
    assert config.data.train.path == [str(tmp_path / "shards/a.parquet"), "s3://bucket/b.parquet"]
    assert config.data.knn_bank.path == str(tmp_path / "bank.parquet")
    assert config.data.knn_query.path == str(tmp_path.parent / "query.parquet")
    assert config.checkpoint.storage_path == str(tmp_path / "runs")
    assert config.tracking.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    # A later chdir (a Tune trial, a Ray Train worker) changes nothing: resolving is idempotent.
    monkeypatch.chdir(tmp_path.parent)
    assert resolve_paths(config) == config
    server = load_config(None, [*MINIMAL, "tracking.tracking_uri=http://127.0.0.1:5000"])
    assert server.tracking.tracking_uri == "http://127.0.0.1:5000"


def test_a_tune_space_base_config_resolves_its_relative_paths(monkeypatch):
    from pipelines.tune.space import load_space

    monkeypatch.chdir(REPO)
    _, tree, base = load_space("tune_spaces/simclr.yaml")
    sample = str(REPO / "data" / "cifar10-sample" / "train.parquet")
    assert base.data.train.path == sample and tree["data"]["train"]["path"] == sample
    assert tree["checkpoint"]["storage_path"] == str(REPO / "runs")
