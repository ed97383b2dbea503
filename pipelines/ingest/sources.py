"""Where images come from: a typed `ImageSource` and `read_raw`, its bytes as a Ray Dataset.

The driver only *plans*: Ray tasks list the files and read the parquet footers
(`listing.py`), and the corpus is cut into small read units (a chunk of files, one
parquet row group, one tar shard); when shuffling, each epoch's read tasks are drawn
from across the corpus (`epoch_tasks`). A manifest (`darkmatter index`, `manifest.py`)
is read instead of listing; from one, the read tasks are planned in Ray tasks too, a
group of manifest shards each (`unit_rows`), and the driver holds only the shard list. Ray tasks read them and emit rows `bytes` (binary; null when the
file could not be read), `key` (str: the path, `path#row` for parquet, `tar#sample` for
webdataset; stable across runs) and `label` (int64, when `label_column` is set).
Nothing is decoded here, so no file can fail a block (see `decode.py`).

S3: `s3://bucket/key` paths go through pyarrow's `S3FileSystem`, with
`s3_endpoint` as the endpoint override. Credentials come from the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or the AWS config
chain) of each process that reads; they are never passed, stored or logged here.
On a multi-node cluster give the nodes those variables (or a runtime_env).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import random
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, get_args
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines.cluster.placement import check_decode_placement, cluster_cpus, data_label_selector
from pipelines.ingest.formats import FORMATS, DecodeOn, SourceFormat
from pipelines.ingest.listing import MARKER, Manifest, footers_in_tasks, list_files, read_manifest
from pipelines.ingest.position import POSITION_COLUMNS, DataPosition

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
# `label_column` value for folder trees and path lists: the parent directory names,
# sorted, give the class indices (torchvision ImageFolder's convention).
FOLDER_LABEL = "folder"
_WEBDATASET_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# A read unit closes at this many (uncompressed parquet, or file) bytes below rows_per_unit.
_UNIT_BYTES = 256 * 1024 * 1024
_READ_THREADS = 16  # files of a folder unit read at once
# A corpus-shuffled read task streams up to this many tars at once, interleaving them.
_TARS_PER_TASK = 4
# How an epoch's read tasks are drawn when shuffling (see `epoch_tasks`).
ShuffleScope = Literal["corpus", "units"]
SHUFFLE_SCOPES: tuple[str, ...] = get_args(ShuffleScope)


@dataclass(frozen=True)
class ImageSource:
    """A corpus of images: a folder tree, parquet files, webdataset tars or a path list.

    `path`: a folder, a file, a list of files, or `s3://` URIs (no globs); or a
    manifest directory (`darkmatter index`; `format="manifest"`, or `auto` finds its
    marker file), which holds a local manifest of `s3://` files with `s3_endpoint`.
    `image_column`: the parquet column holding image bytes; for webdataset, the
    member extension (the default "image" means the first of jpg/jpeg/png/webp).
    `label_column`: a parquet column, a webdataset member extension (an integer in
    text, e.g. "cls"), or "folder" for folder trees / path lists (class index of
    the parent directory name, sorted).
    `rows_per_unit`: images per read unit or task, and so per decode task downstream
    (files of a folder tree or path list; consecutive whole parquet row groups,
    added until a unit holds this many rows; either closes early at 256 MiB; a
    webdataset tar is one unit). Ray pays a fixed gap per task, so small units
    leave decode CPUs idle (the figures: docs/INGEST.md). Lower it when a small
    corpus gives fewer units than there are decode CPUs.
    """

    path: str | list[str]
    format: SourceFormat = "auto"
    image_column: str = "image"
    label_column: str | None = None
    s3_endpoint: str | None = None
    rows_per_unit: int = 8192

    def __post_init__(self) -> None:
        paths = [self.path] if isinstance(self.path, str) else self.path
        if not isinstance(paths, list | tuple) or not paths:
            raise ValueError(f"ImageSource.path={self.path!r}: give a path or a non-empty list")
        for p in paths:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(
                    f"ImageSource.path: every entry must be a non-empty str, got {p!r}"
                )
            if any(ch in p for ch in "*?["):
                raise ValueError(f"ImageSource.path={p!r}: globs are not supported; list the files")
        if isinstance(self.path, tuple):
            object.__setattr__(self, "path", list(self.path))
        if self.format not in FORMATS:
            raise ValueError(f"ImageSource.format={self.format!r}: expected one of {FORMATS}")
        if not isinstance(self.image_column, str) or not self.image_column:
            raise ValueError(
                f"ImageSource.image_column={self.image_column!r}: must be a non-empty str"
            )
        if self.label_column is not None and (
            not isinstance(self.label_column, str) or not self.label_column
        ):
            raise ValueError(f"ImageSource.label_column={self.label_column!r}: a name or None")
        remote = [p.startswith("s3://") for p in paths]
        if any(remote) and not all(remote):
            raise ValueError("ImageSource.path: mixes s3:// URIs and local paths; use one kind")
        if self.s3_endpoint is not None:
            if not self.s3_endpoint.startswith(("http://", "https://")):
                raise ValueError(
                    f"ImageSource.s3_endpoint={self.s3_endpoint!r}: must start with http:// or https://"
                )
            if not all(remote) and self.format != "manifest":
                raise ValueError(
                    "ImageSource.s3_endpoint is set but ImageSource.path is not s3:// "
                    "(a local manifest of s3:// files: format='manifest')"
                )
        if self.rows_per_unit < 1:
            raise ValueError(f"ImageSource.rows_per_unit={self.rows_per_unit!r}: must be >= 1")

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @property
    def is_s3(self) -> bool:
        return self.paths[0].startswith("s3://")


# --- filesystems ---------------------------------------------------------------


@lru_cache(maxsize=8)
def _s3(endpoint: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # No credentials passed: pyarrow resolves them from the environment itself.
    return pafs.S3FileSystem(**kwargs)


def filesystem(source: ImageSource) -> pafs.FileSystem:
    """The pyarrow filesystem the source's paths live on."""
    return _s3(source.s3_endpoint) if source.is_s3 else pafs.LocalFileSystem()


