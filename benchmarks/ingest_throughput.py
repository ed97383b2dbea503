"""Ray Data into 2 Ray Train workers vs a torch DataLoader with 2 workers, same transform.

    python benchmarks/ingest_throughput.py [--size 32] [--images 20000]

Both sides run the CPU half of two SimCLR views (`views_from_bytes`: decode + random
resized crop + flip to uint8) on CIFAR-10 JPEGs and hand batches of 256 to consumers
that only count them. Ray: `view_dataset` -> `TorchTrainer(datasets=...)` with 2
workers iterating `iter_torch_batches` (Ray gets 4 logical CPUs: 1 per consuming
worker, 2 for Ray Data's tasks, like the DataLoader's 2 worker processes).

Steady state, the same rule for both sides: every consumer stamps each batch it
receives (wall clock); the rate is the rows received after the first `--warmup`
fraction of all rows (default 10%), over the time from that point to the last
batch. This leaves out the fixed start-up (worker processes, Ray Data's planning
and the split coordinator, the DataLoader's worker start) that a short run would
otherwise weigh by. The start-to-end rates are printed too. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from _cifar import add_data_argument, cifar_train_files, upscaled_jpegs  # noqa: E402

from pipelines.ingest.crops import views_from_bytes  # noqa: E402
from pipelines.ingest.dataset import row_rng  # noqa: E402
from pipelines.ingest.recipes import simclr  # noqa: E402

BATCH = 256


class ViewsDataset(torch.utils.data.Dataset):
    def __init__(self, images: list[bytes], size: int) -> None:
        self.images, self.recipe = images, simclr(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[np.ndarray]:
        return views_from_bytes(self.images[i], self.recipe, row_rng(0, 0, str(i)))


def collate(rows: list[list[np.ndarray]]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.stack([r[v] for r in rows])) for v in range(len(rows[0]))]


def rates(start: float, stamps: list[tuple[float, int]], warmup: float) -> tuple[float, float]:
    """(steady-state img/s, start-to-end img/s) from (time, rows) stamps of all consumers."""
    stamps = sorted(stamps)
    total = sum(rows for _, rows in stamps)
    seen, t0, rows0 = 0, start, 0
    for t, rows in stamps:
        seen += rows
        if seen >= warmup * total:
            t0, rows0 = t, seen
            break
    end = stamps[-1][0]
    print(f"    first batch {stamps[0][0] - start:.1f} s, {warmup:.0%} of rows at {t0 - start:.1f} s, "
          f"last {end - start:.1f} s")  # fmt: skip
    return (total - rows0) / (end - t0), total / (end - start)


def dataloader_stamps(
    images: list[bytes], size: int, epochs: int
) -> tuple[float, list[tuple[float, int]]]:
    loader = torch.utils.data.DataLoader(
        ViewsDataset(images, size), batch_size=BATCH, num_workers=2, collate_fn=collate,
        persistent_workers=True, prefetch_factor=4,
    )  # fmt: skip
    start, stamps = time.time(), []
    for _ in range(epochs):
        for views in loader:
            stamps.append((time.time(), len(views[0])))
    return start, stamps


def consume(config: dict) -> None:
    """A Train worker that only counts rows; writes its figures (Result sees none)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    start, stamps = time.time(), []
    batches = shard.iter_torch_batches(
        batch_size=BATCH, prefetch_batches=config["prefetch_batches"]
    )
    for batch in batches:
        stamps.append((time.time(), len(batch["view_0"])))
    rank = ray.train.get_context().get_world_rank()
    figures = {"start": start, "stamps": stamps}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(figures))


def ray_stamps(
    parquet: Path, size: int, storage: str, args: argparse.Namespace
) -> tuple[float, list[tuple[float, int]]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.cluster.session import quiet_ray_data
    from pipelines.ingest.dataset import view_dataset
    from pipelines.ingest.sources import ImageSource

    quiet_ray_data()  # as `darkmatter pretrain`: no per-operator progress bars
    ds = view_dataset(
        ImageSource(str(parquet)),
        simclr(size),
        seed=0,
        epochs=args.epochs,
        batch_size=args.decode_batch,
    )
    TorchTrainer(
        consume,
        train_loop_config={"out": storage, "prefetch_batches": args.prefetch_batches},
        datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="ingest-bench", storage_path=storage),
    ).fit()
    figures = [json.loads(p.read_text()) for p in sorted(Path(storage).glob("rank*.json"))]
    return min(f["start"] for f in figures), [tuple(s) for f in figures for s in f["stamps"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, choices=(32, 224), default=32)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the images, both sides")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of rows left out")
    parser.add_argument(
        "--decode-batch",
        type=int,
        default=None,
        help="rows per decode map_batches call (default: view_dataset's, as darkmatter pretrain)",
    )
    parser.add_argument(
        "--prefetch-batches", type=int, default=2, help="iter_torch_batches (the loop's default)"
    )
    parser.add_argument("--skip-dataloader", action="store_true", help="Ray side only")
    add_data_argument(parser)
    args = parser.parse_args()
    import ray

    table = pq.read_table(cifar_train_files(args.data), columns=["image"]).slice(0, args.images)
    images = table.column("image").to_pylist()
    if args.size == 224:
        images = upscaled_jpegs(images)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        parquet = Path(tmp) / "images.parquet"
        table = pa.table({"image": pa.array(images, pa.binary())})
        pq.write_table(table, parquet, row_group_size=1000)
        loader, loader_total = (
            rates(*dataloader_stamps(images, args.size, args.epochs), args.warmup)
            if not args.skip_dataloader
            else (float("nan"), float("nan"))
        )
        # 2 logical CPUs for the 2 consuming workers, 2 for Ray Data: as the DataLoader's
        # 2 decoding processes plus its consuming main process, on the same cores.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray_data, ray_total = rates(*ray_stamps(parquet, args.size, tmp, args), args.warmup)
        ray.shutdown()
    load = max(load, os.getloadavg()[0])
    result = {
        "size": args.size,
        "images": len(images),
        "epochs": args.epochs,
        "ray_data_img_s": round(ray_data, 1),
        "dataloader_img_s": round(loader, 1),
        "ratio": round(ray_data / loader, 2),
        "ray_data_start_to_end_img_s": round(ray_total, 1),
        "dataloader_start_to_end_img_s": round(loader_total, 1),
        "load_avg_1min": round(load, 2),
    }
    print(f"two SimCLR views (CPU half) at {args.size} px, {len(images)} images x {args.epochs} "
          f"epochs, 2 consumers, "
          f"load {load:.1f}")  # fmt: skip
    print(f"  {'img/s':<34}{'steady':>10}{'start-end':>11}")
    print(f"  {'Ray Data -> 2 Ray Train workers':<34}{ray_data:>10,.1f}{ray_total:>11,.1f}")
    print(f"  {'torch DataLoader, 2 workers':<34}{loader:>10,.1f}{loader_total:>11,.1f}")
    print(f"  {'ratio':<34}{ray_data / loader:>10.2f}{ray_total / loader_total:>11.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
