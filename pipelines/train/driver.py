"""``darkmatter pretrain``: validate the config, connect to Ray (embedded or a cluster),
build the streaming dataset, and run the worker loop on a ``TorchTrainer``."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines.cluster.placement import check_checkpoint_storage, check_cpus_left_for_data
from pipelines.cluster.session import (
    connect_ray,
    ingest_execution_options,
    quiet_ray_data,
    ray_address_kind,
)
from pipelines.config import (
    ConfigError,
    RunConfig,
    SourceConfig,
    config_to_yaml,
    flatten,
    is_uri,
    resolve_paths,
)
from pipelines.ingest.dataset import ingest_counts, labeled_eval_dataset, view_dataset
from pipelines.ingest.masks import PatchMask
from pipelines.ingest.pacing import pace_scheduling_loops
from pipelines.ingest.sources import ImageSource, check_paths_here, count_rows
from pipelines.tracking import (
    DatasetDescription,
    RunTracker,
    dataset_digest,
    default_tracking_uri,
    quiet_mlflow,
    redact_uri,
    run_context_tags,
    start_or_resume_run,
)
from pipelines.train.checkpointing import latest_position
from pipelines.train.loop import LoopConfig, train_loop_per_worker
from pipelines.train.progress import run_with_progress
from pipelines.train.record import KeepRecordCopy, committed_steps
from pipelines.train.rendezvous import LoopbackTorchConfig
from pipelines.train.stall import DataStallError
from pipelines.train.step import NonFiniteLossError

# Where a run's local files go (config, curves, backbone.pt) when its checkpoints go to
# remote storage (s3://...): under this folder, by run name.
LOCAL_RUNS_DIR = Path.home() / ".darkmatter" / "runs"


@dataclass
class PretrainResult:
    run_name: str
    steps: int
    knn_top1: float | None
    mlflow_run_id: str | None
    tracking_uri: str
    run_dir: str
    tracking_problem: str | None
    ingest: dict


class RunStopped(ray.train.TrainingFailedError):
    """A failure that a restart would only repeat (a full disk, stalled data, non-finite steps
    with no restarts left): the run stops with this message; its last checkpoint is kept."""


def failure_causes(error: BaseException) -> list[BaseException]:
    """The workers' own exceptions in a ``TrainingFailedError``, or the controller's."""
    causes = list(getattr(error, "worker_failures", {}).values())
    controller = getattr(error, "controller_failure", None)
    return causes + ([controller] if controller is not None else [])


def is_disk_full(error: BaseException) -> bool:
    """An ``OSError`` for a full disk or quota, here or anywhere in its chain of causes."""
    while error is not None:
        if isinstance(error, OSError) and (
            error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error)
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def why_not_restart(
    error: ray.train.TrainingFailedError, storage_path: str, run_name: str, committed_step: int
) -> str | None:
    """The message to stop with instead of restarting after ``error``, or None to restart."""
    kept = (
        f"the last good checkpoint (step {committed_step}) in {storage_path}/{run_name} is kept"
        if committed_step
        else "no checkpoint was committed yet"
    )
    for failure in failure_causes(error):
        if is_disk_full(failure):
            return (
                f"checkpoint.storage_path {storage_path} is full: a write there failed "
                f"({failure}); {kept}. Free space there or set another "
                "checkpoint.storage_path (moving the run folder with it), then run the same "
                "command again to resume."
            )
        if isinstance(failure, DataStallError):
            return f"{failure} ({kept})"
    return None


def ingest_counters(run_name: str) -> dict[str, str]:
    """The names of the run's decode counters (``pipelines.ingest.dataset``), by split."""
    return {split: f"{run_name}/{split}" for split in ("train", "knn_bank", "knn_query")}


def image_source(source: SourceConfig) -> ImageSource:
    """The ingest source of a (path-resolved, see ``resolve_paths``) source config."""
    return ImageSource(**source.model_dump())


def has_checkpoint(storage_path: str, run_name: str) -> bool:
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    selector = pyarrow.fs.FileSelector(f"{root}/{run_name}", allow_not_found=True)
    return any(
        info.base_name.startswith("checkpoint_") for info in filesystem.get_file_info(selector)
    )


def cpus_per_run(config: RunConfig) -> int:
    """The CPUs one run takes: its training workers' plus ``train.data_cpus`` for Ray Data."""
    return config.train.num_workers * config.train.cpus_per_worker + config.train.data_cpus


def connect_ray_for(address: str | None, config: RunConfig, verbose: bool = False) -> None:
    """Ray for this run: the embedded one gets at least the CPUs the run takes."""
    connect_ray(address, cpus_per_run(config), verbose)