def _fs_path(path: str) -> str:
    """A key as the filesystem wants it: bucket/key for S3, absolute for local."""
    return path[len("s3://") :] if path.startswith("s3://") else os.path.abspath(path)


def _key(fs_path: str, source: ImageSource) -> str:
    return f"s3://{fs_path}" if source.is_s3 else fs_path


def check_paths_here(source: ImageSource, address: str | None = None) -> None:
    """A missing local path or an empty folder, refused before an embedded local Ray starts
    (FileNotFoundError naming it). With a cluster (``address`` or RAY_ADDRESS) the paths are
    the nodes', and listing them in Ray tasks finds what is missing."""
    if source.is_s3 or address or os.environ.get("RAY_ADDRESS"):
        return
    for path in source.paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} does not exist")
        if os.path.isdir(path):
            with os.scandir(path) as entries:
                if next(entries, None) is None:
                    raise FileNotFoundError(f"{path!r} is an empty folder: no images to read")


# --- planning (driver; listing and footers in Ray tasks) -------------------------


def _has_ext(path: str, exts: tuple[str, ...]) -> bool:
    return path.lower().endswith(exts)


def _expand(source: ImageSource) -> tuple[str, list[str], dict[str, int]]:
    """Resolve `auto` and list the files: (format, filesystem paths, their sizes).

    A path list is taken as given (no stat per entry: a missing file is read as
    null bytes and counted later; no sizes); folders are listed recursively by Ray
    tasks, a directory level at a time (`listing.walk`), never by one call here.
    """
    fmt = source.format
    paths = [_fs_path(p) for p in source.paths]
    if fmt == "auto" and isinstance(source.path, list):
        if all(p.endswith(".parquet") for p in paths):
            fmt = "parquet"
        elif all(p.endswith(".tar") for p in paths):
            fmt = "webdataset"
        else:
            fmt = "paths"
    if fmt == "paths":
        return fmt, paths, {}
    listed, missing = list_files(filesystem(source), paths)
    if missing:
        first = next(i for i, p in enumerate(paths) if p in set(missing))
        raise FileNotFoundError(f"ImageSource.path: {source.paths[first]!r} does not exist")
    files = [f for f, _ in listed]
    sizes = dict(listed)
    if fmt == "auto":
        if any(f.endswith(".parquet") for f in files):
            fmt = "parquet"
        elif any(f.endswith(".tar") for f in files):
            fmt = "webdataset"
        else:
            fmt = "folder"
    wanted = {"folder": IMAGE_EXTENSIONS, "parquet": (".parquet",), "webdataset": (".tar",)}
    files = [f for f in files if _has_ext(f, wanted[fmt])]
    if not files:
        raise FileNotFoundError(
            f"ImageSource.path={source.path!r}: no {fmt} files found ({', '.join(wanted[fmt])})"
        )
    return fmt, files, sizes


def folder_classes(files: Sequence[str]) -> list[str]:
    """The class names of folder labels: the files' parent directory names, sorted."""
    return sorted({posixpath.basename(posixpath.dirname(f)) for f in files})


