"""`darkmatter tune`: real Ray Tune trials that are real pretraining runs, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import ConfigError
from pipelines.tracking import RUN_NAME_TAG
from pipelines.tune.space import load_space
from pipelines.tune.sweep import TRIAL_STATUS_TAG, run_sweep

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "cifar10-sample"


def write_space(
    tmp_path: Path, method: str, options: dict, params: dict, steps: int = 8, **space
) -> Path:
    """A tiny base config (ResNet-18 at 32px, 1 CPU worker, a few steps) and a space over it."""
    base = {
        "name": "base",
        "method": {"name": method, "options": {"proj_hidden_dim": 64, "proj_dim": 32, **options}},
        "backbone": {"name": "resnet18"},
        "data": {
            "train": {"path": str(SAMPLE / "train.parquet")},
            "recipe": {"name": "simclr", "size": 32},
        },
        "optim": {"name": "sgd", "base_lr": 0.1, "lr_scaling": "none"},
        "schedule": {"steps": steps},
        "train": {"batch_size": 16, "num_workers": 1, "log_every": 2, "diagnostics_every": 2},
        "checkpoint": {"every_steps": 4},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "sweeps"},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "base_config": str(tmp_path / "base.yaml"),
                "metric": "loss",
                "mode": "min",
                "params": params,
                **space,
            }
        )
    )
    return space_file


def children_of(tmp_path: Path, sweep: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps")
    parent = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{sweep}'"
    )
    assert len(parent) == 1
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'",
    )
    return client, parent[0], children


def test_sweep_is_tracked_as_parent_and_children(ray_session, tmp_path):
    space = write_space(
        tmp_path,
        "simclr",
        {},
        {"optim.base_lr": {"distribution": "loguniform", "low": 0.01, "high": 0.5}},
        collapse={"grace_steps": 100},  # 8-step trials: the collapse stopper judges none
    )
    outcomes, best_yaml = run_sweep(
        str(space), 2, scheduler="fifo", name="sweep2", storage_path=str(tmp_path / "sweeps")
    )
    assert len(outcomes) == 2
    assert {o.status for o in outcomes} == {"completed"}
    client, parent, children = children_of(tmp_path, "sweep2")
    assert len(children) == 2
    assert {c.data.tags[TRIAL_STATUS_TAG] for c in children} == {"completed"}
    assert all("loss" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "metric_vs_params.png", "best_config.yaml"} <= artifacts
    best = yaml.safe_load(best_yaml)
    assert best["name"] == "sweep2-best"
    assert best["optim"]["base_lr"] in [o.params["optim.base_lr"] for o in outcomes]


def test_collapsing_space_is_stopped_and_marked_collapsed(ray_session, tmp_path):
    # VICReg with its variance and covariance terms weighted to zero: a plain Siamese energy.
    space = write_space(
        tmp_path,
        "vicreg",
        {"std_coeff": 0.0, "cov_coeff": 0.0},
        {"optim.base_lr": {"distribution": "choice", "values": [0.5]}},
        steps=40,  # the stop reaches a running trial a few steps late on a loaded machine
        collapse={"min_effective_rank": 1.5, "min_energy_gap": 1e-3, "patience": 1},
    )
    outcomes, _ = run_sweep(
        str(space), 1, scheduler="fifo", name="dead", storage_path=str(tmp_path / "sweeps")
    )
    assert [o.status for o in outcomes] == ["collapsed"]
    assert outcomes[0].step < 40  # stopped before the end
    _, _, children = children_of(tmp_path, "dead")
    assert [c.data.tags[TRIAL_STATUS_TAG] for c in children] == ["collapsed"]


def test_bad_space_names_the_key(tmp_path):
    space = write_space(
        tmp_path,
        "simclr",
        {},
        {"optim.base_lrr": {"distribution": "uniform", "low": 0.1, "high": 1.0}},
    )
    with pytest.raises(
        ConfigError, match=r"params.optim.base_lrr = 0.1: optim.base_lrr: unknown key"
    ):
        load_space(space)
    space = write_space(
        tmp_path,
        "simclr",
        {},
        {"optim.base_lr": {"distribution": "uniform", "low": 1.0, "high": 0.1}},
    )
    with pytest.raises(ConfigError, match=r"params.optim.base_lr: uniform needs low < high"):
        load_space(space)
    space = write_space(
        tmp_path, "simclr", {}, {"train.batch_size": {"distribution": "choice", "values": [16, 0]}}
    )
    with pytest.raises(ConfigError, match=r"params.train.batch_size = 0"):
        load_space(space)
    space = write_space(
        tmp_path,
        "simclr",
        {},
        {"method.options.temperature": {"distribution": "choice", "values": [0.1, "cold"]}},
    )
    with pytest.raises(
        ConfigError,
        match=r"params.method.options.temperature = 'cold': method.options.temperature: "
        "Input should be a valid number",
    ):
        load_space(space)


def test_asha_rungs_are_fields_of_the_space(tmp_path):
    params = {"optim.base_lr": {"distribution": "uniform", "low": 0.1, "high": 1.0}}
    space, _, _ = load_space(write_space(tmp_path, "simclr", {}, params))
    assert (space.asha.grace_period, space.asha.max_t) == (2, 10_000)
    asha = {"grace_period": 4, "max_t": 50}
    space, _, _ = load_space(write_space(tmp_path, "simclr", {}, params, asha=asha))
    assert (space.asha.grace_period, space.asha.max_t) == (4, 50)
    with pytest.raises(ConfigError, match=r"asha.grace_period: Input should be greater"):
        load_space(write_space(tmp_path, "simclr", {}, params, asha={"grace_period": 0}))


@pytest.mark.parametrize(
    "path", sorted((REPO / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_spaces_validate(path):
    space, _, base = load_space(path)
    assert base.method.name == path.stem


def test_rerunning_a_sweep_by_name_restores_it(ray_session, tmp_path):
    space = write_space(
        tmp_path,
        "simclr",
        {},
        {"optim.base_lr": {"distribution": "loguniform", "low": 0.01, "high": 0.1}},
        collapse={"grace_steps": 100},
    )
    first, _ = run_sweep(
        str(space), 2, scheduler="fifo", name="again", storage_path=str(tmp_path / "sweeps")
    )
    again, best_yaml = run_sweep(
        str(space), 2, scheduler="fifo", name="again", storage_path=str(tmp_path / "sweeps")
    )
    # Restored from the sweep's saved state: the same trials, none run a second time.
    assert sorted(o.trial_id for o in again) == sorted(o.trial_id for o in first)
    assert best_yaml is not None
    _, _, children = children_of(tmp_path, "again")
    assert len(children) == 2
