"""Representation quality per CPU-minute on the full CIFAR-10: kNN top-1 after a fixed
wall-clock budget of pretraining, beside the pixel-space and random-init baselines.

    .venv/bin/python benchmarks/cifar10_quality.py                      # 20 min, simclr
    .venv/bin/python benchmarks/cifar10_quality.py --methods simclr,byol --budget-min 20

Protocol: weighted kNN (Wu et al. 2018: cosine, k=200, T=0.1) of the backbone's
features, the 50,000 train images as the bank, the 10,000 test images as queries,
no augmentation; the pixel baseline is the same kNN on the per-channel normalised
pixels. Pretraining runs in this process, not on Ray: on a 2-core machine the goal
is the highest step rate, so the images are decoded once into memory, the SimCLR
views (Chen et al. 2020: flip, colour jitter 0.8 / grayscale 0.2, no blur at 32 px;
crop scale (0.2, 1) here, which learns faster in short runs than (0.08, 1)) plus
`--local-crops` SwAV multi-crop views (Caron et al. 2020) are drawn batched
(random-resized crops as one ``roi_align``, the colour half with
``pipelines.ingest.photometric``), the backbone is ``resnet18_3stage`` (see
``ssl_models.backbones``), the matmuls run in bfloat16 channels-last where the CPU
has AMX/AVX-512 BF16, and the learning rate follows a cosine over the wall-clock
budget (Loshchilov & Hutter 2017), so that every budget ends annealed. The methods,
backbones and probes are the project's own (``ssl_models``). Figures and how each
default was chosen: docs/RESULTS.md. The last line is JSON: budget_min, pixel_knn,
random_knn, best_method, best_knn.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cifar import add_data_argument, cifar_files  # noqa: E402

from pipelines.ingest.photometric import normalise, photometric  # noqa: E402
from pipelines.ingest.recipes import simclr  # noqa: E402
from ssl_models.backbones import build_backbone  # noqa: E402
from ssl_models.methods import Batch, build_method  # noqa: E402
from ssl_models.probes import knn_accuracy  # noqa: E402

# Per-method options for a short CPU run: small projectors, published temperatures.
METHOD_OPTIONS: dict[str, dict] = {
    "simclr": {"proj_hidden_dim": 512, "proj_dim": 128, "temperature": 0.2},
    "byol": {"proj_hidden_dim": 1024, "proj_dim": 128},
    "simsiam": {},
    "vicreg": {},
    "barlow_twins": {},
    "mocov3": {},
}


def load_split(
    data_dir: Path, pattern: str, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of the parquet files matching ``pattern``: uint8 (N, 3, 32, 32), labels (N,)."""
    images, labels = [], []
    for file in cifar_files(pattern, data_dir):
        table = pq.read_table(file, columns=["image", "label"]).to_pydict()
        for data, label in zip(table["image"], table["label"], strict=True):
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            labels.append(label)
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels)


