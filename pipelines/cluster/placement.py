"""What a run needs from the Ray cluster it lands on, checked before any training starts.

A multi-node run writes checkpoints from worker processes on several machines, and a
restarted worker reads them back wherever Ray places it: ``checkpoint.storage_path``
must then be storage every node sees (``s3://``, ``gs://``, or a path each node mounts,
e.g. NFS). A node-local path would silently scatter checkpoints across disks, so such a
run is refused with a message that says what to set.
"""

from __future__ import annotations

from typing import Any

import ray

from pipelines.config import ConfigError, RunConfig, is_uri


def trainers_fit_on(node: dict[str, Any], config: RunConfig) -> bool:
    """Whether one node (an entry of ``ray.nodes()``) can hold every training worker."""
    resources = node.get("Resources", {})
    workers = config.train.num_workers
    if resources.get("CPU", 0.0) < workers * config.train.cpus_per_worker:
        return False
    return not config.train.use_gpu or resources.get("GPU", 0.0) >= workers


def why_run_spans_nodes(
    nodes: list[dict[str, Any]], driver_node_id: str, config: RunConfig
) -> str | None:
    """Why training workers may run on a node other than the driver's, or None if they cannot.

    ``nodes`` as ``ray.nodes()`` returns them. A cluster of one node whose resources cannot
    hold the trainers (a head with ``CPU: 0``, say) spans nodes too: the autoscaler adds them.
    """
    alive = [node for node in nodes if node.get("Alive")]
    if len(alive) > 1:
        return f"the Ray cluster has {len(alive)} alive nodes"
    here = next((node for node in alive if node.get("NodeID") == driver_node_id), None)
    if here is None:
        return "the driver runs outside the cluster's only node"
    if not trainers_fit_on(here, config):
        return (
            f"this node cannot hold the {config.train.num_workers} training workers, so they "
            "will run on nodes the autoscaler adds"
        )
    return None


def check_storage_for_nodes(
    config: RunConfig, storage_path: str, nodes: list[dict[str, Any]], driver_node_id: str
) -> None:
    """Raise ConfigError when a run that may span nodes checkpoints to a node-local path."""
    if is_uri(storage_path) or config.checkpoint.shared_storage:
        return
    reason = why_run_spans_nodes(nodes, driver_node_id, config)
    if reason is None:
        return
    raise ConfigError(
        f"checkpoint.storage_path {storage_path!r} is a local path, but {reason}: each node "
        "would keep its checkpoints on its own disk and a restarted worker would not find them. "
        "Use storage every node sees: an s3:// or gs:// URI "
        "(--set checkpoint.storage_path=s3://bucket/runs), or a path mounted at the same place "
        "on every node (NFS) declared with --set checkpoint.shared_storage=true."
    )


def check_checkpoint_storage(config: RunConfig, storage_path: str) -> None:
    """``check_storage_for_nodes`` against the Ray cluster this process is connected to."""
    check_storage_for_nodes(
        config, storage_path, ray.nodes(), ray.get_runtime_context().get_node_id()
    )
