"""Every method: loss, gradients, energy, anti-collapse family, EMA teachers, multi-crop, options."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ssl_models.diagnostics import energy_gap
from ssl_models.ema import EMATeacher, cosine_momentum
from ssl_models.methods import (
    ANTI_COLLAPSE,
    METHODS,
    Batch,
    JointEmbedding,
    Method,
    StepOutput,
    ViewEncoding,
    build_method,
    method_options,
)
from tests.tiny_models import tiny_backbone

FAMILY = {
    "simclr": "negatives",
    "mocov3": "negatives",
    "barlow_twins": "regulariser",
    "vicreg": "regulariser",
    "simsiam": "predictor + stop-gradient",
    "byol": "EMA teacher",
    "siamese": "none",
    "mae": "denoising",
    "ijepa": "EMA teacher",
    "lvpredict": "latent capacity",
}
SMALL_HEADS = {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64}
PROJ_DIM = SMALL_HEADS["proj_dim"]
EMA_METHODS = ["byol", "mocov3"]


def small_method(name: str, **options) -> Method:
    torch.manual_seed(0)
    accepted = method_options(name)
    heads = {k: v for k, v in SMALL_HEADS.items() if k in accepted}
    return build_method(name, tiny_backbone(), **heads, **options)


def views(n: int = 8, side: int = 16, count: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, side, side, generator=g) for _ in range(count)]


# The two-view methods; the masked and predictive ones (ViT, masks) have their own files:
# tests/ssl_models/test_mae.py, test_ijepa.py, test_lvpredict.py.
ALL = sorted(name for name, cls in METHODS.items() if issubclass(cls, JointEmbedding))


def test_every_method_has_a_family():
    assert set(FAMILY) == set(METHODS)


@pytest.mark.parametrize("name", ALL)
def test_anti_collapse_names_the_family(name):
    method = small_method(name)
    assert method.name == name
    assert method.anti_collapse in ANTI_COLLAPSE
    assert method.anti_collapse == FAMILY[name]


@pytest.mark.parametrize("name", ALL)
def test_loss_is_a_finite_scalar_that_reaches_the_backbone(name):
    method = small_method(name).train()
    out = method(Batch(views()))
    assert isinstance(out, StepOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.embedding.shape == (8, PROJ_DIM) and not out.embedding.requires_grad
    out.loss.backward()
    for param_name, p in method.backbone.named_parameters():
        assert p.grad is not None, param_name
        assert p.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", ALL)
def test_energy_scores_each_pair(name):
    method = small_method(name).train()
    x, y = views()
    energies = method.energy(x, y)
    assert energies.shape == (8,)
    assert torch.isfinite(energies).all()
    # The energy of view pairs is what the collapse diagnostic compares to shuffled pairs.
    gap = energy_gap(method.energy, x, y)
    assert isinstance(gap, float) and gap == gap


def test_simsiam_target_carries_no_gradient():
    method = small_method("simsiam").train()
    x, y = views()
    a, b = method.encode(x), method.encode(y)
    assert a.embedding.requires_grad
    assert not a.target.requires_grad and a.target.grad_fn is None
    torch.testing.assert_close(a.target, a.embedding.detach())
    # The loss reaches the embedding only through the predictor: with the prediction
    # held fixed, the loss has no gradient with respect to z at all.
    p_a, p_b = a.prediction.detach(), b.prediction.detach()
    loss = method.pair_loss(a._replace(prediction=p_a), b._replace(prediction=p_b))
    assert not loss.requires_grad


@pytest.mark.parametrize("name", EMA_METHODS)
def test_ema_teacher_gets_no_gradient(name):
    method = small_method(name).train()
    assert isinstance(method.teacher, EMATeacher)
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("teacher.") for n in trainable)
    a = method.encode(views()[0])
    assert not a.target.requires_grad
    method(Batch(views())).loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())


def test_cosine_momentum_schedule():
    # BYOL sec. 3.2: from the base momentum at the start to 1 at the end.
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 0.5) == pytest.approx(0.998)
    # Outside [0, 1] the schedule is clamped.
    assert cosine_momentum(0.99, -1.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 2.0) == pytest.approx(1.0)


@pytest.mark.parametrize("name", EMA_METHODS)
@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_update_teacher_moves_by_the_scheduled_momentum(name, progress):
    method = small_method(name, base_momentum=0.9).train()
    student = nn.Sequential(method.backbone, method.projector)
    for t, s in zip(method.teacher.module.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s)  # the teacher starts as a copy
    # Take a real optimiser step so the student moves away from the teacher.
    optimiser = torch.optim.SGD(method.parameters(), lr=0.5)
    method(Batch(views())).loss.backward()
    optimiser.step()
    before = [t.clone() for t in method.teacher.module.parameters()]
    moved = [s.detach().clone() for s in student.parameters()]
    assert any(not torch.equal(b, s) for b, s in zip(before, moved, strict=True))

    method.update_teacher(progress)

    m = cosine_momentum(0.9, progress)
    assert method.teacher.momentum == pytest.approx(m)
    for t, b, s in zip(method.teacher.module.parameters(), before, moved, strict=True):
        torch.testing.assert_close(t, m * b + (1 - m) * s)
    # Buffers (BN running statistics) follow the student exactly.
    for t, s in zip(method.teacher.module.buffers(), student.buffers(), strict=True):
        torch.testing.assert_close(t, s)


@pytest.mark.parametrize("name", EMA_METHODS)
def test_schedule_position_survives_a_checkpoint(name, tmp_path):
    method = small_method(name, base_momentum=0.9)
    method.update_teacher(0.5)
    state = method.state_dict()
    assert "teacher.progress" in state
    path = tmp_path / "method.pt"
    torch.save(state, path)

    restored = small_method(name, base_momentum=0.9)
    assert float(restored.teacher.progress) == 0.0
    restored.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert float(restored.teacher.progress) == 0.5
    assert restored.teacher.momentum == pytest.approx(cosine_momentum(0.9, 0.5))


def test_ema_teacher_checkpoint_through_bytes():
    teacher = EMATeacher(nn.Linear(3, 2), base_momentum=0.99)
    teacher.update(nn.Linear(3, 2), progress=0.25)
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)
    buffer.seek(0)
    other = EMATeacher(nn.Linear(3, 2), base_momentum=0.99)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.progress.dtype == torch.float64
    assert other.momentum == pytest.approx(cosine_momentum(0.99, 0.25))
    torch.testing.assert_close(other.module.weight, teacher.module.weight)


def test_base_momentum_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="base_momentum must be in"):
        EMATeacher(nn.Linear(3, 2), base_momentum=1.5)


@pytest.mark.parametrize("name", ALL)
def test_multi_crop_pairs_local_views_with_both_global_views(name):
    method = small_method(name).train()
    global_views = views(side=16, count=2, seed=1)
    local_views = views(side=8, count=2, seed=2)
    all_views = global_views + local_views
    out = method(Batch(all_views))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in method.backbone.parameters())

    # Same loss by hand. Symmetric methods: the pair losses of (0, 1) and of each local view
    # with each global view, never local-local. Methods with a target branch: local views
    # are queries only, the targets always global (DINO/SwAV): 2 x the mean directed term.
    with torch.no_grad():
        enc = [method.encode(v) for v in all_views]
        if name in TARGET_BRANCH:
            directed = [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
            terms = [method.directed_loss(enc[q], enc[t]) for q, t in directed]
            expected = 2 * torch.stack(terms).mean()
            # Two views: the same as the symmetric pair loss.
            two = method(Batch(global_views)).loss
            torch.testing.assert_close(two, method.pair_loss(enc[0], enc[1]))
        else:
            pairs = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
            expected = torch.stack([method.pair_loss(enc[i], enc[j]) for i, j in pairs]).mean()
    torch.testing.assert_close(out.loss.detach(), expected)


TARGET_BRANCH = ("byol", "mocov3", "simsiam")


def test_a_local_view_is_never_a_target():
    """Changing what the target branch makes of a local view leaves the loss alone."""
    method = small_method("byol").train()
    all_views = views(side=16, count=2, seed=1) + views(side=8, count=2, seed=2)
    torch.manual_seed(0)
    base = method(Batch(all_views)).loss.detach()
    teacher = method.teacher

    def forward_scrambling_locals(x):
        out = teacher_forward(x)
        return torch.randn_like(out) if x.shape[-1] == 8 else out

    teacher_forward = teacher.forward
    teacher.forward = forward_scrambling_locals
    torch.manual_seed(0)
    scrambled = method(Batch(all_views)).loss.detach()
    teacher.forward = teacher_forward
    torch.testing.assert_close(scrambled, base)


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_views_is_refused(count):
    method = small_method("simclr")
    with pytest.raises(ValueError, match="simclr: needs at least 2 views"):
        method(Batch(views(count=count)))


def test_encoding_is_a_named_tuple_of_embedding_prediction_target():
    enc = small_method("byol").encode(views()[0])
    assert isinstance(enc, ViewEncoding)
    assert enc.prediction.shape == enc.target.shape == enc.embedding.shape == (8, PROJ_DIM)


def test_build_method_refuses_unknown_names_listing_the_accepted():
    with pytest.raises(ValueError, match="unknown method 'simclrr'") as info:
        build_method("simclrr", tiny_backbone())
    for name in METHODS:
        assert name in str(info.value)


def test_build_method_refuses_unknown_options_by_name():
    with pytest.raises(ValueError, match="method 'simclr' has no option 'temprature'") as info:
        build_method("simclr", tiny_backbone(), temprature=0.5)
    assert "temperature" in str(info.value)  # the accepted options are listed


def test_options_reach_the_method():
    options = method_options("simclr")
    assert options["temperature"] == 0.1 and options["gather"] is True
    method = build_method("simclr", tiny_backbone(), temperature=0.5, gather=False, proj_dim=16)
    assert method.temperature == 0.5 and method.gather is False
    assert method.projector[-2].out_features == 16  # then the output BN


@pytest.mark.parametrize("name", ALL)
def test_diagnostics_measure_the_gap_the_method_defines(name):
    method = small_method(name).train()
    out = method(Batch(views()))
    report = method.diagnostics(out)
    assert set(report) == {"embedding_std", "effective_rank", "energy_gap"}
    a, b = out.state
    expected = energy_gap(method.pair_energy, a, b)
    assert report["energy_gap"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
