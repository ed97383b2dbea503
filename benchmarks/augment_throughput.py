"""Two SimCLR views per image, img/s on one core: per-image PIL recipe vs ours vs decode.

    python benchmarks/augment_throughput.py --size 224
    python benchmarks/augment_throughput.py --size 32

(a) baseline: torchvision transforms on PIL images with lightly's SimCLRTransform
    parameters (crop scale 0.08-1, flip 0.5, ColorJitter(0.8, 0.8, 0.8, 0.2) at
    p=0.8, grayscale 0.2, PIL Gaussian blur sigma 0.1-2 at p=0.5, none at 32 px),
    applied twice per decoded image;
(b) ours: `views_from_bytes` (decode + crop to uint8) then `photometric` batched;
(c) decode only (PIL, to RGB). The last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from _cifar import cifar_jpegs, upscaled_jpegs  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from pipelines.ingest.crops import views_from_bytes  # noqa: E402
from pipelines.ingest.photometric import photometric  # noqa: E402
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


def rate(fn, n: int) -> float:
    fn(min(n, 16))  # warm up
    start = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, choices=(224, 32), default=224)
    parser.add_argument("--images", type=int, default=0, help="default: 512 at 224, 4096 at 32")
    parser.add_argument("--batch", type=int, default=128, help="photometric batch (views)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.images or (512 if args.size == 224 else 4096)
    images = cifar_jpegs(n)
    if args.size == 224:
        images = upscaled_jpegs(images)
    recipe = simclr(args.size)
    transform = baseline_transform(args.size)

    def decode(k: int) -> None:
        for data in images[:k]:
            Image.open(io.BytesIO(data)).convert("RGB")

    def baseline(k: int) -> None:
        for data in images[:k]:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            transform(image), transform(image)

    def cpu_part(k: int) -> list[np.ndarray]:
        rng = np.random.default_rng(0)
        rows = [views_from_bytes(data, recipe, rng) for data in images[:k]]
        return [np.stack([r[v] for r in rows]) for v in range(len(recipe.views))]

    def ours(k: int) -> None:
        generator = torch.Generator().manual_seed(0)
        for start in range(0, k, args.batch):
            views = cpu_part(min(k, start + args.batch) - start)
            for v, spec in enumerate(recipe.views):
                photometric(torch.from_numpy(views[v]), spec, generator)

    base_n = min(n, 256 if args.size == 224 else 2048)
    result = {
        "size": args.size,
        "baseline_img_s_core": round(rate(baseline, base_n), 1),
        "ours_img_s_core": round(rate(ours, n), 1),
        "ours_cpu_part_img_s_core": round(rate(cpu_part, n), 1),
        "decode_img_s_core": round(rate(decode, n), 1),
    }
    source = "256 px JPEGs (CIFAR-10 upscaled)" if args.size == 224 else "32 px CIFAR-10 JPEGs"
    print(f"two SimCLR views at {args.size} px from {source}, torch threads = 1")
    for key, value in result.items():
        if key != "size":
            print(f"  {key:<26}{value:>10,.1f}")
    speedup = result["ours_img_s_core"] / result["baseline_img_s_core"]
    print(f"  ours / baseline           {speedup:>10.1f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
