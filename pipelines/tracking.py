"""MLflow tracking that never stops training: every metric is also kept in a local JSONL
file, and when the tracking server cannot be reached the run goes on, and the final
message says what was not logged and where it is kept instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipelines.config import resolve_tracking_uri

RUN_NAME_TAG = "darkmatter.run_name"

# Fail fast on an unreachable server instead of MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_tracking_uri(base_dir: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` when set (a relative local store made absolute), else an
    absolute sqlite store (Ray workers chdir)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return resolve_tracking_uri(env)
    return f"sqlite:///{Path(base_dir).resolve() / 'mlflow.db'}"


def local_artifact_root(tracking_uri: str) -> str | None:
    """For a local sqlite store, artifacts beside it (absolute); the server decides otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def redact_uri(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://host`` wherever it appears in ``text``."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@", r"\1", text)


def quiet_mlflow(verbose: bool = False) -> None:
    """MLflow's INFO lines (e.g. "Creating initial MLflow database tables...") off the
    console unless ``verbose``; its warnings and errors still show."""
    if not verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def get_or_create_experiment(client: MlflowClient, experiment: str, tracking_uri: str) -> str:
    """The experiment's id, creating it (artifacts beside a local store) if needed."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=local_artifact_root(tracking_uri))


def start_or_resume_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    resuming: bool,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """(run id, is new): the latest run named ``run_name`` when the training run resumes
    from a checkpoint, else a new run."""
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment, tracking_uri)
    previous = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if resuming and previous:
        client.update_run(previous[0].info.run_id, status="RUNNING")
        return previous[0].info.run_id, False
    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # shown nested under the sweep's run
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id, True


class RunTracker:
    """Logs to one MLflow run and to ``local_dir/metrics.jsonl``; after the first failure to
    reach MLflow it stops trying and keeps everything locally."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, local_dir: str | Path) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.local_dir / "metrics.jsonl"
        self.client = MlflowClient(tracking_uri) if tracking_uri and run_id else None
        self.not_logged: list[str] = (
            [] if self.client else ["everything (no MLflow run could be started)"]
        )

    @property
    def online(self) -> bool:
        return self.client is not None

    def _call(self, what: str, client_method: str, *args: Any, **kwargs: Any) -> None:
        """Call ``MlflowClient.<client_method>``; on failure go offline and remember ``what``."""
        if self.client is None:
            self.not_logged.append(what)
            return
        try:
            getattr(self.client, client_method)(self.run_id, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure to reach MLflow goes offline
            self.client = None
            reason = redact_uri(str(error).splitlines()[0][:200]) if str(error) else ""
            self.not_logged.append(f"{what} ({type(error).__name__}: {reason})")

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._call(
                "params",
                "log_batch",
                params=items[start : start + 100],
            )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        timestamp = int(record["time"] * 1000)
        batch = [Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
        self._call(
            f"metrics at step {step}",
            "log_batch",
            metrics=batch,
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(
            f"artifact {Path(path).name}",
            "log_artifact",
            str(path),
            artifact_path,
        )

    def set_tag(self, key: str, value: str) -> None:
        self._call(f"tag {key}", "set_tag", key, value)

    def start_system_metrics(self) -> None:
        """MLflow's system metrics of this node (CPU, memory, disk, network; GPU when there
        is one) into the run every 10 s, until ``finish``; a resumed run continues its steps."""
        if self.client is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=True, tracking_uri=self.tracking_uri
            )
            self.monitor.start()
        except Exception as error:  # noqa: BLE001 - e.g. psutil missing: training goes on
            self.not_logged.append(f"system metrics ({type(error).__name__})")

    def log_inputs(self, datasets: list[tuple[DatasetDescription, str]]) -> None:
        """The run's data as MLflow dataset inputs: (description, context) pairs, e.g.
        ``(train, "training")``; shown under "Datasets" on the run page."""
        if self.client is None:
            self.not_logged.append("dataset inputs")
            return
        from mlflow.entities import DatasetInput, InputTag

        inputs = [
            DatasetInput(description.entity(), tags=[InputTag("mlflow.data.context", context)])
            for description, context in datasets
        ]
        self._call("dataset inputs", "log_inputs", datasets=inputs)

    def log_model(
        self, model: Any, input_example: Any, registered_model_name: str | None = None
    ) -> str | None:
        """``model`` (a torch module: (N, 3, S, S) float images -> (N, D) features) as the
        run's MLflow model ``backbone``, with its signature and ``input_example``
        ((2, 3, S, S) float32 numpy), registered as ``registered_model_name`` if given.
        Returns the model's URI (``models:/<model id>``), or None when MLflow is away."""
        if self.client is None:
            self.not_logged.append("the backbone model")
            return None
        try:
            import mlflow
            import mlflow.pytorch
            import torch
            from mlflow.models import infer_signature

            with torch.no_grad():
                output = model(torch.from_numpy(input_example)).numpy()
            mlflow.set_tracking_uri(self.tracking_uri)
            # The registry prints its own "Successfully registered" lines; pretrain says it.
            with mlflow.start_run(run_id=self.run_id), contextlib.redirect_stderr(io.StringIO()):
                info = mlflow.pytorch.log_model(
                    model,
                    name="backbone",
                    signature=infer_signature(input_example, output),
                    input_example=input_example,
                    registered_model_name=registered_model_name,
                    # Stated, not inferred: inference imports the model in a subprocess.
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision"],
                )
            return info.model_uri
        except Exception as error:  # noqa: BLE001 - the weights are in backbone.pt anyway
            reason = redact_uri(str(error).splitlines()[0][:200]) if str(error) else ""
            self.not_logged.append(f"the backbone model ({type(error).__name__}: {reason})")
            return None

    def finish(self, status: str = "FINISHED") -> None:
        if getattr(self, "monitor", None) is not None:
            self.monitor.finish()
        self._call("run status", "set_terminated", status)

    def problem(self) -> str | None:
        """None when everything reached MLflow, else what did not and where it is kept."""
        if not self.not_logged:
            return None
        where = redact_uri(self.tracking_uri) if self.tracking_uri else "MLflow"
        first = self.not_logged[0]
        return (
            f"MLflow at {where} could not be reached: {len(self.not_logged)} logging call(s) were not "
            f"recorded, starting with {first}. Metrics are kept in {self.metrics_file}, and the "
            f"run's files in {self.local_dir}."
        )


def git_state(directory: str | Path) -> dict[str, str]:
    """The commit and dirty state of the checkout holding ``directory`` (empty outside one)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "darkmatter.git_dirty": str(dirty).lower()}


def run_context_tags(ray_cluster: str, argv: list[str] | None = None) -> dict[str, str]:
    """Where a run came from: the git commit (and dirty state) of this checkout, the command
    line (credentials in URIs removed), the Ray cluster kind (local / remote), Ray and torch
    versions."""
    argv = list(sys.argv if argv is None else argv)
    command = shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else ""
    return {
        **git_state(Path(__file__).resolve().parent),
        "darkmatter.command": redact_uri(command)[:5000],
        "darkmatter.ray_cluster": ray_cluster,
        "darkmatter.ray_version": importlib.metadata.version("ray"),
        "darkmatter.torch_version": importlib.metadata.version("torch"),
    }


@dataclass(frozen=True)
class DatasetDescription:
    """A data set as MLflow records it without reading it: where it is (``source``, a path
    or URI; a manifest directory for a manifest), its name, and a digest of what says it
    changed (format, rows, file sizes and times; see ``dataset_digest``)."""

    name: str
    source: str
    digest: str
    profile: dict[str, Any]

    def entity(self):
        from mlflow.entities import Dataset

        return Dataset(
            name=self.name,
            digest=self.digest,
            source_type="local" if "://" not in self.source else self.source.split(":")[0],
            source=json.dumps({"uri": self.source}),
            profile=json.dumps(self.profile),
        )


def dataset_digest(paths: list[str], **facts: Any) -> str:
    """A short digest of a data set: its ``paths`` and ``facts`` (format, rows), plus, for
    local paths, the names, sizes and modification times of their files (10,000 at most)."""
    h = hashlib.sha256(json.dumps({"paths": paths, **facts}, sort_keys=True).encode())
    for source in paths:
        path = Path(source)
        if "://" in source or not path.exists():
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files[:10_000]:
            stat = file.stat()
            h.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_local_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
