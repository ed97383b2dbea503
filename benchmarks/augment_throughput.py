"""Two SimCLR views per image, img/s on one core: per-image PIL recipe vs ours vs decode.

    python benchmarks/augment_throughput.py --size 224
    python benchmarks/augment_throughput.py --size 32

(a) baseline: torchvision transforms on PIL images with lightly's SimCLRTransform
    parameters (crop scale 0.08-1, flip 0.5, ColorJitter(0.8, 0.8, 0.8, 0.2) at
    p=0.8, grayscale 0.2, PIL Gaussian blur sigma 0.1-2 at p=0.5, none at 32 px),
    applied twice per decoded image;
(b) ours: `crop_batch` (decode + crop to uint8, written into a batch of `--batch`
    views as a pipeline decode task does; "cpu part" is this alone) then `photometric`
    on the batch, writing into last batch's view tensors as the training loop on the
    CPU does;
(c) decode only (PIL, to RGB; torchvision's decoder, which ours uses, printed beside).

img/s per core = images over the process's CPU time (user + system, one torch
thread), best of `--repeats` runs: on a shared machine, time spent waiting for a
core is not ours to count, while cache misses and page faults still are. Wall-clock
rates are printed beside. The last line is JSON (with the 1-minute load average).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from _cifar import add_data_argument, cifar_jpegs, upscaled_jpegs  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from torchvision.io import decode_jpeg  # noqa: E402

from pipelines.ingest.crops import crop_batch  # noqa: E402
from pipelines.ingest.photometric import channels_first, photometric  # noqa: E402
from pipelines.ingest.recipes import simclr  # noqa: E402


class PILGaussianBlur:
    """lightly's GaussianBlur: PIL's filter with sigma ~ U(0.1, 2)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=float(np.random.uniform(0.1, 2.0))))


def baseline_transform(size: int) -> T.Compose:
    ops = [
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if size > 32:
        ops.append(T.RandomApply([PILGaussianBlur()], p=0.5))
    ops += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    return T.Compose(ops)


def rate(fn, n: int, repeats: int) -> tuple[float, float]:
    """(img per CPU second, img per wall second), each the best of `repeats` runs."""
    fn(min(n, 16))  # warm up
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        fn(n)
        cpu.append(n / (time.process_time() - start_cpu))
        wall.append(n / (time.perf_counter() - start_wall))
    return max(cpu), max(wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, choices=(224, 32), default=224)
    parser.add_argument("--images", type=int, default=0, help="default: 512 at 224, 4096 at 32")
    parser.add_argument("--batch", type=int, default=128, help="photometric batch (views)")
    parser.add_argument("--repeats", type=int, default=3)
    add_data_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.images or (512 if args.size == 224 else 4096)
    images = cifar_jpegs(n, args.data)
    if args.size == 224:
        images = upscaled_jpegs(images)
    recipe = simclr(args.size)
    transform = baseline_transform(args.size)

    def decode(k: int) -> None:
        for data in images[:k]:
            Image.open(io.BytesIO(data)).convert("RGB")

    def decode_torchvision(k: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for data in images[:k]:
                decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def baseline(k: int) -> None:
        for data in images[:k]:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            transform(image), transform(image)

    def cpu_part(k: int) -> list[np.ndarray]:
        # As a decode task of the pipeline: one batch of views per `--batch` images.
        rng = np.random.default_rng(0)
        views = []
        for start in range(0, k, args.batch):
            chunk = images[start : min(k, start + args.batch)]
            views = crop_batch(chunk, itertools.repeat(rng), recipe, rows=len(chunk)).views
        return views

    buffers: dict[tuple, torch.Tensor] = {}

    def ours(k: int) -> None:
        # As the training loop on the CPU: last step's view tensors take the next views.
        generator = torch.Generator().manual_seed(0)
        for start in range(0, k, args.batch):
            views = cpu_part(min(k, start + args.batch) - start)
            for v, spec in enumerate(recipe.views):
                shape = (v, *views[v].shape)
                crops = channels_first(torch.from_numpy(views[v]))
                buffers[shape] = photometric(crops, spec, generator, out=buffers.get(shape))

    base_n = min(n, 256 if args.size == 224 else 2048)
    load = os.getloadavg()[0]
    runs = {
        "baseline": rate(baseline, base_n, args.repeats),
        "ours": rate(ours, n, args.repeats),
        "ours_cpu_part": rate(cpu_part, n, args.repeats),
        "decode": rate(decode, n, args.repeats),
        "decode_torchvision": rate(decode_torchvision, n, args.repeats),
    }
    load = max(load, os.getloadavg()[0])
    result = {"size": args.size}
    result.update({f"{name}_img_s_core": round(cpu, 1) for name, (cpu, _) in runs.items()})
    result["load_avg_1min"] = round(load, 2)
    source = "256 px JPEGs (CIFAR-10 upscaled)" if args.size == 224 else "32 px CIFAR-10 JPEGs"
    print(f"two SimCLR views at {args.size} px from {source}, torch threads = 1, load {load:.1f}")
    print(f"  {'img/s':<26}{'per CPU s':>10}{'per wall s':>12}")
    for name, (cpu, wall) in runs.items():
        print(f"  {name:<26}{cpu:>10,.1f}{wall:>12,.1f}")
    speedup = result["ours_img_s_core"] / result["baseline_img_s_core"]
    print(f"  ours / baseline           {speedup:>10.1f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
