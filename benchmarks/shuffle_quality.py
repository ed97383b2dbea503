"""How well the training batches mix the classes of a class-sorted corpus, beside random sampling.

    python benchmarks/shuffle_quality.py PATH [--batch-size 128]
    python benchmarks/shuffle_quality.py --make-tree /tmp/cifar10-tree [--from-sample]
        [--layout folder|parquet|tars]

PATH: a class-per-folder tree (ImageNet's layout, `PATH/<class>/<file>.jpg`), or any
source with a `--label-column`. `--make-tree DIR` first writes the CIFAR-10 training
set (the parquet shards of `--data`, default ../shared/data/cifar10 from the repository
root; `--from-sample`: the committed 2,000-image sample) as `DIR/<class>/<index>.jpg`,
so that the files list sorted by class, and measures DIR. `--layout parquet` writes
the images sorted by class into parquet files of 10,000 rows (row groups of 1,000,
label column `label`), `--layout tars` into webdataset tars of 1,000 (`.jpg`, `.cls`).

The datasets are built as `darkmatter pretrain` builds them with the default config
(`image_source`, the default recipe, `view_dataset`, seed 0), split as Ray Train splits
them (`streaming_split(num_workers, equal=True)`, 2 workers), and each worker's shard is
iterated with `iter_torch_batches` as the loop does, plus the local shuffle buffer
(`data.shuffle_buffer`). For each setting, over the batches of one epoch: the mean
number of classes in a batch and the mean share of its largest class, beside the same
figures for batches drawn uniformly at random from the corpus (classes: exact, from the
class counts; largest share: 20,000 simulated batches). "before" is the read plan of
whole read units (`shuffle="units"`: runs of consecutive, same-class files) without a
buffer. The rates printed beside them include Ray Data's start-up (the first run
also warms the page cache): see benchmarks/ingest_throughput.py for throughput. The
last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _cifar import add_data_argument, cifar_train_files  # noqa: E402
from _machine import cpu_model  # noqa: E402

from pipelines.config import RunConfig  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "cifar10-sample" / "train.parquet"
LABEL_COLUMNS = {"folder": "folder", "parquet": "label", "tars": "cls"}


def make_corpus(out: Path, files: list[Path], layout: str) -> int:
    """The images of parquet `files` (columns `image`, `label`, `class`), sorted by class,
    in `out`: `<class>/<index>.jpg` files, parquet files or tars (see the module doc)."""
    if out.exists() and any(out.iterdir()):
        sys.exit(f"--make-tree {out}: exists and is not empty; measure it as PATH instead")
    out.mkdir(parents=True, exist_ok=True)
    table = pa.concat_tables(pq.read_table(f, columns=["image", "label", "class"]) for f in files)
    if layout == "folder":  # the listing sorts the files by class
        images, names = table.column("image").to_pylist(), table.column("class").to_pylist()
        for index, (data, name) in enumerate(zip(images, names, strict=True)):
            (out / name).mkdir(exist_ok=True)
            (out / name / f"{index:05d}.jpg").write_bytes(data)
        return table.num_rows
    table = table.take(pc.sort_indices(table, [("label", "ascending")]))
    if layout == "parquet":
        for i, start in enumerate(range(0, table.num_rows, 10_000)):
            part = table.slice(start, 10_000).select(["image", "label"])
            pq.write_table(part, out / f"train-{i:03d}.parquet", row_group_size=1_000)
        return table.num_rows
    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    for start in range(0, table.num_rows, 1_000):
        with tarfile.open(out / f"shard-{start // 1_000:03d}.tar", "w") as tar:
            for index in range(start, min(start + 1_000, table.num_rows)):
                for ext, payload in (("jpg", images[index]), ("cls", str(labels[index]).encode())):
                    info = tarfile.TarInfo(f"{index:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return table.num_rows


def random_classes_per_batch(counts: list[int], batch: int) -> float:
    """Mean classes in a batch drawn without replacement: sum over classes of
    P(the class appears) = 1 - C(N - n_c, B) / C(N, B)."""
    total = sum(counts)

    def log_comb(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    return sum(
        1.0
        if total - n < batch
        else 1 - math.exp(log_comb(total - n, batch) - log_comb(total, batch))
        for n in counts
    )


def random_max_class_share(counts: list[int], batch: int, batches: int = 20_000) -> float:
    """Mean share of a batch's largest class, batches drawn without replacement (simulated)."""
    draws = np.random.default_rng(0).multivariate_hypergeometric(counts, batch, size=batches)
    return float(draws.max(axis=1).mean() / batch)


