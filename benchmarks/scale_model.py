"""Scaling on paper: what a pretraining config needs on N GPUs over a corpus of M images.

    python benchmarks/scale_model.py --config configs/simclr_imagenet.yaml
    python benchmarks/scale_model.py --config configs/simclr_imagenet.yaml --gpus 1000 \
        --images 1e9 --epochs 100 --cpu-img-s-core 523.1

Every figure printed carries its origin:
  measured  here, by this script (FLOPs with torch's FlopCounterMode, the checkpoint
            written by pipelines.train.checkpointing and its size on disk);
  cited     a published number (the source is printed beside it);
  input     a measurement you pass in (the per-core augmentation throughput comes from
            benchmarks/augment_throughput.py, see docs/SCALING.md);
  assumed   a stated assumption, overridable by a flag;
  derived   arithmetic on the above (the formula is in docs/SCALING.md).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipelines.config import RunConfig, load_config  # noqa: E402
from pipelines.train.checkpointing import STATE_FILE, Progress, save_checkpoint  # noqa: E402
from pipelines.train.loop import build_model  # noqa: E402
from pipelines.train.optim import build_optimizer, build_schedule  # noqa: E402
from ssl_models.methods import Batch  # noqa: E402

# ResNet-50 v1.5, 224 px, mixed precision, DGX A100 (8x A100 80GB): 16,621 img/s on 8 GPUs.
GPU_SOURCE = (
    "NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "
    "'Training performance: NVIDIA DGX A100 (8x A100 80GB)': 16,621 img/s AMP on 8 GPUs"
)
RN50_A100_IMG_S = 16_621 / 8
# Llama 3 405B pre-training: 419 unexpected interruptions in 54 days on 16,384 H100 GPUs,
# 8 GPUs per server (Llama 3 Herd of Models, arXiv:2407.21783, sec. 3.3.4).
FAILURE_SOURCE = "Llama 3 (arXiv:2407.21783) sec. 3.3.4: 419 unexpected interruptions, 54 days, 2,048 8-GPU servers"
FAILURES_PER_NODE_DAY = 419 / (16_384 / 8 * 54)
# ILSVRC2012_img_train.tar: about 138 GiB for 1,281,167 JPEGs.
BYTES_SOURCE = "ImageNet-1k train: ILSVRC2012_img_train.tar, about 138 GiB for 1,281,167 JPEGs"
IMAGENET_BYTES_PER_IMAGE = 138 * 2**30 / 1_281_167


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    origin: str  # measured | cited | input | assumed | derived
    note: str = ""


def train_flops_per_image(model: torch.nn.Module, sizes: list[int]) -> float:
    """Forward + backward FLOPs for one source image: every view through the method."""
    views = [torch.randn(2, 3, s, s) for s in sizes]
    counter = FlopCounterMode(display=False)
    with counter:
        model(Batch(views)).loss.backward()
    return counter.get_total_flops() / 2


def rn50_flops_per_image() -> float:
    """The cited baseline's work: supervised ResNet-50, one 224 px view, forward + backward."""
    model = torchvision.models.resnet50(weights=None)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(2, 3, 224, 224)).sum().backward()
    return counter.get_total_flops() / 2


def checkpoint_bytes(config: RunConfig) -> int:
    """Size of a real checkpoint (model, optimiser state after one step, schedule)."""
    model = build_model(config)
    optimizer = build_optimizer(model, config.optim, config.train.batch_size)
    schedule = build_schedule(optimizer, config.optim, max(2, config.optim.warmup_steps + 2))
    small = [torch.randn(4, 3, 32, 32) for _ in config.data.recipe.build().views]
    model(small).loss.backward()
    optimizer.step()
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(Path(directory), model, optimizer, schedule, Progress())
        return (Path(directory) / STATE_FILE).stat().st_size


def poisson_quantile(mean: float, q: float) -> int:
    """Smallest k with P(X <= k) >= q for X ~ Poisson(mean)."""
    k, term = 0, math.exp(-mean)
    total = term
    while total < q:
        k += 1
        term *= mean / k
        total += term
    return k


