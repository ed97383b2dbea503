"""Where images come from: a typed `ImageSource` and `read_raw`, its bytes as a Ray Dataset.

The driver only *plans*: it lists files (and parquet footers) and cuts the corpus
into small read units (a chunk of files, one parquet row group, one tar shard).
Ray tasks read the units and emit rows `bytes` (binary; null when the file could
not be read), `key` (str: the path, `path#row` for parquet, `tar#sample` for
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
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

Format = Literal["auto", "folder", "parquet", "webdataset", "paths"]
FORMATS: tuple[str, ...] = ("auto", "folder", "parquet", "webdataset", "paths")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
# `label_column` value for folder trees and path lists: the parent directory names,
# sorted, give the class indices (torchvision ImageFolder's convention).
FOLDER_LABEL = "folder"
_WEBDATASET_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# A read unit closes at this many (uncompressed parquet, or file) bytes below rows_per_unit.
_UNIT_BYTES = 256 * 1024 * 1024
_READ_THREADS = 16  # files of a folder unit read at once


@dataclass(frozen=True)
class ImageSource:
    """A corpus of images: a folder tree, parquet files, webdataset tars or a path list.

    `path`: a folder, a file, a list of files, or `s3://` URIs (no globs).
    `image_column`: the parquet column holding image bytes; for webdataset, the
    member extension (the default "image" means the first of jpg/jpeg/png/webp).
    `label_column`: a parquet column, a webdataset member extension (an integer in
    text, e.g. "cls"), or "folder" for folder trees / path lists (class index of
    the parent directory name, sorted).
    `rows_per_unit`: images per read unit, and so per decode task downstream
    (files of a folder tree or path list; consecutive whole parquet row groups,
    added until a unit holds this many rows; either closes early at 256 MiB; a
    webdataset tar is one unit). Ray pays a fixed gap per task: on 2 CPUs,
    1,000-image units ran one decode task at a time, 8,192-image ones kept both
    busy (docs/INGEST.md). Lower it when a small corpus gives fewer units than
    there are decode CPUs.
    """

    path: str | list[str]
    format: Format = "auto"
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
            unit: dict[str, Any] = {"kind": "files", "files": files[start:end], "rows": end - start}
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
        offset, groups, rows, size = 0, [], 0, 0
        for group in range(meta.num_row_groups):
            groups.append(group)
            rows += meta.row_group(group).num_rows
            size += meta.row_group(group).total_byte_size
            last = group == meta.num_row_groups - 1
            if rows >= source.rows_per_unit or size >= _UNIT_BYTES or last:
                units.append(
                    {
                        "kind": "parquet",
                        "file": path,
                        "row_groups": groups,
                        "offset": offset,
                        "rows": rows,
                    }
                )
                offset, groups, rows, size = offset + rows, [], 0, 0
    return units


def plan_units(source: ImageSource) -> tuple[str, list[dict[str, Any]]]:
    """Resolve the format and cut the corpus into read units (runs on the driver)."""
    fmt, files, sizes = _expand(source)
    if fmt in ("folder", "paths"):
        return fmt, _folder_units(source, files, sizes)
    if fmt == "parquet":
        return fmt, _parquet_units(source, files)
    return fmt, [{"kind": "tar", "file": f, "rows": None} for f in files]


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


def _read_parquet(source: ImageSource, unit: dict[str, Any]) -> Iterator[pa.Table]:
    fs = filesystem(source)
    columns = [source.image_column] + ([source.label_column] if source.label_column else [])
    with fs.open_input_file(unit["file"]) as handle:
        table = pq.ParquetFile(handle).read_row_groups(unit["row_groups"], columns=columns)
    key = _key(unit["file"], source)
    keys = [f"{key}#{unit['offset'] + i}" for i in range(table.num_rows)]
    labels = table.column(source.label_column).to_pylist() if source.label_column else None
    yield _table(table.column(source.image_column).to_pylist(), keys, labels)


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


_READERS = {"files": _read_files, "parquet": _read_parquet, "tar": _read_tar}


def read_units(batch: dict[str, Any], source: ImageSource) -> Iterator[pa.Table]:
    """map_batches UDF: each input row is a JSON read unit (plus `epoch`) -> raw rows.

    A unit with a `row_order_seed` (set by `unit_rows` when shuffling) yields its rows
    in an order drawn from that seed: with thousands of images per unit, a fixed order
    would give every epoch the same batches (the same negatives). A tar unit is
    shuffled within each table it streams (256 rows).
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
    source: ImageSource, *, epochs: int = 1, shuffle_seed: int | None = None
) -> ray.data.Dataset:
    """The read plan as a dataset: `epochs` copies of the units, epoch-major.

    With `shuffle_seed`, each epoch visits the units in its own order, drawn from
    (shuffle_seed, epoch), and each unit's rows in an order drawn from (shuffle_seed,
    epoch, unit); rows keep their keys, so views stay reproducible.
    """
    _, units = plan_units(source)
    items = []
    for epoch in range(epochs):
        order = list(range(len(units)))
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}:{epoch}").shuffle(order)
        for i in order:
            unit = units[i]
            if shuffle_seed is not None:  # rows within the unit too, new every epoch
                unit = {**unit, "row_order_seed": [shuffle_seed, epoch, i]}
            items.append({"unit": json.dumps(unit), "epoch": epoch})
    return ray.data.from_items(items, override_num_blocks=min(len(items), 1024))


def read_concurrency() -> int:
    """Read tasks at once: 2, or one per 4 CPUs of the cluster when that is more (a unit is
    thousands of images; a cluster's decode tasks need several units in flight)."""
    cpus = int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
    return max(2, cpus // 4)


def read_raw_rows(
    source: ImageSource, *, epochs: int = 1, shuffle_seed: int | None = None
) -> ray.data.Dataset:
    """`read_raw` plus an int64 `epoch` column, the corpus repeated `epochs` times.

    The read asks for a twentieth of a CPU (`read_concurrency` tasks at once): reading is
    mostly waiting on storage, and half a CPU kept a second decode task from
    starting on 2 CPUs (measured: ~8,000 vs ~7,300 img/s, docs/INGEST.md). The
    differing resources keep Ray Data from fusing it with the decode map that
    follows: fused, the decode map's `batch_size` (rows) bundled that many *read
    units* into one task (measured: every batch of a 10,000-image run arrived at
    the end). Unfused, each read unit is one decode task.
    """
    units = unit_rows(source, epochs=epochs, shuffle_seed=shuffle_seed)
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
