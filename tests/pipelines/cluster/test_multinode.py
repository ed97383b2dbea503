"""Multi-node training on two Ray nodes of this machine (`ray.cluster_utils.Cluster`).

The cluster runs in a subprocess (this file run as a script): a process holds one Ray
connection, and the suite's `ray_session` holds this one. The subprocess writes what it
saw to a JSON file that the tests read. Its checks:

- a run whose checkpoint storage is a node-local path is refused before training, with
  a message naming the field and the fix;
- with `checkpoint.shared_storage=true` (both nodes share this disk) and
  `train.placement_strategy=STRICT_SPREAD`, the two training workers run on the two
  different nodes and the short run completes.

The storage rule itself is unit-tested below on node lists shaped like `ray.nodes()`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from pipelines.cluster.placement import check_storage_for_nodes
from pipelines.config import ConfigError, RunConfig, load_config
from tests.cluster_facts import facts_from_script, free_port
from tests.cluster_facts import node_args as cluster_node_args

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "cifar10-sample"


def tiny_config(tmp: Path, name: str, *extra: str) -> RunConfig:
    """configs/demo.yaml cut to 4 steps: ResNet-18 (standard stem) at 32px, 2 CPU workers."""
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"name={name}",
            f"data.train.path={SAMPLE / 'train.parquet'}",
            "data.knn_bank=null",
            "data.knn_query=null",
            "method.options.proj_hidden_dim=64",
            "method.options.proj_dim=32",
            "schedule.steps=4",
            "optim.warmup_steps=0",
            "train.batch_size=16",
            "train.log_every=2",
            f"checkpoint.storage_path={tmp / 'runs'}",
            "checkpoint.every_steps=4",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.experiment=multinode",
            *extra,
        ],
    )


def node_args(**extra: Any) -> dict[str, Any]:
    return cluster_node_args(2, **extra)


def two_node_scenario(tmp: Path) -> dict[str, Any]:
    """Runs in the subprocess: start two nodes, try both storage settings, report facts."""
    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    from pipelines.train.driver import run_pretraining

    cluster = Cluster(
        initialize_head=True,
        head_node_args=node_args(
            gcs_server_port=free_port(), include_dashboard=False, temp_dir=str(tmp / "ray")
        ),
    )
    try:
        cluster.add_node(**node_args())
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        facts: dict[str, Any] = {"nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}
        try:
            run_pretraining(tiny_config(tmp, "local-storage"))
            facts["local_storage_error"] = None
        except ConfigError as error:
            facts["local_storage_error"] = str(error)
        result = run_pretraining(
            tiny_config(
                tmp,
                "spread",
                "checkpoint.shared_storage=true",
                "train.placement_strategy=STRICT_SPREAD",
            )
        )
        facts["steps"] = result.steps
        facts["checkpoints"] = sorted(
            p.name for p in (tmp / "runs" / "spread").glob("checkpoint_*")
        )
        facts["worker_nodes"] = sorted(
            actor["Address"]["NodeID"]
            for actor in state.actors().values()
            if actor["ActorClassName"] == "RayTrainWorker"
        )
        return facts
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def two_node_facts() -> dict[str, Any]:
    return facts_from_script(__file__, "dmnodes-", timeout=480)


def test_training_workers_run_on_two_nodes_and_finish(two_node_facts):
    assert len(two_node_facts["nodes"]) == 2
    assert two_node_facts["steps"] == 4
    assert two_node_facts["checkpoints"], "the run wrote no checkpoint to the shared storage"
    workers = two_node_facts["worker_nodes"]
    assert len(workers) == 2 and set(workers) == set(two_node_facts["nodes"]), workers


def test_local_checkpoint_storage_is_refused_on_two_nodes(two_node_facts):
    message = two_node_facts["local_storage_error"]
    assert message is not None, "a two-node run with node-local checkpoints was not refused"
    assert "checkpoint.storage_path" in message and "2 alive nodes" in message
    assert "s3://" in message and "checkpoint.shared_storage=true" in message


# --- the storage rule, on node lists shaped like ray.nodes() -------------------------------


def node(node_id: str, cpus: float, gpus: float = 0.0, alive: bool = True) -> dict[str, Any]:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus, "GPU": gpus}}


@pytest.fixture
def config(tmp_path) -> RunConfig:
    return tiny_config(tmp_path, "rule")


def test_one_node_that_holds_the_trainers_may_use_a_local_path(config):
    check_storage_for_nodes(config, "/data/runs", [node("a", 8), node("b", 8, alive=False)], "a")


def test_a_head_without_cpus_for_trainers_needs_shared_storage(config):
    with pytest.raises(ConfigError, match="cannot hold the 2 training workers"):
        check_storage_for_nodes(config, "/data/runs", [node("head", 0)], "head")


def test_gpu_trainers_need_gpu_nodes(config):
    gpu_config = config.model_copy(
        update={"train": config.train.model_copy(update={"use_gpu": True})}
    )
    with pytest.raises(ConfigError, match="autoscaler"):
        check_storage_for_nodes(gpu_config, "/data/runs", [node("a", 16, gpus=1)], "a")


@pytest.mark.parametrize("storage", ["s3://bucket/runs", "gs://bucket/runs"])
def test_uris_are_shared_storage(config, storage):
    check_storage_for_nodes(config, storage, [node("a", 8), node("b", 8)], "a")


def test_declared_shared_path_is_accepted(config):
    shared = config.model_copy(
        update={"checkpoint": config.checkpoint.model_copy(update={"shared_storage": True})}
    )
    check_storage_for_nodes(shared, "/mnt/nfs/runs", [node("a", 8), node("b", 8)], "a")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    (out / "facts.json").write_text(json.dumps(two_node_scenario(out)))
