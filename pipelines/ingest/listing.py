"""Finding a corpus' files without listing it on the driver, and manifests read back.

Listing runs in Ray tasks: `list_directories` lists a batch of directories (S3:
prefixes) one level deep, non-recursively, and returns their subdirectories; the
driver (`walk`) holds only the frontier of directories still to list and the tasks in
flight, never a recursive listing. Parquet footers are read in tasks as well
(`footers_in_tasks`). A task's files come back as one small Arrow table, or, when
`darkmatter index` builds a manifest, go straight to a part file in the manifest
directory and only counts come back.

A manifest (`pipelines/ingest/manifest.py` writes it) is a directory of parquet
shards, one row per image file, parquet row group or tar:

    uri        string   the key rows get (`/abs/path.jpg`, `s3://bucket/key`)
    bytes      int64    file size; a row group's uncompressed bytes for parquet
    rows       int64    1 for an image, the row group's rows, null for a tar
    row_group  int64    parquet: the row group's index in its file (else null)
    first_row  int64    parquet: the index of its first row in the file (else null)
    label      int64    folder trees: index of the class directory in sorted `classes`

and the marker `_darkmatter_manifest.json` (format, columns, classes, totals and the
shard list), written last: a directory holding the marker is a whole manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines.ingest.formats import MARKER

MANIFEST_VERSION = 1
SHARD_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("bytes", pa.int64()),
        ("rows", pa.int64()),
        ("row_group", pa.int64()),
        ("first_row", pa.int64()),
        ("label", pa.int64()),
    ]
)
# A listing task is mostly waiting on storage: a quarter of a CPU each.
_LIST_CPUS = 0.25
# Directories one listing task takes from the frontier, at most.
_DIRS_PER_TASK = 64
_MAX_IN_FLIGHT = 512
_FOOTERS_PER_TASK = 64
_FOOTER_THREADS = 16
log = logging.getLogger(__name__)


def escapes_root(fs: pafs.FileSystem, path: str, root: str | None) -> str | None:
    """Why a local symlink at `path` is not listed, or None (not a link, or another filesystem).

    A linked directory is never walked (a link to an ancestor would loop forever), and a
    linked file is read only when it resolves inside `root` (the corpus path given)."""
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    if os.path.isdir(target):
        return f"symlinked directory {path!r} -> {target!r} is not walked"
    inside = root is None or os.path.commonpath([target, os.path.realpath(root)]) == (
        os.path.realpath(root)
    )
    return None if inside else f"symlink {path!r} -> {target!r} points outside {root!r}"


# --- listing (Ray tasks) ---------------------------------------------------------


def _sorted_files(paths: list[str], sizes: list[int], roots: list[int]) -> pa.Table:
    table = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "bytes": pa.array(sizes, pa.int64()),
            "root": pa.array(roots, pa.int32()),
        }
    )
    return table.sort_by([("root", "ascending"), ("path", "ascending")])


# "DEFAULT": never captured by a caller's placement group (a Tune trial's holds no CPU for it).
@ray.remote(num_cpus=_LIST_CPUS, scheduling_strategy="DEFAULT")
def list_directories(
    fs: pafs.FileSystem,
    entries: list[tuple[str, int]],
    *,
    roots: bool = False,
    exclude: tuple[str, ...] = (),
    part: tuple[pafs.FileSystem, str] | None = None,
    image_extensions: tuple[str, ...] = (),
    root_paths: tuple[str, ...] = (),
) -> dict[str, Any]:
    """List each directory of `entries` ((path, root index)) one level deep.

    `root_paths`: the roots by index; a local symlink is skipped (and logged, with the
    reason, in `skipped`) when it is a directory or resolves outside its root
    (`escapes_root`).

    `roots`: the entries are the paths a user gave (each a file, a directory or
    missing), not known directories. Returns `dirs` (the subdirectories, for the
    next tasks), `missing` (roots that do not exist), and either `files` (an Arrow
    table path, bytes, root; sorted) or, with `part=(filesystem, path)`, writes that
    table there (when it has rows) and returns `files` (count), `extensions` (count per
    lower-case extension) and `parents` (names of the directories holding
    `image_extensions` files: the folder labels' classes).
    """
    paths: list[str] = []
    sizes: list[int] = []
    owners: list[int] = []
    dirs: list[tuple[str, int]] = []
    missing: list[str] = []
    skipped: list[str] = []
    for path, root in entries:
        if roots:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                missing.append(path)
                continue
            if info.type == pafs.FileType.File:
                paths.append(info.path)
                sizes.append(info.size)
                owners.append(root)
                continue
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            reason = escapes_root(fs, info.path, root_paths[root] if root_paths else None)
            if reason is not None:
                log.warning("skipped: %s", reason)
                skipped.append(reason)
            elif info.type == pafs.FileType.File:
                paths.append(info.path)
                sizes.append(info.size)
                owners.append(root)
            elif info.type == pafs.FileType.Directory and info.path not in exclude:
                dirs.append((info.path, root))
    table = _sorted_files(paths, sizes, owners)
    result: dict[str, Any] = {"dirs": sorted(dirs), "missing": missing, "skipped": skipped}
    if part is None:
        result["files"] = table
        return result
    out_fs, part_path = part
    if paths:
        pq.write_table(table.drop_columns(["root"]), part_path, filesystem=out_fs)
    extensions: dict[str, int] = {}
    parents: set[str] = set()
    for path in paths:
        ext = posixpath.splitext(path)[1].lower()
        extensions[ext] = extensions.get(ext, 0) + 1
        if ext in image_extensions:
            parents.add(posixpath.basename(posixpath.dirname(path)))
    result.update(files=len(paths), extensions=extensions, parents=sorted(parents))
    return result


@dataclass
class WalkStats:
    """What a `walk` did: listing tasks run and directories listed."""

    tasks: int = 0
    directories: int = 0


def _in_flight_limit() -> int:
    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else 1
    return int(min(_MAX_IN_FLIGHT, max(4, cpus / _LIST_CPUS)))


def walk(
    fs: pafs.FileSystem,
    roots: Sequence[str],
    *,
    exclude: Sequence[str] = (),
    part: tuple[pafs.FileSystem, str] | None = None,
    image_extensions: tuple[str, ...] = (),
    stats: WalkStats | None = None,
) -> Iterator[dict[str, Any]]:
    """List every file under `roots` (filesystem paths) in Ray tasks; yield each task's
    result (see `list_directories`) as it finishes, in no particular order.

    The driver keeps the frontier (directories found, not yet listed) and the tasks
    in flight. With `part=(filesystem, directory)` each task that finds files writes
    them to `directory/part-NNNNNN.parquet` and its result carries that path as `part`.
    """
    stats = stats if stats is not None else WalkStats()
    limit = _in_flight_limit()
    frontier: deque[tuple[str, int]] = deque()
    in_flight: dict[Any, str | None] = {}
    options = dict(
        exclude=tuple(exclude), image_extensions=image_extensions, root_paths=tuple(roots)
    )

    def submit(entries: list[tuple[str, int]], is_roots: bool) -> None:
        part_path = None
        if part is not None:
            part_path = f"{part[1]}/part-{stats.tasks:06d}.parquet"
        ref = list_directories.remote(
            fs,
            entries,
            roots=is_roots,
            part=None if part is None else (part[0], part_path),
            **options,
        )
        in_flight[ref] = part_path
        stats.tasks += 1
        stats.directories += len(entries)

    entries = [(path, i) for i, path in enumerate(roots)]
    per_task = max(1, min(_DIRS_PER_TASK, math.ceil(len(entries) / limit)))
    for start in range(0, len(entries), per_task):
        submit(entries[start : start + per_task], True)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        part_path = in_flight.pop(ready[0])
        result = ray.get(ready[0])
        if part_path is not None and result["files"]:
            result["part"] = part_path
        frontier.extend(result["dirs"])
        del result["dirs"]
        yield result
        while frontier and len(in_flight) < limit:
            take = max(1, min(_DIRS_PER_TASK, math.ceil(len(frontier) / limit)))
            submit([frontier.popleft() for _ in range(min(take, len(frontier)))], False)


def list_files(
    fs: pafs.FileSystem, roots: Sequence[str], *, stats: WalkStats | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """((path, bytes) of every file under `roots`, in root order then sorted; the roots
    that do not exist), listed in Ray tasks (`walk`)."""
    tables, missing = [], []
    for result in walk(fs, roots, stats=stats):
        tables.append(result["files"])
        missing.extend(result["missing"])
    if not tables:
        return [], missing
    table = pa.concat_tables(tables).sort_by([("root", "ascending"), ("path", "ascending")])
    paths = table.column("path").to_pylist()
    return list(zip(paths, table.column("bytes").to_pylist(), strict=True)), missing


# --- parquet footers (Ray tasks) -------------------------------------------------


def parquet_footers(fs: pafs.FileSystem, paths: Sequence[str]) -> list[dict[str, Any]]:
    """Per file: `names` (its columns), `types` (column -> Arrow type name) and `groups` ([rows, uncompressed bytes] of each
    row group), read by a few threads (an object store's latency bounds one at a time)."""

    def footer(path: str) -> dict[str, Any]:
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
        groups = [
            [meta.row_group(g).num_rows, meta.row_group(g).total_byte_size]
            for g in range(meta.num_row_groups)
        ]
        schema = meta.schema.to_arrow_schema()
        types = {f.name: str(f.type) for f in schema}
        return {"names": schema.names, "types": types, "groups": groups}

    with ThreadPoolExecutor(max_workers=max(1, min(_FOOTER_THREADS, len(paths)))) as pool:
        return list(pool.map(footer, paths))


# "DEFAULT": never captured by a caller's placement group (a Tune trial's holds no CPU for it).
@ray.remote(num_cpus=_LIST_CPUS, scheduling_strategy="DEFAULT")
def read_footers(fs: pafs.FileSystem, paths: list[str]) -> list[dict[str, Any]]:
    return parquet_footers(fs, paths)


def footers_in_tasks(fs: pafs.FileSystem, paths: Sequence[str]) -> list[dict[str, Any]]:
    """`parquet_footers` of `paths`, in order, read by Ray tasks of a few dozen files."""
    refs = [
        read_footers.remote(fs, list(paths[i : i + _FOOTERS_PER_TASK]))
        for i in range(0, len(paths), _FOOTERS_PER_TASK)
    ]
    return [footer for chunk in ray.get(refs) for footer in chunk]


# --- manifests (read side) -------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A manifest's marker, read from `location` (a filesystem path on `fs`)."""

    fs: pafs.FileSystem
    location: str
    marker: dict[str, Any] = field(repr=False)

    @property
    def format(self) -> str:
        return self.marker["format"]

    @property
    def roots(self) -> list[str]:
        return list(self.marker["roots"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.marker["shards"]

    @property
    def rows(self) -> int | None:
        return self.marker.get("rows")

    def shard_table(self, index: int, columns: Sequence[str] | None = None) -> pa.Table:
        path = f"{self.location}/{self.shards[index]['path']}"
        return pq.read_table(path, columns=list(columns) if columns else None, filesystem=self.fs)


def read_manifest(fs: pafs.FileSystem, location: str) -> Manifest | None:
    """The manifest at `location` (a directory holding `MARKER`), or None."""
    marker_path = f"{location.rstrip('/')}/{MARKER}"
    if fs.get_file_info(marker_path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(marker_path) as stream:
        marker = json.loads(stream.read())
    if marker.get("darkmatter_manifest") != MANIFEST_VERSION:
        raise ValueError(
            f"{marker_path}: manifest version {marker.get('darkmatter_manifest')!r}; "
            f"this darkmatter reads version {MANIFEST_VERSION}: index the corpus again"
        )
    return Manifest(fs, location.rstrip("/"), marker)
