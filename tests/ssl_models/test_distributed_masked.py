"""The masked and predictive methods under DDP: 2 gloo processes, each with half of a fixed
batch, give the single-process loss (the mean of the ranks') and, after DDP's gradient
average, the single-process gradients. Their losses are means over images with nothing
gathered across workers, so this is exactly what DDP must preserve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipelines.ingest.masks import MultiBlockMask, RandomPatchMask
from ssl_models.methods import Batch, build_method
from tests.cluster_facts import free_port
from tests.tiny_models import masks_from, smooth_images, tiny_vit

WORLD = 2
N = 8  # images in the global batch
CASES = {
    "mae": ({"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}, RandomPatchMask(grid=4)),
    "ijepa": ({"predictor_dim": 16, "predictor_depth": 1}, MultiBlockMask(grid=4)),
    "lvpredict": (
        {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "hypotheses": 4},
        RandomPatchMask(grid=4),
    ),
}


def loss_and_grads(name: str, rows: slice, ddp: bool = False) -> tuple[float, dict]:
    options, generator = CASES[name]
    torch.manual_seed(0)
    method = build_method(name, tiny_vit(), **options).double()
    extras = {k: v[rows] for k, v in masks_from(generator, N).items()}
    images = smooth_images(N).double()[rows]
    forward = DistributedDataParallel(method) if ddp else method
    loss = forward(Batch([images], extras)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return loss.item(), grads


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        half = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        results = {name: loss_and_grads(name, half, ddp=True) for name in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("gloo-masked")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradients_equal_one_process(ranks, name):
    single_loss, single_grads = loss_and_grads(name, slice(None))
    assert sum(r[name][0] for r in ranks) / WORLD == pytest.approx(single_loss, rel=1e-10)
    for result in ranks:
        grads = result[name][1]
        assert grads.keys() == single_grads.keys()
        for key, grad in grads.items():  # DDP's all-reduce average: the full batch's gradient
            torch.testing.assert_close(grad, single_grads[key], msg=key)
