"""``darkmatter embed``: stream a corpus through a frozen backbone and write parquet.

Rows flow read -> decode -> resize + centre crop -> actor pool (``pipelines.evaluate.inference``)
-> parquet files, block by block: the corpus is never held in memory. Rows that fail
to decode are skipped and counted by reason, as in ingest. Output columns: ``key``
(the path, ``file.parquet#row``, or ``shard.tar#sample``), ``embedding``
(fixed-size list of float32), and ``label`` when the source has one.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import ray.data

from pipelines.cluster.placement import check_decode_placement
from pipelines.config import ConfigError, DecodeOn, resolve_path
from pipelines.evaluate.inference import (
    Checkpoint,
    connect,
    embed_source,
    resolve_checkpoint,
)
from pipelines.ingest.dataset import ingest_counts
from pipelines.ingest.sources import ImageSource, check_paths_here
from pipelines.tracking import default_tracking_uri, quiet_mlflow


@dataclass
class EmbedResult:
    rows: int
    seconds: float
    ingest: dict
    out_dir: str

    @property
    def images_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def embed_corpus(
    source: ImageSource,
    checkpoint: Checkpoint,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    concurrency: int | None = None,
    progress: bool = True,
    decode_on: DecodeOn = "any",
) -> EmbedResult:
    """Embed every decodable image of ``source`` into parquet files under ``out_dir``."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"--out {str(out_dir)!r} exists and is not empty")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    counter = f"embed/{time.time_ns()}"
    started = time.perf_counter()
    embed_source(
        source,
        checkpoint,
        counter,
        batch_size=batch_size,
        concurrency=concurrency,
        decode_on=decode_on,
        arrow_output=True,
    ).write_parquet(str(out_dir))
    seconds = time.perf_counter() - started
    rows = sum(pq.read_metadata(f).num_rows for f in out_dir.glob("*.parquet"))
    return EmbedResult(rows, seconds, ingest_counts(counter), str(out_dir))


def corpus_source(args: argparse.Namespace) -> ImageSource:
    paths = [resolve_path(p) for p in args.data.split(",")]
    return ImageSource(
        paths if len(paths) > 1 else paths[0],
        format=args.format,
        image_column=args.image_column,
        label_column=args.label_column,
        s3_endpoint=args.s3_endpoint,
    )


def run_embed(args: argparse.Namespace) -> int:
    quiet_mlflow(args.verbose)
    try:
        checkpoint = resolve_checkpoint(
            args.checkpoint,
            args.tracking_uri or default_tracking_uri(),
            backbone=args.backbone,
            small_image_stem=args.small_image_stem,
            image_size=args.image_size,
            pool=args.pool,
        )
        source = corpus_source(args)
        check_paths_here(source, args.address)
    except (ValueError, FileNotFoundError) as error:
        print(f"darkmatter embed: {error}", file=sys.stderr)
        return 2
    connect(args.address, args.verbose)
    try:
        check_decode_placement(args.decode_on)
        result = embed_corpus(
            source,
            checkpoint,
            args.out,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            progress=not args.no_progress,
            decode_on=args.decode_on,
        )
    except (FileExistsError, ConfigError) as error:
        print(f"darkmatter embed: {error}", file=sys.stderr)
        return 2
    counts = result.ingest
    print(
        f"[darkmatter] embedded {result.rows} images with {checkpoint.description} in "
        f"{result.seconds:.1f} s ({result.images_per_s:.0f} images/s) -> {result.out_dir}"
    )
    print(
        f"[darkmatter] skipped {counts['skipped']}"
        + (f" {counts['skipped_by_reason']}" if counts["skipped"] else "")
    )
    return 0
