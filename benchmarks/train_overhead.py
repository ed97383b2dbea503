"""Ray Train's overhead on a training step: one Ray Train worker against a plain PyTorch loop.

Same model (SimCLR, ResNet-18 at 32px), same objective, same batches (the committed
CIFAR-10 sample, cropped and photometrically augmented once, up front), same number of
threads. The Ray side reads the batches from a Ray Dataset shard with
``iter_torch_batches``, as the real loop does. Prints step times side by side and the
ratio (target <= 1.05); the last line is JSON.

    python benchmarks/train_overhead.py [--steps 30] [--batch-size 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from pipelines.ingest.dataset import view_dataset
from pipelines.ingest.recipes import simclr
from pipelines.ingest.sources import ImageSource
from pipelines.ingest.views import photometric
from ssl_models.backbones import build_backbone
from ssl_models.methods import build_method

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "cifar10-sample" / "train.parquet"
WARMUP = 5


def make_model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = build_method("simclr", build_backbone("resnet18"), proj_hidden_dim=512, proj_dim=128)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train_step(model, optimizer, view_0: torch.Tensor, view_1: torch.Tensor) -> float:
    spec = simclr(32).views[0]
    generator = torch.Generator().manual_seed(0)
    views = [photometric(view_0, spec, generator), photometric(view_1, spec, generator)]
    loss = model(views).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def timed_steps(batches, model, optimizer) -> float:
    """Mean seconds per step over the batches after the first WARMUP."""
    times = []
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        train_step(model, optimizer, batch["view_0"], batch["view_1"])
        now = time.perf_counter()
        if i >= WARMUP:
            times.append(now - start)
        start = now
    return float(np.mean(times))


def ray_worker(config: dict) -> None:
    torch.set_num_threads(config["threads"])
    model, optimizer = make_model_and_optimizer()
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(batch_size=config["batch_size"], drop_last=True)
    step_s = timed_steps(batches, model, optimizer)
    # Result.metrics only holds reports that carry a checkpoint: attach a tiny one.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "step_s.json").write_text(json.dumps(step_s))
        ray.train.report({"step_s": step_s}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    total = WARMUP + args.steps

    ray.init(
        address="local", num_cpus=args.threads + 2, include_dashboard=False, log_to_driver=False
    )
    rows = (args.batch_size * total) // 2000 + 1
    views = view_dataset(ImageSource(str(SAMPLE)), simclr(32), seed=0, epochs=rows)
    views = views.select_columns(["view_0", "view_1"]).limit(args.batch_size * total).materialize()

    torch.set_num_threads(args.threads)
    model, optimizer = make_model_and_optimizer()
    plain_batches = views.iter_torch_batches(batch_size=args.batch_size, drop_last=True)
    plain_s = timed_steps(list(plain_batches), model, optimizer)

    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"threads": args.threads, "batch_size": args.batch_size},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": args.threads}
        ),
        datasets={"train": views},
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="train_overhead_")),
    )
    ray_s = trainer.fit().metrics["step_s"]
    ray.shutdown()

    ratio = ray_s / plain_s
    print(f"{'':24}{'s/step':>10}{'img/s':>10}")
    print(f"{'plain PyTorch loop':24}{plain_s:>10.3f}{args.batch_size / plain_s:>10.1f}")
    print(f"{'Ray Train, 1 worker':24}{ray_s:>10.3f}{args.batch_size / ray_s:>10.1f}")
    print(f"ratio Ray / plain: {ratio:.3f} (target <= 1.05)")
    print(
        json.dumps(
            {
                "plain_step_s": plain_s,
                "ray_step_s": ray_s,
                "ratio": ratio,
                "batch_size": args.batch_size,
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