def _folder_units(
    source: ImageSource,
    files: list[str],
    sizes: dict[str, int],
    labels: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Consecutive files, rows_per_unit (or _UNIT_BYTES) a unit; `labels`: the files'
    folder labels when known (a manifest's), else drawn from `files`' directories."""
    if source.label_column is None:
        labels = None
    elif source.label_column != FOLDER_LABEL:
        raise ValueError(
            f"ImageSource.label_column={source.label_column!r}: folder trees and path "
            f"lists take labels from directory names; use {FOLDER_LABEL!r}"
        )
    elif labels is None:
        index = {name: i for i, name in enumerate(folder_classes(files))}
        labels = [index[posixpath.basename(posixpath.dirname(f))] for f in files]
    units = []
    start, size = 0, 0
    for end, path in enumerate(files, start=1):
        size += sizes.get(path) or 0
        if end - start >= source.rows_per_unit or size >= _UNIT_BYTES or end == len(files):
            unit: dict[str, Any] = {
                "kind": "files",
                "files": files[start:end],
                "rows": end - start,
                "bytes": size,
            }
            if labels is not None:
                unit["labels"] = labels[start:end]
            units.append(unit)
            start, size = end, 0
    return units


# Arrow types of a parquet image column: encoded image bytes.
_IMAGE_TYPES = ("binary", "large_binary")


def check_columns(
    source: ImageSource,
    names: Sequence[str],
    where: str,
    types: dict[str, str] | None = None,
) -> None:
    """`source`'s image and label columns are among `names`, the columns of `where`; with
    `types` (column -> Arrow type name), the image column holds bytes and labels integers."""
    for field, column in (
        ("image_column", source.image_column),
        ("label_column", source.label_column),
    ):
        if column is not None and column not in names:
            raise ValueError(
                f"ImageSource.{field}={column!r} is not a column of {where} "
                f"(columns: {list(names)})"
            )
    if types is None:
        return
    image_type = types.get(source.image_column)
    if image_type is not None and image_type not in _IMAGE_TYPES:
        raise ValueError(
            f"ImageSource.image_column={source.image_column!r} of {where} holds {image_type}, "
            f"not image bytes ({' or '.join(_IMAGE_TYPES)})"
        )
    label_type = types.get(source.label_column) if source.label_column else None
    if label_type is not None and not label_type.startswith(("int", "uint")):
        raise ValueError(
            f"ImageSource.label_column={source.label_column!r} of {where} holds {label_type}, "
            "not integer class indices"
        )


def _row_group_units(
    source: ImageSource, path: str, groups: Sequence[tuple[int, int, int, int]]
) -> list[dict[str, Any]]:
    """One file's row groups `(index, first row, rows, bytes)`, in order, as units:
    consecutive groups until a unit holds >= rows_per_unit rows (or _UNIT_BYTES
    uncompressed); each unit is one decode task downstream."""
    units, taken, rows, size = [], [], 0, 0
    for n, group in enumerate(groups, start=1):
        taken.append(group)
        rows, size = rows + group[2], size + group[3]
        if rows >= source.rows_per_unit or size >= _UNIT_BYTES or n == len(groups):
            units.append(
                {
                    "kind": "parquet",
                    "file": path,
                    "row_groups": [g[0] for g in taken],
                    "offset": taken[0][1],
                    "rows": rows,
                    "group_rows": [g[2] for g in taken],
                    "group_bytes": [g[3] for g in taken],
                }
            )
            taken, rows, size = [], 0, 0
    return units


def _parquet_units(source: ImageSource, files: list[str]) -> list[dict[str, Any]]:
    units = []
    for path, footer in zip(files, footers_in_tasks(filesystem(source), files), strict=True):
        check_columns(source, footer["names"], _key(path, source), footer.get("types"))
        groups, first = [], 0
        for index, (rows, size) in enumerate(footer["groups"]):
            groups.append((index, first, rows, size))
            first += rows
        units.extend(_row_group_units(source, path, groups))
    return units


def plan_units(source: ImageSource) -> tuple[str, list[dict[str, Any]]]:
    """Resolve the format and cut the corpus into read units (listing in Ray tasks; from
    a manifest, its shards are read here, not the files)."""
    manifest = open_manifest(source)
    if manifest is not None:
        data = reading_source(source, manifest)
        return data.format, _manifest_units(data, manifest, range(len(manifest.shards)))
    fmt, files, sizes = _expand(source)
    if fmt in ("folder", "paths"):
        return fmt, _folder_units(source, files, sizes)
    if fmt == "parquet":
        return fmt, _parquet_units(source, files)
    return fmt, [{"kind": "tar", "file": f, "rows": None} for f in files]


def count_rows(source: ImageSource) -> int | None:
    """Images in `source` from listings, footers or a manifest's marker (nothing read);
    None when they cannot be counted without reading every shard (webdataset)."""
    manifest = open_manifest(source)
    if manifest is not None:
        return manifest.rows
    _, units = plan_units(source)
    if any(unit.get("rows") is None for unit in units):
        return None
    return sum(unit["rows"] for unit in units)


def count_read_units(source: ImageSource) -> int:
    """Read units of `source` (an upper bound on the tasks that can work at once). From a
    manifest, estimated from its marker (rows / rows_per_unit) without reading its shards."""
    manifest = open_manifest(source)
    if manifest is not None:
        return max(1, -(-manifest.rows // source.rows_per_unit))
    return len(plan_units(source)[1])


# --- manifests -------------------------------------------------------------------

# Read planning from a manifest: each epoch, the shards are dealt (in an order drawn from
# (seed, epoch)) into groups of about this many manifest rows, and one Ray task plans a
# group (`epoch_tasks` over its units). A group's read tasks draw from its shards only:
# at <= this many rows the whole corpus is one group, the same plan as `plan_units`.
_PLAN_GROUP_ENTRIES = 1_000_000
# A task of group g is numbered g * _TASK_STRIDE + its index in the group's plan.
_TASK_STRIDE = 1 << 24
# Each manifest's marker, parsed once per (location, mtime, size).
_MANIFESTS: dict[tuple, Manifest] = {}


def open_manifest(source: ImageSource) -> Manifest | None:
    """The manifest `source` names (`format="manifest"`, or `auto` on a directory holding
    `listing.MARKER`), or None."""
    if source.format not in ("auto", "manifest"):
        return None
    if not isinstance(source.path, str):
        if source.format == "manifest":
            raise ValueError(
                f"ImageSource.path={source.path!r}: a manifest is one directory; give its path"
            )
        return None
    fs, location = filesystem(source), _fs_path(source.path).rstrip("/")
    info = fs.get_file_info(f"{location}/{MARKER}")
    if info.type != pafs.FileType.File:
        if source.format == "manifest":
            raise FileNotFoundError(
                f"ImageSource.path={source.path!r} is not a darkmatter manifest (no {MARKER}"
                "; make one with `darkmatter index`)"
            )
        return None
    key = (source.is_s3, source.s3_endpoint, location, info.mtime_ns, info.size)
    if key not in _MANIFESTS:
        _MANIFESTS.clear()
        _MANIFESTS[key] = read_manifest(fs, location)
    return _MANIFESTS[key]


def reading_source(source: ImageSource, manifest: Manifest | None = None) -> ImageSource:
    """The source the read tasks read: `source` itself, or for a manifest its files (the
    manifest's roots and format; the image column of `source`, else the manifest's)."""
    manifest = manifest or open_manifest(source)
    if manifest is None:
        return source
    roots = manifest.roots
    data = ImageSource(
        roots if len(roots) > 1 else roots[0],
        format=manifest.format,
        image_column=(
            source.image_column
            if source.image_column != "image"
            else manifest.marker.get("image_column") or "image"
        ),
        label_column=source.label_column,
        s3_endpoint=source.s3_endpoint,
        rows_per_unit=source.rows_per_unit,
    )
    if manifest.format == "parquet" and manifest.marker.get("columns") is not None:
        where = f"every file of the manifest {source.path}"
        check_columns(data, manifest.marker["columns"], where)
    return data


def _uri_fs_path(uri: str) -> str:
    return uri[len("s3://") :] if uri.startswith("s3://") else uri


def _manifest_units(
    source: ImageSource, manifest: Manifest, shards: Sequence[int]
) -> list[dict[str, Any]]:
    """The read units of manifest `shards` (indices), read from the shards alone;
    `source` is the manifest's `reading_source`."""
    columns = {
        "folder": ["uri", "bytes", "label"],
        "parquet": ["uri", "bytes", "rows", "row_group", "first_row"],
        "webdataset": ["uri"],
    }[manifest.format]
    tables = [manifest.shard_table(i, columns) for i in shards]
    if not tables:
        return []
    table = pa.concat_tables(tables)
    files = [_uri_fs_path(u) for u in table.column("uri").to_pylist()]
    if manifest.format == "folder":
        sizes = dict(zip(files, table.column("bytes").to_pylist(), strict=True))
        return _folder_units(source, files, sizes, table.column("label").to_pylist())
    if manifest.format == "webdataset":
        return [{"kind": "tar", "file": f, "rows": None} for f in files]
    units: list[dict[str, Any]] = []
    groups = zip(
        files,
        table.column("row_group").to_pylist(),
        table.column("first_row").to_pylist(),
        table.column("rows").to_pylist(),
        table.column("bytes").to_pylist(),
        strict=True,
    )
    current, taken = None, []
    for path, *group in groups:  # a file's row groups are consecutive, in order
        if path != current and taken:
            units.extend(_row_group_units(source, current, taken))
            taken = []
        current = path
        taken.append(tuple(group))
    if taken:
        units.extend(_row_group_units(source, current, taken))
    return units


def _shard_groups(manifest: Manifest, shuffle_seed: int | None, epoch: int) -> list[list[int]]:
    """The manifest's shards dealt into groups of about _PLAN_GROUP_ENTRIES rows for one
    epoch: in manifest order unshuffled, else in an order drawn from (shuffle_seed,
    epoch). Always the same number of groups (some may be empty)."""
    sizes = [shard["entries"] for shard in manifest.shards]
    total = max(1, sum(sizes))
    count = max(1, -(-total // _PLAN_GROUP_ENTRIES))
    order: Sequence[int] = range(len(sizes))
    if shuffle_seed is not None and count > 1:
        order = np.random.default_rng([shuffle_seed, epoch, 1]).permutation(len(sizes))
    groups: list[list[int]] = [[] for _ in range(count)]
    filled = 0
    for i in order:  # by where the shard's middle falls in the running total
        groups[min(count - 1, int((filled + sizes[i] / 2) * count // total))].append(int(i))
        filled += sizes[i]
    return groups


def _resumed(task: dict[str, Any], epoch: int, index: int, position: DataPosition | None):
    """`task` less the rows a restored run's `position` consumed; None when all were."""
    if position is None:
        return task
    if position.is_complete(epoch, index):
        return None
    consumed = position.consumed(epoch, index)
    return {**task, "skip": consumed} if consumed else task


def _plan_rows(
    batch: dict[str, np.ndarray],
    *,
    source: ImageSource,
    manifest: Manifest,
    shuffle_seed: int | None,
    scope: ShuffleScope,
    position: DataPosition | None,
) -> Iterator[dict[str, np.ndarray]]:
    """map_batches UDF: (epoch, group) -> that group's read tasks, planned here from the
    group's shards, as `unit_rows` rows."""
    for epoch, group in zip(batch["epoch"].tolist(), batch["group"].tolist(), strict=True):
        groups = _shard_groups(manifest, shuffle_seed, epoch)
        units = _manifest_units(source, manifest, groups[group])
        if not units:
            continue
        seed = shuffle_seed
        if seed is not None and len(groups) > 1:  # a plan of its own for each group
            seed = int(np.random.SeedSequence([seed, epoch, group]).generate_state(1)[0])
        tasks = epoch_tasks(
            units, source.rows_per_unit, epoch=epoch, shuffle_seed=seed, scope=scope
        )
        del units
        for i, task in enumerate(tasks):
            number = group * _TASK_STRIDE + i
            task = _resumed(task, epoch, number, position)
            if task is not None:  # a row (and so a block, see `_manifest_unit_rows`) each
                yield {
                    "unit": np.array([json.dumps(task)], dtype=object),
                    "epoch": np.array([epoch], np.int64),
                    "task": np.array([number], np.int64),
                }


def _fewest_tasks(manifest: Manifest, rows_per_unit: int, epochs: int) -> int:
    """A lower bound on the read tasks of a manifest's plan over `epochs` (a task holds at
    most rows_per_unit files or row groups, or _TARS_PER_TASK tars), for the read pool's
    size: Ray Data warns of a pool larger than its inputs."""
    entries = sum(shard["entries"] for shard in manifest.shards)
    per_task = _TARS_PER_TASK if manifest.format == "webdataset" else rows_per_unit
    return epochs * max(1, entries // per_task)


def _manifest_unit_rows(
    source: ImageSource,
    manifest: Manifest,
    *,
    epochs: int,
    shuffle_seed: int | None,
    scope: ShuffleScope,
    position: DataPosition | None,
) -> ray.data.Dataset:
    """`unit_rows` of a manifest, planned in Ray tasks: the driver holds (epoch, group)
    items and the shard list; a task per item reads its group's shards and plans its read
    tasks (`_plan_rows`), each leaving as a block of its own (one read task per block
    downstream, as `from_items` gives: the repartition runs inside the planning tasks)."""
    if scope not in SHUFFLE_SCOPES:
        raise ValueError(f"epoch_tasks: scope={scope!r}: expected one of {SHUFFLE_SCOPES}")
    groups = len(_shard_groups(manifest, None, 0))
    items = [{"epoch": e, "group": g} for e in range(epochs) for g in range(groups)]
    plan = ray.data.from_items(items, override_num_blocks=min(len(items), 1024))
    # One group at a time, epoch after epoch, on half a CPU: planning runs ahead of the
    # reads, and as an op of whole-CPU tasks it kept the decode map waiting on 2 CPUs.
    resources = dict(num_cpus=0.5, compute=ray.data.TaskPoolStrategy(size=1))
    tasks = plan.map_batches(
        _plan_rows,
        fn_kwargs=dict(
            source=reading_source(source, manifest),
            manifest=manifest,
            shuffle_seed=shuffle_seed,
            scope=scope,
            position=position,
        ),
        batch_size=1,
        batch_format="numpy",
        **resources,
    )
    return _one_row_blocks(tasks, **resources)


def _one_row_blocks(
    ds: ray.data.Dataset, *, num_cpus: float, compute: ray.data.TaskPoolStrategy
) -> ray.data.Dataset:
    """`ds.repartition(target_num_rows_per_block=1)` inside the tasks of `ds`'s last map.

    Ray Data fuses a map with a streaming repartition only when both ask for the same
    resources and pool; `Dataset.repartition` takes neither (it asks for a whole CPU, in
    tasks of its own), so the operator is built here as `repartition` builds it, with
    the map's. (Ray 2.60's internals; without them, the public `repartition`.)"""
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators import StreamingRepartition

        op = StreamingRepartition(
            target_num_rows_per_block=1,
            input_dependencies=[ds._logical_plan.dag],
            ray_remote_args={"num_cpus": num_cpus},
            compute=compute,
        )
        return ray.data.Dataset._from_parent(ds, LogicalPlan(op, ds.context))
    except (ImportError, AttributeError, TypeError):  # another Ray: correct, slower
        return ds.repartition(target_num_rows_per_block=1)


def _group_pieces(unit: dict[str, Any]) -> list[list[Any]]:
    """A parquet unit's row groups as pieces `[file, group, first row's index, rows]`."""
    starts = np.cumsum([unit["offset"], *unit["group_rows"][:-1]])
    return [
        [unit["file"], group, int(start), rows]
        for group, start, rows in zip(unit["row_groups"], starts, unit["group_rows"], strict=True)
    ]


def _mixed_tasks(
    units: list[dict[str, Any]], rows_per_unit: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """One epoch's read tasks, each drawn from across the whole corpus (see `epoch_tasks`)."""
    kind = units[0]["kind"]
    if kind == "files":
        files = np.array([f for unit in units for f in unit["files"]], dtype=object)
        labels = (
            np.concatenate([unit["labels"] for unit in units]) if "labels" in units[0] else None
        )
        mean_bytes = sum(unit.get("bytes", 0) for unit in units) / len(files)
        per_task = rows_per_unit
        if mean_bytes:  # path lists have no sizes
            per_task = min(per_task, max(1, int(_UNIT_BYTES // mean_bytes)))
        tasks = []
        # Equal random samples of the files; sorted inside a task (reading order only:
        # the rows leave in an order drawn from the task's `row_order_seed`).
        for chunk in np.array_split(rng.permutation(len(files)), -(-len(files) // per_task)):
            chunk = np.sort(chunk)
            task: dict[str, Any] = {
                "kind": "files",
                "files": files[chunk].tolist(),
                "rows": len(chunk),
            }
            if labels is not None:
                task["labels"] = labels[chunk].tolist()
            tasks.append(task)
        return tasks
    if kind == "parquet":
        # Row groups are the smallest piece a parquet file reads well: a task takes whole
        # ones from anywhere in the corpus, until it holds rows_per_unit rows or _UNIT_BYTES.
        pieces = [
            (piece, size)
            for unit in units
            for piece, size in zip(_group_pieces(unit), unit["group_bytes"], strict=True)
        ]
        tasks, taken, rows, size = [], [], 0, 0
        for i in rng.permutation(len(pieces)):
            piece, piece_bytes = pieces[i]
            taken.append(piece)
            rows, size = rows + piece[3], size + piece_bytes
            if rows >= rows_per_unit or size >= _UNIT_BYTES:
                tasks.append({"kind": "row_groups", "pieces": sorted(taken), "rows": rows})
                taken, rows, size = [], 0, 0
        if taken:
            tasks.append({"kind": "row_groups", "pieces": sorted(taken), "rows": rows})
        return tasks
    # Tars stream: a task interleaves a few of them; at least ~8 tasks an epoch.
    tars = [units[i]["file"] for i in rng.permutation(len(units))]
    per_task = max(1, min(_TARS_PER_TASK, len(tars) // 8))
    return [
        {"kind": "tars", "files": tars[i : i + per_task], "rows": None}
        for i in range(0, len(tars), per_task)
    ]


def epoch_tasks(
    units: list[dict[str, Any]],
    rows_per_unit: int,
    *,
    epoch: int,
    shuffle_seed: int | None,
    scope: ShuffleScope = "corpus",
) -> list[dict[str, Any]]:
    """The read tasks of one epoch, in the order they are read; every image once.

    Unshuffled (`shuffle_seed=None`): the units in file order. Shuffled, each task
    carries a `row_order_seed` (shuffle_seed, epoch, task) for the order of its rows,
    and `scope` says where a task's rows come from:
      - "corpus" (default): from anywhere in the corpus. Folder trees and path lists:
        each task is a random sample of the files (as many as a unit: rows_per_unit,
        or ~_UNIT_BYTES at the corpus' mean file size); parquet: whole row groups
        from across all files; webdataset: up to _TARS_PER_TASK tars, interleaved.
        A class-per-folder tree listed in sorted order otherwise gives batches of one
        or two classes (docs/SCALING.md, "Shuffle quality").
      - "units": the units (consecutive files, row groups or one tar) in a new order.
    The plan is drawn from (shuffle_seed, epoch) alone: the same on every run.
    """
    if scope not in SHUFFLE_SCOPES:
        raise ValueError(f"epoch_tasks: scope={scope!r}: expected one of {SHUFFLE_SCOPES}")
    if shuffle_seed is None:
        return list(units)
    if scope == "corpus":
        tasks = _mixed_tasks(units, rows_per_unit, np.random.default_rng([shuffle_seed, epoch]))
    else:
        order = list(range(len(units)))
        random.Random(f"{shuffle_seed}:{epoch}").shuffle(order)
        tasks = [units[i] for i in order]
    # The units scope keeps seeding a unit's rows by its index in the plan.
    indices = range(len(tasks)) if scope == "corpus" else order
    return [
        {**task, "row_order_seed": [shuffle_seed, epoch, i]}
        for task, i in zip(tasks, indices, strict=True)
    ]


# --- reading (Ray tasks) ---------------------------------------------------------


def _read_file(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    except OSError:
        return None


def _table(data: list, keys: list[str], labels: list[int] | None) -> pa.Table:
    columns = {"bytes": pa.array(data, pa.binary()), "key": pa.array(keys, pa.string())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    return pa.table(columns)


def _read_files(source: ImageSource, unit: dict[str, Any]) -> Iterator[pa.Table]:
    """A unit of files, read by a few threads: an object store's latency, not its
    bandwidth, bounds one file at a time."""
    fs = filesystem(source)
    files = unit["files"]
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        data = list(pool.map(lambda f: _read_file(fs, f), files))
    yield _table(data, [_key(f, source) for f in files], unit.get("labels"))


def _read_pieces(source: ImageSource, pieces: list[list[Any]]) -> Iterator[pa.Table]:
    """Parquet row groups `[file, group, first row's index, rows]`, each file opened once
    (files read by a few threads, as `_read_files`)."""
    fs = filesystem(source)
    columns = [source.image_column] + ([source.label_column] if source.label_column else [])
    by_file: dict[str, list[list[Any]]] = {}
    for piece in pieces:
        by_file.setdefault(piece[0], []).append(piece)

    def read(path: str) -> pa.Table:
        groups = by_file[path]
        with fs.open_input_file(path) as handle:
            table = pq.ParquetFile(handle).read_row_groups([g[1] for g in groups], columns=columns)
        key = _key(path, source)
        keys = [f"{key}#{start + i}" for _, _, start, rows in groups for i in range(rows)]
        labels = table.column(source.label_column).to_pylist() if source.label_column else None
        return _table(table.column(source.image_column).to_pylist(), keys, labels)

    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(by_file))) as pool:
        tables = list(pool.map(read, by_file))
    yield pa.concat_tables(tables)


def _read_parquet(source: ImageSource, unit: dict[str, Any]) -> Iterator[pa.Table]:
    return _read_pieces(source, _group_pieces(unit))


def _read_row_groups(source: ImageSource, task: dict[str, Any]) -> Iterator[pa.Table]:
    return _read_pieces(source, task["pieces"])


def unsafe_member(name: str) -> str | None:
    """Why a tar member's name cannot be a sample key, or None: an absolute name or a `..`
    part would give a key outside the shard (members are read in memory, never extracted)."""
    if posixpath.isabs(name):
        return "an absolute name"
    if ".." in name.split("/"):
        return "a '..' part"
    return None


def _webdataset_samples(stream: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group tar members into samples by key: `dir/name.ext` -> key `dir/name`, ext.
    Members with an unsafe name (`unsafe_member`) are skipped and logged."""
    current: str | None = None
    sample: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            unsafe = unsafe_member(member.name)
            if unsafe is not None:
                log.warning("skipped tar member %r: %s", member.name, unsafe)
                continue
            directory, base = posixpath.split(member.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = posixpath.join(directory, stem)
            if key != current and current is not None:
                yield current, sample
                sample = {}
            current = key
            handle = tar.extractfile(member)
            sample[ext.lower()] = handle.read() if handle is not None else b""
    if current is not None:
        yield current, sample


def _read_tar(source: ImageSource, unit: dict[str, Any], rows: int = 256) -> Iterator[pa.Table]:
    fs = filesystem(source)
    tar_key = _key(unit["file"], source)
    data: list[bytes | None] = []
    keys: list[str] = []
    labels: list[int] | None = [] if source.label_column else None

    def flush() -> pa.Table:
        table = _table(data, keys, labels)
        data.clear(), keys.clear()
        if labels is not None:
            labels.clear()
        return table

    with fs.open_input_stream(unit["file"]) as stream:
        for sample_key, members in _webdataset_samples(io.BufferedReader(stream)):
            if source.image_column == "image":
                ext = next((e for e in _WEBDATASET_IMAGE_EXTS if e in members), None)
            else:
                ext = source.image_column if source.image_column in members else None
            data.append(members[ext] if ext else None)
            keys.append(f"{tar_key}#{sample_key}")
            if labels is not None:
                text = members.get(source.label_column, b"").decode(errors="replace").strip()
                labels.append(int(text) if text.lstrip("-").isdigit() else -1)
            if len(keys) >= rows:
                yield flush()
    if keys:
        yield flush()


def _read_tars(source: ImageSource, task: dict[str, Any]) -> Iterator[pa.Table]:
    """Several tars streamed at once: each table joins the next table of every tar still
    open (`read_units` then shuffles it), so a task holds a few tables at a time."""
    streams = [_read_tar(source, {"file": path}) for path in task["files"]]
    while streams:
        tables = []
        for stream in list(streams):
            table = next(stream, None)
            if table is None:
                streams.remove(stream)
            else:
                tables.append(table)
        if tables:
            yield pa.concat_tables(tables)


_READERS = {
    "files": _read_files,
    "parquet": _read_parquet,
    "tar": _read_tar,
    "row_groups": _read_row_groups,
    "tars": _read_tars,
}


def read_units(batch: dict[str, Any], source: ImageSource) -> Iterator[pa.Table]:
    """map_batches UDF: each input row is a JSON read task (plus `epoch`, `task`) -> raw rows.

    Each row leaves with its data position (`position.POSITION_COLUMNS`): `epoch`, `task`,
    `pos` (its index among the task's rows in reading order) and `task_rows`. Rows a
    restored run has already consumed (the task's `skip` positions) are not emitted.
    A task with a `row_order_seed` (set by `epoch_tasks` when shuffling) yields its rows
    in an order drawn from that seed: with thousands of images per task, a fixed order
    would give every epoch the same batches (the same negatives). Tars are shuffled
    within each table they stream (256 rows per tar).
    """
    for unit_json, epoch, task in zip(batch["unit"], batch["epoch"], batch["task"], strict=True):
        unit = json.loads(unit_json)
        order_seed = unit.get("row_order_seed")
        rng = np.random.default_rng(order_seed) if order_seed is not None else None
        skip = np.asarray(unit.get("skip", []), np.int64)
        task_rows = unit["rows"] if unit.get("rows") is not None else -1
        offset = 0
        for table in _READERS[unit["kind"]](source, unit):
            pos = np.arange(offset, offset + table.num_rows, dtype=np.int64)
            offset += table.num_rows
            if skip.size:
                keep = ~np.isin(pos, skip)
                table, pos = table.filter(pa.array(keep)), pos[keep]
            if rng is not None:
                order = rng.permutation(table.num_rows)
                table, pos = table.take(order), pos[order]
            n = table.num_rows
            for name, values in (
                ("epoch", np.full(n, epoch, np.int64)),
                ("task", np.full(n, task, np.int64)),
                ("pos", pos),
                ("task_rows", np.full(n, task_rows, np.int64)),
            ):
                table = table.append_column(name, pa.array(values, pa.int64()))
            yield table


def unit_rows(
    source: ImageSource,
    *,
    epochs: int = 1,
    shuffle_seed: int | None = None,
    scope: ShuffleScope = "corpus",
    position: DataPosition | None = None,
) -> ray.data.Dataset:
    """The read plan as a dataset: each epoch's read tasks (`epoch_tasks`), epoch-major.

    With `shuffle_seed`, each epoch draws its own tasks from (shuffle_seed, epoch) and
    each task's row order from (shuffle_seed, epoch, task); rows keep their keys, so
    views stay reproducible. A task is numbered by its place in its epoch's plan (the
    same on every run); with `position` (a restored run's), tasks it consumed are left
    out and partly consumed ones skip the rows it consumed. From a manifest the tasks are
    planned in Ray tasks, a group of its shards each (`_plan_rows`; a task of group g is
    numbered g * _TASK_STRIDE + its place in the group's plan).
    """
    manifest = open_manifest(source)
    if manifest is not None:
        if position is not None and manifest.rows:
            if all(position.coverage(e, manifest.rows) >= 1 for e in range(epochs)):
                raise _nothing_left(source, epochs)
        return _manifest_unit_rows(
            source,
            manifest,
            epochs=epochs,
            shuffle_seed=shuffle_seed,
            scope=scope,
            position=position,
        )
    _, units = plan_units(source)
    items = []
    for epoch in range(epochs):
        tasks = epoch_tasks(
            units, source.rows_per_unit, epoch=epoch, shuffle_seed=shuffle_seed, scope=scope
        )
        for index, task in enumerate(tasks):
            task = _resumed(task, epoch, index, position)
            if task is not None:
                items.append({"unit": json.dumps(task), "epoch": epoch, "task": index})
    if not items:
        raise _nothing_left(source, epochs)
    return ray.data.from_items(items, override_num_blocks=min(len(items), 1024))


def _nothing_left(source: ImageSource, epochs: int) -> ValueError:
    return ValueError(
        f"ImageSource.path={source.path!r}: nothing left to read in {epochs} epoch(s) "
        "(the data position says every row was consumed)"
    )


def read_concurrency() -> int:
    """The most read tasks at once: one per 4 CPUs of the cluster at its largest (what the
    autoscaler may grow it to, else the nodes alive now), at least 2. A unit is thousands of
    images, and a cluster's decode tasks need several units in flight.

    A ceiling, not a count: below it Ray Data's resource budget, which it recomputes as nodes
    join and leave, decides how many run. Without one, reads at 0.05 CPU ran 3-6 at once on
    2 CPUs and Ray started 14 worker processes (Ray warns of fractional-CPU tasks doing so):
    the first batch came after ~100 s instead of ~20 s (docs/SCALING.md, "Concurrency").
    """
    return max(2, cluster_cpus() // 4) if ray.is_initialized() else 2


def read_raw_rows(
    source: ImageSource,
    *,
    epochs: int = 1,
    shuffle_seed: int | None = None,
    scope: ShuffleScope = "corpus",
    position: DataPosition | None = None,
    decode_on: DecodeOn = "any",
) -> ray.data.Dataset:
    """`read_raw` plus the int64 data-position columns (`epoch`, `task`, `pos`, `task_rows`:
    `position.py`), the corpus repeated `epochs` times (in an order drawn from
    `shuffle_seed` and `scope`: `epoch_tasks`; file order without one), less what a
    restored run's `position` says was consumed.

    The read asks for a twentieth of a CPU (`read_concurrency` tasks at once): reading is
    mostly waiting on storage, and half a CPU kept a second decode task from
    starting on 2 CPUs. The differing resources keep Ray Data from fusing it with
    the decode map that follows: fused, the decode map's `batch_size` (rows)
    bundled that many *read units* into one task, and batches arrived only at the
    end of the run. Unfused, each read unit is one decode task. (Both measured:
    docs/INGEST.md, "Measured facts behind the code".) `decode_on="cpu_nodes"`: the read
    tasks run on the nodes labelled as data nodes only (`pipelines.cluster.placement`).
    """
    check_decode_placement(decode_on)
    units = unit_rows(
        source, epochs=epochs, shuffle_seed=shuffle_seed, scope=scope, position=position
    )
    # from_items: counted from metadata; a manifest's plan (made in tasks) is not counted
    manifest = open_manifest(source)
    rows_per_unit = source.rows_per_unit
    tasks = units.count() if manifest is None else _fewest_tasks(manifest, rows_per_unit, epochs)
    return units.map_batches(
        read_units,
        fn_kwargs={"source": reading_source(source, manifest)},  # a manifest's files
        batch_size=1,
        batch_format="numpy",
        num_cpus=0.05,
        compute=ray.data.TaskPoolStrategy(size=min(read_concurrency(), tasks)),
        label_selector=data_label_selector(decode_on),
    )


def read_raw(source: ImageSource) -> ray.data.Dataset:
    """Raw rows `bytes`, `key` (+ `label`) of every image of `source`, lazily read."""
    return read_raw_rows(source).drop_columns(list(POSITION_COLUMNS))
