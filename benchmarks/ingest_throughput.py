"""Ray Data into 2 Ray Train workers vs a torch DataLoader with 2 workers, same transform.

    python benchmarks/ingest_throughput.py [--size 32] [--images 20000]

Both sides run the CPU half of two SimCLR views (`views_from_bytes`: decode + random
resized crop + flip to uint8) on CIFAR-10 JPEGs and hand batches of 256 to consumers
that only count them. Ray: `view_dataset` -> `TorchTrainer(datasets=...)` with 2
workers iterating `iter_torch_batches` (Ray gets 4 logical CPUs: 1 per consuming
worker, 2 for Ray Data's tasks, like the DataLoader's 2 worker processes). img/s is rows over the slowest
worker's wall time from its first batch request. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from _cifar import cifar_train_files, upscaled_jpegs  # noqa: E402

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


def dataloader_rate(images: list[bytes], size: int) -> float:
    loader = torch.utils.data.DataLoader(
        ViewsDataset(images, size), batch_size=BATCH, num_workers=2, collate_fn=collate,
        persistent_workers=False, prefetch_factor=4,
    )  # fmt: skip
    start, rows = time.perf_counter(), 0
    for views in loader:
        rows += len(views[0])
    return rows / (time.perf_counter() - start)


def consume(config: dict) -> None:
    """A Train worker that only counts rows; writes its figures (Result sees none)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    start, rows = time.perf_counter(), 0
    for batch in shard.iter_torch_batches(batch_size=BATCH):
        rows += len(batch["view_0"])
    rank = ray.train.get_context().get_world_rank()
    figures = {"rows": rows, "seconds": time.perf_counter() - start}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(figures))


def ray_rate(parquet: Path, size: int, storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ingest.dataset import view_dataset
    from pipelines.ingest.sources import ImageSource

    ds = view_dataset(ImageSource(str(parquet)), simclr(size), seed=0, batch_size=BATCH)
    TorchTrainer(
        consume,
        train_loop_config={"out": storage},
        datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="ingest-bench", storage_path=storage),
    ).fit()
    figures = [json.loads(p.read_text()) for p in sorted(Path(storage).glob("rank*.json"))]
    return sum(f["rows"] for f in figures) / max(f["seconds"] for f in figures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, choices=(32, 224), default=32)
    parser.add_argument("--images", type=int, default=20_000)
    args = parser.parse_args()
    import ray

    table = pq.read_table(cifar_train_files()[:2], columns=["image"]).slice(0, args.images)
    images = table.column("image").to_pylist()
    if args.size == 224:
        images = upscaled_jpegs(images)
    with tempfile.TemporaryDirectory() as tmp:
        parquet = Path(tmp) / "images.parquet"
        table = pa.table({"image": pa.array(images, pa.binary())})
        pq.write_table(table, parquet, row_group_size=1000)
        loader = dataloader_rate(images, args.size)
        # 2 logical CPUs for the 2 consuming workers, 2 for Ray Data: as the DataLoader's
        # 2 decoding processes plus its consuming main process, on the same cores.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray_data = ray_rate(parquet, args.size, tmp)
        ray.shutdown()
    result = {
        "size": args.size,
        "images": len(images),
        "ray_data_img_s": round(ray_data, 1),
        "dataloader_img_s": round(loader, 1),
        "ratio": round(ray_data / loader, 2),
    }
    print(f"two SimCLR views (CPU half) at {args.size} px, {len(images)} images, 2 consumers")
    print(f"  Ray Data -> 2 Ray Train workers  {ray_data:>10,.1f} img/s")
    print(f"  torch DataLoader, 2 workers      {loader:>10,.1f} img/s")
    print(f"  ratio                            {result['ratio']:>10.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
