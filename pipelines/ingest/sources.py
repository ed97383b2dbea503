"""Where images come from: a typed `ImageSource` and `read_raw`, its bytes as a Ray Dataset.

The driver only *plans*: it lists files (and parquet footers) and cuts the corpus
into small read units (a chunk of files, one parquet row group, one tar shard);
when shuffling, each epoch's read tasks are drawn from across the corpus
(`epoch_tasks`). Ray tasks read them and emit rows `bytes` (binary; null when the
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
import os
import posixpath
import random
import tarfile
from collections.abc import Iterator
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

from pipelines.config import SourceFormat

FORMATS: tuple[str, ...] = get_args(SourceFormat)
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

    `path`: a folder, a file, a list of files, or `s3://` URIs (no globs).
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
            if not all(remote):
                raise ValueError("ImageSource.s3_endpoint is set but ImageSource.path is not s3://")
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


# --- planning (driver) -----------------------------------------------------------


def _has_ext(path: str, exts: tuple[str, ...]) -> bool:
    return path.lower().endswith(exts)


def _list_tree(fs: pafs.FileSystem, root: str) -> list[tuple[str, int]]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File)


def _expand(source: ImageSource) -> tuple[str, list[str], dict[str, int]]:
    """Resolve `auto` and list the files: (format, filesystem paths, their sizes).

    A path list is taken as given (no stat per entry: a missing file is read as
    null bytes and counted later; no sizes); folders are listed recursively.
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
    fs = filesystem(source)
    files: list[str] = []
    sizes: dict[str, int] = {}
    for original, path in zip(source.paths, paths, strict=True):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"ImageSource.path: {original!r} does not exist")
        listed = (
            _list_tree(fs, path) if info.type == pafs.FileType.Directory else [(path, info.size)]
        )
        files.extend(f for f, _ in listed)
        sizes.update(listed)
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


def _folder_units(
    source: ImageSource, files: list[str], sizes: dict[str, int]
) -> list[dict[str, Any]]:
    labels: list[int] | None = None
    if source.label_column is not None:
        if source.label_column != FOLDER_LABEL:
            raise ValueError(
                f"ImageSource.label_column={source.label_column!r}: folder trees and path "
                f"lists take labels from directory names; use {FOLDER_LABEL!r}"
            )
        classes = sorted({posixpath.basename(posixpath.dirname(f)) for f in files})
        index = {name: i for i, name in enumerate(classes)}
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


def _parquet_units(source: ImageSource, files: list[str]) -> list[dict[str, Any]]:
    fs = filesystem(source)
    units = []
    for path in files:
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
        names = meta.schema.to_arrow_schema().names
        for field, column in (
            ("image_column", source.image_column),
            ("label_column", source.label_column),
        ):
            if column is not None and column not in names:
                raise ValueError(
                    f"ImageSource.{field}={column!r} is not a column of {_key(path, source)} "
                    f"(columns: {names})"
                )
        # Consecutive row groups of a file make one unit of >= rows_per_unit rows (or
        # _UNIT_BYTES uncompressed): each unit is one decode task downstream.
        offset, groups, group_rows, group_bytes = 0, [], [], []
        for group in range(meta.num_row_groups):
            groups.append(group)
            group_rows.append(meta.row_group(group).num_rows)
            group_bytes.append(meta.row_group(group).total_byte_size)
            rows, last = sum(group_rows), group == meta.num_row_groups - 1
            if rows >= source.rows_per_unit or sum(group_bytes) >= _UNIT_BYTES or last:
                units.append(
                    {
                        "kind": "parquet",
                        "file": path,
                        "row_groups": groups,
                        "offset": offset,
                        "rows": rows,
                        "group_rows": group_rows,
                        "group_bytes": group_bytes,
                    }
                )
                offset, groups, group_rows, group_bytes = offset + rows, [], [], []
    return units


