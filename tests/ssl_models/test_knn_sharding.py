"""The kNN monitor split across workers gives the single-process answer.

`merge_neighbours` of the per-shard neighbour lists equals the whole bank's lists, and
`sharded_knn_accuracy` on 3 gloo processes, each holding a shard of the bank and of the
queries (uneven, one shard of the bank empty), equals `knn_accuracy` on everything.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_models.distributed import sharded_knn_accuracy
from ssl_models.probes import (
    knn_accuracy,
    knn_neighbours,
    knn_vote,
    merge_neighbours,
    weighted_knn_predict,
)
from tests.cluster_facts import free_port

CLASSES, DIM, K, T = 7, 16, 20, 0.1


def clustered(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features around one random centre per class (kNN is right often, not always)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return centres[labels] + 1.5 * torch.randn(n, DIM, generator=generator), labels


BANK = clustered(300, seed=1)
QUERIES = clustered(101, seed=2)
# Uneven shards, one of them empty (a rank can hold no row of a small bank).
BANK_ROWS = [(0, 170), (170, 170), (170, 300)]
QUERY_ROWS = [(0, 40), (40, 41), (41, 101)]


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_merged_shard_neighbours_are_the_whole_banks(shards):
    bank_x, bank_y = BANK
    whole = knn_neighbours(bank_x, bank_y, QUERIES[0], K)
    parts = [
        knn_neighbours(x, y, QUERIES[0], K)
        for x, y in zip(bank_x.chunk(shards), bank_y.chunk(shards), strict=True)
    ]
    merged = merge_neighbours(parts, K)
    torch.testing.assert_close(merged[0], whole[0])
    assert torch.equal(merged[1], whole[1])
    predicted = knn_vote(*merged, CLASSES, T)
    assert torch.equal(predicted, weighted_knn_predict(bank_x, bank_y, QUERIES[0], CLASSES, K, T))


def test_padding_with_minus_infinity_changes_no_vote():
    """A shard smaller than k pads its list with -inf: never chosen ahead of a neighbour, and
    weighing 0 when the whole bank is smaller than k."""
    bank_x, bank_y = BANK[0][:12], BANK[1][:12]
    queries = QUERIES[0]
    parts = []
    for x, y in zip(bank_x.chunk(3), bank_y.chunk(3), strict=True):
        similarity, label = knn_neighbours(x, y, queries, K)  # 4 columns each
        pad = K - similarity.shape[1]
        parts.append(
            (
                torch.cat([similarity, torch.full((len(queries), pad), float("-inf"))], 1),
                torch.cat([label, torch.zeros(len(queries), pad, dtype=torch.int64)], 1),
            )
        )
    predicted = knn_vote(*merge_neighbours(parts, K), CLASSES, T)
    assert torch.equal(predicted, weighted_knn_predict(bank_x, bank_y, queries, CLASSES, K, T))


def test_one_process_is_knn_accuracy_without_collectives():
    assert not dist.is_initialized()
    expected = knn_accuracy(*BANK, *QUERIES, K, T)
    assert sharded_knn_accuracy(*BANK, *QUERIES, K, T) == expected
    empty = torch.zeros(0, DIM), torch.zeros(0, dtype=torch.int64)
    assert sharded_knn_accuracy(*empty, *QUERIES, K, T) != sharded_knn_accuracy(
        *empty, *QUERIES, K, T
    )  # NaN


def worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=len(BANK_ROWS))
    try:
        (b0, b1), (q0, q1) = BANK_ROWS[rank], QUERY_ROWS[rank]
        accuracy = sharded_knn_accuracy(
            BANK[0][b0:b1], BANK[1][b0:b1], QUERIES[0][q0:q1], QUERIES[1][q0:q1], K, T
        )
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(accuracy, f)
    finally:
        dist.destroy_process_group()


def test_sharded_accuracy_on_three_processes_equals_the_unsharded(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=len(BANK_ROWS), join=True)
    values = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(len(BANK_ROWS))]
    expected = knn_accuracy(*BANK, *QUERIES, K, T)
    assert 0.2 < expected < 1.0  # neither trivial nor chance: a real comparison
    # knn_accuracy averages in float32, the sharded sum in float64: one query is 1/101.
    assert values == [pytest.approx(expected, abs=1e-6)] * len(BANK_ROWS)
    assert len(set(values)) == 1  # every rank the same value
