"""`darkmatter index SOURCE --out MANIFEST`: list a corpus once, in Ray tasks, into a manifest.

A manifest (the format: `listing.py`) is what every command then reads instead of
listing the corpus: `ImageSource(MANIFEST)` (format "manifest", or "auto" on a
directory holding the marker) plans from its shards, and a run's read tasks are planned
in Ray tasks from them (`sources.unit_rows`), so the driver holds the shard list, not
the files.

How it is built, all of it in Ray tasks:
  1. listing: `listing.walk` lists the source a directory level at a time (S3: a prefix
     at a time); each task writes the files it found to a part file in MANIFEST/_parts
     and returns counts, so the driver holds only the frontier of directories and the
     part paths;
  2. shards: a task per ~SHARD_ENTRIES files (parquet: per _PARQUET_FILES_PER_SHARD
     files) reads its parts, keeps the files of the format, sorts them by uri, adds the
     folder labels (the classes, sorted directory names, are known once the listing is
     done) or reads the parquet footers (one manifest row per row group), and writes
     `shard-NNNNNN-K.parquet`;
  3. the marker `_darkmatter_manifest.json` (format, columns, classes, totals, shards),
     last: an interrupted index leaves no marker, so nothing reads it as a manifest.

Files are sorted inside a shard, and shards follow the listing's order: nothing here
mixes classes. The corpus shuffle does (`sources.epoch_tasks`, scope "corpus": each read
task a random sample of a planning group, a group being ~1e6 manifest rows from shards
drawn across the corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

# SHARD_ENTRIES: manifest rows per shard (about: a file's row groups never straddle two shards).
from pipelines.ingest.formats import INDEX_FORMATS, MARKER, SHARD_ENTRIES
from pipelines.ingest.listing import (
    _LIST_CPUS,
    MANIFEST_VERSION,
    SHARD_SCHEMA,
    WalkStats,
    parquet_footers,
    walk,
)
from pipelines.ingest.sources import (
    FOLDER_LABEL,
    IMAGE_EXTENSIONS,
    ImageSource,
    check_columns,
    check_paths_here,
    filesystem,
)

# Parquet files whose footers one shard task reads.
_PARQUET_FILES_PER_SHARD = 1_000
_WANTED = {"folder": IMAGE_EXTENSIONS, "parquet": (".parquet",), "webdataset": (".tar",)}
_PARTS = "_parts"


def _location(path: str, s3_endpoint: str | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, filesystem path) of a local path or an s3:// URI."""
    where = ImageSource(path, s3_endpoint=s3_endpoint if path.startswith("s3://") else None)
    fs_path = path[len("s3://") :] if where.is_s3 else os.path.abspath(path)
    return filesystem(where), fs_path.rstrip("/")


def _prepare_out(fs: pafs.FileSystem, out: str, shown: str) -> bool:
    """A new or empty directory, or a previous manifest (whose files are removed first);
    True when the directory was made here."""
    info = fs.get_file_info(out)
    if info.type == pafs.FileType.NotFound:
        fs.create_dir(out, recursive=True)
        return True
    if info.type != pafs.FileType.Directory:
        raise FileExistsError(f"--out {shown!r} exists and is not a directory")
    if not fs.get_file_info(pafs.FileSelector(out)):
        return False
    if fs.get_file_info(f"{out}/{MARKER}").type != pafs.FileType.File:
        raise FileExistsError(
            f"--out {shown!r} exists and is not a darkmatter manifest (no {MARKER}); "
            "give a new or empty directory"
        )
    _clear(fs, out)
    return False


def _clear(fs: pafs.FileSystem, out: str) -> None:
    """Remove a manifest's own files from `out`, the marker first (a half-removed
    manifest is then no manifest); anything else there stays."""
    if fs.get_file_info(f"{out}/{MARKER}").type == pafs.FileType.File:
        fs.delete_file(f"{out}/{MARKER}")
    for entry in fs.get_file_info(pafs.FileSelector(out)):
        name = entry.base_name
        if entry.type == pafs.FileType.File and name.startswith("shard-"):
            fs.delete_file(entry.path)
        elif entry.type == pafs.FileType.Directory and name == _PARTS:
            fs.delete_dir(entry.path)


