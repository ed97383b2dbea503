"""``darkmatter tune``: a Ray Tune sweep whose trials are whole pretraining runs.

Each trial is a function trainable that runs ``run_pretraining`` (a ``TorchTrainer`` with
its own workers and checkpoints, resumable by the trial's name) and forwards rank 0's
reports to Tune with ``TuneReportCallback`` (the Ray 2.60 pattern). ASHA stops poor
trials on the online kNN accuracy (or the loss); ``CollapseStopper`` stops collapsed ones.
MLflow holds one parent run for the sweep and a nested child run per trial.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pipelines.config import (
    ConfigError,
    RunConfig,
    config_to_yaml,
    resolve_path,
    validate_config,
)
from pipelines.tracking import RUN_NAME_TAG, default_tracking_uri, redact_uri, start_or_resume_run
from pipelines.train.driver import connect_ray_for, cpus_per_run, run_pretraining
from pipelines.tune.plots import plot_sweep
from pipelines.tune.space import CollapseThresholds, TuneSpace, load_space, set_dotted

TRIAL_STATUS_TAG = "darkmatter.trial_status"
# What the trial's own process asks of Ray: it only drives its TorchTrainer, whose workers
# and Ray Data stages reserve their CPUs themselves (counted in max_concurrent_trials).
TRIAL_DRIVER_RESOURCES = {"CPU": 0.1}
MLFLOW_STATUS = {
    "completed": "FINISHED",
    "stopped early": "KILLED",
    "collapsed": "KILLED",
    "failed": "FAILED",
}


def shows_collapse(result: dict[str, Any], thresholds: CollapseThresholds) -> bool:
    """One report's verdict: is the embedding dead (see ``CollapseThresholds``)?"""
    if result.get("step", 0) < thresholds.grace_steps or "effective_rank" not in result:
        return False
    return (
        result["effective_rank"] < thresholds.min_effective_rank
        or result.get("embedding_std", math.inf) < thresholds.min_embedding_std
        or result.get("energy_gap", math.inf) <= thresholds.min_energy_gap
    )


class CollapseStopper(tune.Stopper):
    """Stops a trial after ``patience`` collapsed reports in a row, and remembers it."""

    def __init__(self, thresholds: CollapseThresholds) -> None:
        self.thresholds = thresholds
        self.strikes: dict[str, int] = defaultdict(int)
        self.collapsed: set[str] = set()

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.strikes[trial_id] = (
            self.strikes[trial_id] + 1 if shows_collapse(result, self.thresholds) else 0
        )
        if self.strikes[trial_id] >= self.thresholds.patience:
            self.collapsed.add(trial_id)
            return True
        return False

    def stop_all(self) -> bool:
        return False


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def pretrain_trial(
    params: dict[str, Any],
    *,
    base_tree: dict,
    sweep: str,
    trial_storage: str,
    tracking_uri: str,
    parent_run_id: str | None,
    verbose: bool = False,
) -> None:
    """One trial: the base config with this trial's values, pretrained under the trial's name."""
    trial_id = tune.get_context().get_trial_id()
    tree = set_dotted(base_tree, params)
    tree["name"] = trial_run_name(sweep, trial_id)
    tree.setdefault("checkpoint", {})["storage_path"] = trial_storage
    tree.setdefault("tracking", {})["tracking_uri"] = tracking_uri
    run_pretraining(
        validate_config(tree),
        parent_run_id=parent_run_id,
        trainer_callbacks=[TuneReportCallback()],
        verbose=verbose,
    )


