"""One short `darkmatter pretrain` of the demo config in a subprocess (its own console and
embedded Ray): the console is ours only, and the MLflow run holds the backbone as a model,
the data as inputs, where the run came from, and system metrics."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.evaluate.inference import load_state_dict, resolve_checkpoint
from pipelines.tracking import RUN_NAME_TAG
from ssl_models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(console, tracking URI, run, run directory) of 6 steps of configs/demo.yaml."""
    tmp = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = [
        *("pretrain", "--config", str(REPO / "configs" / "demo.yaml")),
        *("--register-model", "demo-backbone"),
        *("--set", "schedule.epochs=null", "--set", "schedule.steps=6"),
        *("--set", "optim.warmup_steps=2", "--set", "train.batch_size=64"),
        *("--set", "train.log_every=2", "--set", "checkpoint.every_steps=6"),
        *("--set", f"checkpoint.storage_path={tmp / 'runs'}"),
        *("--set", f"tracking.tracking_uri={uri}"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("darkmatter-demo")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'demo-simclr'"
    )
    return console, uri, run, tmp / "runs" / "demo-simclr" / "darkmatter"


def test_the_console_holds_our_lines_only(demo_run):
    console = demo_run[0]
    for noise in ("Reporting training result", "Deprecat", "Traceback", "PYTHON worker"):
        assert noise not in console, console
    assert "RayTrainWorker" not in console, console  # rank 0's lines come through the driver
    assert "[darkmatter] step 6/6" in console and "ETA" in console
    assert "kNN top-1" in console
    assert len(console.splitlines()) < 20, console


def test_the_backbone_is_an_mlflow_model_with_the_features_of_backbone_pt(demo_run):
    _, uri, run, run_dir = demo_run
    mlflow.set_tracking_uri(uri)
    logged = mlflow.pytorch.load_model("models:/demo-backbone/1", map_location="cpu")
    reference = build_backbone("resnet18", small_image_stem=False, image_size=32).model
    reference.load_state_dict(load_state_dict(run_dir / "backbone.pt"))
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(logged(images), reference.eval()(images))
    info = mlflow.models.get_model_info("models:/demo-backbone/1")
    assert info.run_id == run.info.run_id and info.signature is not None
    # eval / embed take the URI: the same weights, rebuilt from the run's config.yaml.
    checkpoint = resolve_checkpoint("models:/demo-backbone/1", uri)
    assert checkpoint.run_id == run.info.run_id and checkpoint.spec.image_size == 32
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(checkpoint.state_dict[key], value)


def test_the_run_records_its_data_origin_and_system_metrics(demo_run):
    _, uri, run, _ = demo_run
    run = MlflowClient(uri).get_run(run.info.run_id)
    contexts = {
        tag.value: item.dataset
        for item in run.inputs.dataset_inputs
        for tag in item.tags
        if tag.key == "mlflow.data.context"
    }
    assert set(contexts) == {"training", "knn-bank", "knn-query"}
    assert "train.parquet" in contexts["training"].source and contexts["training"].digest
    tags = run.data.tags
    assert tags["darkmatter.ray_cluster"] == "local"
    assert tags["darkmatter.torch_version"] == importlib.metadata.version("torch")
    assert "pretrain --config" in tags["darkmatter.command"]
    if (REPO / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40
        assert tags["darkmatter.git_dirty"] in ("true", "false")
    assert tags["mlflow.note.content"].startswith("simclr on resnet18: 6 steps")
    assert "kNN top-1" in tags["mlflow.note.content"]
    assert any(key.startswith("system/") for key in run.data.metrics)


def test_quiet_workers_do_not_warn_about_read_only_batches():
    """Seen in a clean-clone run: a worker's console line of torch's UserWarning on the
    read-only arrays Ray Data's iter_torch_batches converts (object store memory)."""
    import warnings

    import numpy as np

    from pipelines.train.progress import quiet_worker_logs

    array = np.zeros(3, dtype=np.float32)
    array.setflags(write=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_worker_logs(verbose=False)
        torch.as_tensor(array)
    assert not [w for w in caught if "not writable" in str(w.message)]
