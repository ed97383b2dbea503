"""`darkmatter pretrain` end to end: real Ray, real MLflow store, the committed sample images."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torchvision
from mlflow.tracking import MlflowClient
from torch import nn

from pipelines.cli import main as cli_main
from pipelines.config import load_config
from pipelines.tracking import RUN_NAME_TAG
from pipelines.train.driver import run_pretraining

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "cifar10-sample"


def tiny_run(tmp_path: Path, name: str, *extra: str, steps: int = 6):
    """A short SimCLR run on the sample: ResNet-18 (standard stem) at 32px, 2 CPU workers."""
    return load_config(
        None,
        [
            f"name={name}",
            f"data.train.path={SAMPLE / 'train.parquet'}",
            "data.recipe.size=32",
            f"data.knn_bank.path={SAMPLE / 'train.parquet'}",
            "data.knn_bank.label_column=label",
            f"data.knn_query.path={SAMPLE / 'test.parquet'}",
            "data.knn_query.label_column=label",
            "data.knn_k=20",
            "method.name=simclr",
            "method.options.proj_hidden_dim=128",
            "method.options.proj_dim=32",
            "backbone.name=resnet18",
            f"schedule.steps={steps}",
            "optim.name=sgd",
            "optim.base_lr=0.1",
            "train.batch_size=32",
            "train.num_workers=2",
            "train.log_every=2",
            "train.diagnostics_every=2",
            f"checkpoint.storage_path={tmp_path / 'runs'}",
            "checkpoint.every_steps=3",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=tests",
            *extra,
        ],
    )


def mlflow_run(config):
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{config.name}'"
    )
    assert len(runs) == 1, f"expected one MLflow run named {config.name}, found {len(runs)}"
    return client, runs[0]


def test_pretrain_end_to_end_is_tracked_in_mlflow(ray_session, tmp_path):
    config = tiny_run(tmp_path, "e2e")
    result = run_pretraining(config)
    assert result.steps == 6
    assert result.tracking_problem is None
    assert 0.0 <= result.knn_top1 <= 1.0

    client, run = mlflow_run(config)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "simclr"
    assert run.data.params["train.batch_size"] == "32"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(m.value)) for m in losses)
    for key in (
        "effective_rank",
        "embedding_std",
        "energy_gap",
        "img_per_s",
        "data_wait_share",
        "knn_top1",
    ):
        assert key in run.data.metrics, key

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"backbone.pt", "config.yaml", "training_curves.png"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "backbone.pt", str(tmp_path)))
    state = torch.load(local, weights_only=True)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    model.load_state_dict(state, strict=True)
    png = Path(client.download_artifacts(run.info.run_id, "training_curves.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_rerun_with_the_same_name_resumes_from_the_checkpoint(ray_session, tmp_path):
    first = tiny_run(tmp_path, "resume", steps=3)
    run_pretraining(first)
    second = tiny_run(tmp_path, "resume", steps=6)
    result = run_pretraining(second)
    assert result.steps == 6
    client, run = mlflow_run(second)  # the same MLflow run continues
    assert run.data.tags["resumed_from_step"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 3, 4, 6]


def training_worker_pids() -> list[int]:
    """PIDs of this Ray session's live training workers (from the GCS actor table)."""
    from ray._private import state

    return [
        actor["Pid"]
        for actor in state.actors().values()
        if actor["ActorClassName"] == "RayTrainWorker" and actor["State"] == "ALIVE"
    ]


def committed_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoints the controller has registered (its snapshot on storage)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (json.JSONDecodeError, KeyError):
        return []
    return [int(r["metrics"]["step"]) for r in results]


def test_killed_worker_resumes_the_epoch_where_it_was(ray_session, tmp_path):
    """SIGKILL a training worker mid-epoch in a one-epoch run: the run restarts from the last
    committed checkpoint and continues the epoch there; every image is trained on once."""
    config = tiny_run(
        tmp_path,
        "fault",
        "schedule.steps=null",
        "schedule.epochs=1",
        "train.batch_size=40",  # 2000 images: 50 steps, no remainder
        "data.train.rows_per_unit=500",  # 4 read tasks
        "checkpoint.max_failures=2",
        "checkpoint.every_steps=10",
    )
    run_dir = tmp_path / "runs" / "fault"
    killed: list[tuple[int, list[int]]] = []

    def kill_after_first_committed_checkpoint() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            committed = committed_checkpoints(run_dir)
            pids = training_worker_pids()
            if committed and pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append((pids[-1], committed))
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_committed_checkpoint, daemon=True)
    killer.start()
    result = run_pretraining(config)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    committed_at_kill = killed[0][1]
    assert result.steps == 50
    client, run = mlflow_run(config)
    resumed_from = int(run.data.tags["resumed_from_step"])
    # Restarted from a committed checkpoint: the one seen at the kill or a later one.
    assert 50 > resumed_from >= max(committed_at_kill) > 0
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 50
    coverage = client.get_metric_history(run.info.run_id, "data/epoch_coverage")
    repeats = client.get_metric_history(run.info.run_id, "data/repeats")
    assert [(m.step, m.value) for m in coverage] == [(0, 1.0)]
    assert [(m.step, m.value) for m in repeats] == [(0, 0.0)]