def random_resized_crops(
    images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """torchvision's RandomResizedCrop (ratio 3/4..4/3) + horizontal flip for a whole
    uint8 batch at once, bilinear: float (N, 3, size, size) in [0, 255]."""
    n, _, h, w = images.shape
    area = torch.empty(n).uniform_(*scale, generator=generator) * h * w
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    cw = (area * ratio).sqrt().clamp(max=w)
    ch = (area / ratio).sqrt().clamp(max=h)
    x0 = torch.rand(n, generator=generator) * (w - cw)
    y0 = torch.rand(n, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    crops = roi_align(
        images.float(), boxes, size, spatial_scale=1.0, sampling_ratio=2, aligned=True
    )
    flip = torch.rand(n, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def make_views(
    images: torch.Tensor, spec, generator: torch.Generator, args: argparse.Namespace
) -> list[torch.Tensor]:
    """Two global views of ``spec``, then ``args.local_crops`` small ones (SwAV multi-crop,
    Caron et al. 2020; at 32 px: ``args.local_size`` px, scale (0.05, args.local_max_scale))."""
    local = dataclasses.replace(spec, size=args.local_size, scale=(0.05, args.local_max_scale))
    local_crops = args.local_crops
    views = []
    for view_spec in [spec, spec] + [local] * local_crops:
        crops = random_resized_crops(images, view_spec.size, view_spec.scale, generator)
        views.append(photometric(crops.round_().to(torch.uint8), view_spec, generator))
    # Channels-last: oneDNN's bf16 convolutions on AMX run fastest in NHWC.
    return [v.contiguous(memory_format=torch.channels_last) for v in views]


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, spec, autocast) -> torch.Tensor:
    model.eval()
    out = []
    for batch in images.split(1000):
        with autocast():
            x = normalise(batch, spec.mean, spec.std).contiguous(memory_format=torch.channels_last)
            out.append(model(x).float())
    return torch.cat(out)


def pretrain(
    method_name: str,
    args: argparse.Namespace,
    train_x: torch.Tensor,
    autocast,
) -> tuple[torch.nn.Module, int, float]:
    """Pretrain for ``args.budget_min`` wall-clock minutes; (backbone, steps, seconds)."""
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.backbone, args.stem == "small", 32)
    method = build_method(method_name, backbone, **METHOD_OPTIONS.get(method_name, {}))
    method = method.to(memory_format=torch.channels_last)
    spec = dataclasses.replace(simclr(32).views[0], scale=(args.min_scale, 1.0))
    lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(method.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(args.seed)
    budget = args.budget_min * 60
    method.train()
    started = time.perf_counter()
    step, losses = 0, []
    while (elapsed := time.perf_counter() - started) < budget:
        progress = elapsed / budget
        warmup = min(1.0, (step + 1) / args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup * 0.5 * (1 + math.cos(math.pi * progress))
        index = torch.randint(len(train_x), (args.batch_size,), generator=generator)
        views = make_views(train_x[index], spec, generator, args)
        with autocast():
            output = method(Batch(views))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        method.update_teacher(progress)
        losses.append(output.loss.item())
        step += 1
        if step % args.log_every == 0:
            print(
                f"  {method_name} step {step}  {elapsed / 60:.1f} min  "
                f"loss {np.mean(losses[-args.log_every :]):.3f}  "
                f"{args.batch_size * step / elapsed:.0f} img/s",
                flush=True,
            )
    return backbone.model, step, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget-min", type=float, default=20.0, help="pretraining minutes per method"
    )
    parser.add_argument("--methods", default="simclr", help="comma-separated ssl_models methods")
    parser.add_argument("--backbone", default="resnet18_3stage", help="ssl_models.backbones name")
    parser.add_argument(
        "--stem",
        choices=("small", "imagenet"),
        default="small",
        help="small-image stem (ssl_models.backbones) or the ImageNet one",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--min-scale", type=float, default=0.2, help="random-resized-crop scale low end"
    )
    parser.add_argument("--local-crops", type=int, default=4, help="multi-crop: small views")
    parser.add_argument("--local-size", type=int, default=16)
    parser.add_argument("--local-max-scale", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=0.6, help="SGD learning rate per 256 images")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-bf16", action="store_true", help="fp32 matmuls")
    parser.add_argument(
        "--train-limit", type=int, help="use only the first N train images (smoke runs)"
    )
    parser.add_argument(
        "--test-limit", type=int, help="use only the first N test images (smoke runs)"
    )
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save-dir", help="write <dir>/<method>/backbone.pt (for darkmatter eval / embed)"
    )
    add_data_argument(parser)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_OPTIONS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; accepted: {sorted(METHOD_OPTIONS)}")

    torch.set_num_threads(args.threads)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16)

    started = time.perf_counter()
    train_x, train_y = load_split(args.data, "train-*.parquet", args.train_limit)
    test_x, test_y = load_split(args.data, "test-*.parquet", args.test_limit)
    print(
        f"CIFAR-10: {len(train_x)} train / {len(test_x)} test images decoded in "
        f"{time.perf_counter() - started:.0f} s; {args.threads} threads, "
        f"{'fp32' if args.no_bf16 else 'bf16 autocast'}",
        flush=True,
    )
    spec = simclr(32).views[0]
    rows: list[tuple[str, float, str]] = []

    # The pixels as the network sees them (per-channel normalised): cosine on raw
    # uint8 pixels, all positive, mostly measures brightness (30.9% measured).
    pixel = knn_accuracy(
        normalise(train_x, spec.mean, spec.std).flatten(1),
        train_y,
        normalise(test_x, spec.mean, spec.std).flatten(1),
        test_y,
    )
    rows.append(("pixels (no model)", pixel, "-"))
    print(f"pixel-space kNN: {100 * pixel:.2f}%", flush=True)

    torch.manual_seed(args.seed)
    random_model = build_backbone(args.backbone, args.stem == "small", 32).model
    random_model = random_model.to(memory_format=torch.channels_last)
    random_knn = knn_accuracy(
        features(random_model, train_x, spec, autocast), train_y,
        features(random_model, test_x, spec, autocast), test_y,
    )  # fmt: skip
    rows.append((f"{args.backbone} random init", random_knn, "-"))
    print(f"random-init kNN: {100 * random_knn:.2f}%", flush=True)

    results: dict[str, float] = {}
    for name in methods:
        print(f"pretraining {name} on {args.backbone} for {args.budget_min:g} min ...", flush=True)
        model, steps, seconds = pretrain(name, args, train_x, autocast)
        knn = knn_accuracy(
            features(model, train_x, spec, autocast), train_y,
            features(model, test_x, spec, autocast), test_y,
        )  # fmt: skip
        results[name] = knn
        if args.save_dir:
            out = Path(args.save_dir) / name
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / "backbone.pt")
        epochs = steps * args.batch_size / len(train_x)
        rows.append(
            (
                f"{name} ({args.backbone})",
                knn,
                f"{steps} steps, {epochs:.1f} epochs, {seconds / 60:.1f} min",
            )
        )
        print(f"{name}: kNN {100 * knn:.2f}%", flush=True)

    print(f"\n{'model':<32} {'kNN top-1':>10}  pretraining")
    for label, value, detail in rows:
        print(f"{label:<32} {100 * value:>9.2f}%  {detail}")
    best = max(results, key=results.get) if results else None
    print(
        json.dumps(
            {
                "budget_min": args.budget_min,
                "pixel_knn": round(pixel, 4),
                "random_knn": round(random_knn, 4),
                "best_method": best,
                "best_knn": round(results[best], 4) if best else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