def plan_units(source: ImageSource) -> tuple[str, list[dict[str, Any]]]:
    """Resolve the format and cut the corpus into read units (runs on the driver)."""
    fmt, files, sizes = _expand(source)
    if fmt in ("folder", "paths"):
        return fmt, _folder_units(source, files, sizes)
    if fmt == "parquet":
        return fmt, _parquet_units(source, files)
    return fmt, [{"kind": "tar", "file": f, "rows": None} for f in files]


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


def _webdataset_samples(stream: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group tar members into samples by key: `dir/name.ext` -> key `dir/name`, ext."""
    current: str | None = None
    sample: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
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
    """map_batches UDF: each input row is a JSON read task (plus `epoch`) -> raw rows.

    A task with a `row_order_seed` (set by `epoch_tasks` when shuffling) yields its rows
    in an order drawn from that seed: with thousands of images per task, a fixed order
    would give every epoch the same batches (the same negatives). Tars are shuffled
    within each table they stream (256 rows per tar).
    """
    for unit_json, epoch in zip(batch["unit"], batch["epoch"], strict=True):
        unit = json.loads(unit_json)
        order_seed = unit.get("row_order_seed")
        rng = np.random.default_rng(order_seed) if order_seed is not None else None
        for table in _READERS[unit["kind"]](source, unit):
            if rng is not None:
                table = table.take(rng.permutation(table.num_rows))
            yield table.append_column("epoch", pa.array([int(epoch)] * table.num_rows, pa.int64()))


def unit_rows(
    source: ImageSource,
    *,
    epochs: int = 1,
    shuffle_seed: int | None = None,
    scope: ShuffleScope = "corpus",
) -> ray.data.Dataset:
    """The read plan as a dataset: each epoch's read tasks (`epoch_tasks`), epoch-major.

    With `shuffle_seed`, each epoch draws its own tasks from (shuffle_seed, epoch) and
    each task's row order from (shuffle_seed, epoch, task); rows keep their keys, so
    views stay reproducible.
    """
    _, units = plan_units(source)
    items = [
        {"unit": json.dumps(task), "epoch": epoch}
        for epoch in range(epochs)
        for task in epoch_tasks(
            units, source.rows_per_unit, epoch=epoch, shuffle_seed=shuffle_seed, scope=scope
        )
    ]
    return ray.data.from_items(items, override_num_blocks=min(len(items), 1024))


def read_concurrency() -> int:
    """Read tasks at once: 2, or one per 4 CPUs of the cluster when that is more (a unit is
    thousands of images; a cluster's decode tasks need several units in flight)."""
    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    return max(2, cpus // 4)


def read_raw_rows(
    source: ImageSource,
    *,
    epochs: int = 1,
    shuffle_seed: int | None = None,
    scope: ShuffleScope = "corpus",
) -> ray.data.Dataset:
    """`read_raw` plus an int64 `epoch` column, the corpus repeated `epochs` times (in an
    order drawn from `shuffle_seed` and `scope`: `epoch_tasks`; file order without one).

    The read asks for a twentieth of a CPU (`read_concurrency` tasks at once): reading is
    mostly waiting on storage, and half a CPU kept a second decode task from
    starting on 2 CPUs. The differing resources keep Ray Data from fusing it with
    the decode map that follows: fused, the decode map's `batch_size` (rows)
    bundled that many *read units* into one task, and batches arrived only at the
    end of the run. Unfused, each read unit is one decode task. (Both measured:
    docs/INGEST.md, "Measured facts behind the code".)
    """
    units = unit_rows(source, epochs=epochs, shuffle_seed=shuffle_seed, scope=scope)
    return units.map_batches(
        read_units,
        fn_kwargs={"source": source},
        batch_size=1,
        batch_format="numpy",
        num_cpus=0.05,
        # from_items: counted from metadata
        compute=ray.data.TaskPoolStrategy(size=min(read_concurrency(), units.count())),
    )


def read_raw(source: ImageSource) -> ray.data.Dataset:
    """Raw rows `bytes`, `key` (+ `label`) of every image of `source`, lazily read."""
    return read_raw_rows(source).drop_columns(["epoch"])
