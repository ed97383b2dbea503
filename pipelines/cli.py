"""The `darkmatter` command: parses arguments and hands each subcommand to its module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, which adds its subparser and sets
# `func(args) -> int` as the handler.
COMMAND_MODULES: tuple[str, ...] = (
    "pipelines.ingest.inspect",
    "pipelines.ingest.manifest",
    "pipelines.train.driver",
    "pipelines.cluster.jobs",
    "pipelines.tune.sweep",
    "pipelines.evaluate.probe",
    "pipelines.evaluate.embed",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkmatter",
        description="Self-supervised pretraining of vision models on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
