"""``darkmatter submit`` and ``darkmatter jobs``: run darkmatter commands on a Ray cluster
as Ray jobs, through the Jobs SDK (``ray.job_submission.JobSubmissionClient``).

The job's runtime environment carries the project (``working_dir``: this repository,
without virtual environments, git history or local runs) so the cluster runs the code
you submitted; the nodes provide the dependencies (``cluster.yaml`` installs them).
Secrets never go in the entrypoint (anyone who can list jobs reads it): the MLflow
tracking URI, and any variable named with ``--env``, travel as runtime-environment
variables read from your environment.

Token authentication: the SDK sends the cluster's token when ``RAY_AUTH_MODE=token`` is
set here; the token comes from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``,
else ``~/.ray/auth_token``. The dashboard listens on 127.0.0.1 on the head: reach it
through ``ray dashboard cluster.yaml`` (an SSH tunnel) or ``kubectl port-forward``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import secrets
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.exceptions import AuthenticationError

from pipelines.config import ConfigError, RunConfig, is_uri, load_config
from pipelines.tracking import redact_uri

# Never uploaded: environments, history, caches, local run outputs and stores.
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "runs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
]
PASSED_THROUGH_ENV = ("MLFLOW_TRACKING_URI",)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """A submission that cannot go ahead; the message says what to change."""


# --- building the job ---------------------------------------------------------------------


def check_address(address: str, allow_plain_http: bool) -> str:
    """The Jobs API address, refused when the token would cross a network in clear text."""
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(f"--address {address!r}: expected http://HOST:PORT or https://HOST:PORT")
    host = parsed.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parsed.scheme == "http" and not loopback and not allow_plain_http:
        raise SubmitError(
            f"--address {address!r} is plain HTTP to another machine: the cluster token would "
            "cross the network in clear text. Open a tunnel (`ray dashboard cluster.yaml`, or "
            "`kubectl port-forward`) and use http://127.0.0.1:8265, use https://, or pass "
            "--allow-plain-http inside a trusted network."
        )
    return address.rstrip("/")


def config_arguments(command: list[str]) -> tuple[str | None, list[str]]:
    """(``--config`` path, ``--set`` overrides) of a ``pretrain`` command line."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    known, _ = parser.parse_known_args(command[1:])
    return known.config, known.set


def relative_to_working_dir(path: str, working_dir: Path) -> str:
    """A local config path as the job sees it (relative to its working directory)."""
    resolved = Path(path).expanduser().resolve()
    try:
        return resolved.relative_to(working_dir).as_posix()
    except ValueError:
        raise SubmitError(
            f"config {path!r} is outside the uploaded working directory {str(working_dir)!r}: "
            "copy it into the project (e.g. configs/) or pass --working-dir"
        ) from None


def paths_outside(config: RunConfig, working_dir: Path) -> list[tuple[str, str]]:
    """(field, path) of each local data path of ``config`` that the upload does not carry."""
    fields = {
        f"data.{name}.path": getattr(config.data, name)
        for name in ("train", "knn_bank", "knn_query")
    }
    outside = []
    for field, source in fields.items():
        if source is None:
            continue
        for path in source.path if isinstance(source.path, list) else [source.path]:
            if not is_uri(path) and not Path(path).is_relative_to(working_dir):
                outside.append((field, path))
    return outside


def job_entrypoint(command: list[str], working_dir: Path) -> tuple[str, str | None]:
    """(shell entrypoint, run name): ``python -m pipelines.cli ...`` with the config path made
    relative to the working directory; a ``pretrain`` config is validated here first."""
    if not command:
        raise SubmitError(
            "nothing to submit: add the command after --, e.g. -- pretrain --config configs/demo.yaml"
        )
    if command[0] in ("submit", "jobs"):
        raise SubmitError(f"`darkmatter {command[0]}` runs here, not as a job")
    if redact_uri(" ".join(command)) != " ".join(command):
        raise SubmitError(
            "the command holds credentials (user:password@ in a URI); the entrypoint is visible "
            "to anyone who lists jobs. Export MLFLOW_TRACKING_URI (or pass --env NAME) instead."
        )
    run_name = None
    command = list(command)
    if command[0] == "pretrain":
        config_path, overrides = config_arguments(command)
        try:
            # Resolved as the job will resolve it: against the shipped working directory.
            config = load_config(config_path, overrides, base_dir=working_dir)
        except ConfigError as error:
            raise SubmitError(
                f"the pretrain config is invalid, nothing submitted: {error}"
            ) from None
        run_name = config.name
        for field, path in paths_outside(config, working_dir):
            print(
                f"[darkmatter] note: {field} = {path} is outside the shipped working directory; "
                "the job reads it at that path on the cluster's nodes",
                file=sys.stderr,
            )
        if config_path is not None:
            job_path = relative_to_working_dir(config_path, working_dir)
            command = [
                job_path
                if item == config_path
                else f"--config={job_path}"
                if item == f"--config={config_path}"
                else item
                for item in command
            ]
    # `python` of the node (cluster.yaml puts the project's environment first on PATH).
    return shlex.join(["python", "-m", "pipelines.cli", *command]), run_name


