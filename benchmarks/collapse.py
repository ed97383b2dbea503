"""Collapse, shown: the same small predictive models trained with their energy alone, and
with the mechanism that keeps the energy from going flat, side by side.

    python benchmarks/collapse.py [--data DIR] [--steps 300] [--batch-size 64]

The seed's claim: an energy-based model trained only to lower the energy of compatible
pairs finds a trivial minimum (every pair gets low energy: a constant embedding, or a
latent that can explain any y); each family's anti-collapse mechanism keeps the energy
of incompatible pairs high. Two pairs of runs, same ViT (2 blocks, 64 wide, 4 px patches
on 32 x 32 CIFAR-10), same seed, batches and masks, AdamW 1e-3:

- I-JEPA (``ssl_models/methods/ijepa.py``): the EMA target encoder (momentum 0.996 -> 1)
  against no EMA: the targets are the online encoder's own, with gradients through both
  sides (the energy alone, no stop-gradient, no teacher);
- the latent-variable predictor (``lvpredict``): a discrete z of K = 16 hypotheses
  against an unlimited z (continuous, as large as a target patch, no cost).

MAE is not in the figure: its mechanism is the mask itself (y is the hidden patches),
and without it there is no y left to predict.

Every ``--every`` steps, on held-out images with fixed masks: the energy gap (the mean
energy of mismatched pairs, each x with another image's y, less that of true pairs; one
panel per family, their energies have different units) and the effective rank (RankMe)
of the encoder's mean patch token. The plot is docs/img/collapse.png;
the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _cifar import CIFAR_DIR, add_data_argument  # noqa: E402
from _machine import cpu_model  # noqa: E402
from latent_capacity import load_images  # noqa: E402

from pipelines.ingest.masks import MultiBlockMask, RandomPatchMask  # noqa: E402
from ssl_models.backbones import Backbone, ViTSize, _vit  # noqa: E402
from ssl_models.diagnostics import effective_rank  # noqa: E402
from ssl_models.methods import Batch, build_method  # noqa: E402
from ssl_models.methods.ijepa import IJEPA  # noqa: E402

PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "collapse.png"
SIDE, PATCH = 32, 4
GRID = SIDE // PATCH


class IJEPAWithoutEMA(IJEPA):
    """I-JEPA's energy alone: the targets come from the online encoder, with gradients
    (no EMA teacher, no stop-gradient)."""

    def targets(self, images: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        h = self.backbone.tokens(images)[:, 1:]
        h = F.layer_norm(h, (h.shape[-1],))
        n, m, p = blocks.shape
        index = blocks.reshape(n, m * p).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return torch.gather(h, 1, index).reshape(n, m, p, -1)

    def update_teacher(self, progress: float) -> None:
        pass


def small_backbone() -> Backbone:
    model, dim = _vit(ViTSize(hidden_dim=64, num_layers=2, num_heads=4, mlp_dim=128), SIDE, True)
    return Backbone("vit_32px_2x64", model, dim)


def build(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    predictor = {"predictor_dim": 64, "predictor_depth": 1, "predictor_heads": 4}
    decoder = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4}
    if variant == "ijepa_ema":
        return IJEPA(small_backbone(), **predictor)
    if variant == "ijepa_no_ema":
        return IJEPAWithoutEMA(small_backbone(), **predictor)
    if variant == "lvpredict_k16":
        return build_method(
            "lvpredict", small_backbone(), latent="discrete", hypotheses=16, **decoder
        )
    if variant == "lvpredict_unlimited":
        latent = {"latent": "continuous", "latent_dim": PATCH * PATCH * 3, "kl_weight": 0.0}
        return build_method("lvpredict", small_backbone(), **latent, **decoder)
    raise ValueError(variant)


VARIANTS = {
    "ijepa_ema": "I-JEPA, EMA teacher",
    "ijepa_no_ema": "I-JEPA, energy alone (no EMA)",
    "lvpredict_k16": "latent predictor, K = 16",
    "lvpredict_unlimited": "latent predictor, unlimited z",
}


def draw_masks(variant: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """The batch's mask columns, as the data pipeline draws them (one generator per row)."""
    draw = MultiBlockMask(grid=GRID) if variant.startswith("ijepa") else RandomPatchMask(GRID, 0.5)
    rows = [draw(np.random.default_rng([seed, i])) for i in range(n)]
    return {name: torch.from_numpy(np.stack([r[name] for r in rows])) for name in rows[0]}


