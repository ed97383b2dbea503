"""Everything that touches Ray: ingest, training, evaluation, sweeps, tracking, the CLI."""
