"""The Ray Train worker loop: set-up, resume, the step, the schedule, checkpoints, logging.

Read top to bottom like torchvision's reference ``train.py``: everything a step does is
in ``train_loop_per_worker``; Ray's calls (``get_context``, ``get_dataset_shard``,
``get_checkpoint``, ``report``) are visible where they happen. The step itself and its
non-finite policy are in ``pipelines.train.step``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from pipelines.config import RunConfig
from pipelines.ingest.dataset import ingest_counts
from pipelines.ingest.photometric import channels_first, normalise, photometric
from pipelines.ingest.position import DataPosition
from pipelines.ingest.recipes import ViewRecipe, ViewSpec
from pipelines.tracking import RunTracker
from pipelines.train.budget import TrainingBudget
from pipelines.train.checkpointing import Progress, load_checkpoint, temporary_checkpoint
from pipelines.train.consumed import ConsumedRows
from pipelines.train.optim import build_optimizer, build_schedule, scale_learning_rate
from pipelines.train.precision import in_mixed_precision, resolve_precision
from pipelines.train.progress import attach_console, post_progress, quiet_worker_logs, say
from pipelines.train.stall import within_timeout
from pipelines.train.step import NonFinitePolicy, train_step
from pipelines.train.throughput import ThroughputWindow
from ssl_models.backbones import build_backbone
from ssl_models.distributed import sharded_knn_accuracy
from ssl_models.methods import Batch, Method, build_method

# Metrics each report carries (rank 0's latest values): what Tune schedules and stops on.
REPORTED = ("loss", "effective_rank", "energy_gap", "embedding_std")


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (``train_loop_config={"loop": LoopConfig(...)}``).

    ``mlflow_run_id``: None when MLflow could not be reached (metrics stay local);
    ``local_dir``, ``tracking_uri``: absolute (workers ``chdir``); ``ingest_counter``: the
    name of the train split's decode counter; ``extra_columns``: batch columns drawn in the
    data pipeline (masks, ...) that the method receives as ``Batch.extras``;
    ``rows_per_epoch``: images in one epoch (for ``data/epoch_coverage``); ``lr_scale``: the
    learning rate's factor after restarts for non-finite steps (``train.nonfinite_lr_factor``).
    """

    config: RunConfig
    total_steps: int
    steps_per_epoch: int
    mlflow_run_id: str | None
    tracking_uri: str | None
    local_dir: str
    ingest_counter: str
    extra_columns: tuple[str, ...] = ()
    rows_per_epoch: int = 0
    verbose: bool = False
    register_model: str | None = None
    lr_scale: float = 1.0

    def __getstate__(self) -> dict[str, Any]:
        # The run config travels as JSON: its per-method models are built at import time
        # (pipelines.config), so pickle cannot find their classes by name.
        return {**vars(self), "config": self.config.model_dump(mode="json")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {**state, "config": RunConfig.model_validate(state["config"])}
        for name, value in state.items():
            object.__setattr__(self, name, value)


def build_model(config: RunConfig) -> Method:
    """The configured method around the configured backbone (on the CPU, untrained)."""
    backbone = build_backbone(
        config.backbone.name,
        small_image_stem=config.backbone.small_image_stem,
        image_size=config.data.recipe.size,
        pool=config.backbone.pool,
    )
    return build_method(config.method.name, backbone, **config.method.options)


def is_due(step: int, every: int, last: bool) -> bool:
    """Every ``every`` steps, and at the run's last step (``last``)."""
    return step % every == 0 or last


def train_loop_per_worker(loop_config: dict[str, LoopConfig]) -> None:
    """Ray Train's worker function: one worker's share of the run described by ``loop``."""
    # ---- set-up ------------------------------------------------------------------------------
    loop = loop_config["loop"]
    quiet_worker_logs(loop.verbose)
    config, total_steps = loop.config, loop.total_steps
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    channels_last = config.train.channels_last
    local_batch = config.train.batch_size // world_size  # elastic runs: normalise by world size
    recipe = config.data.recipe.build()
    torch.manual_seed(config.train.seed)
    model = place_model(build_model(config), device, world_size, channels_last)
    optimizer = build_optimizer(model, config.optim, config.train.batch_size)
    max_minutes = config.schedule.max_minutes
    budget = TrainingBudget(total_steps, max_minutes * 60 if max_minutes else None)
    schedule = build_schedule(optimizer, config.optim, total_steps, budget.time_fraction)
    grad_clip_norm = config.optim.grad_clip_norm

    # ---- resume from the last committed checkpoint, if any ------------------------------------
    progress, position = Progress(mlflow_run_id=loop.mlflow_run_id or ""), DataPosition()
    base_lrs = list(schedule.base_lrs)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        progress, position = load_checkpoint(checkpoint, model, optimizer, schedule)
        progress.mlflow_run_id = loop.mlflow_run_id or progress.mlflow_run_id
    # The lowest scale yet: this invocation's restarts, or an earlier invocation's checkpoint.
    progress.lr_scale = min(progress.lr_scale, loop.lr_scale)
    scale_learning_rate(schedule, base_lrs, progress.lr_scale)
    forward = ray.train.torch.prepare_model(model, move_to_device=False)
    if config.train.compile:
        forward = torch.compile(forward)
    forward = in_mixed_precision(forward, device, config.train.precision)
    tracker = start_tracking(loop, progress, world_size, device) if rank == 0 else None

    # ---- the loop: views -> step -> log, diagnostics, kNN -> report (and checkpoint) ----------
    # One pass over the shard is the rest of the run (all its epochs, less the rows the
    # checkpoint's data position says were consumed): the driver planned it so.
    shard = ray.train.get_dataset_shard("train")
    consumed = ConsumedRows(position)
    generator = torch.Generator(device=device)
    view_buffers: list[torch.Tensor] = []  # last step's CPU views, rewritten in place
    policy = NonFinitePolicy(config.train.max_nonfinite_in_a_row)
    window = ThroughputWindow(config.train.batch_size)
    latest: dict[str, float] = {}
    model.train()
    batches = shard.iter_torch_batches(
        batch_size=local_batch,
        drop_last=True,
        prefetch_batches=config.train.prefetch_batches,
        local_shuffle_buffer_size=config.data.shuffle_buffer or None,
        local_shuffle_seed=config.train.seed + rank + progress.step,
    )
    first_step = progress.step
    inject_at = set(config.train.inject_nonfinite_at) if rank == 0 else set()
    batches = within_timeout(batches, config.data.stall_timeout_s, lambda: progress.step + 1)
    for batch in window.timed(batches):
        if progress.step == first_step:  # the first batch is here: training time starts now
            budget.start(progress.train_seconds)
        generator.manual_seed(hash((config.train.seed, rank, progress.step)) & 0x7FFF_FFFF_FFFF)
        views = make_views(batch, recipe, generator, device, view_buffers, channels_last)
        if progress.step + 1 in inject_at:  # test hook: a diverged forward pass on rank 0
            views = [torch.full_like(view, float("nan")) for view in views]
        inputs = Batch(views, extras={c: batch[c].to(device) for c in loop.extra_columns})
        result = train_step(
            model,
            forward,
            inputs,
            optimizer,
            policy,
            progress,
            budget.fraction(progress.step + 1),
            grad_clip_norm,
        )
        progress.train_seconds = budget.tick(device)  # the same on every worker
        schedule.step()
        consumed.add(batch)
        progress.step += 1
        progress.images_seen += config.train.batch_size
        window.add(result.loss)
        last = budget.done(progress.step)

        metrics: dict[str, float] = {}
        if rank == 0 and is_due(progress.step, config.train.log_every, last):
            metrics = interval_metrics(window, optimizer, progress, loop)
            line = progress_line(metrics, progress.step, total_steps, budget.minutes_line())
            shown = metrics | ({"remaining_s": budget.remaining()} if budget.timed else {})
            post_progress(line, progress.step, shown)
            window.reset()
        diagnose = is_due(progress.step, config.train.diagnostics_every, last)
        if rank == 0 and diagnose and result.finite and result.output.embedding.shape[0] >= 2:
            metrics.update(model.diagnostics(result.output))
        if knn_due(config, progress.step, loop.steps_per_epoch, last):  # every rank: sharded
            progress.last_knn_top1 = metrics["knn_top1"] = online_knn(
                model, config, device, progress.step
            )
            epoch = math.ceil(progress.step / loop.steps_per_epoch)
            if rank == 0:
                say(f"[darkmatter] epoch {epoch}: kNN top-1 {100 * progress.last_knn_top1:.2f}%")
        if tracker is not None and metrics:
            tracker.log_metrics(metrics, progress.step)

        # Every worker reports at the same steps (a barrier): diagnostics steps feed Tune's
        # schedulers and stoppers; checkpoint steps also carry rank 0's checkpoint, with the
        # data position every worker agreed on.
        latest.update({k: metrics[k] for k in REPORTED if k in metrics}, step=progress.step)
        latest.update(knn_top1=progress.last_knn_top1, nonfinite_steps=progress.nonfinite_total)
        save = is_due(progress.step, config.checkpoint.every_steps, last)
        if save or progress.step % config.train.diagnostics_every == 0:
            report(latest, save, rank, consumed, model, optimizer, schedule, progress)
        if last:
            break
    else:  # the data ran out first (rows dropped as undecodable): the run ends here, everywhere
        if not budget.done(progress.step):
            if rank == 0:
                say(
                    f"[darkmatter] WARNING: the data ended at step {progress.step} of "
                    f"{total_steps} (undecodable images leave epochs short); the run ends here"
                )
            report(latest, True, rank, consumed, model, optimizer, schedule, progress)

    # ---- the end: data coverage, backbone weights and curves as artifacts ---------------------
    if tracker is not None:
        # Logged with the epoch as the step: one point per epoch read.
        for epoch, coverage in coverage_metrics(consumed.position, loop.rows_per_epoch).items():
            tracker.log_metrics(coverage, epoch)
        finish_run(tracker, model, loop)


def report(
    latest: dict[str, float],
    save: bool,
    rank: int,
    consumed: ConsumedRows,
    model: Method,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
) -> None:
    """``ray.train.report`` on every worker; when ``save``, first agree on the data position,
    and rank 0 attaches the checkpoint (weights, optimiser, progress, data position)."""
    position = consumed.sync() if save else None
    with temporary_checkpoint(
        rank == 0 and save, model, optimizer, schedule, progress, position
    ) as checkpoint:
        ray.train.report(dict(latest), checkpoint=checkpoint)


def coverage_metrics(position: DataPosition, rows_per_epoch: int) -> dict[int, dict[str, float]]:
    """Per epoch read: ``data/epoch_coverage`` (distinct images trained on / images in the
    epoch) and ``data/repeats`` (images trained on more than once in the epoch)."""
    return {
        epoch: {
            "data/epoch_coverage": position.coverage(epoch, rows_per_epoch),
            "data/repeats": float(position.repeats(epoch)),
        }
        for epoch in sorted(position.epochs)
    }


def place_model(
    model: Method, device: torch.device, world_size: int, channels_last: bool
) -> Method:
    """``model`` on ``device``: synchronised batch norm across GPUs, channels-last if asked."""
    if device.type == "cuda" and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_views(
    batch: dict[str, torch.Tensor],
    recipe: ViewRecipe,
    generator: torch.Generator,
    device: torch.device,
    buffers: list[torch.Tensor],
    channels_last: bool = False,
) -> list[torch.Tensor]:
    """The recipe's views of one batch, on ``device``: uint8 crops (columns ``view_i``,
    (N, S, S, 3)) -> photometric augmentation -> normalised float (N, 3, S, S).

    On the CPU, ``buffers`` holds last step's views and this step's are written into them
    (a fresh batch is page-faulted in; on a GPU the caching allocator already reuses
    memory), then ``buffers`` is replaced by this step's views.
    """
    views = []
    for index, (column, spec) in enumerate(zip(recipe.columns, recipe.views, strict=True)):
        crop = channels_first(batch[column])
        reusable = index < len(buffers) and buffers[index].shape == crop.shape
        out = buffers[index] if reusable else None
        views.append(photometric(crop.to(device, non_blocking=True), spec, generator, out=out))
    if device.type != "cuda":
        buffers[:] = views
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def start_tracking(
    loop: LoopConfig, progress: Progress, world_size: int, device: torch.device
) -> RunTracker:
    """Rank 0's tracker (MLflow, else local files) and the run's first console line."""
    config = loop.config
    attach_console(config.name)
    tracker = RunTracker(loop.tracking_uri, progress.mlflow_run_id or None, loop.local_dir)
    if config.tracking.system_metrics:
        tracker.start_system_metrics()
    tracker.set_tag("resumed_from_step", str(progress.step))
    precision = resolve_precision(device, config.train.precision)
    tracker.set_tag("precision", precision)
    layout = ", channels-last" if config.train.channels_last else ""
    say(
        f"[darkmatter] {config.method.name} on {config.backbone.name}: {world_size} worker(s) on "
        f"{device.type} ({precision}{layout}, {torch.get_num_threads()} thread(s)), global batch {config.train.batch_size}, "
        + (
            f"{config.schedule.max_minutes:g} min of training (at most {loop.total_steps} steps)"
            if config.schedule.max_minutes
            else f"{loop.total_steps} steps"
        )
        + (f", resuming at step {progress.step}" if progress.step else "")
        + (
            f", learning rate x{progress.lr_scale:g} after non-finite steps"
            if progress.lr_scale < 1
            else ""
        )
    )
    if progress.lr_scale < 1:
        tracker.set_tag("lr_scale", f"{progress.lr_scale:g}")
    return tracker


def interval_metrics(
    window: ThroughputWindow, optimizer: torch.optim.Optimizer, progress: Progress, loop: LoopConfig
) -> dict[str, float]:
    """The metrics logged every ``train.log_every`` steps (rank 0)."""
    counts = ingest_counts(loop.ingest_counter, settle_s=0)
    return {
        "images_decoded": float(counts["decoded"]),
        "images_skipped": float(counts["skipped"]),
        **window.metrics(),
        "lr": optimizer.param_groups[0]["lr"],
        "nonfinite_steps": float(progress.nonfinite_total),
        "epoch": progress.step / loop.steps_per_epoch,
    }


def progress_line(metrics: dict[str, float], step: int, total_steps: int, minutes: str = "") -> str:
    """``[darkmatter] step i/N  loss ...  lr ...  ... img/s  data wait ...%``; with a time
    budget, ``step i  m/M min ...`` (N is then only a cap)."""
    where = f"step {step}  {minutes}" if minutes else f"step {step}/{total_steps}"
    return (
        f"[darkmatter] {where}  loss {metrics['loss']:.4f}  "
        f"lr {metrics['lr']:.3g}  {metrics['img_per_s']:.0f} img/s  "
        f"data wait {100 * metrics['data_wait_share']:.0f}%"
    )


def knn_due(config: RunConfig, step: int, steps_per_epoch: int, last: bool) -> bool:
    """At the end of every ``data.knn_every_epochs``-th epoch and of the run, when configured."""
    if config.data.knn_bank is None or not is_due(step, steps_per_epoch, last):
        return False
    epoch = math.ceil(step / steps_per_epoch)
    return epoch % config.data.knn_every_epochs == 0 or last


@torch.no_grad()
def extract_features(
    model: Method,
    shard,
    spec: ViewSpec,
    device: torch.device,
    batch_size: int = 512,
    stall_timeout_s: float | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (N, D) and labels (N,) of a labeled eval dataset (columns ``image``,
    ``label``); ``DataStallError`` when a batch takes longer than ``stall_timeout_s``."""
    features, labels = [], []
    batches = shard.iter_torch_batches(batch_size=batch_size)
    if stall_timeout_s is not None:
        batches = within_timeout(batches, stall_timeout_s, lambda: step)
    for batch in batches:
        images = normalise(batch["image"].to(device), spec.mean, spec.std)
        features.append(model.backbone(images).float().cpu())
        labels.append(batch["label"].long().cpu())
    if not features:  # an empty shard (fewer rows than workers)
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(features), torch.cat(labels)


def online_knn(model: Method, config: RunConfig, device: torch.device, step: int) -> float:
    """Weighted kNN top-1 of the current backbone on the configured labeled splits, the same
    on every rank. Every rank calls it at the same step: each embeds its shard of the bank
    (at most ``data.knn_bank_max`` images in all) and of the queries, and the neighbours are
    merged across ranks (``sharded_knn_accuracy``), so no rank waits on another's whole kNN."""
    spec = config.data.recipe.build().views[0]
    was_training = model.training
    model.eval()
    bank, query = (
        extract_features(
            model,
            ray.train.get_dataset_shard(split),
            spec,
            device,
            stall_timeout_s=config.data.stall_timeout_s,
            step=step,
        )
        for split in ("knn_bank", "knn_query")
    )
    model.train(was_training)
    return sharded_knn_accuracy(*bank, *query, config.data.knn_k, config.data.knn_temperature)


def finish_run(tracker: RunTracker, model: Method, loop: LoopConfig) -> None:
    """Write and log ``backbone.pt`` (loads strictly into the torchvision model), the backbone
    as an MLflow model (registered if asked) and the curves."""
    from pipelines.evaluate.reports import plot_training_curves

    out = Path(loop.local_dir)
    backbone_path = out / "backbone.pt"
    torch.save({k: v.cpu() for k, v in model.backbone.model.state_dict().items()}, backbone_path)
    tracker.log_artifact(backbone_path)
    size = loop.config.data.recipe.size
    backbone = copy.deepcopy(model.backbone.model).cpu().eval()
    # Normalised images (N, 3, S, S) float32; two, so that the exported batch size is free.
    example = torch.zeros(2, 3, size, size).numpy()
    model_uri = tracker.log_model(backbone, example, loop.register_model)
    if model_uri is not None:
        tracker.set_tag("darkmatter.model_uri", model_uri)
        if loop.register_model:
            say(f"[darkmatter] backbone registered as MLflow model {loop.register_model!r}")
    curves = plot_training_curves(tracker.metrics_file, out / "training_curves.png")
    if curves is not None:
        tracker.log_artifact(curves)
    tracker.finish("FINISHED")
    problem = tracker.problem()
    if problem:
        say(f"[darkmatter] WARNING: {problem}")
    (out / "tracking_problem.txt").write_text(problem or "")
