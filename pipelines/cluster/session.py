"""Connecting to Ray: a cluster when an address is given, else an embedded local Ray."""

from __future__ import annotations

import os

import ray
import ray.data


def connect_ray(address: str | None = None, min_cpus: int = 0) -> None:
    """A cluster when ``address`` (or RAY_ADDRESS) is given, else a new embedded local Ray
    with at least ``min_cpus`` logical CPUs; its dashboard listens on 127.0.0.1 only."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        address="local",  # a new embedded Ray, never one already running on this machine
        num_cpus=max(os.cpu_count() or 1, min_cpus),
        include_dashboard=True,  # the state API needs it; bound to 127.0.0.1 only
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level="WARNING",
    )


def quiet_ray_data() -> None:
    """No per-operator progress bars or plans from Ray Data: our commands print their own lines."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
