"""MLflow tracking on a real local store, and the fallback when the server is unreachable."""

from __future__ import annotations

import socket

from mlflow.tracking import MlflowClient

from pipelines.tracking import RunTracker, read_local_metrics, redact_uri, start_or_resume_run


def test_metrics_reach_mlflow_and_the_local_file(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, is_new = start_or_resume_run(uri, "exp", "run-a", resuming=False)
    assert is_new
    tracker = RunTracker(uri, run_id, tmp_path / "local")
    tracker.log_params({"method.name": "simclr"})
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.log_metrics({"loss": 1.2}, step=2)
    tracker.finish()
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.5, 1.2]
    assert client.get_run(run_id).data.params["method.name"] == "simclr"
    assert [r["loss"] for r in read_local_metrics(tracker.metrics_file)] == [1.5, 1.2]
    assert tracker.problem() is None
    # A resumed run of the same name continues the same MLflow run.
    again, is_new = start_or_resume_run(uri, "exp", "run-a", resuming=True)
    assert again == run_id and not is_new
    fresh, is_new = start_or_resume_run(uri, "exp", "run-a", resuming=False)
    assert fresh != run_id and is_new


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_keeps_metrics_locally_and_says_so(tmp_path):
    uri = f"http://user:secret@127.0.0.1:{closed_port()}"
    tracker = RunTracker(uri, "0123abcd", tmp_path)
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert not tracker.online
    assert len(read_local_metrics(tracker.metrics_file)) == 3
    problem = tracker.problem()
    assert problem is not None
    assert "metrics at step 0" in problem and str(tracker.metrics_file) in problem
    assert "secret" not in problem  # credentials never reach a message


def test_redact_uri():
    assert redact_uri("https://u:p@host:5000/path") == "https://host:5000/path"
    assert redact_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
