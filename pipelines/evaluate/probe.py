"""``darkmatter eval``: how good is a pretrained backbone downstream?

Frozen features of a labeled train and test split (Ray Data batch inference, see
``pipelines.evaluate.inference``), then the standard probes of ``ssl_models.probes``:
weighted kNN (Wu et al. 2018: cosine, k=200, T=0.1), a linear probe trained to
convergence, and linear probes on 1% and 10% of the train labels. Results are
printed as a table, written as JSON (``--json``), logged to MLflow (in the
pretraining run when the checkpoint is a run id, else in a new run tagged with
the checkpoint), with optional PNG reports (``--reports DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from pipelines.cluster.placement import check_decode_placement
from pipelines.cluster.session import quiet_ray_data
from pipelines.config import ConfigError, DecodeOn, resolve_path
from pipelines.evaluate.inference import (
    Checkpoint,
    connect,
    embed_source,
    gather_features,
    resolve_checkpoint,
)
from pipelines.evaluate.reports import (
    mlflow_curve_records,
    nearest_neighbours,
    plot_curves,
    plot_projections,
    plot_retrieval_grid,
    plot_singular_values,
)
from pipelines.ingest.dataset import ingest_counts, resize_center_crop
from pipelines.ingest.decode import UndecodableImage, decode_pil
from pipelines.ingest.sources import ImageSource, check_paths_here, read_raw
from pipelines.tracking import (
    default_tracking_uri,
    get_or_create_experiment,
    quiet_mlflow,
    redact_uri,
)
from ssl_models.probes import knn_accuracy, linear_probe, low_label_probe

RESULT_KEYS = ("knn_top1", "linear_top1", "linear_1pct_top1", "linear_10pct_top1")
EVALUATED_TAG = "darkmatter.evaluated"


def labeled_source(path: str, label_column: str, image_column: str, fmt: str) -> ImageSource:
    paths = [resolve_path(p) for p in path.split(",")]
    return ImageSource(
        paths if len(paths) > 1 else paths[0],
        format=fmt,  # type: ignore[arg-type]
        image_column=image_column,
        label_column=label_column,
    )


def split_features(
    source: ImageSource,
    checkpoint: Checkpoint,
    split: str,
    *,
    batch_size: int = 256,
    concurrency: int | None = None,
    decode_on: DecodeOn = "any",
) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(features (N, D), labels (N,), keys, ingest counts) of one labeled split."""
    counter = f"eval/{split}/{time.time_ns()}"
    embedded = embed_source(
        source,
        checkpoint,
        counter,
        batch_size=batch_size,
        concurrency=concurrency,
        decode_on=decode_on,
    )
    features, labels, keys = gather_features(embedded, with_keys=True)
    return features, labels, keys or [], ingest_counts(counter)


