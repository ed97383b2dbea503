"""Connecting to Ray: a cluster when an address is given, else an embedded local Ray."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import ray
import ray._private.ray_constants as ray_constants
import ray.data

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _single_machine_ray() -> Iterator[None]:
    """While a local Ray starts: its node address is 127.0.0.1, so every server it starts
    (GCS, raylet, core workers, agents, metrics) listens on loopback only.

    Ray turns a ``localhost`` node address into the machine's reachable address unless
    clusters are off, as on Windows and macOS (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read
    by this process's ``ray_constants`` and by the processes that start now). Restored after
    start-up: later subprocesses (a ``ray start`` of a test cluster) must not inherit it."""
    saved = (
        ray_constants.ENABLE_RAY_CLUSTER,
        os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR),
    )
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved[1]


def token_file() -> Path:
    """The file Ray reads its auth token from: ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def secure_token_file() -> Path | None:
    """Before a local Ray starts with token auth (Ray's default for ``ray.init()``): the token
    file, created mode 0600 when missing (Ray would write it with the umask's 0644), and a
    warning naming it when others can read it. None when the token is not read from a file
    (``RAY_AUTH_TOKEN``) or token auth is off (``RAY_AUTH_MODE``)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return None
    path = token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:  # 256 random bits, as Ray's own generate_new_authentication_token
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            print(
                f"[darkmatter] WARNING: the Ray auth token {path} can be read by other users "
                f"(mode {mode:04o}); run: chmod 600 {path}",
                file=sys.stderr,
            )
        return path
    with os.fdopen(descriptor, "w") as out:
        out.write(secrets.token_hex(32))
    ray._raylet.AuthenticationTokenLoader.instance().reset_cache()  # it may have looked before
    return path


def start_local_ray(**init_options) -> None:
    """A new Ray on this machine only (``ray.init(address="local", ...)``) that listens on
    127.0.0.1 alone, with its auth token file private (``secure_token_file``)."""
    secure_token_file()
    with _single_machine_ray():
        ray.init(address="local", _node_ip_address=LOOPBACK, **init_options)


class RayUnreachable(ConnectionError):
    """An address where no Ray answers (``ray.init`` would retry for a minute, then raise)."""


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A ``host:port`` or ``ray://host:port`` address takes a TCP connection, or
    ``RayUnreachable`` names it. Other forms (``auto``, ``local``) are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayUnreachable(f"no Ray cluster answers at {address!r} ({reason})") from None


def connect_ray(address: str | None = None, min_cpus: int = 0, verbose: bool = False) -> None:
    """A cluster when ``address`` (or RAY_ADDRESS) is given, else a new embedded local Ray
    with at least ``min_cpus`` logical CPUs; its dashboard listens on 127.0.0.1 only.

    Unless ``verbose``, Ray's own warnings stay in its log files (errors still show): the
    driver's ``ray`` logger at ERROR and, in an embedded Ray, Ray Data's loggers in every
    worker (``RAY_DATA_LOG_LEVEL``) and the raylet's worker start-up warning, which counts
    our few actors against a small machine's CPUs."""
    if address:
        check_reachable(address)
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
        "RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{dashboard_port}",
        # Ray Train's node-preemption watcher: no preemptions on one machine, and its actor
        # logs a spurious core-worker error line at every start.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    # The workers' collectives on loopback too (NCCL's bootstrap skips `lo` unless told).
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if name not in os.environ:
            env_vars[name] = "lo"
    if not verbose:
        env_vars["RAY_DATA_LOG_LEVEL"] = "ERROR"
    start_local_ray(  # a new embedded Ray, never one already running on this machine
        num_cpus=num_cpus,
        include_dashboard=True,  # the state API needs it; bound to 127.0.0.1 only
        dashboard_host=LOOPBACK,
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