def job_runtime_env(working_dir: Path, env_names: list[str]) -> dict[str, Any]:
    """The project as ``working_dir`` and the named variables from this environment."""
    env_vars = {}
    for name in [*PASSED_THROUGH_ENV, *env_names]:
        if name in os.environ:
            env_vars[name] = os.environ[name]
        elif name in env_names:
            raise SubmitError(f"--env {name}: {name} is not set in this environment")
    return {
        "working_dir": str(working_dir),
        "excludes": WORKING_DIR_EXCLUDES,
        "env_vars": env_vars,
    }


def submission_id(run_name: str | None) -> str:
    return f"darkmatter-{run_name or 'job'}-{secrets.token_hex(3)}"


# --- talking to the cluster ---------------------------------------------------------------


def jobs_client(address: str, allow_plain_http: bool = False):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(check_address(address, allow_plain_http))


def follow_logs(client, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status."""

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(
            f"\n[darkmatter] stopped following; job {job_id} keeps running "
            f"(darkmatter jobs stop {job_id} ends it)",
            file=sys.stderr,
        )
        return "RUNNING"
    return str(client.get_job_status(job_id))


def exit_code_for(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def submit_command(args: argparse.Namespace) -> int:
    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    working_dir = Path(args.working_dir).resolve()
    entrypoint, run_name = job_entrypoint(command, working_dir)
    client = jobs_client(args.address, args.allow_plain_http)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id(run_name),
        runtime_env=job_runtime_env(working_dir, args.env),
        metadata={"darkmatter.command": command[0], "darkmatter.run_name": run_name or ""},
    )
    print(job_id)
    print(f"[darkmatter] submitted to {args.address}: {entrypoint}", file=sys.stderr)
    if "MLFLOW_TRACKING_URI" in os.environ:
        uri = redact_uri(os.environ["MLFLOW_TRACKING_URI"])
        print(f"[darkmatter] MLflow tracking URI passed to the job: {uri}", file=sys.stderr)
    if not args.follow:
        print(
            f"[darkmatter] follow it with: darkmatter jobs logs --follow {job_id}", file=sys.stderr
        )
        return 0
    status = follow_logs(client, job_id)
    print(f"[darkmatter] job {job_id}: {status}", file=sys.stderr)
    return exit_code_for(status) if status in TERMINAL else 0


def list_command(args: argparse.Namespace) -> int:
    jobs = sorted(
        jobs_client(args.address, args.allow_plain_http).list_jobs(),
        key=lambda job: job.start_time or 0,
    )
    print(f"{'JOB ID':<34} {'STATUS':<10} ENTRYPOINT")
    for job in jobs:
        entrypoint = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        print(f"{job.submission_id or job.job_id:<34} {job.status!s:<10} {entrypoint}")
    return 0


def status_command(args: argparse.Namespace) -> int:
    info = jobs_client(args.address, args.allow_plain_http).get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status}")
    if info.message:
        print(info.message)
    return exit_code_for(str(info.status)) if str(info.status) in TERMINAL else 0


def logs_command(args: argparse.Namespace) -> int:
    client = jobs_client(args.address, args.allow_plain_http)
    if args.follow:
        status = follow_logs(client, args.job_id)
        return exit_code_for(status) if status in TERMINAL else 0
    print(client.get_job_logs(args.job_id), end="")
    return 0


def stop_command(args: argparse.Namespace) -> int:
    stopped = jobs_client(args.address, args.allow_plain_http).stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def explained(handler: Callable[[argparse.Namespace], int], name: str):
    """Run ``handler``; turn the usual failures into one clear line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except SubmitError as error:
            message = str(error)
        except AuthenticationError as error:
            message = (
                f"the cluster refused the request ({str(error).splitlines()[0]}). Set "
                "RAY_AUTH_MODE=token here, with the cluster's token in RAY_AUTH_TOKEN_PATH "
                "(or ~/.ray/auth_token)."
            )
        except ConnectionError:
            message = (
                f"cannot reach the Ray Jobs API at {args.address}. Is the tunnel open "
                "(`ray dashboard cluster.yaml`, or `kubectl port-forward svc/<cluster>-head-svc "
                "8265:8265`)?"
            )
        except RuntimeError as error:  # the SDK's HTTP errors (unknown job id, ...)
            message = str(error).splitlines()[0]
        print(f"darkmatter {name}: {message}", file=sys.stderr)
        return 2

    return run
