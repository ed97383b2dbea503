"""Source + recipe -> a Ray Dataset of uint8 views, ready for `TorchTrainer(datasets=...)`.

Rows are decoded one by one inside `map_batches`: a row that fails is dropped and
counted by reason in a named `IngestCounter` actor (read with `ingest_counts`),
never the whole block.

Epochs. `TorchTrainer` hands each worker one `streaming_split(n, equal=True)` shard
of the dataset. Ray 2.60's `Dataset.union` runs all its inputs at once and
interleaves their blocks (`UnionOperator`, even with `preserve_order`: round robin),
so a union of per-epoch datasets would mix epochs. Instead the read plan itself
holds `epochs` copies of the read units, epoch-major, each row carrying its
`epoch`: one pass over a shard is the whole run, in epoch order up to the blocks
in flight, and the `epoch` column tells the loop where it is. Views are drawn
from `np.random.default_rng([seed, epoch, crc32(key)])`: the same (seed, epoch,
row) gives the same views on any worker and any run, and each epoch new ones.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from typing import Any

import numpy as np
import ray
from PIL import Image
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.cluster.placement import data_label_selector
from pipelines.config import DecodeOn
from pipelines.ingest.crops import MaskGenerator, crop_batch
from pipelines.ingest.decode import DEFAULT_MAX_PIXELS, UndecodableImage, decode_pil
from pipelines.ingest.position import POSITION_COLUMNS, DataPosition
from pipelines.ingest.recipes import ViewRecipe
from pipelines.ingest.sources import ImageSource, ShuffleScope, read_raw_rows

COUNTER_NAMESPACE = "darkmatter-ingest"

# --- counting -------------------------------------------------------------------


@ray.remote(num_cpus=0)
class IngestCounter:
    """Sums the decoded / skipped-by-reason counts that the map tasks report."""

    def __init__(self) -> None:
        self._decoded = 0
        self._skipped: Counter[str] = Counter()

    def add(self, decoded: int, skipped_by_reason: dict[str, int]) -> None:
        self._decoded += decoded
        self._skipped.update(skipped_by_reason)

    def counts(self) -> dict[str, Any]:
        return {
            "decoded": self._decoded,
            "skipped": sum(self._skipped.values()),
            "skipped_by_reason": dict(sorted(self._skipped.items())),
        }

    def reset(self) -> None:
        self._decoded = 0
        self._skipped.clear()


# Handles held by the driver: a named actor lives while its owner holds a handle.
_DRIVER_COUNTERS: dict[str, Any] = {}
# Handles looked up inside map tasks, cached per worker process, and each process's
# reports not yet known to have arrived (kept so that they are not dropped; see `_report`).
_TASK_COUNTERS: dict[str, Any] = {}
_IN_FLIGHT: list[Any] = []


def _actor_name(counter: str) -> str:
    return f"IngestCounter:{counter}"


def ingest_counter(counter: str, *, reset: bool = False):
    """Get or create the named `IngestCounter` actor; `reset` zeroes it.

    It runs on the driver's node (on a cluster, the head node, where the job's driver
    runs): a lost worker node never takes the counts with it, and the driver's own
    node going takes the run anyway. It restarts (from zero) if its process dies.
    """
    handle = _DRIVER_COUNTERS.get(counter)
    if handle is None:
        # Keep the first (owning) handle: the actor dies when its owner's handles go.
        here = ray.get_runtime_context().get_node_id()
        handle = IngestCounter.options(
            name=_actor_name(counter),
            namespace=COUNTER_NAMESPACE,
            get_if_exists=True,
            max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        ).remote()
        _DRIVER_COUNTERS[counter] = handle
    if reset:
        ray.get(handle.reset.remote())
    return handle


def ingest_counts(counter: str = "train", *, settle_s: float = 0.5) -> dict[str, Any]:
    """{decoded, skipped, skipped_by_reason} summed over what the decode tasks have reported.

    Reports travel without blocking decode, so one can trail its rows by moments: with
    `settle_s` (for a final count, once the data has been consumed) the counts are read
    until they hold still for that long (at most 20 times); 0 reads once (progress lines).
    """
    handle = _DRIVER_COUNTERS.get(counter) or ray.get_actor(
        _actor_name(counter), namespace=COUNTER_NAMESPACE
    )
    counts = ray.get(handle.counts.remote())
    for _ in range(20 if settle_s > 0 else 0):
        time.sleep(settle_s)
        latest = ray.get(handle.counts.remote())
        if latest == counts:
            break
        counts = latest
    return counts


def _report(counter: str, decoded: int, skipped: Counter[str]) -> None:
    """Send one decode call's counts to the counter without waiting for it.

    Decode never blocks on the counter (it used to wait for every report). The refs of
    reports not yet known to have arrived are kept, so the process keeps owning them
    until they land; those that have are dropped without waiting.
    """
    handle = _TASK_COUNTERS.get(counter)
    if handle is None:
        handle = ray.get_actor(_actor_name(counter), namespace=COUNTER_NAMESPACE)
        _TASK_COUNTERS[counter] = handle
    _IN_FLIGHT.append(handle.add.remote(decoded, dict(skipped)))
    if len(_IN_FLIGHT) > 16:
        _, pending = ray.wait(_IN_FLIGHT, num_returns=len(_IN_FLIGHT), timeout=0)
        _IN_FLIGHT[:] = pending


# --- views ----------------------------------------------------------------------


def row_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one row's views: (seed, epoch, crc32 of the key)."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def _stack(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, *shape), np.uint8)


def _views_batch(
    batch: dict[str, np.ndarray],
    *,
    recipe: ViewRecipe,
    seed: int,
    counter: str,
    max_pixels: int,
    keep_key: bool,
    mask_generator: MaskGenerator | None,
) -> dict[str, np.ndarray]:
    rngs = (
        row_rng(seed, int(epoch), str(key))
        for key, epoch in zip(batch["key"], batch["epoch"], strict=True)
    )
    cropped = crop_batch(
        batch["bytes"],
        rngs,
        recipe,
        rows=len(batch["bytes"]),
        max_pixels=max_pixels,
        mask_generator=mask_generator,
    )
    _report(counter, len(cropped.kept), cropped.skipped)
    out = {column: view for column, view in zip(recipe.columns, cropped.views, strict=True)}
    out.update(cropped.masks)
    for column in ("label", *POSITION_COLUMNS) + (("key",) if keep_key else ()):
        if column in batch:
            out[column] = batch[column][cropped.kept]
    return out


def decode_batch_rows(recipe: ViewRecipe, target_bytes: int = 64 * 1024 * 1024) -> int:
    """Rows per decode call: output blocks of about `target_bytes` of views, 16 to 512 rows.

    Each call is one counter report and one output batch: 512 rows at 32 px (3 MiB),
    ~220 at 224 px (two views, 64 MiB), fewer for bigger multi-crop recipes. Ray Data
    joins a task's outputs into blocks of up to its 128 MiB target block size.
    """
    row_bytes = sum(3 * spec.size * spec.size for spec in recipe.views)
    return max(16, min(512, target_bytes // row_bytes))


def view_dataset(
    source: ImageSource,
    recipe: ViewRecipe,
    *,
    seed: int,
    epochs: int = 1,
    counter: str = "train",
    batch_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shuffle: ShuffleScope | None = "corpus",
    keep_key: bool = False,
    mask_generator: MaskGenerator | None = None,
    max_tasks: int | None = None,
    position: DataPosition | None = None,
    reset_counter: bool = True,
    decode_on: DecodeOn = "any",
) -> ray.data.Dataset:
    """The CPU half of `recipe` over `source`, for `epochs` epochs (see module doc).

    Columns: `view_i` uint8 (S_i, S_i, 3) for each view of the recipe (channels
    last; `photometric.channels_first` makes a batch of them (N, 3, S, S)), the int64
    data position `epoch`, `task`, `pos`, `task_rows` (`position.py`; a restored run
    passes its `position` and reads only what it has not consumed), `label` int64 when `source.label_column` is set (and `key` with
    `keep_key`, for debugging: strings do not batch into tensors). Each epoch reads
    the corpus in a new order drawn from (seed, epoch), each read task taking images
    from across the corpus (`shuffle="units"`: whole read units in a new order;
    None: file order; see `sources.epoch_tasks`).
    Decode failures are counted in the `IngestCounter` named `counter` (reset here unless
    not `reset_counter`, as a restarted run continues counting; use one name per
    concurrent run). `mask_generator` (`pipelines.ingest.masks`)
    adds its columns (e.g. `mask` bool (T,)), drawn from each row's generator after
    its views. `max_tasks` caps the decode tasks running at
    once (default: as many as Ray Data's CPU budget allows, which grows with the cluster).
    `decode_on="cpu_nodes"`: reads and decodes run only on the nodes labelled as data nodes
    (`pipelines.cluster.placement`; refused when none can come). `batch_size`: rows per
    decode call, and so per output block (default `decode_batch_rows(recipe)`). The
    photometric half
    runs on the batch:
    `photometric(channels_first(batch[f"view_{i}"]), recipe.views[i], generator)`.
    """
    if seed < 0:
        raise ValueError(f"view_dataset: seed={seed!r} must be >= 0")
    if epochs < 1:
        raise ValueError(f"view_dataset: epochs={epochs!r} must be >= 1")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"view_dataset: batch_size={batch_size!r} must be >= 1")
    ingest_counter(counter, reset=reset_counter)
    raw = read_raw_rows(
        source,
        epochs=epochs,
        shuffle_seed=None if shuffle is None else seed,
        scope=shuffle or "corpus",
        position=position,
        decode_on=decode_on,
    )
    return raw.map_batches(
        _views_batch,
        fn_kwargs=dict(
            recipe=recipe,
            seed=seed,
            counter=counter,
            max_pixels=max_pixels,
            keep_key=keep_key,
            mask_generator=mask_generator,
        ),
        batch_size=batch_size or decode_batch_rows(recipe),
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=max_tasks),
        label_selector=data_label_selector(decode_on),
    )


# --- evaluation -----------------------------------------------------------------


def resize_center_crop(image: Image.Image, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """Shorter side to round(size / crop_fraction), central size x size: (3, S, S) uint8.

    torchvision's evaluation transform (Resize + CenterCrop; ImageNet uses 0.875).
    """
    short = round(size / crop_fraction)
    width, height = image.size
    scale = short / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    # One resample: the crop box expressed in source pixels.
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized).transpose(2, 0, 1)


def _eval_batch(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    crop_fraction: float,
    counter: str,
    max_pixels: int,
    keep_key: bool,
) -> dict[str, np.ndarray]:
    images, kept = [], []
    skipped: Counter[str] = Counter()
    target = round(size / crop_fraction)
    for i, data in enumerate(batch["bytes"]):
        try:
            image = decode_pil(data, max_pixels=max_pixels, target_min_side=target)
        except UndecodableImage as err:
            skipped[err.reason] += 1
            continue
        images.append(resize_center_crop(image, size, crop_fraction))
        kept.append(i)
    _report(counter, len(kept), skipped)
    out = {"image": _stack(images, (3, size, size))}
    if "label" in batch:
        out["label"] = batch["label"][kept]
    if keep_key:
        out["key"] = batch["key"][kept]
    return out


def eval_image_dataset(
    source: ImageSource,
    size: int,
    *,
    crop_fraction: float = 1.0,
    counter: str = "eval",
    batch_size: int = 128,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_key: bool = False,
    decode_on: DecodeOn = "any",
    max_rows: int | None = None,
    decode_cpus: float = 1.0,
) -> ray.data.Dataset:
    """`image` uint8 (3, size, size) resized + center-cropped, no augmentation, and `label`
    when `source.label_column` is set (`key` with `keep_key`).

    For feature extraction (evaluation, embedding a corpus); undecodable rows are
    skipped and counted in the `IngestCounter` named `counter` (reset here).
    `decode_on`: as `view_dataset`'s. `max_rows`: at most this many images, read in the
    corpus-shuffled order (each read task a sample from across the corpus, so a class-sorted
    tree still gives every class) and cut before decoding; which rows make the cut depends
    on the order blocks arrive in. `decode_cpus`: the CPUs each decode task asks for (a
    pipeline whose inference actors hold most CPUs gives its decode a fraction, or it waits).
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"eval_image_dataset: crop_fraction={crop_fraction!r} not in (0, 1]")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"eval_image_dataset: max_rows={max_rows!r} must be >= 1")
    ingest_counter(counter, reset=True)
    if max_rows is None:
        raw = read_raw_rows(source, decode_on=decode_on)
    else:
        raw = read_raw_rows(source, shuffle_seed=0, decode_on=decode_on).limit(max_rows)
    return raw.map_batches(
        _eval_batch,
        fn_kwargs=dict(
            size=size,
            crop_fraction=crop_fraction,
            counter=counter,
            max_pixels=max_pixels,
            keep_key=keep_key,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=decode_cpus,
        label_selector=data_label_selector(decode_on),
    )


def labeled_eval_dataset(
    source: ImageSource,
    size: int,
    *,
    crop_fraction: float = 1.0,
    counter: str = "eval",
    batch_size: int = 128,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_key: bool = False,
    decode_on: DecodeOn = "any",
    max_rows: int | None = None,
) -> ray.data.Dataset:
    """`eval_image_dataset` for a source with labels: `image` and `label` (and `key`).

    For kNN monitors and linear evaluation.
    """
    if source.label_column is None:
        raise ValueError("labeled_eval_dataset: ImageSource.label_column is required")
    return eval_image_dataset(
        source,
        size,
        crop_fraction=crop_fraction,
        counter=counter,
        batch_size=batch_size,
        max_pixels=max_pixels,
        keep_key=keep_key,
        decode_on=decode_on,
        max_rows=max_rows,
    )