def scale_model(config: RunConfig, args: argparse.Namespace) -> list[Figure]:
    sizes = [view.size for view in config.data.recipe.build().views]
    model = build_model(config)
    ssl_flops = train_flops_per_image(model, sizes)
    base_flops = rn50_flops_per_image()
    gpu_img_s = (args.gpu_img_s or RN50_A100_IMG_S) * base_flops / ssl_flops
    total_img_s = gpu_img_s * args.gpus * args.scaling_efficiency
    cores_per_gpu = gpu_img_s / args.cpu_img_s_core
    data_cores = cores_per_gpu * args.gpus
    gpu_nodes = math.ceil(args.gpus / args.gpus_per_node)
    spare = max(0, args.gpu_node_cpus - args.gpus_per_node * config.train.cpus_per_worker)
    cpu_nodes = max(0, math.ceil((data_cores - spare * gpu_nodes) / args.cpu_node_cpus))
    epoch_s = args.images / total_img_s
    run_days = epoch_s * args.epochs / 86_400
    ckpt_bytes = checkpoint_bytes(config)
    write_s = ckpt_bytes / args.write_bytes_s
    nodes = gpu_nodes + cpu_nodes
    failures_per_day = args.failures_per_node_day * gpu_nodes  # a GPU node stops training
    mtbf_s = 86_400 / failures_per_day
    interval_s = math.sqrt(2 * write_s * mtbf_s)  # Young (1974)
    global_batch = config.local_batch_size * args.gpus  # the config's per-GPU batch, kept
    steps_per_s = total_img_s / global_batch
    expected_run_failures = failures_per_day * run_days
    down_at_once = poisson_quantile(failures_per_day * args.replace_hours / 24, 0.999)
    baseline_source = "--gpu-img-s" if args.gpu_img_s else GPU_SOURCE
    return [
        Figure(
            "train FLOPs per image (all views)",
            ssl_flops / 1e9,
            "GFLOP",
            "measured",
            f"{config.backbone.name}, views {sizes}, forward+backward",
        ),
        Figure("ResNet-50 224px supervised FLOPs per image", base_flops / 1e9, "GFLOP", "measured"),
        Figure(
            "ResNet-50 224px img/s per GPU",
            args.gpu_img_s or RN50_A100_IMG_S,
            "img/s",
            "input" if args.gpu_img_s else "cited",
            baseline_source,
        ),
        Figure(
            "images/s per GPU for this config",
            gpu_img_s,
            "img/s",
            "derived",
            "baseline x FLOP ratio (throughput taken as proportional to 1/FLOPs)",
        ),
        Figure("scaling efficiency at this GPU count", args.scaling_efficiency, "", "assumed"),
        Figure("images/s, whole cluster", total_img_s, "img/s", "derived"),
        Figure(
            "decode+crop img/s per CPU core",
            args.cpu_img_s_core,
            "img/s",
            "input",
            "benchmarks/augment_throughput.py, ours_cpu_part_img_s_core",
        ),
        Figure("CPU cores per GPU to keep it fed", cores_per_gpu, "cores", "derived"),
        Figure("CPU cores for Ray Data, whole cluster", data_cores, "cores", "derived"),
        Figure(
            "CPU worker nodes (cpu_worker)",
            cpu_nodes,
            "nodes",
            "derived",
            f"{args.cpu_node_cpus} cores each, after {spare} spare cores per GPU node",
        ),
        Figure("epoch time", epoch_s / 3600, "hours", "derived", f"{args.images:.3g} images"),
        Figure("run time", run_days, "days", "derived", f"{args.epochs} epochs"),
        Figure(
            "bytes per image read",
            args.bytes_per_image / 1e3,
            "kB",
            "input" if args.bytes_per_image != IMAGENET_BYTES_PER_IMAGE else "cited",
            "" if args.bytes_per_image != IMAGENET_BYTES_PER_IMAGE else BYTES_SOURCE,
        ),
        Figure("data read per second", total_img_s * args.bytes_per_image / 1e9, "GB/s", "derived"),
        Figure(
            "checkpoint size", ckpt_bytes / 1e6, "MB", "measured", "pipelines.train.checkpointing"
        ),
        Figure("checkpoint write bandwidth", args.write_bytes_s / 1e6, "MB/s", "assumed"),
        Figure(
            "failures per node-day",
            args.failures_per_node_day,
            "",
            "cited" if args.failures_per_node_day == FAILURES_PER_NODE_DAY else "input",
            FAILURE_SOURCE if args.failures_per_node_day == FAILURES_PER_NODE_DAY else "",
        ),
        Figure("GPU nodes", gpu_nodes, "nodes", "derived", f"{args.gpus_per_node} GPUs each"),
        Figure("all nodes", nodes, "nodes", "derived"),
        Figure(
            "expected training failures per day",
            failures_per_day,
            "",
            "derived",
            "GPU nodes x rate (a CPU node's loss only delays data)",
        ),
        Figure("expected training failures over the run", expected_run_failures, "", "derived"),
        Figure(
            "checkpoint interval (Young)",
            interval_s / 60,
            "minutes",
            "derived",
            "sqrt(2 x write time x MTBF)",
        ),
        Figure(
            "checkpoint.every_steps",
            max(1, round(interval_s * steps_per_s)),
            "steps",
            "derived",
            f"global batch {global_batch:,} ({config.local_batch_size} per GPU)",
        ),
        Figure(
            "checkpoint.max_failures",
            poisson_quantile(expected_run_failures, 0.999),
            "",
            "derived",
            "99.9% Poisson quantile of failures over the run",
        ),
        Figure(
            "elastic num_workers min",
            args.gpus - down_at_once * args.gpus_per_node,
            "workers",
            "derived",
            f"nodes down at once, 99.9% quantile, {args.replace_hours} h to replace a node",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/simclr_imagenet.yaml")
    parser.add_argument("--gpus", type=int, default=1000)
    parser.add_argument("--images", type=float, default=1e9, help="corpus size")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--cpu-img-s-core",
        type=float,
        required=True,
        help="decode+crop img/s per core (benchmarks/augment_throughput.py)",
    )
    parser.add_argument(
        "--gpu-img-s",
        type=float,
        default=0.0,
        help=f"ResNet-50 224px img/s per GPU (default: cited A100, {RN50_A100_IMG_S:.0f})",
    )
    parser.add_argument("--scaling-efficiency", type=float, default=0.9)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-node-cpus", type=int, default=96)
    parser.add_argument("--cpu-node-cpus", type=int, default=64)
    parser.add_argument("--bytes-per-image", type=float, default=IMAGENET_BYTES_PER_IMAGE)
    parser.add_argument(
        "--write-bytes-s",
        type=float,
        default=500e6,
        help="checkpoint write bandwidth to shared storage",
    )
    parser.add_argument("--failures-per-node-day", type=float, default=FAILURES_PER_NODE_DAY)
    parser.add_argument(
        "--replace-hours", type=float, default=1.0, help="time to replace a failed node"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.config)
    figures = scale_model(config, args)
    print(f"{config.name}: {args.gpus} GPUs, {args.images:.3g} images, {args.epochs} epoch(s)")
    for f in figures:
        print(f"  {f.name:<44}{f.value:>12,.3g} {f.unit:<8}{f.origin:<9}{f.note}")
    print(json.dumps({f.name: round(f.value, 4) for f in figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
