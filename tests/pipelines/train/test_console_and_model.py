"""One short `darkmatter pretrain` of the demo config in a subprocess (its own console and
embedded Ray): the console is ours only, and the MLflow run holds the backbone as a model,
the data as inputs, where the run came from, and system metrics. The same run, watched:
its Ray listens on loopback only, its token file is private, and the secrets in its
environment appear nowhere it writes."""

from __future__ import annotations

import importlib.metadata
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.evaluate.inference import load_state_dict, resolve_checkpoint
from pipelines.tracking import RUN_NAME_TAG
from ssl_models.backbones import build_backbone
from tests.sockets import listening_sockets, off_loopback

REPO = Path(__file__).resolve().parents[3]
# Marker secrets in the run's environment: cloud keys, an S3 endpoint with credentials in
# it, an MLflow token. None may reach the console, the MLflow store or the run's files.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIADARKMATTERMARKER1",
    "AWS_SECRET_ACCESS_KEY": "darkmatter-secret-marker-2",
    "AWS_ENDPOINT_URL": "http://endpointuser3:endpoint-password-marker-4@127.0.0.1:9",
    "MLFLOW_S3_ENDPOINT_URL": "http://endpointuser3:endpoint-password-marker-4@127.0.0.1:9",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-marker-5",
}
MARKERS = ("AKIADARKMATTERMARKER1", "secret-marker-2", "endpointuser3", "password-marker-4")
MARKERS += ("mlflow-token-marker-5",)
# What the watch saw of the run: its listening sockets, its HOME.
WATCHED: dict = {}


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
    home = tmp / "home"  # where Ray writes its token file
    home.mkdir()
    env.update(SECRETS, HOME=str(home))
    with open(tmp / "console.txt", "w+") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *argv],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        sockets, deadline = set(), time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            sockets.update(listening_sockets(process.pid))  # the run's Ray, as it grows
            time.sleep(1.0)
        if process.poll() is None:
            process.kill()
        out.seek(0)
        console = out.read()
    WATCHED.update(sockets=sockets, home=home, files=tmp)
    assert process.wait() == 0, console
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


def test_a_local_run_listens_on_loopback_only_and_keeps_its_token_private(demo_run):
    sockets = WATCHED["sockets"]
    assert {"gcs_server", "raylet"} <= {name for *_, name in sockets}, sockets
    assert not off_loopback(sorted(sockets)), sorted(off_loopback(sorted(sockets)))
    token = WATCHED["home"] / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_no_secret_leaves_the_environment(demo_run):
    """The console, the MLflow store (database and artifacts), the run folder and its
    checkpoints, the run's HOME: every byte, searched for each marker."""
    console = demo_run[0]
    found = [marker for marker in MARKERS if marker in console]
    for path in WATCHED["files"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{marker} in {path}" for marker in MARKERS if marker.encode() in data]
    assert not found, found
    # The search reads what was written: the run's name is there, in the store and in files.
    assert b"demo-simclr" in (WATCHED["files"] / "mlflow.db").read_bytes()
    assert any((WATCHED["files"] / "runs").rglob("state.pt"))  # a checkpoint was searched


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