def count_images(source: ImageSource, declared: int | None) -> int:
    """Images in the training set, from file listings and parquet metadata, or a manifest's
    marker (nothing decoded)."""
    if declared is not None:
        return declared
    rows = count_rows(source)
    if rows is None:
        raise ConfigError(
            f"data.num_images: the images in {source.path} cannot be counted without reading "
            "every shard (webdataset); set data.num_images, or schedule.steps"
        )
    return rows


def plan_steps(config: RunConfig, num_rows: int) -> tuple[int, int]:
    """(total steps, steps per epoch) from the schedule and the number of training images."""
    steps_per_epoch = num_rows // config.train.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) is larger than the training set "
            f"({num_rows} images at {config.data.train.path})"
        )
    total = config.schedule.step_cap(steps_per_epoch)
    config.optim.check_warmup(total)
    return total, steps_per_epoch


def open_mlflow_run(
    config: RunConfig, tracking_uri: str, resuming: bool, parent_run_id: str | None = None
) -> str | None:
    """The run's MLflow id, or None (with a warning) when MLflow cannot be reached."""
    try:
        run_id, _ = start_or_resume_run(
            tracking_uri, config.tracking.experiment, config.name, resuming, parent_run_id
        )
    except Exception as error:  # noqa: BLE001 - training goes on without MLflow
        print(
            f"[darkmatter] WARNING: MLflow at {redact_uri(tracking_uri)} cannot be reached "
            f"({type(error).__name__}); training goes on and metrics are kept locally.",
            file=sys.stderr,
        )
        return None
    return run_id


def data_inputs(config: RunConfig, train_rows: int) -> list[tuple[DatasetDescription, str]]:
    """The run's data as MLflow inputs: the training set, and the kNN bank and queries."""
    inputs = []
    for split, context in (
        ("train", "training"),
        ("knn_bank", "knn-bank"),
        ("knn_query", "knn-query"),
    ):
        source = getattr(config.data, split)
        if source is None:
            continue
        paths = [source.path] if isinstance(source.path, str) else list(source.path)
        facts = {"format": source.format} | ({"rows": train_rows} if split == "train" else {})
        name = f"{split}:{Path(paths[0]).name or paths[0]}"
        digest = dataset_digest(paths, **facts)
        inputs.append((DatasetDescription(name, ",".join(paths), digest, facts), context))
    return inputs


def headline(config: RunConfig, steps: int, knn_top1: float | None) -> str:
    """The run's description on its MLflow page."""
    knn = f", kNN top-1 {100 * knn_top1:.2f}%" if knn_top1 is not None else ""
    return (
        f"{config.method.name} on {config.backbone.name}: {steps} steps at global batch "
        f"{config.train.batch_size}{knn}"
    )


