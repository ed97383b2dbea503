"""Connecting to Ray: a cluster when an address is given, else an embedded local Ray."""

from __future__ import annotations

import os
import socket

import ray
import ray.data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(address: str | None = None, min_cpus: int = 0, verbose: bool = False) -> None:
    """A cluster when ``address`` (or RAY_ADDRESS) is given, else a new embedded local Ray
    with at least ``min_cpus`` logical CPUs; its dashboard listens on 127.0.0.1 only.

    Unless ``verbose``, Ray's own warnings stay in its log files (errors still show): the
    driver's ``ray`` logger at ERROR and, in an embedded Ray, Ray Data's loggers in every
    worker (``RAY_DATA_LOG_LEVEL``) and the raylet's worker start-up warning, which counts
    our few actors against a small machine's CPUs."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    logging_level = "INFO" if verbose else "ERROR"
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging_level)
        return
    num_cpus = max(os.cpu_count() or 1, min_cpus)
    dashboard_port = free_port()
    env_vars = {
        # Ray Train's placement-group cleaner finds the state API by this address; left to
        # auto-detection it fails when another Ray runs on the machine.
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
        # Ray Train's node-preemption watcher: no preemptions on one machine, and its actor
        # logs a spurious core-worker error line at every start.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    if not verbose:
        env_vars["RAY_DATA_LOG_LEVEL"] = "ERROR"
    ray.init(
        address="local",  # a new embedded Ray, never one already running on this machine
        num_cpus=num_cpus,
        include_dashboard=True,  # the state API needs it; bound to 127.0.0.1 only
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        configure_logging=True,
        logging_level=logging_level,
        runtime_env={"env_vars": env_vars},
        _system_config={} if verbose else {"worker_maximum_startup_concurrency": max(num_cpus, 8)},
    )


def ray_address_kind() -> str:
    """``local`` when this process started its Ray (embedded), else ``remote`` (a cluster
    it connected to, or the one a Tune trial runs in)."""
    node = ray._private.worker._global_node
    return "local" if node is not None and node.is_head() else "remote"


def quiet_ray_data(progress_bars: bool = False) -> None:
    """No execution plans from Ray Data, and no progress bars unless they are the command's
    progress (``eval``; ``pretrain`` draws its own view)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.print_on_execution_start = False


def ingest_execution_options() -> ray.data.ExecutionOptions:
    """The driver's Ray Data execution options for a trainer's ``DataConfig``: what
    ``DataConfig.default_ingest_options`` carries over, without the deprecated
    ``exclude_resources`` it passes (which warns in every run)."""
    options = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=options.resource_limits,
        preserve_order=options.preserve_order,
        verbose_progress=options.verbose_progress,
    )
