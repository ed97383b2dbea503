"""`data.decode_on: cpu_nodes` on two labelled Ray nodes of this machine.

The cluster (`ray.cluster_utils.Cluster`) runs in a subprocess, this file run as a script:
a process holds one Ray connection and the suite's `ray_session` holds this one. The head
is labelled as a training node, a second node as a data node (`DATA_NODE_LABEL`). The
subprocess wraps the read and decode functions so that every call writes down the node it
ran on, and reports:

- with the head alone (no data node, no autoscaler), `view_dataset(decode_on="cpu_nodes")`
  is refused before any task starts, naming the label and the fix;
- with the data node up, every read and every decode call of a `view_dataset` ran there,
  and the rows all arrive.

The rule itself is unit-tested below on node lists shaped like `ray.nodes()`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from pipelines.cluster.placement import (
    DATA_NODE_LABEL,
    can_add_nodes,
    check_data_nodes_for,
    data_label_selector,
)
from pipelines.config import ConfigError
from tests.cluster_facts import facts_from_script, free_port
from tests.cluster_facts import node_args as cluster_node_args

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "cifar10-sample"
KEY, VALUE = DATA_NODE_LABEL

# The node of each read / decode call, one line each, written by the wrappers below.
CALLS_FILE = "calls.txt"


def node_args(**extra: Any) -> dict[str, Any]:
    return cluster_node_args(1, **extra)


def note_node(out_dir: str, stage: str) -> None:
    import ray

    with open(os.path.join(out_dir, CALLS_FILE), "a") as f:
        f.write(f"{stage} {ray.get_runtime_context().get_node_id()}\n")


def recording_read(out_dir: str):
    from pipelines.ingest import sources

    read_units = sources.read_units

    def read(batch, source):
        note_node(out_dir, "read")
        yield from read_units(batch, source)

    return read


def recording_decode(out_dir: str):
    from pipelines.ingest import dataset

    views_batch = dataset._views_batch

    def decode(batch, **kwargs):
        note_node(out_dir, "decode")
        return views_batch(batch, **kwargs)

    return decode


def placement_scenario(tmp: Path) -> dict[str, Any]:
    """Runs in the subprocess: a head labelled for training, then a data node."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.ingest import dataset, sources
    from pipelines.ingest.recipes import simclr

    cluster = Cluster(
        initialize_head=True,
        head_node_args=node_args(
            gcs_server_port=free_port(),
            include_dashboard=False,
            temp_dir=str(tmp / "ray"),
            labels={KEY: "train"},
        ),
    )
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        source = sources.ImageSource(
            str(SAMPLE / "train.parquet"), label_column="label", rows_per_unit=500
        )
        facts: dict[str, Any] = {}
        try:
            dataset.view_dataset(source, simclr(32), seed=0, decode_on="cpu_nodes")
            facts["refusal"] = None
        except ConfigError as error:
            facts["refusal"] = str(error)

        data_node = cluster.add_node(**node_args(labels={KEY: VALUE}))
        cluster.wait_for_nodes()
        facts["data_node"] = data_node.node_id
        facts["head_node"] = ray.get_runtime_context().get_node_id()
        sources.read_units = recording_read(str(tmp))
        dataset._views_batch = recording_decode(str(tmp))
        views = dataset.view_dataset(source, simclr(32), seed=0, decode_on="cpu_nodes")
        facts["rows"] = sum(len(b["label"]) for b in views.iter_batches(batch_size=None))
        facts["calls"] = [line.split() for line in (tmp / CALLS_FILE).read_text().splitlines()]
        return facts
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def placement_facts() -> dict[str, Any]:
    return facts_from_script(__file__, "dmplace-", timeout=300)


def test_every_read_and_decode_runs_on_the_data_node(placement_facts):
    calls = placement_facts["calls"]
    stages = {stage for stage, _ in calls}
    assert stages == {"read", "decode"}, calls
    nodes = {node for _, node in calls}
    assert nodes == {placement_facts["data_node"]}, (nodes, placement_facts)
    assert placement_facts["data_node"] != placement_facts["head_node"]
    assert placement_facts["rows"] == 2000


def test_no_data_node_and_no_autoscaler_is_refused_before_any_task(placement_facts):
    message = placement_facts["refusal"]
    assert message is not None, "decode_on=cpu_nodes with no data node was not refused"
    assert f"{KEY}={VALUE}" in message and "data.decode_on=any" in message
    assert "cluster.yaml" in message and "ray start --labels" in message


# --- the rule, on node lists shaped like ray.nodes() ----------------------------------------


def node(labels: dict[str, str], alive: bool = True) -> dict[str, Any]:
    return {"NodeID": "n", "Alive": alive, "Labels": labels, "Resources": {"CPU": 8.0}}


def test_a_live_data_node_is_enough():
    nodes = [node({KEY: "train"}), node({KEY: VALUE})]
    assert check_data_nodes_for(nodes, autoscaling=False) is None


def test_a_dead_data_node_does_not_count():
    nodes = [node({KEY: "train"}), node({KEY: VALUE}, alive=False)]
    with pytest.raises(ConfigError, match="no autoscaler"):
        check_data_nodes_for(nodes, autoscaling=False)


def test_with_an_autoscaler_the_run_is_warned_and_waits():
    warning = check_data_nodes_for([node({})], autoscaling=True)
    assert warning is not None and "autoscaler adds one" in warning
    assert "data.decode_on=any" in warning


@pytest.mark.parametrize(
    "groups, expected",
    [
        ([], False),
        ([(0, 0)], False),  # a group that may never run
        ([(2, 2)], False),  # a fixed group
        ([(2, 2), (0, 16)], True),  # cluster.yaml's cpu_worker: 0 to 16
        ([(1, -1)], True),  # unbounded
    ],
)
def test_an_autoscaler_can_add_nodes_when_a_group_may_grow(groups, expected):
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name=f"g{i}", min_count=low, max_count=high)
            for i, (low, high) in enumerate(groups)
        ]
    )
    assert can_add_nodes(config) is expected
    assert can_add_nodes(None) is False


def test_decode_anywhere_selects_no_label():
    assert data_label_selector("any") is None
    assert data_label_selector("cpu_nodes") == {KEY: VALUE}


# --- the label in the cluster configs ---------------------------------------------------------


def test_cluster_yaml_labels_the_cpu_workers_as_data_nodes():
    import yaml

    types = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    assert types["cpu_worker"]["labels"] == {KEY: VALUE}
    assert all(KEY not in t.get("labels", {}) for name, t in types.items() if name != "cpu_worker")


def test_rayjob_labels_the_cpu_worker_group_as_kuberay_reads_it():
    import yaml
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_labels_from_group_spec

    spec = yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert _get_labels_from_group_spec(groups["cpu-workers"]) == {KEY: VALUE}
    assert _get_labels_from_group_spec(groups["gpu-workers"]) == {}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    (out / "facts.json").write_text(json.dumps(placement_scenario(out)))