@torch.no_grad()
def measure(method: torch.nn.Module, variant: str, test: torch.Tensor) -> dict[str, float]:
    """Energy of true and mismatched pairs and the effective rank on the held-out images."""
    method.eval()
    extras = draw_masks(variant, len(test), seed=10_000)
    output = method(Batch([test], extras))
    true, mismatched = method.energy_pairs(output)
    method.train()
    e_true, e_mismatched = float(true.mean()), float(mismatched.mean())
    context = method.backbone.tokens(test)[:, 1:].mean(dim=1)
    return {
        "energy_true": e_true,
        "energy_mismatched": e_mismatched,
        "energy_gap": e_mismatched - e_true,
        "effective_rank": effective_rank(context),
    }


def train(
    variant: str, images: torch.Tensor, test: torch.Tensor, args: argparse.Namespace
) -> list[dict]:
    method = build(variant).train()
    optimiser = torch.optim.AdamW(
        [p for p in method.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05
    )
    generator = torch.Generator().manual_seed(1)  # the same batches for every variant
    curve = [{"step": 0, **measure(method, variant, test)}]
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        extras = draw_masks(variant, args.batch_size, seed=step)
        loss = method(Batch([images[rows]], extras)).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        method.update_teacher(step / args.steps)
        if step % args.every == 0 or step == args.steps:
            curve.append({"step": step, **measure(method, variant, test)})
    return curve


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    gap_axes = {"ijepa": axes[0], "lvpredict": axes[1]}
    colors = {"ijepa": "tab:blue", "lvpredict": "tab:orange"}
    for variant, curve in curves.items():
        family = variant.split("_")[0]
        steps = [point["step"] for point in curve]
        style = dict(
            linestyle="-" if variant in ("ijepa_ema", "lvpredict_k16") else "--",
            color=colors[family],
            label=VARIANTS[variant],
        )
        gaps = [p["energy_mismatched"] - p["energy_true"] for p in curve]
        gap_axes[family].plot(steps, gaps, **style)
        axes[2].plot(steps, [p["effective_rank"] for p in curve], **style)
    axes[0].set_ylabel("energy gap (mismatched - true): smooth L1 of features")
    axes[1].set_ylabel("energy gap (mismatched - true): MSE of pixels")
    axes[2].set_ylabel("effective rank of the encoder (RankMe)")
    for axis in axes:
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every", type=int, default=50, help="steps between measurements")
    parser.add_argument("--images", type=int, default=8192, help="training images")
    parser.add_argument("--test-images", type=int, default=512)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    images, source = load_images(args.data or CIFAR_DIR, args.images + args.test_images, SIDE)
    train_images, test = images[: args.images], images[args.images :]
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; data: {source}")
    print(f"{args.steps} steps of {args.batch_size}; measured on {len(test)} held-out images")
    print(f"{'variant':>22} {'step':>5} {'E true':>9} {'E mismatch':>10} {'gap':>8} {'rank':>6}")
    curves: dict[str, list[dict]] = {}
    for variant in VARIANTS:
        start = time.perf_counter()
        curves[variant] = train(variant, train_images, test, args)
        for point in (curves[variant][0], curves[variant][-1]):
            print(
                f"{variant:>22} {point['step']:5d} {point['energy_true']:9.4f} "
                f"{point['energy_mismatched']:10.4f} {point['energy_gap']:8.4f} "
                f"{point['effective_rank']:6.2f}",
                flush=True,
            )
        print(f"{'':>22} ({time.perf_counter() - start:.0f} s)", flush=True)
    title = f"{args.steps} steps x {args.batch_size}, {source}; CPU: {cpu_model()}"
    plot(curves, args.plot, title)
    print(f"plot: {args.plot}")
    final = {v: c[-1] for v, c in curves.items()}
    print(
        json.dumps(
            {
                "variant": list(final),
                "energy_gap": [round(p["energy_gap"], 5) for p in final.values()],
                "effective_rank": [round(p["effective_rank"], 3) for p in final.values()],
                "energy_true": [round(p["energy_true"], 5) for p in final.values()],
                "energy_mismatched": [round(p["energy_mismatched"], 5) for p in final.values()],
            }
        )
    )


if __name__ == "__main__":
    main()
