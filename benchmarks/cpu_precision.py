"""fp32 against bf16 autocast, NCHW against channels-last, for one training step on this
CPU, side by side; and what ``train.precision: auto`` picks here.

    .venv/bin/python benchmarks/cpu_precision.py                   # resnet18_3stage, 32 px
    .venv/bin/python benchmarks/cpu_precision.py --backbone resnet50 --size 224 --batch-size 32

The step is the loop's: a SimCLR forward on two views under ``in_mixed_precision`` (the
function ``darkmatter pretrain`` wraps its model in), backward, SGD; the model and views
placed as ``train.channels_last`` places them. Times are the best of ``--steps`` steps
after two warm-up steps. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_model  # noqa: E402

from pipelines.train.precision import (  # noqa: E402
    cpu_has_fast_bf16,
    in_mixed_precision,
    resolve_precision,
)
from ssl_models.backbones import build_backbone  # noqa: E402
from ssl_models.methods import Batch, build_method  # noqa: E402


def step_seconds(args: argparse.Namespace, precision: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, args.size <= 64, args.size)
    model = build_method("simclr", backbone, proj_hidden_dim=512, proj_dim=128)
    views = [torch.randn(args.batch_size, 3, args.size, args.size) for _ in range(2)]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    forward = in_mixed_precision(model, torch.device("cpu"), precision)  # type: ignore[arg-type]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for _ in range(2 + args.steps):
        started = time.perf_counter()
        loss = forward(Batch(views)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return min(times[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18_3stage")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    auto = resolve_precision(torch.device("cpu"), "auto")
    print(
        f"CPU: {cpu_model()}, {args.threads} threads; native bf16 (AMX / AVX-512 BF16): "
        f"{cpu_has_fast_bf16()}; train.precision auto -> {auto}"
    )
    print(f"{args.backbone}, {args.size} px, batch {args.batch_size} x 2 views, SimCLR step")
    results = {}
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            seconds = step_seconds(args, precision, channels_last)
            key = f"{precision}{'_channels_last' if channels_last else ''}"
            results[key] = seconds
    base = results["fp32"]
    print(f"{'precision':<10} {'layout':<14} {'s/step':>8} {'img/s':>8} {'vs fp32 NCHW':>13}")
    for key, seconds in results.items():
        precision, _, layout = key.partition("_")
        print(
            f"{precision:<10} {layout.replace('_', '-') or 'NCHW':<14} {seconds:>8.3f} "
            f"{args.batch_size / seconds:>8.0f} {base / seconds:>12.2f}x"
        )
    print(json.dumps({"cpu": cpu_model(), "auto": auto, "seconds_per_step": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