def measure(config: RunConfig, shuffle: str | None, buffer: int, batch: int) -> dict:
    """Class mix of the batches of every worker over one epoch, as the loop iterates them."""
    from pipelines.ingest.dataset import view_dataset
    from pipelines.train.driver import image_source

    dataset = view_dataset(
        image_source(config.data.train),
        config.data.recipe.build(),
        seed=config.train.seed,
        epochs=1,
        counter="shuffle-quality",
        shuffle=shuffle,
    )
    shards = dataset.streaming_split(config.train.num_workers, equal=True)
    labels: dict[int, list[np.ndarray]] = {rank: [] for rank in range(len(shards))}

    def consume(rank: int) -> None:
        for b in shards[rank].iter_torch_batches(
            batch_size=batch,
            drop_last=True,
            prefetch_batches=config.train.prefetch_batches,
            local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=config.train.seed + rank,
        ):
            labels[rank].append(b["label"].numpy())

    start = time.perf_counter()
    threads = [threading.Thread(target=consume, args=(rank,)) for rank in labels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    batches = [b for rank in labels for b in labels[rank]]
    classes = [len(np.unique(b)) for b in batches]
    shares = [np.bincount(b).max() / len(b) for b in batches]
    seen = np.bincount(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
    return {
        "label_counts": [int(n) for n in seen if n],
        "shuffle": shuffle,
        "shuffle_buffer": buffer,
        "batches": len(batches),
        "mean_classes_per_batch": round(float(np.mean(classes)), 3),
        "max_class_share": round(float(np.mean(shares)), 4),
        "seconds": round(seconds, 1),
        "start_to_end_img_s": round(len(batches) * batch / seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, help="a class-per-folder tree")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per worker batch (default: the config's train.batch_size / num_workers, 128)",
    )
    parser.add_argument("--make-tree", type=Path, metavar="DIR", help="write CIFAR-10 to DIR first")
    parser.add_argument(
        "--from-sample", action="store_true", help=f"--make-tree from {SAMPLE} (2,000 images)"
    )
    parser.add_argument(
        "--layout", choices=sorted(LABEL_COLUMNS), default="folder", help="of --make-tree"
    )
    parser.add_argument(
        "--label-column",
        default=None,
        help="ImageSource.label_column (default: folder; with --make-tree, the layout's)",
    )
    parser.add_argument(
        "--buffers",
        default=None,
        help="comma list of local shuffle buffer sizes to compare (default: 0 and data.shuffle_buffer)",
    )
    add_data_argument(parser)
    args = parser.parse_args()
    if args.make_tree:
        files = [SAMPLE] if args.from_sample else cifar_train_files(args.data)
        written = make_corpus(args.make_tree.resolve(), files, args.layout)
        print(f"wrote {written} images to {args.make_tree} ({args.layout}, sorted by class)")
    path = args.path or args.make_tree
    if path is None:
        parser.error("give PATH or --make-tree DIR")
    label_column = args.label_column or LABEL_COLUMNS[args.layout if args.make_tree else "folder"]

    config = RunConfig.model_validate(
        {"data": {"train": {"path": str(path.resolve()), "label_column": label_column}}}
    )
    batch = args.batch_size or config.train.batch_size // config.train.num_workers
    default_buffer = config.data.shuffle_buffer
    buffers = [int(b) for b in args.buffers.split(",")] if args.buffers else [0, default_buffer]

    import ray

    from pipelines.cluster.session import quiet_ray_data
    from pipelines.ingest.sources import plan_units
    from pipelines.train.driver import connect_ray_for, image_source

    _, units = plan_units(image_source(config.data.train))
    counts = list(Counter(y for unit in units for y in unit.get("labels", [])).values())

    load = os.getloadavg()[0]
    connect_ray_for(None, config)
    quiet_ray_data()
    settings = [("units", 0)] + [("corpus", b) for b in buffers]
    runs = [measure(config, shuffle, buffer, batch) for shuffle, buffer in settings]
    ray.shutdown()
    load = max(load, os.getloadavg()[0])
    # Parquet / webdataset labels are in the files, not the plan: counted from the batches
    # of the first run (an epoch, but for the rows that do not fill a last batch).
    counts = counts or runs[0]["label_counts"]
    for run in runs:
        del run["label_counts"]
    random_classes = random_classes_per_batch(counts, batch)
    random_share = random_max_class_share(counts, batch)

    print(f"{path}: {sum(counts):,} images in {len(counts)} classes; batches of {batch} per worker, "
          f"{config.train.num_workers} workers, one epoch; CPU {cpu_model()}, "
          f"load {load:.1f}")  # fmt: skip
    print(f"  {'read plan, local shuffle buffer':<38}{'classes/batch':>14}{'vs random':>10}"
          f"{'max class share':>16}{'vs random':>10}{'img/s*':>9}")  # fmt: skip
    for run in runs:
        label = ("before: read units" if run["shuffle"] == "units" else "corpus") + (
            f", buffer {run['shuffle_buffer']}"
        )
        print(f"  {label:<38}{run['mean_classes_per_batch']:>14.2f}"
              f"{run['mean_classes_per_batch'] / random_classes:>10.3f}"
              f"{run['max_class_share']:>16.3f}{run['max_class_share'] / random_share:>10.3f}"
              f"{run['start_to_end_img_s']:>9,.0f}")  # fmt: skip
    print(f"  {'random sampling':<38}{random_classes:>14.2f}{1:>10.3f}{random_share:>16.3f}"
          f"{1:>10.3f}")  # fmt: skip
    print("  * start to end of the epoch, Ray Data's start-up included: not a throughput figure")
    # "after": as `darkmatter pretrain` runs by default (corpus plan, data.shuffle_buffer).
    after = next(
        (r for r in runs if r["shuffle"] == "corpus" and r["shuffle_buffer"] == default_buffer),
        runs[-1],
    )
    result = {
        "path": str(path),
        "images": sum(counts),
        "classes": len(counts),
        "batch_size": batch,
        "workers": config.train.num_workers,
        "mean_classes_per_batch": after["mean_classes_per_batch"],
        "expected_classes_per_batch": round(random_classes, 3),
        "max_class_share": after["max_class_share"],
        "expected_max_class_share": round(random_share, 4),
        "before_mean_classes_per_batch": runs[0]["mean_classes_per_batch"],
        "before_max_class_share": runs[0]["max_class_share"],
        "runs": runs,
        "cpu": cpu_model(),
        "load_avg_1min": round(load, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
