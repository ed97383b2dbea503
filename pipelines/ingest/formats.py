"""The names every layer shares (the CLI, the config, ingest): source formats, where decoding
runs, the manifest's marker and shard size. Plain data, importing nothing heavy, so that
``darkmatter --help`` can list them without loading torch or Ray."""

from __future__ import annotations

from typing import Literal, get_args

# The source formats `pipelines.ingest.sources.ImageSource` reads; "manifest": a
# `darkmatter index` output.
SourceFormat = Literal["auto", "folder", "parquet", "webdataset", "paths", "manifest"]
FORMATS: tuple[str, ...] = get_args(SourceFormat)
# The formats `darkmatter index` lists into a manifest.
INDEX_FORMATS: tuple[str, ...] = ("auto", "folder", "parquet", "webdataset")
# Where the read and decode tasks run (`data.decode_on`): anywhere, or only on the nodes
# labelled as CPU data nodes (`pipelines.cluster.placement.DATA_NODE_LABEL`).
DecodeOn = Literal["any", "cpu_nodes"]
# The file that makes a directory a darkmatter manifest, and its rows per shard (about).
MARKER = "_darkmatter_manifest.json"
SHARD_ENTRIES = 100_000
