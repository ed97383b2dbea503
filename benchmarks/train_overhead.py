"""Ray Train's overhead on a training step: one Ray Train worker against a plain PyTorch loop.

Same model (SimCLR), same objective, same batches (made once, up front, by our ingest
pipeline: decode + random resized crop), same photometric augmentation on the training
device, same threads. The Ray side reads the batches from a Ray Dataset shard with
``iter_torch_batches``, as the real loop does. Prints step times and img/s side by side,
the ratio (target <= 1.05) and, on a GPU, peak memory; the last line is JSON.

CPU (the committed sample, 32px, ResNet-18):
    python benchmarks/train_overhead.py
GPU (the issue's figure: ResNet-50 at 224px, bf16, channels_last, the sample's CIFAR
JPEGs upscaled to 256px):
    python benchmarks/train_overhead.py --device cuda --backbone resnet50 --size 224 \
        --batch-size 256 --steps 50 --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from _cifar import upscaled_jpegs
from ray.train.torch import TorchTrainer

from pipelines.ingest.dataset import view_dataset
from pipelines.ingest.photometric import channels_first, photometric
from pipelines.ingest.recipes import simclr
from pipelines.ingest.sources import ImageSource
from ssl_models.backbones import build_backbone
from ssl_models.methods import Batch, build_method

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "cifar10-sample" / "train.parquet"
WARMUP = 5


def upscaled_sample(size: int, out_dir: Path) -> Path:
    """The sample's JPEGs resized to ``size`` px (for 224px work), as a parquet file."""
    images = upscaled_jpegs(
        pq.read_table(SAMPLE, columns=["image"]).column("image").to_pylist(), size
    )
    path = out_dir / f"sample_{size}px.parquet"
    pq.write_table(pa.table({"image": images}), path)
    return path


def make_model_and_optimizer(args: dict, device: torch.device):
    torch.manual_seed(0)
    small_stem = args["size"] <= 64 and args["small_stem"]
    backbone = build_backbone(
        args["backbone"], small_image_stem=small_stem, image_size=args["size"]
    )
    model = build_method("simclr", backbone, proj_hidden_dim=2048, proj_dim=128).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def timed_steps(batches, model, optimizer, args: dict, device: torch.device) -> float:
    """Mean seconds per step over the batches after the first WARMUP."""
    spec = simclr(args["size"]).views[0]
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if args["bf16"] else contextlib.nullcontext()
    )
    times, start = [], time.perf_counter()
    for i, batch in enumerate(batches):
        views = [
            photometric(channels_first(batch[c]).to(device, non_blocking=True), spec, generator)
            for c in ("view_0", "view_1")
        ]
        if device.type == "cuda":
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with autocast:
            loss = model(Batch(views)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # synchronise, as a logging step would
        now = time.perf_counter()
        if i >= WARMUP:
            times.append(now - start)
        start = now
    return float(np.mean(times))


def ray_worker(args: dict) -> None:
    device = ray.train.torch.get_device()
    torch.set_num_threads(args["threads"])
    model, optimizer = make_model_and_optimizer(args, device)
    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=args["batch_size"], drop_last=True
    )
    step_s = timed_steps(batches, model, optimizer, args, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    # Result.metrics only holds reports that carry a checkpoint: attach a tiny one.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "step_s.json").write_text(json.dumps(step_s))
        ray.train.report(
            {"step_s": step_s, "peak_gib": peak},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--small-stem", action="store_true", help="CIFAR stem at <= 64px")
    parser.add_argument("--bf16", action="store_true")
    args = vars(parser.parse_args())
    total = WARMUP + args["steps"]
    device = torch.device(args["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")

    ray.init(
        address="local", num_cpus=args["threads"] + 2, include_dashboard=False, log_to_driver=False
    )
    work = Path(tempfile.mkdtemp(prefix="train_overhead_"))
    source = SAMPLE if args["size"] <= 32 else upscaled_sample(256, work)
    epochs = (args["batch_size"] * total) // 2000 + 1
    views = view_dataset(ImageSource(str(source)), simclr(args["size"]), seed=0, epochs=epochs)
    views = (
        views.select_columns(["view_0", "view_1"]).limit(args["batch_size"] * total).materialize()
    )

    torch.set_num_threads(args["threads"])
    model, optimizer = make_model_and_optimizer(args, device)
    plain_batches = list(views.iter_torch_batches(batch_size=args["batch_size"], drop_last=True))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    plain_s = timed_steps(plain_batches, model, optimizer, args, device)
    plain_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=args,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1,
            use_gpu=device.type == "cuda",
            resources_per_worker={"CPU": args["threads"]},
        ),
        datasets={"train": views},
        run_config=ray.train.RunConfig(storage_path=str(work / "ray")),
    )
    metrics = trainer.fit().metrics
    ray.shutdown()

    ray_s, ratio = metrics["step_s"], metrics["step_s"] / plain_s
    b = args["batch_size"]
    print(
        f"SimCLR {args['backbone']} {args['size']}px batch {b} on {device.type}{' bf16' if args['bf16'] else ''}"
    )
    print(f"{'':24}{'s/step':>10}{'img/s':>10}{'peak GiB':>10}")
    print(f"{'plain PyTorch loop':24}{plain_s:>10.3f}{b / plain_s:>10.1f}{plain_peak:>10.2f}")
    print(f"{'Ray Train, 1 worker':24}{ray_s:>10.3f}{b / ray_s:>10.1f}{metrics['peak_gib']:>10.2f}")
    print(f"ratio Ray / plain: {ratio:.3f} (target <= 1.05)")
    print(json.dumps({"plain_step_s": plain_s, "ray_step_s": ray_s, "ratio": ratio, **args}))


if __name__ == "__main__":
    main()