def test_unreachable_mlflow_does_not_stop_training(ray_session, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny_run(
        tmp_path, "offline", f"tracking.tracking_uri=http://127.0.0.1:{port}", steps=4
    )
    result = run_pretraining(config)
    assert result.steps == 4
    assert result.tracking_problem is not None and "could not be reached" in result.tracking_problem
    metrics_file = Path(result.run_dir) / "metrics.jsonl"
    assert metrics_file.exists() and str(metrics_file) in result.tracking_problem
    assert (Path(result.run_dir) / "backbone.pt").exists()


def test_bad_config_is_refused_before_ray_starts(tmp_path, capsys):
    was_running = ray.is_initialized()
    code = cli_main(
        [
            "pretrain",
            "--set",
            f"data.train.path={SAMPLE / 'train.parquet'}",
            "--set",
            "train.batch_sze=8",
        ]
    )
    assert code == 2
    assert "train.batch_sze: unknown key" in capsys.readouterr().err
    assert ray.is_initialized() == was_running


@pytest.mark.parametrize("config_file", ["demo.yaml"])
def test_cli_parses_ready_configs(config_file):
    assert load_config(REPO / "configs" / config_file).train.num_workers == 2


def test_data_that_ends_short_ends_the_run_instead_of_rereading_epoch_0(ray_session, tmp_path):
    """50 files of which 10 are not images: the plan counts 50 (3 steps of 16), the data
    holds 40 (2 steps). The run ends after 2 steps with a warning, on every worker."""
    from PIL import Image

    folder = tmp_path / "short"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"good_{i:02d}.jpg", quality=90)
    for i in range(10):
        (folder / f"bad_{i:02d}.jpg").write_bytes(b"<html>not an image</html>")
    config = tiny_run(
        tmp_path,
        "short",
        f"data.train.path={folder}",
        "data.knn_bank=null",
        "data.knn_query=null",
        "schedule.steps=null",
        "schedule.epochs=1",
        "train.batch_size=16",
        "train.num_workers=1",
    )
    result = run_pretraining(config)
    assert result.steps == 2
    assert result.ingest["skipped_by_reason"] == {"not_an_image": 10}
    client, run = mlflow_run(config)
    coverage = client.get_metric_history(run.info.run_id, "data/epoch_coverage")
    assert [(m.step, m.value) for m in coverage] == [(0, 32 / 50)]


def latest_state(run_dir: Path) -> dict:
    """The training state in a run's latest committed checkpoint (Ray Train's own record)."""
    checkpoint = ray.train.Result.from_path(str(run_dir)).checkpoint
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / "state.pt", weights_only=True)


def test_time_budget_ends_the_run_annealed_and_a_resumed_run_counts_the_time_spent(
    ray_session, tmp_path
):
    """schedule.max_minutes alone: 2 workers stop together when the (shared) clock runs
    out, the last learning rate is the cosine's end, and the same run given a larger budget
    resumes with the time it already spent."""
    budget = ("schedule.steps=null", "data.knn_bank=null", "data.knn_query=null")
    first = tiny_run(tmp_path, "timed", *budget, "schedule.max_minutes=0.15")
    result = run_pretraining(first)
    client, run = mlflow_run(first)
    lrs = client.get_metric_history(run.info.run_id, "lr")
    assert lrs[-1].step == result.steps >= 1
    assert lrs[-1].value < 0.02 * 0.1 * 32 / 256  # < 2% of the peak: annealed
    assert run.data.tags["precision"] in ("fp32", "bf16")
    state = latest_state(tmp_path / "runs" / "timed")
    assert state["progress"]["step"] == result.steps
    assert 9.0 <= state["progress"]["train_seconds"] < 9.0 + 60  # the last step ends it

    second = tiny_run(tmp_path, "timed", *budget, "schedule.max_minutes=0.3")
    resumed = run_pretraining(second)
    client, run = mlflow_run(second)
    assert run.data.tags["resumed_from_step"] == str(result.steps)
    assert resumed.steps > result.steps
    # It trained for the rest of 18 s (not 18 s more), and ended annealed again.
    state = latest_state(tmp_path / "runs" / "timed")
    assert 18.0 <= state["progress"]["train_seconds"] < 18.0 + 60
    assert client.get_metric_history(run.info.run_id, "lr")[-1].value < 0.02 * 0.1 * 32 / 256
