"""The worker loop's parts, without Ray: the step and its non-finite policy, the throughput
window, the views, and what the driver hands the workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import pipelines.train.throughput as throughput
from pipelines.config import load_config
from pipelines.ingest.photometric import channels_first, photometric
from pipelines.ingest.recipes import simclr
from pipelines.train.checkpointing import Progress
from pipelines.train.loop import LoopConfig, make_views
from pipelines.train.step import NonFiniteLossError, NonFinitePolicy, StepResult, train_step
from pipelines.train.throughput import ThroughputWindow
from ssl_models.methods import Batch, Method, StepOutput, build_method
from tests.tiny_models import tiny_backbone

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "cifar10-sample"
TOTAL_STEPS = 100


def tiny_simclr() -> Method:
    """SimCLR on a real two-conv Backbone (as tests/ssl_models/test_methods.py builds one)."""
    torch.manual_seed(0)
    return build_method("simclr", tiny_backbone(), proj_hidden_dim=32, proj_dim=16)


def two_views(seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch([torch.randn(8, 3, 16, 16, generator=generator) for _ in range(2)])


def with_nan_loss(model: Method):
    """``model``'s forward with its loss made NaN (the objectives refuse NaN embeddings, so a
    NaN loss comes from the loss itself: an overflow, a log of 0)."""

    def forward(batch: Batch) -> StepOutput:
        output = model(batch)
        output.loss = output.loss * float("nan")
        return output

    return forward


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def step(model, optimizer, policy, progress, forward=None, seed: int = 0) -> StepResult:
    """One ``train_step``, counted done as the loop counts it."""
    batch = two_views(seed)
    result = train_step(
        model,
        forward or model,
        batch,
        optimizer,
        policy,
        progress,
        (progress.step + 1) / TOTAL_STEPS,
    )
    progress.step += 1
    return result


@pytest.fixture
def setup():
    model = tiny_simclr()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, NonFinitePolicy(max_in_a_row=3), Progress()


def test_finite_step_updates_the_weights(setup):
    model, optimizer, policy, progress = setup
    before = parameters(model)
    result = step(model, optimizer, policy, progress)
    assert result.finite and result.loss is not None and result.loss > 0
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())
    assert progress.nonfinite_total == 0


def test_nan_loss_skips_the_step_without_touching_the_weights(setup):
    model, optimizer, policy, progress = setup
    step(model, optimizer, policy, progress)  # momentum would move the weights on any step()
    before = parameters(model)
    result = step(model, optimizer, policy, progress, with_nan_loss(model), seed=1)
    assert not result.finite and result.loss is None
    assert torch.isnan(result.output.loss)
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p), name
        assert p.grad is None, name
    assert progress.nonfinite_total == 1 and policy.in_a_row == 1


def test_nan_embeddings_reach_the_policy_instead_of_the_objectives_error(setup):
    """NaN views give NaN embeddings, which SimCLR's objective refuses (NonFiniteInputError, a
    ValueError): the step is skipped and counted like a NaN loss, and the NaN batch statistics
    that forward pass wrote are put back."""
    model, optimizer, policy, progress = setup
    step(model, optimizer, policy, progress)
    before = parameters(model)
    buffers = {name: b.clone() for name, b in model.named_buffers() if b.is_floating_point()}
    nan_views = Batch([torch.full((8, 3, 16, 16), float("nan")) for _ in range(2)])
    result = train_step(model, model, nan_views, optimizer, policy, progress, 0.5)
    assert not result.finite and result.loss is None and result.output is None
    assert progress.nonfinite_total == 1 and policy.in_a_row == 1
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())
    for name, buffer in model.named_buffers():
        if name in buffers:
            assert torch.equal(buffers[name], buffer), name


def test_nonfinite_gradient_with_a_finite_loss_is_skipped_too(setup):
    model, optimizer, policy, progress = setup
    weight = model.backbone.model[0].weight
    with torch.no_grad():
        weight[0, 0, 0, 0] = 0.0  # d sqrt(|w|) / dw is not finite at 0

    def forward(batch: Batch) -> StepOutput:
        output = model(batch)
        output.loss = output.loss + weight.abs().sqrt().sum() * 1e-6
        return output

    before = parameters(model)
    result = step(model, optimizer, policy, progress, forward)
    assert not result.finite and result.loss is None
    assert torch.isfinite(result.output.loss)
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())
    assert progress.nonfinite_total == 1


def test_k_nonfinite_steps_in_a_row_raise_naming_the_step(setup):
    model, optimizer, policy, progress = setup
    progress.step = 41
    nan_loss = with_nan_loss(model)
    step(model, optimizer, policy, progress, nan_loss)
    step(model, optimizer, policy, progress, nan_loss)
    message = r"3 non-finite losses or gradients in a row at step 44 \(3 in all\)"
    with pytest.raises(NonFiniteLossError, match=message):
        step(model, optimizer, policy, progress, nan_loss)


def test_a_finite_step_resets_the_count_in_a_row(setup):
    model, optimizer, policy, progress = setup
    nan_loss = with_nan_loss(model)
    for forward in (nan_loss, nan_loss, model, nan_loss, nan_loss):  # never 3 in a row
        step(model, optimizer, policy, progress, forward)
    assert policy.in_a_row == 2
    assert progress.nonfinite_total == 4
    assert progress.step == 5


def test_throughput_window_arithmetic():
    window = ThroughputWindow(batch_size=32, start=100.0)
    for loss in (2.0, None, 4.0):
        window.add(loss)
    window.data_wait = 0.5
    assert window.metrics(now=102.0) == {
        "loss": 3.0,  # mean over the finite steps
        "img_per_s": 3 * 32 / 2.0,  # every step, skipped ones included
        "data_wait_share": 0.25,
    }
    window.reset(now=200.0)
    assert (window.loss_sum, window.finite_steps, window.steps, window.data_wait) == (0, 0, 0, 0)
    assert window.metrics(now=201.0) == {"loss": 0.0, "img_per_s": 0.0, "data_wait_share": 0.0}


def test_throughput_window_times_only_the_wait_for_batches(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])

    def slow_batches():
        for batch in range(3):
            clock[0] += 1.0  # the data pipeline takes 1 s per batch
            yield batch

    window = ThroughputWindow(batch_size=1, start=clock[0])
    for _ in window.timed(slow_batches()):
        clock[0] += 10.0  # the step takes 10 s: not waiting
        window.add(1.0)
    assert window.data_wait == 3.0
    assert window.metrics()["data_wait_share"] == pytest.approx(3.0 / 33.0)


def test_make_views_writes_into_last_steps_cpu_buffers():
    recipe = simclr(16)
    crops = torch.randint(
        0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    batch = {"view_0": crops, "view_1": crops.flip(1)}
    buffers: list[torch.Tensor] = []
    cpu = torch.device("cpu")
    first = make_views(batch, recipe, torch.Generator().manual_seed(1), cpu, buffers)
    assert len(buffers) == 2 and all(b is v for b, v in zip(buffers, first, strict=True))
    second = make_views(batch, recipe, torch.Generator().manual_seed(1), cpu, buffers)
    assert [v.data_ptr() for v in second] == [v.data_ptr() for v in first]
    generator = torch.Generator().manual_seed(1)
    expected = [
        photometric(channels_first(batch[c]), s, generator)
        for c, s in zip(recipe.columns, recipe.views, strict=True)
    ]
    for got, want in zip(second, expected, strict=True):
        assert got.shape == (4, 3, 16, 16) and torch.equal(got, want)


def test_loop_config_survives_pickling():
    config = load_config(None, [f"data.train.path={SAMPLE / 'train.parquet'}"])
    loop = LoopConfig(
        config=config,
        total_steps=10,
        steps_per_epoch=5,
        mlflow_run_id=None,
        tracking_uri="sqlite:////tmp/mlflow.db",
        local_dir="/tmp/run",
        ingest_counter="run/train",
        extra_columns=("mask",),
    )
    restored = pickle.loads(pickle.dumps(loop))
    assert restored == loop
    with pytest.raises(AttributeError):
        restored.total_steps = 11  # frozen


def test_progress_ignores_keys_of_older_checkpoints():
    old = {"step": 7, "nonfinite_total": 1, "images_seen": 224, "mlflow_run_id": "abc"}
    assert Progress.from_state({**old, "last_knn_top1": 0.5, "extra": {}}) == Progress(
        **old, last_knn_top1=0.5
    )
