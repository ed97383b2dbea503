"""`darkmatter inspect PATH`: stream a corpus and report what decodes, before a long run."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from typing import Any

import numpy as np

from pipelines.cluster.session import connect_ray
from pipelines.ingest.decode import UndecodableImage, load_rgb, open_image
from pipelines.ingest.sources import ImageSource, check_paths_here, count_rows, read_raw


def inspect_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per row: format, width, height, bytes and the skip reason ("" when it decodes).

    The pixels are decoded in full (at 1/8 DCT scale for JPEGs: every byte of the
    stream is still read, so truncation shows) to catch what a header hides.
    """
    formats, widths, heights, sizes, reasons = [], [], [], [], []
    for data in batch["bytes"]:
        fmt, width, height, reason = "", 0, 0, ""
        try:
            image = open_image(data)
            fmt, (width, height) = image.format or "", image.size
            load_rgb(image, target_min_side=1)
        except UndecodableImage as err:
            reason = err.reason
        formats.append(fmt)
        widths.append(width)
        heights.append(height)
        sizes.append(0 if data is None else len(data))
        reasons.append(reason)
    return {
        "key": batch["key"],
        "format": np.array(formats, dtype=object),
        "width": np.array(widths, np.int64),
        "height": np.array(heights, np.int64),
        "nbytes": np.array(sizes, np.int64),
        "reason": np.array(reasons, dtype=object),
    }


def _quantiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    q = np.quantile(np.asarray(values), [0.0, 0.5, 1.0])
    return {"min": int(q[0]), "median": int(q[1]), "max": int(q[2])}


def summarise(source: ImageSource, *, progress: bool = True) -> tuple[dict[str, Any], list]:
    """Stream `source` once: the summary dict and the (key, reason) list of bad rows."""
    from tqdm import tqdm

    total = count_rows(source)
    rows = read_raw(source).map_batches(inspect_batch, batch_size=256, batch_format="numpy")
    by_format: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    widths, heights, nbytes, bad = [], [], [], []
    with tqdm(
        total=total, unit="img", desc="inspect", disable=not progress, file=sys.stderr
    ) as bar:
        for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
            for key, fmt, w, h, n, reason in zip(
                batch["key"], batch["format"], batch["width"], batch["height"],
                batch["nbytes"], batch["reason"], strict=True,
            ):  # fmt: skip
                nbytes.append(int(n))
                if reason:
                    reasons[reason] += 1
                    bad.append((str(key), reason))
                else:
                    by_format[fmt] += 1
                    widths.append(int(w))
                    heights.append(int(h))
            bar.update(len(batch["key"]))
    decoded = sum(by_format.values())
    summary = {
        "path": source.path,
        "files": decoded + sum(reasons.values()),
        "decoded": decoded,
        "skipped": sum(reasons.values()),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "by_format": dict(sorted(by_format.items())),
        "width": _quantiles(widths),
        "height": _quantiles(heights),
        "bytes": _quantiles(nbytes),
    }
    return summary, bad


def _print_human(summary: dict[str, Any], bad: list, show: int) -> None:
    print(f"{summary['path']}")
    print(f"  files     {summary['files']:>10,}")
    print(f"  decoded   {summary['decoded']:>10,}")
    print(f"  skipped   {summary['skipped']:>10,}")
    for reason, count in summary["skipped_by_reason"].items():
        print(f"    {reason:<16}{count:>8,}")
    for fmt, count in summary["by_format"].items():
        print(f"  format {fmt:<10}{count:>8,}")
    for name in ("width", "height", "bytes"):
        if summary[name]:
            q = summary[name]
            print(f"  {name:<8} min {q['min']:,}  median {q['median']:,}  max {q['max']:,}")
    if bad and show:
        print(f"  first {min(show, len(bad))} of {len(bad)} skipped:")
        for key, reason in bad[:show]:
            print(f"    {reason:<16}{key}")


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of `darkmatter inspect`; exit status 1 when nothing decodes."""
    import ray

    source = ImageSource(
        args.path if len(args.path) > 1 else args.path[0],
        format=args.format,
        image_column=args.image_column,
        s3_endpoint=args.s3_endpoint,
    )
    check_paths_here(source, args.address)
    connect_ray(args.address, verbose=args.verbose)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours is the bar
    summary, bad = summarise(source, progress=not args.no_progress)
    if args.bad_list:
        with open(args.bad_list, "w", encoding="utf-8") as out:
            out.writelines(f"{key}\t{reason}\n" for key, reason in bad)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_human(summary, bad, args.show)
    return 0 if summary["decoded"] > 0 else 1
