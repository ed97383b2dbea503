"""Faults a long run meets, each injected for real (docs/RELIABILITY.md, "Faults"): non-finite
steps, the driver stopped by SIGTERM, data that stalls, a cluster without a CPU for the data,
a full checkpoint disk, the MLflow server stopped. Real Ray, real MLflow store or server, the
committed sample images; short runs of a small backbone (ResNet-18 without its last stage,
32 px, batches of 32)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from pipelines.cluster.placement import check_cpus_for_data
from pipelines.cluster.session import free_port
from pipelines.config import ConfigError, load_config
from pipelines.tracking import read_local_metrics
from pipelines.train.checkpointing import latest_position
from pipelines.train.driver import RunStopped, run_pretraining
from pipelines.train.record import (
    RECORD,
    RECORD_COPY,
    committed_steps,
    copy_record,
    restore_record,
)
from tests.pipelines.train.test_pretrain import committed_checkpoints, latest_state, mlflow_run

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "cifar10-sample"


def fault_overrides(tmp_path: Path, name: str, *extra: str, steps: int = 9) -> list[str]:
    """A short SimCLR run on the sample without the kNN monitor: 2 CPU workers, a checkpoint
    every 3 steps."""
    return [
        f"name={name}",
        f"data.train.path={SAMPLE / 'train.parquet'}",
        "data.recipe.size=32",
        "method.name=simclr",
        "method.options.proj_hidden_dim=128",
        "method.options.proj_dim=32",
        "backbone.name=resnet18_3stage",
        f"schedule.steps={steps}",
        "optim.name=sgd",
        "optim.base_lr=0.1",
        "train.batch_size=32",
        "train.num_workers=2",
        "train.log_every=2",
        "train.diagnostics_every=3",
        "tracking.system_metrics=false",
        f"checkpoint.storage_path={tmp_path / 'runs'}",
        "checkpoint.every_steps=3",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=faults",
        *extra,
    ]


def fault_run(tmp_path: Path, name: str, *extra: str, steps: int = 9):
    return load_config(None, fault_overrides(tmp_path, name, *extra, steps=steps))


def test_nonfinite_steps_are_skipped_then_restored_at_a_lower_lr_then_stopped(
    ray_session, tmp_path, capsys
):
    """NaN views on rank 0 (the test hook) at steps 2, 5 and 6, two in a row allowed, one
    restart: step 2 is skipped and counted; steps 5-6 restore the step-3 checkpoint with the
    learning rate halved; the same divergence there stops the run naming step 6, with the
    step-3 checkpoint kept and the MLflow run marked FAILED."""
    config = fault_run(
        tmp_path,
        "nonfinite",
        "train.inject_nonfinite_at=[2, 5, 6]",
        "train.max_nonfinite_in_a_row=2",
        "checkpoint.max_failures=1",
    )
    with pytest.raises(RunStopped) as stopped:
        run_pretraining(config)
    message = str(stopped.value)
    assert "2 non-finite losses or gradients in a row at step 6" in message
    assert "No restarts left" in message and "the last good checkpoint (step 3)" in message
    err = capsys.readouterr().err
    assert "restoring step 3 with the learning rate x0.5" in err

    client, run = mlflow_run(config)
    assert run.info.status == "FAILED"
    assert run.data.tags["lr_scale"] == "0.5" and run.data.tags["resumed_from_step"] == "3"

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)

    skipped = history("nonfinite_steps")
    assert [(m.step, m.value) for m in skipped] == [(2, 1.0), (4, 1.0), (4, 1.0)]
    at_4 = [m.value for m in history("lr") if m.step == 4]
    assert len(at_4) == 2 and at_4[1] == pytest.approx(at_4[0] / 2)  # before and after restart
    assert all(torch.isfinite(torch.tensor(m.value)) for m in history("loss"))
    state = latest_state(tmp_path / "runs" / "nonfinite")
    assert state["progress"]["step"] == 3 and state["progress"]["nonfinite_total"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def darkmatter(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "darkmatter"), *args]


def test_sigterm_marks_the_run_killed_and_the_same_command_resumes(ray_session, tmp_path):
    """`darkmatter pretrain` sent SIGTERM once its first checkpoint is committed: it exits
    143 saying how to resume, the MLflow run is KILLED, the committed checkpoint stays; the
    same run name then resumes from it and finishes."""
    overrides = fault_overrides(tmp_path, "sigterm", steps=30)
    command = darkmatter("pretrain", *[a for o in overrides for a in ("--set", o)])
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    run_dir = tmp_path / "runs" / "sigterm"
    console = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with console[0].open("w") as stdout, console[1].open("w") as stderr:
        driver = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + 300
        while not committed_checkpoints(run_dir) and driver.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint committed in 300 s"
            time.sleep(0.2)
        committed_at_signal = max(committed_checkpoints(run_dir), default=0)
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=120)
    out, err = console[0].read_text(), console[1].read_text()
    assert committed_at_signal >= 3, out + err
    assert driver.returncode == 128 + signal.SIGTERM, out + err
    assert "interrupted (SIGTERM): MLflow run marked KILLED" in err
    assert "To resume, run the same command again (run name 'sigterm'" in err
    assert "Traceback" not in err

    config = load_config(None, overrides)
    client, run = mlflow_run(config)
    assert run.info.status == "KILLED"
    kept = latest_state(run_dir)["progress"]["step"]
    assert 30 > kept >= committed_at_signal

    result = run_pretraining(config)
    assert result.steps == 30
    client, run = mlflow_run(config)  # the same MLflow run, finished
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_step"] == str(kept)
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 30


@ray.remote
class CpuHolder:
    """Another job's task that holds CPUs (the data pipeline's share of them)."""

    def ready(self) -> bool:
        return True


def test_data_that_stalls_stops_the_run_saying_so(ray_session, tmp_path):
    """Another job holds every CPU the trainers leave: no read or decode task can run, no
    batch comes, and after data.stall_timeout_s the run stops with a message that says so
    (instead of Ray Data's silent "may hang forever")."""
    free = ray.available_resources().get("CPU", 0)
    assert free >= 2, f"the suite's Ray has {free} CPUs free"
    holder = CpuHolder.options(num_cpus=free - 2).remote()  # 2 left: the 2 training workers
    try:
        ray.get(holder.ready.remote(), timeout=60)
        config = fault_run(
            tmp_path, "stall", "data.stall_timeout_s=5", "checkpoint.max_failures=0", steps=3
        )
        with pytest.raises(RunStopped, match=r"the data stalled: no batch for 5 s at step 1"):
            run_pretraining(config)
    finally:
        ray.kill(holder)
    _, run = mlflow_run(config)
    assert run.info.status == "FAILED"


def test_a_cluster_with_no_cpu_left_for_data_is_refused_before_training(ray_session, tmp_path):
    """On this 4-CPU Ray (no autoscaler) 4 one-CPU workers leave nothing to decode with: refused
    before any training, naming the CPUs; an autoscaler that can add nodes lets it wait."""
    config = fault_run(tmp_path, "nocpu", "train.num_workers=4")
    with pytest.raises(ConfigError) as refused:
        run_pretraining(config)
    assert (
        "the Ray cluster has 4 CPUs and the 4 training workers take 4 of them "
        "(train.num_workers=4 x train.cpus_per_worker=1), leaving 0 for Ray Data, which needs "
        "at least 1"
    ) in str(refused.value)
    assert not (tmp_path / "runs" / "nocpu" / "checkpoint_manager_snapshot.json").exists()
    check_cpus_for_data(config, 4, autoscaling=True)
    fits = fault_run(tmp_path, "fits", "train.num_workers=3", "train.batch_size=30")
    check_cpus_for_data(fits, 4, autoscaling=False)


def can_mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file (returned, to free the space again)."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb") as out:
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_checkpoint_disk_stops_naming_the_path_and_keeps_the_last_checkpoint(
    ray_session, tmp_path
):
    """Checkpoints go to a 64 MB tmpfs, filled up (another writer) once the first checkpoint
    is committed: the next checkpoint fails with ENOSPC, while its files upload or while Ray
    Train rewrites its record of the checkpoints (which the full disk leaves empty); the run
    stops at once naming the path and the last committed step. Once space is freed, that
    checkpoint resumes: the record reads (put back from its last good copy when emptied) and
    the weights load."""
    disk = tmp_path / "small-disk"
    if not can_mount_tmpfs(disk, "64m"):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    run_dir = disk / "full"
    filled: list[Path] = []

    def fill_after_first_commit() -> None:
        deadline = time.monotonic() + 300
        while not (run_dir / RECORD_COPY).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        filled.append(fill(disk))

    try:
        config = fault_run(
            tmp_path,
            "full",
            f"checkpoint.storage_path={disk}",
            "checkpoint.max_failures=2",
            steps=60,
        )
        filler = threading.Thread(target=fill_after_first_commit, daemon=True)
        filler.start()
        with pytest.raises(RunStopped) as stopped:
            run_pretraining(config)
        filler.join(timeout=10)
        message = str(stopped.value)
        assert f"checkpoint.storage_path {disk} is full" in message
        assert "No space left on device" in message and "restart" not in message
        kept = re.search(rf"the last good checkpoint \(step (\d+)\) in {run_dir} is kept", message)
        assert kept, message
        _, run = mlflow_run(config)
        assert run.info.status == "FAILED"

        filled[0].unlink()  # space freed
        step = int(kept.group(1))
        assert latest_position(str(disk), "full")[0] == step
        state = latest_state(run_dir)
        assert state["progress"]["step"] == step >= 3
        assert all(
            torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
        )
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_mlflow_server_stopped_mid_run_leaves_the_metrics_in_the_local_file(ray_session, tmp_path):
    """A real `mlflow server` on 127.0.0.1, stopped once the run's first checkpoint is
    committed: training never fails for tracking; what the server did not get is in the
    run's metrics.jsonl, which the summary names."""
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--backend-store-uri=sqlite:///{tmp_path / 'server.db'}",
            f"--artifacts-destination={tmp_path / 'artifacts'}",
            "--workers=1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the server and its uvicorn worker, stopped together
    )
    stopped: list[float] = []
    try:
        # ~16 s on an idle 2-core machine; over 120 s once, in a fresh clone's first suite
        # run with two other Ray jobs on the same cores.
        deadline = time.monotonic() + 300
        while not server_answers(port):
            assert server.poll() is None and time.monotonic() < deadline, "no mlflow server"
            time.sleep(0.5)
        config = fault_run(
            tmp_path, "mlflow-down", f"tracking.tracking_uri=http://127.0.0.1:{port}", steps=12
        )
        run_dir = tmp_path / "runs" / "mlflow-down"

        def stop_server_after_first_checkpoint() -> None:
            while not committed_checkpoints(run_dir) and time.monotonic() < deadline + 300:
                time.sleep(0.1)
            os.killpg(server.pid, signal.SIGKILL)  # at once, as a crashed server
            server.wait(timeout=30)
            stopped.append(time.monotonic())

        stopper = threading.Thread(target=stop_server_after_first_checkpoint, daemon=True)
        stopper.start()
        result = run_pretraining(config)
        stopper.join(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert stopped, "the server was not stopped"
    assert result.steps == 12
    assert result.tracking_problem is not None
    metrics_file = Path(result.run_dir) / "metrics.jsonl"
    assert str(metrics_file) in result.tracking_problem
    assert f"MLflow at http://127.0.0.1:{port} could not be reached" in result.tracking_problem
    local = [r["step"] for r in read_local_metrics(metrics_file) if "loss" in r]
    assert local == [2, 4, 6, 8, 10, 12]
    assert (Path(result.run_dir) / "backbone.pt").exists()
    # The server's store (read directly) has what reached it before it stopped: the first
    # steps, not the last, all of them in the local file.
    client = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    reached = sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "loss"))
    assert reached and reached == local[: len(reached)] and len(reached) < len(local)


def server_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_an_emptied_record_is_put_back_from_its_last_good_copy(tmp_path):
    """What a full disk does to Ray Train's record (it rewrites it in place): the last good
    copy is never replaced by a broken record, gives the committed steps without writing,
    and is put back."""
    run = tmp_path / "run"
    run.mkdir()
    whole = json.dumps({"checkpoint_results": [{"metrics": {"step": 3}}]})
    (run / RECORD).write_text(whole)
    assert copy_record(str(run))
    (run / RECORD).write_text("")  # the record a full disk leaves
    assert not copy_record(str(run))
    assert committed_steps(str(run)) == [3]
    assert restore_record(str(run)) and (run / RECORD).read_text() == whole