def build_trainer(
    config: RunConfig,
    loop: LoopConfig,
    datasets: dict[str, ray.data.Dataset],
    storage_path: str,
    callbacks: list | None,
    verbose: bool = False,
) -> TorchTrainer:
    """The ``TorchTrainer`` of one attempt (no restarts of its own: ``run_pretraining``'s)."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        torch_config=LoopbackTorchConfig(),  # a local Ray's rendezvous on 127.0.0.1 too
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.num_workers,
            use_gpu=config.train.use_gpu,
            placement_strategy=config.train.placement_strategy,
            resources_per_worker={"CPU": config.train.cpus_per_worker}
            | ({"GPU": 1} if config.train.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
            # Node preemptions too: every restart goes through run_pretraining's re-planning.
            failure_config=ray.train.FailureConfig(
                max_failures=0, controller_failure_limit=0, max_preemption_failures=0
            ),
            callbacks=[KeepRecordCopy(f"{storage_path}/{config.name}"), *(callbacks or [])],
            # Ray Train's own INFO lines (worker group start, process group, checkpoints).
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
        datasets=datasets,
        # The kNN splits too: each rank embeds its share of the bank and of the queries
        # (pipelines.train.loop.online_knn merges the neighbours across ranks).
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train", "knn_bank", "knn_query"],
            execution_options=ingest_execution_options(),
        ),
    )


def run_attempts(
    config: RunConfig,
    loop: LoopConfig,
    train_source: ImageSource,
    mask_generator: PatchMask | None,
    storage_path: str,
    trainer_callbacks: list | None,
) -> ray.train.Result:
    """Fit the run, restarting after a failure from the last committed checkpoint, here
    rather than inside Ray Train: the data is re-planned from that checkpoint's data
    position, so the epoch continues where it was instead of starting again (exact resume,
    docs/SCALING.md). Non-finite steps restart with a lower learning rate; a full disk or
    stalled data stop the run at once (``RunStopped``): a restart would only repeat them."""
    recipe = config.data.recipe.build()
    epochs_covered = math.ceil(loop.total_steps / loop.steps_per_epoch)
    counters = ingest_counters(config.name)
    restarts = config.checkpoint.max_failures
    lr_scale = 1.0
    for attempt in range(restarts + 1):
        resume_step, position = latest_position(storage_path, config.name)
        if attempt:
            print(
                f"[darkmatter] restart {attempt}/{restarts}: resuming at step {resume_step}",
                file=sys.stderr,
            )
        datasets = {
            "train": view_dataset(
                train_source,
                recipe,
                seed=config.train.seed,
                epochs=epochs_covered,
                counter=counters["train"],
                mask_generator=mask_generator,
                position=position,
                reset_counter=attempt == 0,
                decode_on=config.data.decode_on,
            )
        }
        if config.data.knn_bank is not None and config.data.knn_query is not None:
            size = recipe.views[0].size
            for split in ("knn_bank", "knn_query"):
                source = image_source(getattr(config.data, split))
                datasets[split] = labeled_eval_dataset(
                    source,
                    size,
                    counter=counters[split],
                    decode_on=config.data.decode_on,
                    max_rows=config.data.knn_bank_max if split == "knn_bank" else None,
                )
        attempt_loop = dataclasses.replace(loop, lr_scale=lr_scale)
        trainer = build_trainer(
            config, attempt_loop, datasets, storage_path, trainer_callbacks, loop.verbose
        )
        try:
            shown_steps = (
                None
                if config.schedule.max_minutes and not config.schedule.steps
                else loop.total_steps
            )
            return run_with_progress(config.name, shown_steps, trainer.fit, resume_step)
        except ray.train.TrainingFailedError as error:
            # Read only (the disk may be full): the record, else its last good copy.
            committed_step = max(committed_steps(f"{storage_path}/{config.name}"), default=0)
            stop = why_not_restart(error, storage_path, config.name, committed_step)
            if stop is not None:
                raise RunStopped(stop) from None
            nonfinite = [e for e in failure_causes(error) if isinstance(e, NonFiniteLossError)]
            if nonfinite and attempt == restarts:
                raise RunStopped(
                    f"{nonfinite[0]} No restarts left (checkpoint.max_failures={restarts}); "
                    f"the last good checkpoint (step {committed_step}) is kept."
                ) from None
            if attempt == restarts:
                raise
            if nonfinite:
                lr_scale *= config.train.nonfinite_lr_factor
                print(f"[darkmatter] {nonfinite[0]}", file=sys.stderr)
                print(
                    f"[darkmatter] restoring step {committed_step} with the learning rate "
                    f"x{lr_scale:g} (train.nonfinite_lr_factor)",
                    file=sys.stderr,
                )
            else:
                print(f"[darkmatter] training failed: {error}", file=sys.stderr)
    raise AssertionError("unreachable: the last attempt returns or raises")


def run_pretraining(
    config: RunConfig,
    address: str | None = None,
    *,
    parent_run_id: str | None = None,
    trainer_callbacks: list | None = None,
    verbose: bool = False,
    register_model: str | None = None,
) -> PretrainResult:
    """Run (or resume) one pretraining run; ``parent_run_id`` nests its MLflow run under a
    sweep's, ``trainer_callbacks`` go to the trainer's RunConfig (Tune's report callback)."""
    config = resolve_paths(config)  # idempotent: load_config resolved them already
    storage_path = config.checkpoint.storage_path
    tracking_uri = config.tracking.tracking_uri or default_tracking_uri(
        storage_path if not is_uri(storage_path) else "."
    )
    local_dir = (
        Path(storage_path if not is_uri(storage_path) else LOCAL_RUNS_DIR)
        / config.name
        / "darkmatter"
    )
    local_dir.mkdir(parents=True, exist_ok=True)
    resuming = has_checkpoint(storage_path, config.name)

    for source in (config.data.train, config.data.knn_bank, config.data.knn_query):
        if source is not None:
            check_paths_here(image_source(source), address)
    connect_ray_for(address, config, verbose)
    quiet_mlflow(verbose)
    check_checkpoint_storage(config, storage_path)
    check_cpus_left_for_data(config)
    train_source = image_source(config.data.train)
    num_rows = count_images(train_source, config.data.num_images)
    total_steps, steps_per_epoch = plan_steps(config, num_rows)
    mask = config.data.mask
    mask_generator = mask.build(config.data.recipe.size) if mask is not None else None
    quiet_ray_data()
    pace_scheduling_loops()  # the trainers' data: an idle scheduling loop sleeps
    counters = ingest_counters(config.name)

    mlflow_run_id = open_mlflow_run(config, tracking_uri, resuming, parent_run_id)
    tracker = RunTracker(tracking_uri, mlflow_run_id, local_dir)
    config_file = local_dir / "config.yaml"
    config_file.write_text(config_to_yaml(config))
    if not resuming:
        tracker.log_params(flatten(config.model_dump(mode="json")))
        tracker.log_params({"total_steps": total_steps, "steps_per_epoch": steps_per_epoch})
    tracker.log_artifact(config_file)
    for key, value in run_context_tags(ray_address_kind()).items():
        tracker.set_tag(key, value)
    if not resuming:
        tracker.log_inputs(data_inputs(config, num_rows))
    loop = LoopConfig(
        config=config,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        mlflow_run_id=mlflow_run_id if tracker.online else None,
        tracking_uri=tracking_uri,
        local_dir=str(local_dir),
        ingest_counter=counters["train"],
        extra_columns=mask_generator.columns if mask_generator is not None else (),
        rows_per_epoch=num_rows,
        verbose=verbose,
        register_model=register_model,
    )

    try:
        result = run_attempts(
            config, loop, train_source, mask_generator, storage_path, trainer_callbacks
        )
    except KeyboardInterrupt as interrupt:
        # SIGINT, or SIGTERM (run_command turns it into the same): the workers go with this
        # process; what Ray Train committed stays, and the same command resumes from it.
        step = max(committed_steps(f"{storage_path}/{config.name}"), default=0)
        tracker.finish("KILLED")
        where = f"{storage_path}/{config.name}"
        print(
            f"\n[darkmatter] interrupted ({interrupt or 'SIGINT'}): MLflow run marked KILLED; "
            + (
                f"the last checkpoint, step {step}, is kept in {where}. "
                if step
                else f"no checkpoint was committed yet in {where}. "
            )
            + f"To resume, run the same command again (run name {config.name!r}, "
            f"checkpoint.storage_path {storage_path}).",
            file=sys.stderr,
        )
        raise
    except ray.train.TrainingFailedError:
        tracker.finish("FAILED")
        raise
    skipped = ingest_counts(counters["train"])
    problem_file = local_dir / "tracking_problem.txt"
    problem = problem_file.read_text().strip() if problem_file.exists() else None
    knn = (result.metrics or {}).get("knn_top1")
    knn = knn if knn is not None and knn >= 0 else None
    steps = int((result.metrics or {}).get("step", total_steps))
    tracker.set_tag("mlflow.note.content", headline(config, steps, knn))
    return PretrainResult(
        run_name=config.name,
        steps=steps,
        knn_top1=knn,
        mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking_uri,
        run_dir=str(local_dir),
        tracking_problem=problem or tracker.problem(),
        ingest=skipped,
    )


def print_summary(result: PretrainResult) -> None:
    print(f"\n[darkmatter] run {result.run_name!r} finished after {result.steps} steps.")
    counts = result.ingest
    print(
        f"[darkmatter] images decoded {counts['decoded']}, skipped {counts['skipped']}"
        + (f" {counts['skipped_by_reason']}" if counts["skipped"] else "")
    )
    if result.knn_top1 is not None:
        print(f"[darkmatter] kNN top-1 accuracy: {100 * result.knn_top1:.2f}%")
    print(f"[darkmatter] run files (config, backbone.pt, curves, metrics): {result.run_dir}")
    if result.tracking_problem:
        print(f"[darkmatter] WARNING: {result.tracking_problem}")
    elif result.mlflow_run_id:
        uri = redact_uri(result.tracking_uri)
        print(f"[darkmatter] MLflow run {result.mlflow_run_id} in {uri}")
        print(f"[darkmatter] open it with: mlflow ui --backend-store-uri '{uri}' --host 127.0.0.1")


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, ``kill``, a preempted node's shutdown) ends the run as
    Ctrl-C does: ``KeyboardInterrupt`` in the main thread, whose handler marks the run.
    Installed after ``ray.init``, whose own handler would abort the process."""

    def interrupt(signum: int, _frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def run_command(args: argparse.Namespace, config: RunConfig) -> int:
    """``darkmatter pretrain`` once ``pipelines.cli`` has loaded and validated ``config``."""
    try:
        connect_ray_for(args.address, config, args.verbose)
        interrupt_on_sigterm()
        result = run_pretraining(
            config, args.address, verbose=args.verbose, register_model=args.register_model
        )
    except ConfigError as error:
        print(f"darkmatter pretrain: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # the resume hint is printed already
        return 128 + (signal.SIGTERM if str(interrupt) == "SIGTERM" else signal.SIGINT)
    except RunStopped as error:
        print(f"darkmatter pretrain: stopped: {error}", file=sys.stderr)
        return 1
    except ray.train.TrainingFailedError as error:
        print(f"darkmatter pretrain: training failed: {error}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0
