"""What a run needs from the Ray cluster it lands on, checked before any training starts.

A multi-node run writes checkpoints from worker processes on several machines, and a
restarted worker reads them back wherever Ray places it: ``checkpoint.storage_path``
must then be storage every node sees (``s3://``, ``gs://``, or a path each node mounts,
e.g. NFS). A node-local path would silently scatter checkpoints across disks, so such a
run is refused with a message that says what to set.

``data.decode_on: cpu_nodes`` places the read and decode tasks on the nodes that carry
``DATA_NODE_LABEL`` (a Ray node label). With no such node alive the run is refused when
nothing can add one (no autoscaler: the tasks would wait forever), and warned about when
an autoscaler may (a ``cpu_worker`` group that starts at zero nodes is the usual case).
"""

from __future__ import annotations

import sys
from typing import Any

import ray

from pipelines.config import ConfigError, DecodeOn, RunConfig, is_uri

# The Ray node label of the CPU-only data nodes: cluster.yaml's `cpu_worker` and
# k8s/rayjob.yaml's `cpu-workers` carry it. Ray reserves keys under `ray.io/`; a prefix of
# our own keeps the key apart from other tools' labels.
DATA_NODE_LABEL: tuple[str, str] = ("darkmatter/role", "data")


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


# --- CPUs for Ray Data beside the trainers ----------------------------------------------

# The CPUs Ray Data needs to make progress: one decode task (``map_batches`` tasks take one
# CPU; pipelines.ingest.dataset); the read tasks' 0.05 run between decodes.
DATA_MIN_CPUS = 1.0


def check_cpus_for_data(config: RunConfig, cluster_cpus: float, autoscaling: bool) -> None:
    """Raise ConfigError when the training workers leave Ray Data less than
    ``DATA_MIN_CPUS`` of a cluster of ``cluster_cpus`` CPUs that no autoscaler can grow:
    the read and decode tasks would never be placed and the run would wait forever."""
    workers, per_worker = config.train.num_workers, config.train.cpus_per_worker
    trainers = workers * per_worker
    left = cluster_cpus - trainers
    if autoscaling or left >= DATA_MIN_CPUS:
        return
    raise ConfigError(
        f"the Ray cluster has {cluster_cpus:g} CPUs and the {workers} training workers take "
        f"{trainers} of them (train.num_workers={workers} x train.cpus_per_worker="
        f"{per_worker}), leaving {max(left, 0):g} for Ray Data, which needs at least "
        f"{DATA_MIN_CPUS:g} to read and decode images: the run would wait forever without a "
        "step. Give the cluster more CPUs (ray start --num-cpus, another node), or lower "
        "train.num_workers or train.cpus_per_worker."
    )


def check_cpus_left_for_data(config: RunConfig) -> None:
    """``check_cpus_for_data`` against the cluster this process is connected to."""
    check_cpus_for_data(config, cluster_cpus(), can_add_nodes(autoscaler_config()))


# --- where the read and decode tasks run ------------------------------------------------


def data_label_selector(decode_on: DecodeOn) -> dict[str, str] | None:
    """The ``label_selector`` of the read and decode tasks; None places them anywhere."""
    if decode_on == "any":
        return None
    key, value = DATA_NODE_LABEL
    return {key: value}


def autoscaler_config() -> Any | None:
    """The node groups the cluster's autoscaler may launch (its published ``ClusterConfig``),
    or None without an autoscaler (an embedded Ray, a fixed cluster of ``ray start`` nodes).

    Ray has no public call for it; Ray Data and Ray Train read the same record.
    """
    try:
        from ray._private.state import state

        return state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a moved private API: treated as "unknown"
        return None


def cluster_cpus() -> int:
    """The CPUs of the cluster at its largest: what the autoscaler's node groups add up to
    (``max_workers`` of each), else the CPUs of the nodes alive now. Ray Data's hash shuffle
    sizes its pool the same way (``_get_total_cluster_resources``)."""
    try:
        from ray._private.state import state

        largest = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - a moved private API: the nodes alive now
        largest = {}
    cpus = largest.get("CPU") or ray.cluster_resources().get("CPU", 0)
    return int(min(cpus, sys.maxsize))


def can_add_nodes(cluster_config: Any | None) -> bool:
    """Whether an autoscaler with ``cluster_config`` may launch another node (a node group
    whose ``max_count`` is above its ``min_count``, or unbounded)."""
    if cluster_config is None:
        return False
    return any(
        group.max_count == -1 or group.max_count > group.min_count
        for group in cluster_config.node_group_configs
        if group.max_count != 0
    )


def has_data_label(node: dict[str, Any]) -> bool:
    key, value = DATA_NODE_LABEL
    return (node.get("Labels") or {}).get(key) == value


def check_data_nodes_for(nodes: list[dict[str, Any]], autoscaling: bool) -> str | None:
    """For ``data.decode_on: cpu_nodes``: None when a node labelled ``DATA_NODE_LABEL`` is
    alive, a warning when none is but an autoscaler may add one, else ConfigError.

    ``nodes`` as ``ray.nodes()`` returns them. The autoscaler's published config does not
    say which node groups carry the label, so with an autoscaler this can only warn.
    """
    if any(node.get("Alive") and has_data_label(node) for node in nodes):
        return None
    key, value = DATA_NODE_LABEL
    label = f"{key}={value}"
    where = (
        "cluster.yaml's cpu_worker (labels:) and k8s/rayjob.yaml's cpu-workers (labels:) carry "
        f"it; a node started by hand takes `ray start --labels={label}`"
    )
    if not autoscaling:
        raise ConfigError(
            f"data.decode_on=cpu_nodes, but no alive Ray node is labelled {label} and this "
            "cluster has no autoscaler to add one: the read and decode tasks would wait "
            f"forever. Start data nodes with the label ({where}), or set "
            "--set data.decode_on=any."
        )
    return (
        f"data.decode_on=cpu_nodes, but no alive Ray node is labelled {label} yet: reading "
        "and decoding wait until the autoscaler adds one (scaling on labels needs Ray's "
        f"autoscaler v2; {where}). If no node group carries the label, the run waits forever: "
        "stop it and set --set data.decode_on=any."
    )


_WARNED: set[str] = set()


def check_decode_placement(decode_on: DecodeOn) -> None:
    """``check_data_nodes_for`` against the cluster this process is connected to; a warning
    goes to stderr once per process."""
    if decode_on == "any":
        return
    warning = check_data_nodes_for(ray.nodes(), can_add_nodes(autoscaler_config()))
    if warning is not None and warning not in _WARNED:
        _WARNED.add(warning)
        print(f"[darkmatter] WARNING: {warning}", file=sys.stderr)
