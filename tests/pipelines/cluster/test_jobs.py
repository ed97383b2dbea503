"""`darkmatter submit` / `darkmatter jobs` against a real two-node Ray cluster with token auth.

The cluster is started with Ray's own CLI, as a user would: `ray start --head` on
127.0.0.1 (dashboard on 127.0.0.1, `RAY_AUTH_MODE=token`, a token file of mode 0600) and
a second node with `ray start --address`. Both run with `--block` so the finalizer stops
exactly these two nodes: a bare `ray stop` would kill every Ray process on the machine,
including the suite's own `ray_session` cluster.

The darkmatter CLI runs in subprocesses with its own environment (the token, the mode):
the Jobs SDK reads the auth mode and token once per process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.cluster.jobs import SubmitError, check_address, job_entrypoint, job_runtime_env
from pipelines.tracking import RUN_NAME_TAG

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "cifar10-sample"
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_ports() -> list[str]:
    """Every port a node listens on, chosen free, so this cluster meets no other on the machine."""
    names = (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    return [f"{name}={port}" for name, port in zip(names, free_ports(len(names)), strict=True)]


@dataclass
class TokenCluster:
    dashboard: str
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
    token: str
    tmp: Path


def wait_for_dashboard(url: str, token: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        request = urllib.request.Request(
            f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    raise TimeoutError(f"the dashboard at {url} did not answer within {timeout:.0f}s")


def wait_for_nodes(env: dict[str, str], address: str, count: int, timeout: float = 60.0) -> None:
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR');"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
        )
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1.0)
    raise TimeoutError(f"{count} nodes did not join within {timeout:.0f}s")


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
    return [pid for pid in pids if pid != os.getpid()]


def stop_nodes(processes: list[subprocess.Popen], temp_dir: Path) -> None:
    """Stop the `ray start --block` processes (each takes its node down), then anything
    left that names this cluster's temp dir."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    for pid in pids_naming(str(temp_dir)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[TokenCluster]:
    tmp = Path(tempfile.mkdtemp(prefix="dmjobs-"))
    token = secrets.token_hex(32)
    token_file = tmp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port, client_port = free_ports(3)
    temp_dir = tmp / "ray"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--block", "--disable-usage-stats"]
    processes: list[subprocess.Popen] = []
    log = (tmp / "nodes.log").open("w")
    try:
        processes.append(
            subprocess.Popen(
                [
                    RAY,
                    "start",
                    "--head",
                    f"--port={gcs_port}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}",
                    f"--ray-client-server-port={client_port}",
                    f"--temp-dir={temp_dir}",
                    *common,
                    *node_ports(),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_for_dashboard(dashboard, token)
        processes.append(
            subprocess.Popen(
                [
                    RAY,
                    "start",
                    f"--address=127.0.0.1:{gcs_port}",
                    # Its own temp dir, as on another machine: a node left to inherit the
                    # head's would unpack the job's working_dir over the head's copy.
                    f"--temp-dir={temp_dir}-node2",
                    *common,
                    *node_ports(),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for_nodes(env, f"127.0.0.1:{gcs_port}", 2)
        yield TokenCluster(dashboard=dashboard, env=env, token=token, tmp=tmp)
    finally:
        stop_nodes(processes, temp_dir)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def darkmatter(cluster: TokenCluster, *args: str, env: dict[str, str] | None = None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=REPO,
        env=env or cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status_code(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code


def test_jobs_api_refuses_requests_without_the_right_token(token_cluster):
    url = f"{token_cluster.dashboard}/api/jobs/"
    assert status_code(url, {}) == 401
    assert status_code(url, {"Authorization": "Bearer " + "0" * 64}) == 403
    assert status_code(url, {"Authorization": f"Bearer {token_cluster.token}"}) == 200


def test_cli_without_the_token_is_refused_with_a_clear_message(token_cluster):
    env = {k: v for k, v in token_cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    result = darkmatter(
        token_cluster, "jobs", "list", "--address", token_cluster.dashboard, env=env, timeout=60
    )
    assert result.returncode == 2
    assert "refused" in result.stderr and "RAY_AUTH_MODE=token" in result.stderr


def test_submitted_pretraining_succeeds_and_is_tracked(token_cluster):
    tracking_uri = f"sqlite:///{token_cluster.tmp / 'mlflow.db'}"
    runs = token_cluster.tmp / "runs"
    env = token_cluster.env | {"MLFLOW_TRACKING_URI": tracking_uri}
    result = darkmatter(
        token_cluster,
        "submit",
        "--address",
        token_cluster.dashboard,
        "--follow",
        "--",
        "pretrain",
        "--config",
        "configs/demo.yaml",
        *("--set", "name=submitted"),
        *("--set", "schedule.steps=4", "--set", "optim.warmup_steps=0"),
        *("--set", "train.batch_size=16", "--set", "train.log_every=2"),
        *("--set", "method.options.proj_hidden_dim=64", "--set", "method.options.proj_dim=32"),
        *("--set", "data.knn_bank=null", "--set", "data.knn_query=null"),
        *("--set", f"checkpoint.storage_path={runs}", "--set", "checkpoint.every_steps=4"),
        # Both nodes share this machine's disk: the path is shared storage for this cluster.
        *("--set", "checkpoint.shared_storage=true"),
        *("--set", "tracking.experiment=jobs-test"),
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("darkmatter-submitted-")
    assert "step 4/4" in result.stdout
    assert tracking_uri not in job_id  # the URI travels in the runtime env, not the entrypoint

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("jobs-test")
    assert experiment is not None, "the job did not write to the MLflow store it was given"
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'submitted'"
    )
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]

    listed = darkmatter(token_cluster, "jobs", "list", "--address", token_cluster.dashboard)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = darkmatter(
        token_cluster, "jobs", "status", job_id, "--address", token_cluster.dashboard
    )
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = darkmatter(token_cluster, "jobs", "logs", job_id, "--address", token_cluster.dashboard)
    assert "step 4/4" in logs.stdout


def test_submit_refuses_a_bad_config_before_contacting_the_cluster(tmp_path):
    with pytest.raises(SubmitError, match="train.batch_sze: unknown key"):
        job_entrypoint(
            ["pretrain", "--config", "configs/demo.yaml", "--set", "train.batch_sze=8"], REPO
        )


def test_entrypoint_runs_the_cli_with_the_config_relative_to_the_working_dir():
    entrypoint, run_name = job_entrypoint(
        ["pretrain", "--config", str(REPO / "configs" / "demo.yaml"), "--set", "name=x"], REPO
    )
    assert entrypoint == "python -m pipelines.cli pretrain --config configs/demo.yaml --set name=x"
    assert run_name == "x"


def test_entrypoint_refuses_credentials_and_configs_outside_the_project(tmp_path):
    with pytest.raises(SubmitError, match="credentials"):
        job_entrypoint(
            ["pretrain", "--set", "tracking.tracking_uri=http://user:secret@mlflow:5000"], REPO
        )
    outside = tmp_path / "run.yaml"
    shutil.copy(REPO / "configs" / "demo.yaml", outside)
    with pytest.raises(SubmitError, match="outside the uploaded working directory"):
        job_entrypoint(["pretrain", "--config", str(outside)], REPO)


def test_runtime_env_carries_the_project_and_the_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("AWS_PROFILE", "training")
    env = job_runtime_env(REPO, ["AWS_PROFILE"])
    assert env["working_dir"] == str(REPO)
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    assert env["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
        "AWS_PROFILE": "training",
    }
    monkeypatch.delenv("AWS_PROFILE")
    with pytest.raises(SubmitError, match="AWS_PROFILE is not set"):
        job_runtime_env(REPO, ["AWS_PROFILE"])


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("http://127.0.0.1:8265", True),
        ("http://localhost:8265/", True),
        ("https://ray.example.com", True),
        ("http://10.0.0.5:8265", False),
        ("ray://127.0.0.1:10001", False),
    ],
)
def test_plain_http_goes_only_to_this_machine(address, allowed):
    if allowed:
        assert check_address(address, allow_plain_http=False) == address.rstrip("/")
    else:
        with pytest.raises(SubmitError):
            check_address(address, allow_plain_http=False)
