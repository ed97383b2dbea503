"""Representation quality per CPU-minute on the full CIFAR-10, through the product:
``darkmatter pretrain`` with a wall-clock budget (``schedule.max_minutes``) on the five
train shards, then ``darkmatter eval`` of the backbone it wrote, beside the pixel-space
and random-init baselines.

    .venv/bin/python benchmarks/cifar10_quality.py                      # 20 min, simclr
    .venv/bin/python benchmarks/cifar10_quality.py --methods simclr,byol --budget-min 20

Each method runs as a user runs it: ``darkmatter pretrain --config C`` where C is
``configs/simclr_cifar10_budget.yaml`` (``resnet18_3stage``, batch 128, two 32 px and
four 16 px views, SGD lr 0.6 x batch/256, a cosine over the budget) with the method,
the train shards and ``--set`` overrides written in, then ``darkmatter eval BACKBONE
--train <train shards> --test <test shard> --json``: weighted kNN (Wu et al. 2018:
cosine, k=200, T=0.1, the 50,000 train images as the bank, the 10,000 test images as
queries), a linear probe, and linear probes on 1% / 10% of the labels. The pixel
baseline is the same kNN on the per-channel normalised pixels; the random-init one on a
freshly initialised backbone (both computed here, in-process).

``--loop-steps N`` also times N steps of a plain in-process PyTorch loop on the same
model, views and batch (images decoded once into memory, views drawn batched with
``roi_align``), the loop that made this project's first quality figure: its img/s is
printed beside the product's, as a ratio. Figures and how each default was chosen:
docs/RESULTS.md. The last line is JSON: budget_min, pixel_knn, random_knn, best_method,
best_knn, and per method its probes, steps and img/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cifar import add_data_argument, cifar_files  # noqa: E402
from _machine import cpu_model  # noqa: E402

from pipelines.ingest.photometric import normalise, photometric  # noqa: E402
from pipelines.ingest.recipes import simclr  # noqa: E402
from pipelines.train.precision import cpu_has_fast_bf16  # noqa: E402
from ssl_models.backbones import build_backbone  # noqa: E402
from ssl_models.methods import Batch, build_method  # noqa: E402
from ssl_models.probes import knn_accuracy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUDGET_CONFIG = REPO / "configs" / "simclr_cifar10_budget.yaml"
DARKMATTER = Path(sys.executable).parent / "darkmatter"

# Per-method options for a short CPU run: small projectors, published temperatures.
METHOD_OPTIONS: dict[str, dict] = {
    "simclr": {"proj_hidden_dim": 512, "proj_dim": 128, "temperature": 0.2},
    "byol": {"proj_hidden_dim": 1024, "proj_dim": 128},
    "simsiam": {},
    "vicreg": {},
    "barlow_twins": {},
    "mocov3": {},
}

# The predictive and latent-variable methods (#15) run on their own configs: a ViT-Tiny in
# 4 px patches, masks in the data pipeline, their authors' optimisers. Their random-init
# baseline is the same ViT, evaluated through ``darkmatter eval random`` (kNN and linear).
OWN_CONFIGS: dict[str, Path] = {
    name: REPO / "configs" / f"{name}_cifar10.yaml" for name in ("mae", "ijepa", "lvpredict")
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


def loop_throughput(
    method_name: str, args: argparse.Namespace, train_x: torch.Tensor, autocast
) -> float:
    """img/s of ``args.loop_steps`` steps of the plain in-process loop (after 5 warm-up
    steps) on the product's model, views and batch: the baseline of the product's rate."""
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.backbone, True, 32)
    method = build_method(method_name, backbone, **METHOD_OPTIONS.get(method_name, {}))
    method = method.to(memory_format=torch.channels_last)
    spec = dataclasses.replace(simclr(32).views[0], scale=(0.2, 1.0))
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(args.seed)
    method.train()
    started = 0.0
    for step in range(5 + args.loop_steps):
        if step == 5:
            started = time.perf_counter()
        index = torch.randint(len(train_x), (args.batch_size,), generator=generator)
        views = make_views(train_x[index], spec, generator, args)
        with autocast():
            output = method(Batch(views))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        method.update_teacher(step / (5 + args.loop_steps))
    return args.batch_size * args.loop_steps / (time.perf_counter() - started)


def product_config(method_name: str, args: argparse.Namespace, out: Path) -> Path:
    """``configs/simclr_cifar10_budget.yaml`` for ``method_name`` (or the method's own
    config, ``OWN_CONFIGS``) on the full train shards, for the budget."""
    own = method_name in OWN_CONFIGS
    config = yaml.safe_load((OWN_CONFIGS[method_name] if own else BUDGET_CONFIG).read_text())
    config["name"] = f"quality-{method_name}-seed{args.seed}"
    if not own:
        config["method"] = {"name": method_name, "options": METHOD_OPTIONS[method_name]}
    config["data"]["train"]["path"] = [str(f) for f in cifar_files("train-*.parquet", args.data)]
    config["data"]["num_images"] = None
    for online in ("knn_bank", "knn_query"):  # the probes run once, after, in darkmatter eval
        config["data"].pop(online, None)
    config["schedule"] = {"max_minutes": args.budget_min}
    config["train"].update(
        batch_size=batch_size(method_name, args),
        num_workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        seed=args.seed,
        precision="fp32" if args.no_bf16 else "auto",
    )
    config["checkpoint"]["storage_path"] = str(out / "runs")
    config["tracking"] = {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "quality"}
    path = out / f"{method_name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def batch_size(method_name: str, args: argparse.Namespace) -> int:
    """``--batch-size`` for the budget recipe; the own config's batch otherwise."""
    if method_name in OWN_CONFIGS:
        return int(yaml.safe_load(OWN_CONFIGS[method_name].read_text())["train"]["batch_size"])
    return args.batch_size


