"""The `darkmatter` command: parses the arguments, then imports the one module that runs
the command given. torch, Ray and MLflow load only there, so `darkmatter --help`,
`darkmatter pretrain --help` and a refused argument answer at once."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import get_args

from pipelines.ingest.formats import FORMATS, INDEX_FORMATS, MARKER, SHARD_ENTRIES, DecodeOn

# The Ray Jobs API (the dashboard) of `submit` and `jobs`, through a tunnel by default.
DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"
Handler = Callable[[argparse.Namespace], int]


def handler(target: str, explained_as: str | None = None) -> Handler:
    """``module:function``, imported when the command runs; ``explained_as``: wrapped in
    ``pipelines.cluster.jobs.explained`` (the Jobs API's failures as one line)."""

    def run(args: argparse.Namespace) -> int:
        module_name, function_name = target.split(":")
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
        if explained_as is not None:
            function = module.explained(function, explained_as)
        return function(args)

    run.target = target  # type: ignore[attr-defined]
    return run


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that runs on Ray: where, and how much of Ray to show."""
    parser.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own log lines (reports, worker start-up, Ray Data) too",
    )


def add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"{help_text} (repeatable)"
    )


def add_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="stream a corpus and report how many images decode, and why the others do not",
        description="Stream a corpus (folder, parquet, webdataset tar, path list; local or "
        "s3://) and report files, decoded, skipped by reason, formats and sizes.",
    )
    parser.add_argument("path", nargs="+", help="a folder, file(s), or s3:// URI(s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--show", type=int, default=10, metavar="N", help="bad files to list")
    parser.add_argument("--bad-list", metavar="FILE", help="write every bad key<TAB>reason")
    parser.add_argument("--image-column", default="image", help="parquet column of image bytes")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--s3-endpoint", default=None, help="e.g. http://127.0.0.1:9000")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_options(parser)
    parser.set_defaults(func=handler("pipelines.ingest.inspect:run_inspect"))


def add_index(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="list a corpus once, in Ray tasks, into a manifest that every command reads",
        description="List SOURCE (a folder tree, parquet files or webdataset tars; local or "
        "s3://) in Ray tasks, a directory at a time, and write the manifest directory MANIFEST: "
        "parquet shards (uri, bytes, rows, row_group, first_row, label) and "
        f"{MARKER}. Give MANIFEST wherever a source is accepted.",
    )
    parser.add_argument("source", nargs="+", help="a folder, file(s), or s3:// URI(s)")
    parser.add_argument("--out", required=True, metavar="MANIFEST", help="the manifest directory")
    parser.add_argument("--format", default="auto", choices=INDEX_FORMATS)
    parser.add_argument("--image-column", default="image", help="parquet column of image bytes")
    parser.add_argument(
        "--label-column",
        default=None,
        help="parquet column or webdataset extension of labels, checked and recorded "
        "(folder trees always get their folder labels)",
    )
    parser.add_argument(
        "--shard-rows",
        type=int,
        default=SHARD_ENTRIES,
        metavar="N",
        help=f"manifest rows per shard, about (default {SHARD_ENTRIES:,})",
    )
    parser.add_argument("--s3-endpoint", default=None, help="e.g. http://127.0.0.1:9000")
    add_ray_options(parser)
    parser.set_defaults(func=handler("pipelines.ingest.manifest:run_index"))


def add_pretrain(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pretrain a backbone with a self-supervised method"
    )
    parser.add_argument("--config", help="YAML run config (see configs/)")
    add_overrides(parser, "override a config field, e.g. --set train.batch_size=128")
    add_ray_options(parser)
    parser.add_argument(
        "--register-model",
        metavar="NAME",
        help="register the trained backbone in the MLflow model registry under NAME",
    )
    parser.set_defaults(func=pretrain)


def pretrain(args: argparse.Namespace) -> int:
    """Validate the config first (no Ray yet: a refused config answers at once), then train."""
    from pipelines.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"darkmatter pretrain: {error}", file=sys.stderr)
        return 2
    from pipelines.train.driver import run_command

    return run_command(args, config)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_JOBS_ADDRESS),
        help="Ray Jobs API (dashboard) address (default: RAY_API_SERVER_ADDRESS, else "
        f"{DEFAULT_JOBS_ADDRESS})",
    )
    parser.add_argument(
        "--allow-plain-http",
        action="store_true",
        help="allow http:// to a non-loopback address (the token travels unencrypted)",
    )


def add_jobs(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser(
        "submit",
        help="run a darkmatter command on a Ray cluster as a Ray job",
        description="e.g. darkmatter submit --follow -- pretrain --config configs/demo.yaml",
    )
    add_connection_options(submit)
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument(
        "--working-dir",
        default=".",
        help="directory uploaded as the job's working_dir (default: the current directory, "
        "normally the repository root); relative paths in the config resolve inside it",
    )
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable to the job (repeatable; MLFLOW_TRACKING_URI always is)",
    )
    submit.add_argument("job_command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    submit.set_defaults(func=handler("pipelines.cluster.jobs:submit_command", "submit"))

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow and stop Ray jobs")
    actions = jobs.add_subparsers(dest="action", required=True)
    for name, help_text in (
        ("list", "list the cluster's jobs"),
        ("status", "a job's status"),
        ("logs", "a job's logs"),
        ("stop", "stop a job"),
    ):
        action = actions.add_parser(name, help=help_text)
        add_connection_options(action)
        if name != "list":
            action.add_argument("job_id")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until the job ends")
        action.set_defaults(func=handler(f"pipelines.cluster.jobs:{name}_command", f"jobs {name}"))


def add_tune(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="sweep hyperparameters with Ray Tune")
    parser.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    parser.add_argument("--trials", type=int, default=8, help="number of trials (default 8)")
    parser.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    parser.add_argument("--search", choices=["random", "optuna"], default="random")
    add_overrides(parser, "override a field of the base config")
    parser.add_argument("--name", help="sweep name (default: <space>-sweep); re-use it to resume")
    parser.add_argument(
        "--storage-path", default="runs/sweeps", help="where trials and checkpoints go"
    )
    add_ray_options(parser)
    parser.set_defaults(func=handler("pipelines.tune.sweep:run_command"))


def add_backbone_options(parser: argparse.ArgumentParser) -> None:
    """Checkpoint and backbone options shared by ``eval`` and ``embed``."""
    parser.add_argument(
        "checkpoint",
        help="backbone.pt path, MLflow run id (or runs:/<id>), an MLflow model URI "
        "(models:/<name>/<version>, models:/<model id>), or 'random' (random init)",
    )
    parser.add_argument(
        "--backbone", help="backbone name (default: from the run's config.yaml beside the weights)"
    )
    parser.add_argument(
        "--small-image-stem",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the backbone's small-image stem (default: from config.yaml)",
    )
    parser.add_argument(
        "--image-size", type=int, help="input side in pixels (default: from config.yaml)"
    )
    parser.add_argument(
        "--pool",
        choices=("cls", "mean"),
        help="a ViT's feature: class token or mean patch token (default: from config.yaml)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    add_ray_options(parser)
    parser.add_argument("--batch-size", type=int, default=256, help="images per inference batch")
    parser.add_argument(
        "--concurrency", type=int, help="inference actors (default: one per GPU, else CPUs - 1)"
    )
    parser.add_argument("--format", default="auto", choices=FORMATS, help="source format")
    parser.add_argument(
        "--decode-on",
        default="any",
        choices=get_args(DecodeOn),
        help="where images are read and decoded: any node, or only the CPU data nodes "
        "(labelled darkmatter/role=data; docs/CLUSTER.md)",
    )
    parser.add_argument(
        "--image-column", default="image", help="parquet column / webdataset member of the images"
    )


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="kNN and linear probes of a pretrained backbone on a labeled dataset"
    )
    add_backbone_options(parser)
    parser.add_argument(
        "--train", required=True, help="labeled train split (path, or comma-separated paths)"
    )
    parser.add_argument(
        "--test", required=True, help="labeled test split (path, or comma-separated paths)"
    )
    parser.add_argument(
        "--label-column", default="label", help="label column (or 'folder' for class folders)"
    )
    parser.add_argument("--k", type=int, default=200, help="kNN neighbours (Wu et al. 2018: 200)")
    parser.add_argument("--temperature", type=float, default=0.1, help="kNN temperature (0.1)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the low-label subsets and held-out split"
    )
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--reports", metavar="DIR", help="write PNG reports here (and log them)")
    parser.add_argument("--class-names", help="comma-separated class names for the reports")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.set_defaults(func=handler("pipelines.evaluate.probe:run_eval"))


def add_embed(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed", help="stream a corpus through a backbone and write embeddings as parquet"
    )
    add_backbone_options(parser)
    parser.add_argument(
        "--data", required=True, help="the corpus (path, comma-separated paths, s3://)"
    )
    parser.add_argument(
        "--out", required=True, help="output folder for the parquet files (new or empty)"
    )
    parser.add_argument("--label-column", help="carry this label column into the output")
    parser.add_argument("--s3-endpoint", help="S3 endpoint override (http(s)://host:port)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=handler("pipelines.evaluate.embed:run_embed"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkmatter",
        description="Self-supervised pretraining of vision models on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (add_inspect, add_index, add_pretrain, add_jobs, add_tune, add_eval, add_embed):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ConnectionError) as error:
        # A path or an address the user gave (the handlers check them before Ray starts):
        # one line naming it, not a traceback.
        print(f"darkmatter {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
