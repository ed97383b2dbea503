"""cluster.yaml (Ray cluster launcher) and k8s/rayjob.yaml: valid, and secure by default.

cluster.yaml goes through the launcher's own `prepare_config` + `validate_config` (the
JSON schema `ray up` applies, with AWS defaults merged), so a typo fails here, not at
`ray up`. The rest checks what the issue asks for: a head that trains nothing, GPU and
CPU worker types, token auth, the dashboard on 127.0.0.1, no ingress beyond SSH.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())


def start_commands(cluster: dict[str, Any]) -> list[str]:
    return cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]


def ray_start(commands: list[str]) -> str:
    (command,) = [c for c in commands if "ray start" in c]
    return command


# --- cluster.yaml -------------------------------------------------------------------------


def test_cluster_yaml_passes_the_launchers_validation(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker", "cpu_worker"}


def test_a_typo_fails_the_validation(cluster):
    typo = copy.deepcopy(cluster)
    typo["available_node_types"]["gpu_worker"]["max_worker"] = 4  # max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(typo))


def test_head_trains_nothing(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0
    assert "--num-cpus=0" in ray_start(cluster["head_start_ray_commands"])


def test_gpu_workers_for_training_and_cpu_workers_for_data(cluster):
    types = cluster["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] > 0
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0
    assert types["cpu_worker"]["resources"]["CPU"] > 0
    for name in ("gpu_worker", "cpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert (
        sum(types[n]["max_workers"] for n in ("gpu_worker", "cpu_worker")) <= cluster["max_workers"]
    )


def test_setup_installs_darkmatter_with_the_pinned_ray(cluster):
    import ray

    setup = "\n".join(cluster["setup_commands"])
    assert "pip install" in setup and "-e ~/darkmatter" in setup
    assert f"ray[default,data,train,tune]=={ray.__version__}" in setup
    assert cluster["file_mounts"]["~/darkmatter"] == "."


def test_token_auth_on_every_node_with_a_private_token_file(cluster):
    for command in start_commands(cluster):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
            assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in command
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in cluster["setup_commands"]


def test_dashboard_and_jobs_api_listen_on_localhost_only(cluster):
    head = ray_start(cluster["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head)
    for command in start_commands(cluster):
        assert "0.0.0.0" not in command


def test_no_ingress_open_to_the_world_beyond_ssh(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    for rule in prepared["provider"].get("security_group", {}).get("IpPermissions", []):
        world = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if world & {"0.0.0.0/0", "::/0"}:
            assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule


# --- k8s/rayjob.yaml ----------------------------------------------------------------------


def test_rayjob_runs_a_pretraining_config_of_this_repository(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    entrypoint = rayjob["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["python", "-m", "pipelines.cli", "pretrain"]
    config_path = entrypoint[entrypoint.index("--config") + 1]
    prefix = "/home/ray/darkmatter/"
    assert config_path.startswith(prefix)
    overrides = [entrypoint[i + 1] for i, arg in enumerate(entrypoint) if arg == "--set"]
    config = load_config(REPO / config_path.removeprefix(prefix), overrides)
    assert config.checkpoint.storage_path.startswith("s3://")  # shared storage across pods
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]


def test_rayjob_cluster_is_token_authenticated_and_internal(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(int(p) for p in spec["rayVersion"].split(".")[:2]) >= (2, 52)
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_has_a_gpu_worker_group_sized_for_the_config(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_group = groups["gpu-workers"]
    (container,) = gpu_group["template"]["spec"]["containers"]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    config = load_config(REPO / "configs" / "simclr_imagenet.yaml")
    assert config.train.use_gpu
    assert gpu_group["minReplicas"] * gpus_per_pod >= config.train.num_workers
    cpus_per_pod = int(container["resources"]["limits"]["cpu"])
    assert cpus_per_pod >= gpus_per_pod * config.train.cpus_per_worker


def test_rayjob_shuts_the_cluster_down_after_the_job(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] == "K8sJobMode"
