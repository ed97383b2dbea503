"""Cross-worker gathering: 2 gloo processes reproduce the single-process loss and gradient.

Each rank holds half of a fixed batch of embeddings and computes the method's loss with
``gather=True``. Every rank then sees the loss of the global batch; in backward,
``torch.distributed.nn``'s all-gather sums the (identical) gradients of all ranks, so a
rank's embedding gradient is world_size times the single-process one, and DDP's average
over ranks brings it back to exactly the single-process gradient.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_models import functional as F_ssl
from ssl_models.backbones import Backbone
from ssl_models.distributed import gather_no_grad, gather_with_grad, is_distributed, rank
from ssl_models.methods import Method, ViewEncoding, build_method
from tests.cluster_facts import free_port

WORLD = 2
N_PER_RANK = 6
DIM = 5
GATHERED = ["simclr", "barlow_twins", "vicreg"]


def fixed_batch() -> dict[str, torch.Tensor]:
    """The global batch every process rebuilds identically (float64 for tight comparisons)."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * N_PER_RANK
    z1 = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return {
        "z1": z1,
        "z2": z1 + 0.5 * torch.randn(n, DIM, generator=g, dtype=torch.float64),
        "q": torch.randn(n, DIM, generator=g, dtype=torch.float64),
        "k": torch.randn(n, DIM, generator=g, dtype=torch.float64),
    }


def method(name: str, **options) -> Method:
    # Only pair_loss is exercised: the backbone and heads never see the embeddings.
    heads = {"proj_hidden_dim": 4, "proj_dim": 4}
    if name == "mocov3":
        heads["pred_hidden_dim"] = 4
    return build_method(name, Backbone("identity", nn.Identity(), DIM), **heads, **options)


def pair_loss_and_grads(
    name: str, rows: slice, gather: bool = True
) -> tuple[float, torch.Tensor, torch.Tensor]:
    batch = fixed_batch()
    z1 = batch["z1"][rows].clone().requires_grad_(True)
    z2 = batch["z2"][rows].clone().requires_grad_(True)
    loss = method(name, gather=gather).pair_loss(ViewEncoding(z1), ViewEncoding(z2))
    loss.backward()
    return loss.item(), z1.grad, z2.grad


def mocov3_loss_and_grads(rows: slice) -> tuple[float, torch.Tensor, torch.Tensor]:
    batch = fixed_batch()
    q1 = batch["q"][rows].clone().requires_grad_(True)
    q2 = batch["k"][rows].flip(1).clone().requires_grad_(True)
    k1, k2 = batch["k"][rows], batch["q"][rows].flip(1)
    a = ViewEncoding(q1, prediction=q1, target=k1)
    b = ViewEncoding(q2, prediction=q2, target=k2)
    loss = method("mocov3", gather=True).pair_loss(a, b)
    loss.backward()
    return loss.item(), q1.grad, q2.grad


def worker(rank_: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_, world_size=WORLD
    )
    try:
        rows = slice(rank_ * N_PER_RANK, (rank_ + 1) * N_PER_RANK)
        results = {name: pair_loss_and_grads(name, rows) for name in GATHERED}
        results["simclr_local"] = pair_loss_and_grads("simclr", rows, gather=False)
        results["mocov3"] = mocov3_loss_and_grads(rows)
        # The functional route a training loop may take, without a method object.
        z1 = fixed_batch()["z1"][rows].clone().requires_grad_(True)
        z2 = fixed_batch()["z2"][rows]
        loss = F_ssl.vicreg(gather_with_grad(z1), gather_with_grad(z2))
        loss.backward()
        results["functional_vicreg"] = (loss.item(), z1.grad, None)
        results["gathered_keys"] = gather_no_grad(fixed_batch()["k"][rows])
        results["rank"] = rank()
        results["is_distributed"] = is_distributed()
        torch.save(results, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def rows_of(r: int) -> slice:
    return slice(r * N_PER_RANK, (r + 1) * N_PER_RANK)


def test_ranks_know_where_they_are(ranks):
    assert [result["rank"] for result in ranks] == [0, 1]
    assert all(result["is_distributed"] for result in ranks)
    for result in ranks:  # keys gathered in rank order
        torch.testing.assert_close(result["gathered_keys"], fixed_batch()["k"])


@pytest.mark.parametrize("name", GATHERED)
def test_gathered_loss_equals_single_process_loss(ranks, name):
    single_loss, _, _ = pair_loss_and_grads(name, slice(None))
    for result in ranks:
        assert result[name][0] == pytest.approx(single_loss, rel=1e-10)


@pytest.mark.parametrize("name", GATHERED)
def test_gathered_gradient_after_ddp_average_equals_single_process_gradient(ranks, name):
    _, single_g1, single_g2 = pair_loss_and_grads(name, slice(None))
    for r, result in enumerate(ranks):
        _, g1, g2 = result[name]
        # DDP averages over ranks what all-gather's backward summed over ranks.
        torch.testing.assert_close(g1 / WORLD, single_g1[rows_of(r)])
        torch.testing.assert_close(g2 / WORLD, single_g2[rows_of(r)])


def test_functional_route_with_gather_with_grad_matches_too(ranks):
    batch = fixed_batch()
    z1 = batch["z1"].clone().requires_grad_(True)
    loss = F_ssl.vicreg(z1, batch["z2"])
    loss.backward()
    for r, result in enumerate(ranks):
        value, g1, _ = result["functional_vicreg"]
        assert value == pytest.approx(loss.item(), rel=1e-10)
        torch.testing.assert_close(g1 / WORLD, z1.grad[rows_of(r)])


def test_without_gather_each_rank_sees_only_its_own_negatives(ranks):
    global_loss, _, _ = pair_loss_and_grads("simclr", slice(None))
    for r, result in enumerate(ranks):
        local_loss, _, _ = pair_loss_and_grads("simclr", rows_of(r))
        assert result["simclr_local"][0] == pytest.approx(local_loss, rel=1e-10)
        assert result["simclr_local"][0] != pytest.approx(global_loss, rel=1e-3)


def test_mocov3_gathered_keys_with_rank_offset_equal_single_process(ranks):
    single_loss, single_g1, single_g2 = mocov3_loss_and_grads(slice(None))
    # Each rank's loss is the mean over its own queries: the ranks' mean is the global mean.
    mean_loss = sum(result["mocov3"][0] for result in ranks) / WORLD
    assert mean_loss == pytest.approx(single_loss, rel=1e-10)
    for r, result in enumerate(ranks):
        _, g1, g2 = result["mocov3"]
        torch.testing.assert_close(g1 / WORLD, single_g1[rows_of(r)])
        torch.testing.assert_close(g2 / WORLD, single_g2[rows_of(r)])


def test_outside_ddp_gathering_is_the_identity():
    z = torch.randn(4, 3, requires_grad=True)
    assert not is_distributed() and rank() == 0
    assert gather_with_grad(z) is z
    assert torch.equal(gather_no_grad(z), z)
