"""Streaming ingest, in the order data flows: sources -> decode -> recipes, crops (CPU) ->
dataset (Ray Data) -> photometric (on the training device). See docs/INGEST.md."""
