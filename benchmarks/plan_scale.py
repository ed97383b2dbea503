"""The driver's memory and the time to the first training batch, by corpus size: from a folder
tree, and from a manifest of it made by `darkmatter index`.

    python benchmarks/plan_scale.py [--files 10000 100000 1000000] [--dir DIR]
        [--synthetic-rows 10000000 100000000] [--no-folder]

For each N, a tree of N tiny files (one 8x8 JPEG's bytes, written with os.write) in 1,000
class folders is made under DIR (default: the system's temp dir; reused when complete),
then `darkmatter index` makes its manifest (reused too; its own time is the marker's
`seconds`). Each measurement runs in a fresh Python process that does what `darkmatter
pretrain` does on the driver: an embedded local Ray (`connect_ray`), `count_images`,
`view_dataset` (the default SimCLR recipe at 32 px, shuffled, one epoch), then the first
batch of `iter_batches(batch_size=256)`. `first_batch_s` is from after Ray is up to that
batch; `driver_peak_rss_mb` is the process' `ru_maxrss` after it (Ray's own processes
are not the driver). The slope is a least-squares fit of peak RSS over N, in MB per
million files, and the extrapolation to 1e9 files is `intercept + slope * 1000`.
`--synthetic-rows N`: also a manifest of N rows whose uris cycle over the largest tree's
files (no tree of 1e8 files fits this disk; planning and the driver see N rows), fitted
with the manifests' figures (`with_synthetic` in the JSON).

Target (issue 13): from a manifest, driver RSS grows < 50 MB from 1e4 to 1e6 files, and
the first batch comes in < 30 s at 1e6. The last line is JSON; its `files`,
`driver_peak_rss_mb` and `first_batch_s` are the manifest's figures, `folder_tree` holds
the folder tree's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DIRS = 1000


def tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 120, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_tree(root: Path, files: int) -> Path:
    """N copies of one tiny JPEG as `root/tree-N/cNNN/NNNNNNNN.jpg`, 1,000 folders."""
    tree = root / f"tree-{files}"
    done = root / f"tree-{files}.complete"
    if done.exists():
        return tree
    data = tiny_jpeg()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    started = time.perf_counter()
    for d in range(DIRS):
        folder = tree / f"c{d:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = str(folder) + "/"
        for i in range(d, files, DIRS):
            fd = os.open(f"{prefix}{i:08d}.jpg", flags, 0o644)
            os.write(fd, data)
            os.close(fd)
    done.write_text(str(files))
    print(f"  made {tree} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return tree


def make_manifest(root: Path, tree: Path, files: int) -> tuple[Path, float]:
    """`darkmatter index tree --out manifest-N` (in its own process), or the one there."""
    from pipelines.ingest.listing import MARKER

    manifest = root / f"manifest-{files}"
    marker = manifest / MARKER
    if not marker.exists() or json.loads(marker.read_text())["roots"] != [str(tree)]:
        command = [
            sys.executable,
            "-m",
            "pipelines.cli",
            "index",
            str(tree),
            "--out",
            str(manifest),
        ]
        subprocess.run(command, check=True, cwd=REPO, env=child_env())
    return manifest, json.loads(marker.read_text())["seconds"]


def make_synthetic_manifest(root: Path, base: Path, rows: int) -> Path:
    """A manifest of `rows` rows whose uris cycle over the files of manifest `base` (so every
    row reads a real file; keys repeat), in shards of 100,000 rows: the planning path at
    sizes no tree on this disk can have. Reused when complete."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.ingest.listing import MARKER
    from pipelines.ingest.manifest import SHARD_ENTRIES

    out = root / f"manifest-synthetic-{rows}"
    if (out / MARKER).exists():
        return out
    marker = json.loads((base / MARKER).read_text())
    table = pa.concat_tables(pq.read_table(base / s["path"]) for s in marker["shards"])
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, rows, SHARD_ENTRIES)):
        count = min(SHARD_ENTRIES, rows - start)
        shard = table.take(pa.array((start + np.arange(count)) % table.num_rows))
        path = f"shard-{k:06d}-000.parquet"
        pq.write_table(shard, out / path)
        size = int(pc.sum(shard.column("bytes")).as_py())
        shards.append({"path": path, "entries": count, "rows": count, "bytes": size})
    marker.update(
        files=rows,
        entries=rows,
        rows=rows,
        bytes=sum(s["bytes"] for s in shards),
        shards=shards,
        synthetic=f"uris cycle over the {table.num_rows:,} files of {base}",
    )
    (out / MARKER).write_text(json.dumps(marker))
    return out


