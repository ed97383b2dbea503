"""MLflow tracking that never stops training: every metric is also kept in a local JSONL
file, and when the tracking server cannot be reached the run goes on, and the final
message says what was not logged and where it is kept instead.
"""

from __future__ import annotations

import json
import os
import re
import time
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

    def finish(self, status: str = "FINISHED") -> None:
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


def read_local_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