def run_cli(command: list[str], log: Path) -> None:
    """Run ``darkmatter ...`` as a user would, its console echoed as it comes (stderr into
    ``log``); exit with that log's tail on failure."""
    print("$ " + " ".join(command), flush=True)
    with log.open("w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip():
                print("  " + line.rstrip(), flush=True)
    if process.wait() != 0:
        sys.exit(
            f"{' '.join(command[:2])} failed ({process.returncode}):\n{log.read_text()[-3000:]}"
        )


def product_run(method_name: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """``darkmatter pretrain`` for the budget, then ``darkmatter eval``: the probes, the
    steps taken and the training img/s (from the run's metrics.jsonl)."""
    config = product_config(method_name, args, out)
    run_cli([str(DARKMATTER), "pretrain", "--config", str(config)], out / f"{method_name}.log")
    run_dir = out / "runs" / f"quality-{method_name}-seed{args.seed}" / "darkmatter"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    intervals = [r for r in records if "img_per_s" in r]
    steps = max(r["step"] for r in records)
    if len(intervals) >= 2:  # from the end of the first interval (past the warm-up) to the last
        first, last = intervals[0], intervals[-1]
        images = (last["step"] - first["step"]) * batch_size(method_name, args)
        rate = images / (last["time"] - first["time"])
    else:
        rate = intervals[0]["img_per_s"] if intervals else 0.0
    results_file = out / f"{method_name}_eval.json"
    train = ",".join(str(f) for f in cifar_files("train-*.parquet", args.data))
    test = ",".join(str(f) for f in cifar_files("test-*.parquet", args.data))
    run_cli(
        [
            str(DARKMATTER), "eval", str(run_dir / "backbone.pt"),
            "--train", train, "--test", test, "--json", str(results_file), "--no-mlflow",
        ],
        out / f"{method_name}_eval.log",
    )  # fmt: skip
    results = json.loads(results_file.read_text())
    return {**results, "steps": steps, "img_per_s": rate}


def random_init_eval(method_name: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """``darkmatter eval random`` on the backbone of ``method_name``'s own config: the
    same-architecture baseline its linear probe is read against."""
    backbone = yaml.safe_load(OWN_CONFIGS[method_name].read_text())["backbone"]
    pool = backbone.get("pool", "cls")
    results_file = out / f"random_{backbone['name']}_{pool}_eval.json"
    if not results_file.exists():
        train = ",".join(str(f) for f in cifar_files("train-*.parquet", args.data))
        test = ",".join(str(f) for f in cifar_files("test-*.parquet", args.data))
        command = [str(DARKMATTER), "eval", "random", "--backbone", backbone["name"]]
        if backbone.get("small_image_stem"):
            command.append("--small-image-stem")
        command += ["--image-size", "32", "--pool", pool, "--train", train, "--test", test]
        command += ["--json", str(results_file), "--no-mlflow"]
        run_cli(command, results_file.with_suffix(".log"))
    return json.loads(results_file.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget-min", type=float, default=20.0, help="pretraining minutes per method"
    )
    parser.add_argument("--methods", default="simclr", help="comma-separated ssl_models methods")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument(
        "--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per worker"
    )
    parser.add_argument("--no-bf16", action="store_true", help="fp32 even where bf16 is native")
    parser.add_argument(
        "--loop-steps",
        type=int,
        default=100,
        help="steps of the plain in-process loop timed as the throughput baseline (0: none)",
    )
    parser.add_argument("--local-crops", type=int, default=4, help="(in-process loop) local views")
    parser.add_argument("--local-size", type=int, default=16)
    parser.add_argument("--local-max-scale", type=float, default=0.3)
    parser.add_argument("--backbone", default="resnet18_3stage", help="(baselines) backbone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="runs, configs, results (default: a temp dir)")
    parser.add_argument(
        "--test-limit", type=int, help="baselines on only the first N images (smoke runs)"
    )
    add_data_argument(parser)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    accepted = sorted(METHOD_OPTIONS) + sorted(OWN_CONFIGS)
    unknown = [m for m in methods if m not in accepted]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; accepted: {accepted}")
    out = args.out or Path(tempfile.mkdtemp(prefix="cifar10_quality_"))
    out.mkdir(parents=True, exist_ok=True)

    bf16 = not args.no_bf16 and cpu_has_fast_bf16()

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    started = time.perf_counter()
    limit = args.test_limit
    train_x, train_y = load_split(args.data, "train-*.parquet", limit)
    test_x, test_y = load_split(args.data, "test-*.parquet", limit)
    print(
        f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, "
        f"{'bf16 autocast' if bf16 else 'fp32'}; CIFAR-10: {len(train_x)} train / "
        f"{len(test_x)} test images decoded in {time.perf_counter() - started:.0f} s; "
        f"runs in {out}",
        flush=True,
    )
    spec = simclr(32).views[0]
    rows: list[tuple[str, dict[str, float] | float, str]] = []

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
    random_model = build_backbone(args.backbone, True, 32).model
    random_model = random_model.to(memory_format=torch.channels_last)
    random_knn = knn_accuracy(
        features(random_model, train_x, spec, autocast), train_y,
        features(random_model, test_x, spec, autocast), test_y,
    )  # fmt: skip
    rows.append((f"{args.backbone} random init", random_knn, "-"))
    print(f"random-init kNN: {100 * random_knn:.2f}%", flush=True)

    results: dict[str, dict[str, float]] = {}
    for name in methods:
        timed = args.loop_steps and name in METHOD_OPTIONS  # the loop draws crops, not masks
        loop_rate = loop_throughput(name, args, train_x, autocast) if timed else 0.0
        note = f"; the in-process loop: {loop_rate:.0f} img/s" if loop_rate else ""
        print(f"{name}: darkmatter pretrain for {args.budget_min:g} min{note}", flush=True)
        result = product_run(name, args, out)
        result["loop_img_per_s"] = loop_rate
        results[name] = result
        epochs = result["steps"] * batch_size(name, args) / 50_000
        ratio = (
            f", {result['img_per_s'] / loop_rate:.2f}x the loop's {loop_rate:.0f}"
            if loop_rate
            else ""
        )
        architecture = args.backbone
        if name in OWN_CONFIGS:
            architecture = yaml.safe_load(OWN_CONFIGS[name].read_text())["backbone"]["name"]
            baseline = random_init_eval(name, args, out)
            results[f"random_{name}"] = baseline
            rows.append((f"{architecture} random init ({name}'s)", baseline, "-"))
        rows.append(
            (
                f"{name} ({architecture})",
                result,
                f"{result['steps']} steps, {epochs:.1f} epochs, "
                f"{result['img_per_s']:.0f} img/s{ratio}",
            )
        )

    print(f"\nCPU: {cpu_model()}; budget {args.budget_min:g} min per method")
    print(f"{'model':<30} {'kNN':>7} {'linear':>7} {'1%':>7} {'10%':>7}  pretraining")
    for label, value, detail in rows:
        if isinstance(value, dict):
            probes = " ".join(
                f"{100 * value[k]:>6.2f}%"
                for k in ("knn_top1", "linear_top1", "linear_1pct_top1", "linear_10pct_top1")
            )
        else:
            probes = f"{100 * value:>6.2f}% {'-':>7} {'-':>7} {'-':>7}"
        print(f"{label:<30} {probes}  {detail}")
    trained = [m for m in results if not m.startswith("random_")]
    best = max(trained, key=lambda m: results[m]["knn_top1"]) if trained else None
    print(
        json.dumps(
            {
                "budget_min": args.budget_min,
                "pixel_knn": round(pixel, 4),
                "random_knn": round(random_knn, 4),
                "best_method": best,
                "best_knn": round(results[best]["knn_top1"], 4) if best else None,
                "methods": {m: {k: round(v, 4) for k, v in r.items()} for m, r in results.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