def evaluate_features(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    k: int = 200,
    temperature: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """The four probes of the issue, fractions in [0, 1], keyed as ``RESULT_KEYS``."""
    (train_x, train_y), (test_x, test_y) = train, test
    return {
        "knn_top1": knn_accuracy(train_x, train_y, test_x, test_y, k, temperature),
        "linear_top1": linear_probe(train_x, train_y, test_x, test_y, seed=seed).top1,
        "linear_1pct_top1": low_label_probe(train_x, train_y, test_x, test_y, 0.01, seed=seed).top1,
        "linear_10pct_top1": low_label_probe(
            train_x, train_y, test_x, test_y, 0.10, seed=seed
        ).top1,
    }


def format_table(
    results: dict[str, float],
    description: str,
    extra: dict[str, str],
    k: int = 200,
    temperature: float = 0.1,
) -> str:
    names = {
        "knn_top1": f"kNN top-1 (k={k}, T={temperature:g})",
        "linear_top1": "linear probe top-1 (100% labels)",
        "linear_1pct_top1": "linear probe top-1 (1% labels)",
        "linear_10pct_top1": "linear probe top-1 (10% labels)",
    }
    width = max(len(v) for v in names.values())
    lines = [f"evaluation of {description}"]
    lines += [f"  {label:<{width}}  {value}" for label, value in extra.items()]
    lines.append("  " + "-" * (width + 10))
    lines += [f"  {names[key]:<{width}}  {100 * results[key]:6.2f}%" for key in RESULT_KEYS]
    return "\n".join(lines)


# --- reports ---------------------------------------------------------------------------------


def images_by_key(source: ImageSource, keys: list[str], size: int) -> dict[str, np.ndarray]:
    """uint8 (3, size, size) images of the rows named by ``keys`` (raw bytes filtered by key,
    only those decoded); undecodable ones are left out."""
    wanted = np.array(sorted(set(keys)), dtype=object)

    def named(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.isin(batch["key"], wanted)
        return {"bytes": batch["bytes"][keep], "key": batch["key"][keep]}

    rows = read_raw(source).map_batches(named, batch_format="numpy").take_all()
    images = {}
    for row in rows:
        try:
            images[row["key"]] = resize_center_crop(decode_pil(row["bytes"]), size)
        except UndecodableImage:
            continue
    return images


def write_reports(
    out_dir: Path,
    train: tuple[torch.Tensor, torch.Tensor, list[str], ImageSource],
    test: tuple[torch.Tensor, torch.Tensor, list[str], ImageSource],
    size: int,
    *,
    queries: int = 8,
    neighbours: int = 8,
    class_names: list[str] | None = None,
    curves: list[dict] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Retrieval grid (test queries, train neighbours), PCA + t-SNE of test embeddings,
    singular-value spectrum, and training curves when ``curves`` is given."""
    train_x, train_y, train_keys, train_source = train
    test_x, test_y, test_keys, test_source = test
    pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed))[:queries]
    found = nearest_neighbours(test_x[pick], train_x, neighbours)
    query_images = images_by_key(test_source, [test_keys[i] for i in pick], size)
    bank_images = images_by_key(train_source, [train_keys[j] for j in found.flatten()], size)
    blank = np.zeros((3, size, size), np.uint8)
    written = [
        plot_retrieval_grid(
            np.stack([query_images.get(test_keys[i], blank) for i in pick]),
            [int(test_y[i]) for i in pick],
            np.stack(
                [np.stack([bank_images.get(train_keys[j], blank) for j in row]) for row in found]
            ),
            [[int(train_y[j]) for j in row] for row in found],
            out_dir / "retrieval.png",
            class_names,
        ),
        plot_projections(
            test_x, test_y, out_dir / "projection.png", seed=seed, class_names=class_names
        ),
        plot_singular_values({"train": train_x, "test": test_x}, out_dir / "singular_values.png"),
    ]
    if curves:
        path = plot_curves(curves, out_dir / "training_curves.png")
        if path is not None:
            written.append(path)
    return written


# --- MLflow ----------------------------------------------------------------------------------


def log_results(
    tracking_uri: str,
    checkpoint: Checkpoint,
    results: dict[str, float],
    artifacts: list[Path],
    experiment: str = "darkmatter-eval",
) -> str:
    """Metrics ``eval/<key>`` and artifacts ``eval/*`` into the pretraining run when the
    checkpoint is one, else into a new run tagged ``darkmatter.evaluated``. Returns its id."""
    client = MlflowClient(tracking_uri)
    run_id = checkpoint.run_id
    if run_id is None:
        experiment_id = get_or_create_experiment(client, experiment, tracking_uri)
        run_id = client.create_run(
            experiment_id, run_name="eval", tags={EVALUATED_TAG: checkpoint.description}
        ).info.run_id
    else:
        client.set_tag(run_id, EVALUATED_TAG, checkpoint.description)
    timestamp = int(time.time() * 1000)
    for key, value in results.items():
        client.log_metric(run_id, f"eval/{key}", value, timestamp=timestamp)
    for path in artifacts:
        client.log_artifact(run_id, str(path), "eval")
    if checkpoint.run_id is None:
        client.set_terminated(run_id)
    return run_id


# --- the command -----------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    quiet_mlflow(args.verbose)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    started = time.perf_counter()
    try:
        checkpoint = resolve_checkpoint(
            args.checkpoint,
            tracking_uri,
            backbone=args.backbone,
            small_image_stem=args.small_image_stem,
            image_size=args.image_size,
            pool=args.pool,
            random_seed=args.seed,
        )
        sources = {
            split: labeled_source(path, args.label_column, args.image_column, args.format)
            for split, path in (("train", args.train), ("test", args.test))
        }
        for source in sources.values():
            check_paths_here(source, args.address)
    except (ValueError, FileNotFoundError) as error:
        print(f"darkmatter eval: {error}", file=sys.stderr)
        return 2
    connect(args.address, args.verbose)
    quiet_ray_data(progress_bars=True)  # the features' passes are eval's progress
    try:
        check_decode_placement(args.decode_on)
    except ConfigError as error:
        print(f"darkmatter eval: {error}", file=sys.stderr)
        return 2
    splits = {
        split: split_features(
            source,
            checkpoint,
            split,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            decode_on=args.decode_on,
        )
        for split, source in sources.items()
    }
    features_s = time.perf_counter() - started
    results = evaluate_features(
        splits["train"][:2],
        splits["test"][:2],
        k=args.k,
        temperature=args.temperature,
        seed=args.seed,
    )
    skipped = {split: counts["skipped"] for split, (*_, counts) in splits.items()}
    print(
        format_table(
            results,
            checkpoint.description,
            {
                "backbone": f"{checkpoint.spec.name} (small stem: {checkpoint.spec.small_image_stem}, "
                f"{checkpoint.spec.image_size}px)",
                "images (train / test)": f"{len(splits['train'][1])} / {len(splits['test'][1])}"
                + (
                    f"  (skipped {skipped['train']} / {skipped['test']})"
                    if any(skipped.values())
                    else ""
                ),
                "time (features / total)": f"{features_s:.0f} s / {time.perf_counter() - started:.0f} s",
            },
            args.k,
            args.temperature,
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    artifacts: list[Path] = []
    if args.reports:
        curves = (
            mlflow_curve_records(tracking_uri, checkpoint.run_id) if checkpoint.run_id else None
        )
        artifacts = write_reports(
            Path(args.reports),
            (*splits["train"][:3], sources["train"]),
            (*splits["test"][:3], sources["test"]),
            checkpoint.spec.image_size,
            class_names=args.class_names.split(",") if args.class_names else None,
            curves=curves,
            seed=args.seed,
        )
        print(f"[darkmatter] reports: {', '.join(str(p) for p in artifacts)}")
    if not args.no_mlflow:
        try:
            run_id = log_results(tracking_uri, checkpoint, results, artifacts)
            print(f"[darkmatter] logged to MLflow run {run_id} in {redact_uri(tracking_uri)}")
        except Exception as error:  # noqa: BLE001 - the results are printed and written already
            print(
                f"[darkmatter] WARNING: results not logged to MLflow at {redact_uri(tracking_uri)} "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]})",
                file=sys.stderr,
            )
    return 0
