"""The Ray Train worker loop: set-up, resume, the step, the schedule, checkpoints, logging.

Read top to bottom like torchvision's reference ``train.py``: everything a step does is
in ``train_loop_per_worker``; Ray's calls (``get_context``, ``get_dataset_shard``,
``get_checkpoint``, ``report``) are visible where they happen.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipelines.config import RunConfig
from pipelines.ingest.dataset import ingest_counts
from pipelines.ingest.photometric import channels_first, photometric
from pipelines.ingest.recipes import ViewSpec
from pipelines.tracking import RunTracker
from pipelines.train.checkpointing import Progress, load_checkpoint, report_with_checkpoint
from pipelines.train.optim import build_optimizer, build_schedule
from pipelines.train.progress import post_progress
from ssl_models.backbones import build_backbone
from ssl_models.methods import Batch, Method, build_method
from ssl_models.probes import knn_accuracy

# Metrics each report carries (rank 0's latest values): what Tune schedules and stops on.
REPORTED = ("loss", "effective_rank", "energy_gap", "embedding_std")


class NonFiniteLossError(RuntimeError):
    """Raised after too many non-finite steps in a row; Ray Train then restores the last checkpoint."""


def say(message: str) -> None:
    """One line to the driver's console. Ray Train patches ``print`` to log *and* echo when
    stdout is wrapped (doubling every line); the process's own stdout is forwarded once."""
    print(message, file=sys.__stdout__, flush=True)


def build_model(config: RunConfig) -> Method:
    backbone = build_backbone(
        config.backbone.name,
        small_image_stem=config.backbone.small_image_stem,
        image_size=config.data.recipe.size,
    )
    return build_method(config.method.name, backbone, **config.method.options)