def child_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def measure_here(path: str) -> dict:
    """In a fresh process: what `darkmatter pretrain` does on the driver, to the first batch."""
    from pipelines.cluster.session import connect_ray, quiet_ray_data
    from pipelines.ingest.dataset import view_dataset
    from pipelines.ingest.recipes import simclr
    from pipelines.ingest.sources import ImageSource
    from pipelines.train.driver import count_images

    started = time.perf_counter()
    connect_ray(None, os.cpu_count() or 1)
    quiet_ray_data()
    ray_up = time.perf_counter()
    rss_ray_up = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    source = ImageSource(path, label_column="folder")
    rows = count_images(source, None)
    dataset = view_dataset(source, simclr(32), seed=0, epochs=1)
    batch = next(iter(dataset.iter_batches(batch_size=256, batch_format="numpy")))
    first_batch = time.perf_counter() - ray_up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": rows,
        "batch_rows": len(batch["view_0"]),
        "ray_start_s": round(ray_up - started, 2),
        "first_batch_s": round(first_batch, 2),
        "driver_peak_rss_mb": round(peak, 1),
        "driver_rss_at_ray_up_mb": round(rss_ray_up, 1),
    }


def measure(path: Path, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", str(path)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=child_env()
    )
    if done.returncode != 0:
        sys.exit(f"measuring {path} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(files: list[int], values: list[float]) -> tuple[float, float]:
    """(slope per million files, intercept) of a least-squares line."""
    if len(files) < 2:
        return 0.0, values[0]
    slope, intercept = np.polyfit(np.asarray(files) / 1e6, np.asarray(values), 1)
    return float(slope), float(intercept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "plan_scale")
    parser.add_argument(
        "--synthetic-rows",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also measure manifests of N rows cycling over the largest tree's files "
        "(e.g. 10000000 100000000), included in the manifest's fit",
    )
    parser.add_argument("--no-folder", action="store_true", help="measure the manifest only")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_here(args.child)))
        return

    args.dir.mkdir(parents=True, exist_ok=True)
    cpu = cpu_model()
    print(f"CPU: {cpu} ({os.cpu_count()} logical CPUs); trees under {args.dir}")
    files = sorted(args.files)
    results: dict[str, list[dict]] = {"manifest": [], "folder_tree": []}
    index_s = []
    manifest = None
    for n in files:
        tree = make_tree(args.dir, n)
        manifest, seconds = make_manifest(args.dir, tree, n)
        index_s.append(seconds)
        results["manifest"].append(measure(manifest, args.timeout))
        if not args.no_folder:
            results["folder_tree"].append(measure(tree, args.timeout))
    synthetic = sorted(args.synthetic_rows)
    results["synthetic"] = [
        measure(make_synthetic_manifest(args.dir, manifest, n), args.timeout) for n in synthetic
    ]
    sizes = {"manifest": files, "folder_tree": files, "synthetic": synthetic}
    for mode, runs in results.items():
        assert [r["rows"] for r in runs] == sizes[mode][: len(runs)], (mode, runs)

    print(f"{'files':>12} {'source':<22} {'first batch s':>14} {'peak RSS MB':>12} {'index s':>8}")
    names = {
        "manifest": "manifest",
        "folder_tree": "folder tree",
        "synthetic": "manifest (synthetic)",
    }
    for mode, runs in results.items():
        for i, run in enumerate(runs):
            index = f"{index_s[i]:8.1f}" if mode == "manifest" else ""
            print(
                f"{sizes[mode][i]:>12,} {names[mode]:<22} {run['first_batch_s']:>14.1f} "
                f"{run['driver_peak_rss_mb']:>12.1f} {index}"
            )

    def figures(n: list[int], runs: list[dict]) -> dict:
        rss = [r["driver_peak_rss_mb"] for r in runs]
        slope, intercept = fit(n, rss)
        return {
            "driver_peak_rss_mb": rss,
            "first_batch_s": [r["first_batch_s"] for r in runs],
            "ray_start_s": [r["ray_start_s"] for r in runs],
            "rss_slope_mb_per_million_files": round(slope, 2),
            "extrapolated_driver_rss_mb_at_1e9_files": round(intercept + slope * 1000, 1),
            "rss_growth_mb": round(rss[-1] - rss[0], 1),
        }

    summary: dict = {"cpu": cpu, "logical_cpus": os.cpu_count(), "files": files}
    summary.update(figures(files, results["manifest"]), index_s=index_s)
    lines = [("manifest", files, summary)]
    if results["folder_tree"]:
        summary["folder_tree"] = figures(files, results["folder_tree"])
        lines.append(("folder tree", files, summary["folder_tree"]))
    if synthetic:  # the manifest's fit over every size measured
        every = files + synthetic
        summary["with_synthetic"] = {
            "rows": every,
            **figures(every, results["manifest"] + results["synthetic"]),
        }
        lines.append(("manifest, with synthetic", every, summary["with_synthetic"]))
    for name, n, fig in lines:
        print(
            f"{name}: driver RSS {fig['rss_slope_mb_per_million_files']:+.2f} MB per million files"
            f" -> {fig['extrapolated_driver_rss_mb_at_1e9_files']:,.0f} MB at 1e9 files; grows "
            f"{fig['rss_growth_mb']:+.1f} MB from {n[0]:,} to {n[-1]:,}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
