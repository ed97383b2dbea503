"""``darkmatter pretrain``: validate the config, connect to Ray (embedded or a cluster),
build the streaming dataset, and run the worker loop on a ``TorchTrainer``."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines.cluster.placement import check_checkpoint_storage
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
from pipelines.ingest.sources import ImageSource, count_rows
from pipelines.tracking import (
    DatasetDescription,
    RunTracker,
    dataset_digest,
    default_tracking_uri,
    redact_uri,
    run_context_tags,
    start_or_resume_run,
)
from pipelines.train.checkpointing import latest_position
from pipelines.train.loop import LoopConfig, train_loop_per_worker
from pipelines.train.progress import run_with_progress

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
            callbacks=callbacks,
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

    connect_ray_for(address, config, verbose)
    if not verbose:  # e.g. "Creating initial MLflow database tables..."
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    check_checkpoint_storage(config, storage_path)
    train_source = image_source(config.data.train)
    num_rows = count_images(train_source, config.data.num_images)
    total_steps, steps_per_epoch = plan_steps(config, num_rows)
    epochs_covered = math.ceil(total_steps / steps_per_epoch)
    recipe = config.data.recipe.build()
    mask = config.data.mask
    mask_generator = mask.build(config.data.recipe.size) if mask is not None else None
    quiet_ray_data()
    counters = {split: f"{config.name}/{split}" for split in ("train", "knn_bank", "knn_query")}

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

    # A failure restarts the workers from the last committed checkpoint, here rather than
    # inside Ray Train: the data is re-planned from that checkpoint's data position, so the
    # epoch continues where it was instead of starting again (exact resume, docs/SCALING.md).
    restarts = config.checkpoint.max_failures
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
        trainer = build_trainer(config, loop, datasets, storage_path, trainer_callbacks, verbose)
        try:
            shown_steps = (
                None if config.schedule.max_minutes and not config.schedule.steps else total_steps
            )
            result = run_with_progress(config.name, shown_steps, trainer.fit, resume_step)
            break
        except ray.train.TrainingFailedError as error:
            if attempt == restarts:
                raise
            print(f"[darkmatter] training failed: {error}", file=sys.stderr)
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


def run_command(args: argparse.Namespace, config: RunConfig) -> int:
    """``darkmatter pretrain`` once ``pipelines.cli`` has loaded and validated ``config``."""
    try:
        result = run_pretraining(
            config, args.address, verbose=args.verbose, register_model=args.register_model
        )
    except ConfigError as error:
        print(f"darkmatter pretrain: {error}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as error:
        print(f"darkmatter pretrain: training failed: {error}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0