def max_concurrent_trials(config: RunConfig) -> int:
    """As many trials as the cluster's resources hold at once: each needs what a single run
    does (``cpus_per_run``: its workers' CPUs plus ``train.data_cpus``), and its GPUs."""
    resources = ray.cluster_resources()
    fit = int(resources.get("CPU", 1) // cpus_per_run(config))
    if config.train.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // config.train.num_workers))
    if fit < 1:
        raise ConfigError(
            f"the cluster ({resources.get('CPU', 0)} CPU, {resources.get('GPU', 0)} GPU) cannot hold one trial "
            f"of {config.train.num_workers} worker(s); lower train.num_workers"
        )
    return fit


@dataclass
class TrialOutcome:
    trial_id: str
    status: str
    params: dict[str, Any]
    metric: float | None
    step: int
    mlflow_run_id: str | None


def classify(result, stopper: CollapseStopper, total_steps: int | None) -> str:
    """completed, stopped early (by ASHA), collapsed (by the stopper) or failed."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id", "")
    if result.error is not None:
        return "failed"
    if trial_id in stopper.collapsed:
        return "collapsed"
    if total_steps is not None and metrics.get("step", 0) < total_steps:
        return "stopped early"
    return "completed"


def mark_children(
    client: MlflowClient | None, experiment: str, sweep: str, outcomes: list[TrialOutcome]
) -> None:
    """Each trial's child run gets its status tag and a terminal MLflow status."""
    if client is None:
        return
    found = client.get_experiment_by_name(experiment)
    for outcome in outcomes:
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{RUN_NAME_TAG}` = '{trial_run_name(sweep, outcome.trial_id)}'",
            max_results=1,
        )
        if not runs:
            continue
        outcome.mlflow_run_id = runs[0].info.run_id
        client.set_tag(outcome.mlflow_run_id, TRIAL_STATUS_TAG, outcome.status)
        client.set_terminated(outcome.mlflow_run_id, MLFLOW_STATUS[outcome.status])


def best_trial(outcomes: list[TrialOutcome], mode: str) -> TrialOutcome | None:
    usable = [
        o for o in outcomes if o.status in ("completed", "stopped early") and o.metric is not None
    ]
    if not usable:
        return None
    return (max if mode == "max" else min)(usable, key=lambda o: o.metric)


def run_sweep(
    space_path: str,
    trials: int,
    *,
    scheduler: str = "asha",
    search: str = "random",
    overrides: list[str] | None = None,
    name: str | None = None,
    storage_path: str = "runs/sweeps",
    address: str | None = None,
    verbose: bool = False,
) -> tuple[list[TrialOutcome], str | None]:
    """Run (or resume) a sweep; returns the trials' outcomes and the best config as YAML."""
    space, base_tree, base = load_space(space_path, overrides)
    sweep = name or f"{Path(space_path).stem}-sweep"
    storage = resolve_path(storage_path)
    tracking_uri = base.tracking.tracking_uri or default_tracking_uri(storage)
    connect_ray_for(address, base, verbose)

    client, parent_run_id = None, None
    try:
        resuming = tune.Tuner.can_restore(f"{storage}/{sweep}")
        parent_run_id, _ = start_or_resume_run(
            tracking_uri, base.tracking.experiment, sweep, resuming
        )
        client = MlflowClient(tracking_uri)
        if not resuming:
            client.log_param(parent_run_id, "space", Path(space_path).name)
            client.log_param(parent_run_id, "trials", trials)
            client.log_text(parent_run_id, Path(space_path).read_text(), "space.yaml")
    except Exception as error:  # noqa: BLE001 - the sweep goes on without MLflow
        print(
            f"[darkmatter] WARNING: MLflow at {redact_uri(tracking_uri)} unreachable ({type(error).__name__}); "
            "the sweep goes on without it.",
            file=sys.stderr,
        )
        resuming = tune.Tuner.can_restore(f"{storage}/{sweep}")

    trainable = tune.with_resources(
        tune.with_parameters(
            pretrain_trial,
            base_tree=base_tree,
            sweep=sweep,
            trial_storage=f"{storage}/{sweep}-trials",
            tracking_uri=tracking_uri,
            parent_run_id=parent_run_id,
            verbose=verbose,
        ),
        TRIAL_DRIVER_RESOURCES,
    )
    stopper = CollapseStopper(space.collapse)
    if resuming:
        tuner = tune.Tuner.restore(
            f"{storage}/{sweep}", trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        search_alg = None
        if search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(metric=space.metric, mode=space.mode)
        trial_scheduler = (
            ASHAScheduler(
                metric=space.metric,
                mode=space.mode,
                time_attr="training_iteration",
                grace_period=space.asha.grace_period,
                max_t=space.asha.max_t,
            )
            if scheduler == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                num_samples=trials,
                scheduler=trial_scheduler,
                search_alg=search_alg,
                max_concurrent_trials=max_concurrent_trials(base),
            ),
            run_config=tune.RunConfig(name=sweep, storage_path=storage, stop=stopper, verbose=0),
        )
    results = tuner.fit()

    total_steps = base.schedule.steps
    outcomes = []
    for result in results:
        metrics = result.metrics or {}
        value = metrics.get(space.metric)
        if value is not None and space.metric == "knn_top1" and value < 0:
            value = None
        outcomes.append(
            TrialOutcome(
                trial_id=metrics.get("trial_id", Path(result.path).name),
                status=classify(result, stopper, total_steps),
                params={k: result.config.get(k) for k in space.params},
                metric=value,
                step=int(metrics.get("step", 0)),
                mlflow_run_id=None,
            )
        )
    best = best_trial(outcomes, space.mode)
    best_yaml = None
    if best is not None:
        tree = set_dotted(base_tree, best.params)
        tree["name"] = f"{sweep}-best"
        best_yaml = config_to_yaml(validate_config(tree))
    try:
        mark_children(client, base.tracking.experiment, sweep, outcomes)
        if client is not None and parent_run_id is not None:
            log_sweep_summary(client, parent_run_id, space, outcomes, best_yaml, storage, sweep)
    except Exception as error:  # noqa: BLE001
        print(
            f"[darkmatter] WARNING: the sweep summary did not reach MLflow ({type(error).__name__})",
            file=sys.stderr,
        )
    return outcomes, best_yaml


def log_sweep_summary(
    client: MlflowClient,
    parent_run_id: str,
    space: TuneSpace,
    outcomes: list[TrialOutcome],
    best_yaml: str | None,
    storage: str,
    sweep: str,
) -> None:
    table = {
        "trial_id": [o.trial_id for o in outcomes],
        "status": [o.status for o in outcomes],
        space.metric: [o.metric for o in outcomes],
        "step": [o.step for o in outcomes],
        **{key: [o.params.get(key) for o in outcomes] for key in space.params},
    }
    client.log_dict(parent_run_id, table, "trials.json")
    out_dir = Path(storage) / f"{sweep}-summary"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_sweep(table, list(space.params), space.metric, out_dir / "metric_vs_params.png")
    if plot is not None:
        client.log_artifact(parent_run_id, str(plot))
    if best_yaml is not None:
        client.log_text(parent_run_id, best_yaml, "best_config.yaml")
    counts = defaultdict(int)
    for o in outcomes:
        counts[o.status] += 1
    for status, count in counts.items():
        client.log_metric(parent_run_id, f"trials_{status.replace(' ', '_')}", float(count))
    client.set_terminated(parent_run_id, "FINISHED")


def print_outcomes(outcomes: list[TrialOutcome], metric: str) -> None:
    print(f"\n{'trial':<16} {'status':<14} {metric:>10} {'step':>6}  params")
    for o in outcomes:
        value = f"{o.metric:.4f}" if o.metric is not None else "-"
        print(f"{o.trial_id:<16} {o.status:<14} {value:>10} {o.step:>6}  {json.dumps(o.params)}")


def run_command(args: argparse.Namespace) -> int:
    try:
        outcomes, best_yaml = run_sweep(
            args.space,
            args.trials,
            scheduler=args.scheduler,
            search=args.search,
            overrides=args.set,
            name=args.name,
            storage_path=args.storage_path,
            address=args.address,
            verbose=args.verbose,
        )
    except ConfigError as error:
        print(f"darkmatter tune: {error}", file=sys.stderr)
        return 2
    space = yaml.safe_load(Path(args.space).read_text())
    print_outcomes(outcomes, space.get("metric", "knn_top1"))
    if best_yaml is None:
        print("\n[darkmatter] no trial finished with a usable metric", file=sys.stderr)
        return 1
    print("\n# best config: save as best.yaml and run `darkmatter pretrain --config best.yaml`")
    print(best_yaml)
    return 0