def _format_of(fmt: str, extensions: dict[str, int]) -> str:
    """`auto` resolved as `sources._expand` resolves it: parquet, else tars, else images."""
    if fmt != "auto":
        return fmt
    if extensions.get(".parquet"):
        return "parquet"
    if extensions.get(".tar"):
        return "webdataset"
    return "folder"


# "DEFAULT": never captured by a caller's placement group (a Tune trial's holds no CPU for it).
@ray.remote(num_cpus=_LIST_CPUS, scheduling_strategy="DEFAULT")
def write_shards(
    out_fs: pafs.FileSystem,
    out: str,
    parts: list[str],
    name: str,
    *,
    data_fs: pafs.FileSystem,
    fmt: str,
    is_s3: bool,
    classes: list[str] | None,
    columns: tuple[str, str | None],
    shard_entries: int,
) -> dict[str, Any]:
    """Parts -> `name-K.parquet` shards of <= shard_entries rows, files sorted by uri.

    Returns `shards` ({path, entries, rows, bytes} each), `files`, and for parquet the
    columns every file has (`columns`) and the first file missing a requested column
    (`missing`: [uri, its columns], or None)."""
    table = pa.concat_tables(pq.read_table(p, filesystem=out_fs) for p in parts)
    files = zip(table.column("path").to_pylist(), table.column("bytes").to_pylist(), strict=True)
    listed = sorted((p, b) for p, b in files if p.lower().endswith(_WANTED[fmt]))
    paths = [p for p, _ in listed]
    uris = [f"s3://{p}" if is_s3 else p for p in paths]
    result: dict[str, Any] = {"files": len(paths), "columns": None, "missing": None}
    # Rows of each file: (uri, bytes, rows, row_group, first_row, label).
    per_file: list[list[tuple]] = []
    if fmt == "parquet":
        common: set[str] | None = None
        for uri, footer in zip(uris, parquet_footers(data_fs, paths), strict=True):
            names = footer["names"]
            common = set(names) if common is None else common & set(names)
            wanted = [c for c in columns if c is not None]
            if result["missing"] is None and any(c not in names for c in wanted):
                result["missing"] = [uri, names]
            first, rows = 0, []
            for group, (count, size) in enumerate(footer["groups"]):
                rows.append((uri, size, count, group, first, None))
                first += count
            per_file.append(rows)
        result["columns"] = sorted(common or ())
    elif fmt == "folder":
        index = {c: i for i, c in enumerate(classes or ())}
        per_file = [
            [(uri, size, 1, None, None, index[posixpath.basename(posixpath.dirname(p))])]
            for uri, (p, size) in zip(uris, listed, strict=True)
        ]
    else:
        per_file = [
            [(uri, size, None, None, None, None)]
            for uri, (_, size) in zip(uris, listed, strict=True)
        ]

    total = sum(len(file_rows) for file_rows in per_file)
    target = -(-total // max(1, -(-total // shard_entries)))  # equal shards, <= shard_entries

    def chunks() -> Iterator[list[tuple]]:
        rows: list[tuple] = []
        for file_rows in per_file:
            if rows and len(rows) + len(file_rows) > target:
                yield rows
                rows = []
            rows.extend(file_rows)
        if rows:
            yield rows

    shards = []
    for k, rows in enumerate(chunks()):
        shard = pa.Table.from_arrays(
            [
                pa.array(values, type=column.type)
                for values, column in zip(zip(*rows, strict=True), SHARD_SCHEMA, strict=True)
            ],
            schema=SHARD_SCHEMA,
        )
        path = f"{name}-{k:03d}.parquet"
        pq.write_table(shard, f"{out}/{path}", filesystem=out_fs)
        counts = shard.column("rows")
        shards.append(
            {
                "path": path,
                "entries": shard.num_rows,
                "rows": None if counts.null_count else int(pc.sum(counts).as_py() or 0),
                "bytes": int(pc.sum(shard.column("bytes")).as_py() or 0),
            }
        )
    result["shards"] = shards
    return result


def build_manifest(
    source: ImageSource,
    out: str,
    *,
    shard_entries: int = SHARD_ENTRIES,
    log: Any = None,
    stats: WalkStats | None = None,
) -> dict[str, Any]:
    """Index `source` (a folder tree, parquet files or tars; local or s3://) into the
    manifest directory `out` (local or s3://, created; a previous manifest there is
    replaced), shards of about `shard_entries` rows. Returns the marker. Listing and
    footers run in Ray tasks (see module doc); `stats` counts the listing tasks.
    """
    if shard_entries < 1:
        raise ValueError(f"index: shard_entries={shard_entries!r} must be >= 1")
    if source.format not in INDEX_FORMATS:
        raise ValueError(
            f"index: format {source.format!r} cannot be indexed; use one of {INDEX_FORMATS}"
        )
    started = time.perf_counter()
    stats = stats if stats is not None else WalkStats()
    data_fs = filesystem(source)
    roots = [p[len("s3://") :] if source.is_s3 else os.path.abspath(p) for p in source.paths]
    out_fs, out_path = _location(out, source.s3_endpoint)
    created = _prepare_out(out_fs, out_path, out)
    parts_dir = f"{out_path}/{_PARTS}"
    out_fs.create_dir(parts_dir, recursive=True)
    same_storage = out.startswith("s3://") == source.is_s3
    try:
        parts: list[tuple[str, int]] = []
        extensions: dict[str, int] = {}
        parents: set[str] = set()
        for result in walk(
            data_fs,
            roots,
            exclude=(out_path,) if same_storage else (),
            part=(out_fs, parts_dir),
            image_extensions=IMAGE_EXTENSIONS,
            stats=stats,
        ):
            if result["missing"]:  # roots are listed first: fail before the rest
                first = next(i for i, p in enumerate(roots) if p in set(result["missing"]))
                raise FileNotFoundError(f"ImageSource.path: {source.paths[first]!r} does not exist")
            if result.get("part"):
                parts.append((result["part"], result["files"]))
            for ext, count in result["extensions"].items():
                extensions[ext] = extensions.get(ext, 0) + count
            parents.update(result["parents"])
        parts.sort()  # part-NNNNNN: the order the listing tasks were started in
        fmt = _format_of(source.format, extensions)
        if not sum(n for ext, n in extensions.items() if ext in _WANTED[fmt]):
            raise FileNotFoundError(
                f"ImageSource.path={source.path!r}: no {fmt} files found "
                f"({', '.join(_WANTED[fmt])})"
            )
        if fmt == "folder" and source.label_column not in (None, FOLDER_LABEL):
            raise ValueError(
                f"ImageSource.label_column={source.label_column!r}: folder trees take labels "
                f"from directory names; use {FOLDER_LABEL!r}"
            )
        # Folder labels: the image files' directory names, sorted (`sources.folder_classes`).
        classes = sorted(parents) if fmt == "folder" else None
        if log:
            log(f"listed {sum(extensions.values()):,} files in {stats.tasks:,} tasks")
        shard_results = _write_all_shards(
            out_fs,
            out_path,
            parts,
            data_fs=data_fs,
            fmt=fmt,
            source=source,
            classes=classes,
            shard_entries=shard_entries,
        )
        columns = None
        if fmt == "parquet":
            for result in shard_results:
                if result["missing"] is not None:
                    uri, names = result["missing"]
                    check_columns(source, names, uri)
            common = [set(r["columns"]) for r in shard_results]
            columns = sorted(set.intersection(*common)) if common else []
        shards = [shard for result in shard_results for shard in result["shards"]]
        rows = [shard["rows"] for shard in shards]
        marker = {
            "darkmatter_manifest": MANIFEST_VERSION,
            "format": fmt,
            "roots": [f"s3://{r}" if source.is_s3 else r for r in roots],
            "image_column": source.image_column,
            "label_column": FOLDER_LABEL if fmt == "folder" else source.label_column,
            "columns": columns,
            "classes": classes,
            "files": sum(r["files"] for r in shard_results),
            "entries": sum(shard["entries"] for shard in shards),
            "rows": None if any(r is None for r in rows) else sum(rows),
            "bytes": sum(shard["bytes"] for shard in shards),
            "shards": shards,
            "listing": {"tasks": stats.tasks, "directories": stats.directories},
            "order": "files sorted by uri inside each shard; the corpus shuffle mixes them",
            "seconds": round(time.perf_counter() - started, 3),
        }
        with out_fs.open_output_stream(f"{out_path}/{MARKER}") as stream:
            stream.write(json.dumps(marker, indent=1).encode())
        return marker
    except BaseException:
        _clear(out_fs, out_path)  # no half-written manifest left behind
        if created and not out_fs.get_file_info(pafs.FileSelector(out_path)):
            out_fs.delete_dir(out_path)
        raise
    finally:
        if out_fs.get_file_info(parts_dir).type == pafs.FileType.Directory:
            out_fs.delete_dir(parts_dir)


def _write_all_shards(
    out_fs: pafs.FileSystem,
    out: str,
    parts: list[tuple[str, int]],
    *,
    data_fs: pafs.FileSystem,
    fmt: str,
    source: ImageSource,
    classes: list[str] | None,
    shard_entries: int,
) -> list[dict[str, Any]]:
    """The shard tasks over consecutive parts, a bounded number in flight."""
    per_shard = min(_PARQUET_FILES_PER_SHARD, shard_entries) if fmt == "parquet" else shard_entries
    groups: list[list[str]] = []
    count = 0
    for part, files in parts:  # a group closes before it would pass per_shard files
        if not groups or (count and count + files > per_shard):
            groups.append([])
            count = 0
        groups[-1].append(part)
        count += files
    limit = max(4, int(ray.cluster_resources().get("CPU", 1) / _LIST_CPUS))
    options = dict(
        data_fs=data_fs,
        fmt=fmt,
        is_s3=source.is_s3,
        classes=classes,
        columns=(source.image_column, source.label_column),
        shard_entries=shard_entries,
    )
    results: list[dict[str, Any] | None] = [None] * len(groups)
    in_flight: dict[Any, int] = {}
    for i, group in enumerate(groups):
        if len(in_flight) >= limit:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            results[in_flight.pop(ready[0])] = ray.get(ready[0])
        in_flight[write_shards.remote(out_fs, out, group, f"shard-{i:06d}", **options)] = i
    for ref, i in in_flight.items():
        results[i] = ray.get(ref)
    return [r for r in results if r is not None]


# --- the command -----------------------------------------------------------------


def run_index(args: argparse.Namespace) -> int:
    """Handler of `darkmatter index`: 0, or 2 with the reason on stderr."""
    from pipelines.cluster.session import connect_ray

    try:
        source = ImageSource(
            args.source if len(args.source) > 1 else args.source[0],
            format=args.format,
            image_column=args.image_column,
            label_column=args.label_column,
            s3_endpoint=args.s3_endpoint,
        )
        check_paths_here(source, args.address)
        connect_ray(args.address, verbose=args.verbose)
        marker = build_manifest(
            source,
            args.out,
            shard_entries=args.shard_rows,
            log=lambda line: print(f"[index] {line}", file=sys.stderr),
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"darkmatter index: {error}", file=sys.stderr)
        return 2
    rows = "unknown" if marker["rows"] is None else f"{marker['rows']:,}"
    print(
        f"{args.out}: {marker['format']} manifest, {marker['files']:,} files, {rows} images, "
        f"{marker['entries']:,} rows in {len(marker['shards']):,} shards "
        f"({marker['listing']['tasks']:,} listing tasks, {marker['seconds']:.1f} s)"
    )
    return 0