def normalise(images: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, normalised with the recipe's mean and std (no augmentation)."""
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def extract_features(
    model: Method, shard, spec: ViewSpec, device: torch.device, batch_size: int = 512
):
    """Backbone features and labels of a labeled eval dataset (columns ``image``, ``label``)."""
    features, labels = [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size):
        features.append(model.backbone(normalise(batch["image"].to(device), spec)).float().cpu())
        labels.append(batch["label"].long().cpu())
    return torch.cat(features), torch.cat(labels)


def online_knn(model: Method, config: RunConfig, device: torch.device) -> float:
    """Weighted kNN top-1 of the current backbone on the configured labeled splits."""
    spec = config.data.recipe.build().views[0]
    was_training = model.training
    model.eval()
    bank_x, bank_y = extract_features(model, ray.train.get_dataset_shard("knn_bank"), spec, device)
    query_x, query_y = extract_features(
        model, ray.train.get_dataset_shard("knn_query"), spec, device
    )
    model.train(was_training)
    return knn_accuracy(
        bank_x, bank_y, query_x, query_y, config.data.knn_k, config.data.knn_temperature
    )


def reusable_view_buffer(
    buffers: list[torch.Tensor], index: int, batch: torch.Tensor
) -> torch.Tensor | None:
    """Last step's view `index` when it can take this batch's views. The loop keeps
    buffers on the CPU only: there a fresh batch is page-faulted in, while the CUDA
    caching allocator already reuses memory."""
    if index >= len(buffers) or buffers[index].shape != batch.shape:
        return None
    return buffers[index]


def all_workers_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is true on every worker (so all skip a step together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    # ---- set-up --------------------------------------------------------------------------
    config = RunConfig.model_validate(loop_config["config"])
    total_steps: int = loop_config["total_steps"]
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_rank_zero = rank == 0
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    local_batch = config.train.batch_size // world_size  # elastic runs: normalise by world size
    recipe = config.data.recipe.build()

    torch.manual_seed(config.train.seed)
    model = build_model(config)
    if on_gpu and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if on_gpu and config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.optim, config.train.batch_size)
    schedule = build_schedule(optimizer, config.optim, total_steps)

    # ---- resume from the last committed checkpoint, if any --------------------------------
    progress = Progress(mlflow_run_id=loop_config.get("mlflow_run_id") or "")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, model, optimizer, schedule)
        progress.mlflow_run_id = loop_config.get("mlflow_run_id") or progress.mlflow_run_id
    resumed_from = progress.step

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    step_fn = torch.compile(ddp_model) if config.train.compile else ddp_model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if on_gpu and config.train.precision in ("auto", "bf16")
        else contextlib.nullcontext()
    )
    tracker = None
    if is_rank_zero:
        tracker = RunTracker(
            loop_config.get("tracking_uri"),
            progress.mlflow_run_id or None,
            loop_config["local_dir"],
        )
        tracker.set_tag("resumed_from_step", str(resumed_from))
        say(
            f"[darkmatter] {config.method.name} on {config.backbone.name}: {world_size} worker(s) on "
            f"{device.type}, global batch {config.train.batch_size}, {total_steps} steps"
            + (f", resuming at step {resumed_from}" if resumed_from else "")
        )

    # ---- the loop --------------------------------------------------------------------------
    shard = ray.train.get_dataset_shard("train")
    generator = torch.Generator(device=device)
    view_buffers: list[torch.Tensor] = []  # last step's CPU views, rewritten in place
    nonfinite_in_a_row = 0
    latest: dict[str, float] = {}
    window = {"loss": 0.0, "steps": 0, "all_steps": 0, "wait": 0.0, "start": time.perf_counter()}
    model.train()
    while progress.step < total_steps:
        batches = shard.iter_torch_batches(
            batch_size=local_batch, drop_last=True, prefetch_batches=config.train.prefetch_batches
        )
        waited_since = time.perf_counter()
        for batch in batches:
            window["wait"] += time.perf_counter() - waited_since
            generator.manual_seed(hash((config.train.seed, rank, progress.step)) & 0x7FFF_FFFF_FFFF)
            crops = [channels_first(batch[column]) for column in recipe.columns]
            views = [
                photometric(
                    crop.to(device, non_blocking=True),
                    spec,
                    generator,
                    out=reusable_view_buffer(view_buffers, v, crop),
                )
                for v, (crop, spec) in enumerate(zip(crops, recipe.views, strict=True))
            ]
            if not on_gpu:
                view_buffers = views
            if on_gpu and config.train.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]

            with autocast:
                output = step_fn(Batch(views))
            loss_is_finite = all_workers_agree(bool(torch.isfinite(output.loss)), device)
            optimizer.zero_grad(set_to_none=True)
            if loss_is_finite:
                output.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), config.optim.grad_clip_norm or math.inf
                )
                loss_is_finite = all_workers_agree(bool(torch.isfinite(grad_norm)), device)
            if not loss_is_finite:
                optimizer.zero_grad(set_to_none=True)
                progress.nonfinite_total += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= config.train.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} non-finite losses or gradients in a row at step "
                        f"{progress.step} ({progress.nonfinite_total} in all): stopping; Ray Train "
                        "restores the last checkpoint if failures remain (checkpoint.max_failures). "
                        "Lower optim.base_lr or set optim.grad_clip_norm."
                    )
            else:
                nonfinite_in_a_row = 0
                optimizer.step()
                model.update_teacher((progress.step + 1) / total_steps)
            schedule.step()
            progress.step += 1
            progress.images_seen += config.train.batch_size
            window["loss"] += output.loss.item() if loss_is_finite else 0.0
            window["steps"] += int(loss_is_finite)
            window["all_steps"] += 1

            # ---- logging, diagnostics, kNN, checkpoints ----------------------------------
            metrics: dict[str, float] = {}
            if is_rank_zero and (
                progress.step % config.train.log_every == 0 or progress.step == total_steps
            ):
                elapsed = time.perf_counter() - window["start"]
                counts = ingest_counts(loop_config["ingest_counter"])
                metrics = {
                    "images_decoded": float(counts["decoded"]),
                    "images_skipped": float(counts["skipped"]),
                    "loss": window["loss"] / max(1, window["steps"]),
                    "lr": optimizer.param_groups[0]["lr"],
                    "img_per_s": window["all_steps"] * config.train.batch_size / elapsed,
                    "data_wait_share": window["wait"] / elapsed,
                    "nonfinite_steps": float(progress.nonfinite_total),
                    "epoch": progress.step / steps_per_epoch,
                }
                say(
                    f"[darkmatter] step {progress.step}/{total_steps}  loss {metrics['loss']:.4f}  "
                    f"lr {metrics['lr']:.3g}  {metrics['img_per_s']:.0f} img/s  "
                    f"data wait {100 * metrics['data_wait_share']:.0f}%"
                )
                post_progress(config.name, step=progress.step, loss=metrics["loss"])
                window = {
                    "loss": 0.0,
                    "steps": 0,
                    "all_steps": 0,
                    "wait": 0.0,
                    "start": time.perf_counter(),
                }
            if is_rank_zero and (
                progress.step % config.train.diagnostics_every == 0 or progress.step == total_steps
            ):
                if output.embedding.shape[0] >= 2:
                    metrics.update(model.diagnostics(output))
            end_of_epoch = progress.step % steps_per_epoch == 0 or progress.step == total_steps
            epoch = math.ceil(progress.step / steps_per_epoch)
            if (
                is_rank_zero
                and config.data.knn_bank is not None
                and end_of_epoch
                and (epoch % config.data.knn_every_epochs == 0 or progress.step == total_steps)
            ):
                progress.last_knn_top1 = online_knn(model, config, device)
                metrics["knn_top1"] = progress.last_knn_top1
                say(f"[darkmatter] epoch {epoch}: kNN top-1 {100 * progress.last_knn_top1:.2f}%")
            if tracker is not None and metrics:
                tracker.log_metrics(metrics, progress.step)
            # Every worker reports at the same steps (a barrier): diagnostics steps feed Tune's
            # schedulers and stoppers; checkpoint steps also carry rank 0's checkpoint.
            latest.update({k: metrics[k] for k in REPORTED if k in metrics})
            latest["step"] = progress.step
            save_now = (
                progress.step % config.checkpoint.every_steps == 0 or progress.step == total_steps
            )
            if save_now or progress.step % config.train.diagnostics_every == 0:
                report = dict(
                    latest,
                    knn_top1=progress.last_knn_top1,
                    nonfinite_steps=progress.nonfinite_total,
                )
                report_with_checkpoint(
                    report, is_rank_zero, save_now, model, optimizer, schedule, progress
                )
            if progress.step >= total_steps:
                break
            waited_since = time.perf_counter()

    # ---- the end: backbone weights and curves as artifacts --------------------------------
    if tracker is not None:
        finish_run(tracker, model, loop_config["local_dir"])


def finish_run(tracker: RunTracker, model: Method, local_dir: str) -> None:
    """Write and log ``backbone.pt`` (loads strictly into the torchvision model) and the curves."""
    from pipelines.evaluate.reports import plot_training_curves

    out = Path(local_dir)
    backbone_path = out / "backbone.pt"
    torch.save({k: v.cpu() for k, v in model.backbone.model.state_dict().items()}, backbone_path)
    tracker.log_artifact(backbone_path)
    curves = plot_training_curves(tracker.metrics_file, out / "training_curves.png")
    if curves is not None:
        tracker.log_artifact(curves)
    tracker.finish("FINISHED")
    problem = tracker.problem()
    if problem:
        say(f"[darkmatter] WARNING: {problem}")
    (out / "tracking_problem.txt").write_text(problem or "")
