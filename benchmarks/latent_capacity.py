"""The energy gap of the latent-variable predictive model against its latent's capacity.

    python benchmarks/latent_capacity.py [--data DIR] [--steps 2000] [--batch-size 32] [--images 4096]

The seed's claim: a latent-variable predictive EBM, E(x, y) = min_z D(Pred(x, z), y)
+ cost(z), needs a latent of limited capacity; as the capacity grows, every y gets low
energy and the gap between true (x, y) pairs and shuffled ones (x with another image's
y) closes. Here the model is the project's own (``ssl_models/methods/lvpredict.py``,
``lvpredict``) on CIFAR-10 images shrunk to 16 x 16 (the parquet shards of ``--data``,
default ../shared/data/cifar10 from the repository root; when they are absent the
2,000-image sample in data/ is used and the output says so): x = half of the 4 x 4
patches (4 px each, a random mask), y = the other half as per-patch normalised pixels.
Every capacity trains the same model (a ViT of 2 blocks, 64 wide; decoder 1 block)
from the same seed on the same batches and masks for the same number of steps:

- K = 1, 4, 16, 256: a discrete z among K learned hypotheses, E = min over K;
- unlimited: a continuous z as large as the target (one 48-d z per hidden patch, a
  patch's pixels), no cost (kl_weight 0).

Reported on held-out images with fixed masks: the mean energy of true pairs, of
shuffled pairs (each x with the y of another image, at that pair's own best z), their
gap, and for discrete latents the usage entropy of the K hypotheses (bits; log2 K when
all are used equally); a plot in docs/img/latent_capacity.png. The last line is JSON.
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
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from _cifar import CIFAR_DIR, add_data_argument  # noqa: E402
from _machine import cpu_model  # noqa: E402
from PIL import Image  # noqa: E402

from ssl_models.backbones import Backbone, ViTSize, _vit  # noqa: E402
from ssl_models.diagnostics import derange  # noqa: E402
from ssl_models.methods import Batch, build_method  # noqa: E402
from ssl_models.methods.lvpredict import usage_entropy_bits  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "cifar10-sample" / "train.parquet"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "latent_capacity.png"
SIDE, PATCH, HIDDEN_RATIO = 16, 4, 0.5
CAPACITIES: list[tuple[str, dict]] = [
    ("1", {"latent": "discrete", "hypotheses": 1}),
    ("4", {"latent": "discrete", "hypotheses": 4}),
    ("16", {"latent": "discrete", "hypotheses": 16}),
    ("256", {"latent": "discrete", "hypotheses": 256}),
    ("unlimited", {"latent": "continuous", "latent_dim": PATCH * PATCH * 3, "kl_weight": 0.0}),
]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_images(data_dir: Path, n: int, side: int = SIDE) -> tuple[torch.Tensor, str]:
    """n images as normalised (n, 3, side, side) floats, and where they came from."""
    files = sorted(Path(data_dir).glob("train-*.parquet"))
    if files:
        source = f"CIFAR-10 train ({data_dir})"
    else:
        print(
            f"CIFAR-10 not found in {data_dir} (train-*.parquet): using the committed "
            f"sample {SAMPLE} instead; figures are not comparable with the full set's",
            flush=True,
        )
        files, source = [SAMPLE], f"the committed 2,000-image sample ({SAMPLE.name})"
    jpegs: list[bytes] = []
    for file in files:
        jpegs += pq.read_table(file, columns=["image"]).column("image").to_pylist()
        if len(jpegs) >= n:
            break
    pixels = [
        np.asarray(
            Image.open(io.BytesIO(data if isinstance(data, bytes) else data["bytes"]))
            .convert("RGB")
            .resize((side, side), Image.Resampling.BICUBIC)
        )
        for data in jpegs[:n]
    ]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return (images - MEAN) / STD, f"{len(pixels)} images of {source}"


def random_masks(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 16) bool, half the patches hidden in each row."""
    t = (SIDE // PATCH) ** 2
    order = torch.rand(n, t, generator=generator).argsort(dim=1)
    return order < int(HIDDEN_RATIO * t)


def build(options: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    size = ViTSize(hidden_dim=64, num_layers=2, num_heads=4, mlp_dim=128)
    model, dim = _vit(size, SIDE, small_image_stem=True)
    backbone = Backbone("vit_16px", model, dim)
    decoder = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4}
    return build_method("lvpredict", backbone, **decoder, **options)


def train_and_measure(
    options: dict, train: torch.Tensor, test: torch.Tensor, steps: int, batch_size: int
) -> dict[str, float]:
    method = build(options).train()
    optimiser = torch.optim.AdamW(
        [p for p in method.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05
    )
    generator = torch.Generator().manual_seed(1)  # the same batches and masks for all
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(train), (batch_size,), generator=generator)
        mask = random_masks(batch_size, generator)
        loss = method(Batch([train[rows]], {"mask": mask})).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    seconds = time.perf_counter() - start
    method.eval()
    true, shuffled, choices = [], [], []
    with torch.no_grad():
        masks = random_masks(len(test), torch.Generator().manual_seed(2))
        for i in range(0, len(test), 256):
            output = method(Batch([test[i : i + 256]], {"mask": masks[i : i + 256]}))
            h, y = output.state
            energy = method.energy(h, y)
            true.append(energy.energy)
            shuffled.append(method.energy(h, derange(y)).energy)
            if energy.choice is not None:
                choices.append(energy.choice)
    e_true, e_shuffled = float(torch.cat(true).mean()), float(torch.cat(shuffled).mean())
    return {
        "energy_true": e_true,
        "energy_shuffled": e_shuffled,
        "energy_gap": e_shuffled - e_true,
        "usage_bits": usage_entropy_bits(torch.cat(choices), method.hypotheses)
        if choices
        else float("nan"),
        "train_seconds": seconds,
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["capacity"] for row in rows]
    x = np.arange(len(rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(x, [r["energy_true"] for r in rows], "o-", label="true (x, y)")
    left.plot(x, [r["energy_shuffled"] for r in rows], "s-", label="shuffled (x, y')")
    left.set_ylabel("energy (MSE of normalised pixels)")
    left.legend()
    right.bar(x, [r["energy_gap"] for r in rows], color="tab:green")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_ylabel("energy gap (shuffled - true)")
    for axis in (left, right):
        axis.set_xticks(x, labels)
        axis.set_xlabel("latent capacity (K hypotheses; unlimited: z as large as y)")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=4096, help="training images")
    parser.add_argument("--test-images", type=int, default=1024)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images, source = load_images(args.data or CIFAR_DIR, args.images + args.test_images)
    train, test = images[: args.images], images[args.images :]
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; data: {source}")
    print(f"{args.steps} steps of {args.batch_size} per capacity; {len(test)} held-out images")
    print(
        f"{'capacity':>10} {'E true':>8} {'E shuffled':>10} {'gap':>8} "
        f"{'usage bits':>10} {'train s':>8}"
    )
    rows = []
    for label, options in CAPACITIES:
        result = {
            "capacity": label,
            **train_and_measure(options, train, test, args.steps, args.batch_size),
        }
        rows.append(result)
        print(
            f"{label:>10} {result['energy_true']:8.4f} {result['energy_shuffled']:10.4f} "
            f"{result['energy_gap']:8.4f} {result['usage_bits']:10.2f} "
            f"{result['train_seconds']:8.1f}",
            flush=True,
        )
    title = f"lvpredict, {args.steps} steps x {args.batch_size}, {source}; CPU: {cpu_model()}"
    plot(rows, args.plot, title)
    print(f"plot: {args.plot}")
    print(
        json.dumps(
            {
                "capacity": [r["capacity"] for r in rows],
                "energy_true": [round(r["energy_true"], 5) for r in rows],
                "energy_shuffled": [round(r["energy_shuffled"], 5) for r in rows],
                "energy_gap": [round(r["energy_gap"], 5) for r in rows],
            }
        )
    )


if __name__ == "__main__":
    main()
