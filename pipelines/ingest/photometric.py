"""The device half of a view: photometric augmentation, batched over N views.

Input uint8 (N, 3, S, S) on any device, in any memory format (a dataset's channels-last
(N, S, S, 3) views through `channels_first`), output float32 (N, 3, S, S) normalised.
Each view gets its own random parameters, drawn with the distributions of the
torchvision recipe that SimCLR/BYOL use (`ColorJitter` in a random order per view,
`RandomGrayscale`, `GaussianBlur`, `RandomSolarize`).

Colour, fused. Brightness, contrast, saturation and grayscale are affine maps of a
pixel's RGB; hue is approximated by one. So the jitter in each view's own order,
then grayscale, the uint8 -> [0, 1] scaling and the normalisation compose into one
3x3 matrix and offset per view, applied in a single batched matmul, then one clamp
(as NVIDIA DALI's `ColorTwist`). Contrast blends with the view's mean luma at that
point of the chain, an affine function of the input's channel means, so it is
exact. Two deviations from torchvision's sequential tensor ops, both measured on
CIFAR-10 images in tests/pipelines/ingest/test_photometric.py and docs/INGEST.md:

- hue rotates RGB about the gray axis (1, 1, 1), where torchvision shifts the HSV
  hue: the same for gray and for shifts of 1/3 turn, close for small shifts, not
  the same map. (DALI rotates in YIQ instead, which lands further from torchvision
  on CIFAR-10 than the RGB rotation, so we use the latter.)
- the clamps to [0, 1] after each jitter op are dropped, only the last is kept:
  a pixel pushed past 1 by brightness 1.8 comes back by a following contrast 0.2
  instead of staying saturated.

Blur and solarize run after the normalisation, on the views that draw them: a
normalised blur kernel commutes with the per-channel affine normalisation, and the
solarize threshold and inversion are mapped into normalised units. Both are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.ingest.recipes import ViewSpec

# ColorJitter's four ops, indexed as torchvision's `fn_idx` (get_params order).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# ITU-R 601-2 luma, as torchvision's `rgb_to_grayscale` on tensors.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass
class PhotometricParams:
    """Per-view random parameters; every field is a tensor with first dimension N."""

    jitter: torch.Tensor  # bool: colour jitter applied (p = jitter_p)
    brightness: torch.Tensor  # float: factor ~ U[max(0, 1 - b), 1 + b]
    contrast: torch.Tensor  # float: factor ~ U[max(0, 1 - c), 1 + c]
    saturation: torch.Tensor  # float: factor ~ U[max(0, 1 - s), 1 + s]
    hue: torch.Tensor  # float: shift ~ U[-h, h] (fraction of the hue circle)
    order: torch.Tensor  # long (N, 4): a uniform random permutation of the 4 jitter ops
    grayscale: torch.Tensor  # bool (p = grayscale_p)
    blur: torch.Tensor  # bool (p = blur_p)
    sigma: torch.Tensor  # float: blur sigma ~ U[blur_sigma]
    solarize: torch.Tensor  # bool (p = solarize_p)

    def to(self, device: torch.device) -> PhotometricParams:
        return PhotometricParams(**{k: v.to(device) for k, v in vars(self).items()})


def sample_photometric_params(
    n: int,
    spec: ViewSpec,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> PhotometricParams:
    """Draw the parameters of N views (torchvision `ColorJitter.get_params` et al.)."""
    if generator is not None:
        device = generator.device
    device = torch.device(device or "cpu")

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) * (high - low) + low

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) < p

    return PhotometricParams(
        jitter=coin(spec.jitter_p),
        brightness=uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness),
        contrast=uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast),
        saturation=uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation),
        hue=uniform(-spec.hue, spec.hue),
        order=torch.rand(n, 4, generator=generator, device=device).argsort(dim=1),
        grayscale=coin(spec.grayscale_p),
        blur=coin(spec.blur_p),
        sigma=uniform(*spec.blur_sigma),
        solarize=coin(spec.solarize_p),
    )


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma, torchvision `rgb_to_grayscale`."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def hue_matrix(shift: torch.Tensor) -> torch.Tensor:
    """(N,) shifts in turns -> (N, 3, 3): rotation by 2 pi shift about the gray axis.

    Rodrigues' formula about u = (1, 1, 1) / sqrt(3): R = u u^T + cos(theta) (I - u u^T)
    + sin(theta) [u]_x. Gray stays gray; a third of a turn maps R -> G -> B exactly, as
    the HSV shift does. Built in float64 so that a zero shift is the identity exactly.
    """
    theta = (2 * torch.pi) * shift.to(torch.float64).view(-1, 1, 1)
    gray_axis = torch.full((3, 3), 1 / 3, dtype=torch.float64, device=shift.device)
    cross = (
        torch.tensor(
            [[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]],
            dtype=torch.float64,
            device=shift.device,
        )
        / 3**0.5
    )
    eye = torch.eye(3, dtype=torch.float64, device=shift.device)
    rotation = gray_axis + torch.cos(theta) * (eye - gray_axis) + torch.sin(theta) * cross
    return rotation.to(torch.float32)


def colour_affine(
    params: PhotometricParams, channel_means: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jitter (each view's order) then grayscale as y = A x + t on [0, 1] RGB pixels.

    `channel_means`: (N, 3) mean of each input channel, in [0, 1]; contrast needs the
    mean luma of its own input, luma . (A mean + t) with the (A, t) composed so far.
    Returns A (N, 3, 3), t (N, 3). Views without jitter get the identity there.
    """
    n, device = channel_means.shape[0], channel_means.device
    eye = torch.eye(3, device=device).expand(n, 3, 3)
    luma = torch.tensor(_LUMA, device=device)
    to_gray = luma.expand(3, 3)  # every output channel = luma . rgb
    f_b = params.brightness.view(n, 1, 1)
    f_c = params.contrast.view(n, 1, 1)
    f_s = params.saturation.view(n, 1, 1)
    candidates = torch.stack(
        [f_b * eye, f_c * eye, f_s * eye + (1 - f_s) * to_gray, hue_matrix(params.hue)], dim=1
    )  # (N, 4, 3, 3), indexed by op
    a, t = eye, torch.zeros(n, 3, device=device)
    rows = torch.arange(n, device=device)
    for slot in range(4):
        op = params.order[:, slot]
        active = params.jitter.view(n, 1, 1)
        m = torch.where(active, candidates[rows, op], eye)
        mean_luma = (a @ channel_means.unsqueeze(-1)).squeeze(-1).add_(t) @ luma  # (N,)
        offset = (1 - params.contrast) * mean_luma
        offset = torch.where(params.jitter & (op == CONTRAST), offset, 0.0).view(n, 1)
        a, t = m @ a, (m @ t.unsqueeze(-1)).squeeze(-1) + offset
    gray = torch.where(params.grayscale.view(n, 1, 1), to_gray, eye)
    return gray @ a, (gray @ t.unsqueeze(-1)).squeeze(-1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-view Gaussian blur, separable, reflect padding (torchvision `gaussian_blur`).

    The kernel is cut at 4 sigma (at most `kernel_size`): beyond it lies < 1e-4 of
    the mass, below a uint8 step. Returns a new tensor; see `gaussian_blur_where_`.
    """
    out = x.clone()
    gaussian_blur_where_(out, torch.ones(x.shape[0], dtype=torch.bool), sigma, kernel_size)
    return out


def gaussian_blur_where_(
    x: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor, kernel_size: int
) -> None:
    """`gaussian_blur` of the views where `mask` is set, in place in `x`.

    Views are grouped by kernel radius: each group is read once, blurred by one
    grouped convolution per axis, and written back once.
    """
    n, c, h, w = x.shape
    max_radius = max(min(kernel_size // 2, h - 1, w - 1), 1)
    radii = torch.ceil(4 * sigma).clamp_(1, max_radius).long()
    radii = torch.where(mask.to(radii.device), radii, 0)
    for radius in radii.unique().tolist():
        if radius == 0:
            continue
        idx = (radii == radius).nonzero().squeeze(1).to(x.device)
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps / sigma.to(x.device)[idx].view(-1, 1)) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        group = x.index_select(0, idx).view(1, -1, h, w)
        group = F.pad(group, (radius, radius, 0, 0), mode="reflect")
        group = F.conv2d(group, kernel.view(-1, 1, 1, 2 * radius + 1), groups=group.shape[1])
        group = F.pad(group, (0, 0, radius, radius), mode="reflect")
        group = F.conv2d(group, kernel.view(-1, 1, 2 * radius + 1, 1), groups=group.shape[1])
        x.index_copy_(0, idx, group.view(-1, c, h, w))


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert pixels >= threshold (torchvision `solarize` on [0, 1] tensors)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def _solarize_normalised(z: torch.Tensor, threshold: float, spec: ViewSpec) -> torch.Tensor:
    """`solarize` on z = (x - mean) / std: x >= t <=> z >= (t - mean) / std, and
    1 - x = ((1 - mean) - mean) / std - z in those units."""
    mean, std = _channel_constants(spec.mean, spec.std, z.device)
    return torch.where(z >= (threshold - mean) / std, (1 - 2 * mean) / std - z, z)


def _channel_constants(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as float32 (1, 3, 1, 1) tensors on ``device``."""
    mean_t, std_t = (
        torch.tensor(v, device=device, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std)
    )
    return mean_t, std_t


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, H, W), (x / 255 - mean) / std per channel: the
    model's input without augmentation (evaluation, inference). `apply_photometric` folds
    the same map into its colour affine."""
    mean_t, std_t = _channel_constants(mean, std, images.device)
    return (images.float() / 255 - mean_t) / std_t


def _apply_where(x: torch.Tensor, mask: torch.Tensor, op) -> None:
    """x[mask] = op(x[mask]), in place, skipping an empty subset."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    x.index_copy_(0, idx, op(x.index_select(0, idx)))


# On the CPU a chunk of views is converted to float and transformed while it sits in
# cache; a fresh tensor of a whole 224 px batch costs a page fault per 4 KiB.
_CPU_CHUNK_PIXELS = 1 << 17


def channels_first(views: torch.Tensor) -> torch.Tensor:
    """A dataset's uint8 (N, S, S, 3) views as (N, 3, S, S): a channels_last view, no copy."""
    if views.ndim != 4 or views.shape[3] != 3:
        raise ValueError(f"channels_first: views must be (N, S, S, 3), got {tuple(views.shape)}")
    return views.permute(0, 3, 1, 2)


def apply_photometric(
    views: torch.Tensor,
    spec: ViewSpec,
    params: PhotometricParams,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply drawn parameters: colour (fused) -> blur -> solarize, normalised (module doc).

    `views`: uint8 (N, 3, S, S) in any memory format (the dataset's views are
    channels_last: `channels_first(batch["view_0"])`); the output is contiguous.
    `out`: an optional float32 (N, 3, S, S) tensor to write into (and return). A
    training loop on the CPU passes last step's views back: a fresh 224 px batch is
    tens of MB that glibc maps anew each time, paid in page faults (what a fault costs
    on our VM: docs/INGEST.md, "Measured facts behind the code").
    """
    if views.dtype != torch.uint8 or views.ndim != 4 or views.shape[1] != 3:
        raise ValueError(
            f"photometric: views must be uint8 (N, 3, S, S), got {views.dtype} {tuple(views.shape)}"
        )
    params = params.to(views.device)
    n, _, h, w = views.shape
    if out is None:
        out = torch.empty((n, 3, h, w), dtype=torch.float32, device=views.device)
    elif (
        out.shape != views.shape
        or out.dtype != torch.float32
        or out.device != views.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"photometric: out must be a contiguous float32 {tuple(views.shape)} tensor on "
            f"{views.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    # One pass converts to float and to (N, 3, S, S) memory, whatever the input layout.
    out.copy_(views)
    out = out.view(n, 3, h * w)
    if views.device.type == "cpu":
        # The affine map reads a copy of a few views at a time: a whole-batch temporary
        # would be a fresh batch-sized tensor, paid in page faults.
        chunk = max(1, _CPU_CHUNK_PIXELS // (h * w))
        scratch = torch.empty((min(chunk, n), 3, h * w), dtype=torch.float32)
    else:
        chunk, scratch = max(n, 1), None
    means = out.mean(dim=2) / 255.0
    a, t = colour_affine(params, means)
    # Fold the [0, 255] -> [0, 1] scaling and the normalisation into (a, t) and the clamp.
    # Per-channel scalar clamp bounds (broadcast tensor bounds are slower, docs/INGEST.md), computed
    # on the CPU in float32 so that a GPU batch needs no sync for them.
    mean_cpu, std_cpu = (c.view(3) for c in _channel_constants(spec.mean, spec.std, "cpu"))
    bounds = list(
        zip((-mean_cpu / std_cpu).tolist(), ((1 - mean_cpu) / std_cpu).tolist(), strict=True)
    )
    mean, std = mean_cpu.to(out.device), std_cpu.to(out.device)
    a = a / (255.0 * std.view(1, 3, 1))
    t = ((t - mean) / std).unsqueeze(-1)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        y = out[start:stop]
        x = y.clone() if scratch is None else scratch[: stop - start].copy_(y)
        torch.baddbmm(t[start:stop], a[start:stop], x, out=y)
        for channel, (low, high) in enumerate(bounds):
            y[:, channel].clamp_(low, high)
    out = out.view(n, 3, h, w)
    if spec.blur_p > 0:
        gaussian_blur_where_(out, params.blur, params.sigma, spec.blur_kernel)
    if spec.solarize_p > 0:
        _apply_where(
            out, params.solarize, lambda v: _solarize_normalised(v, spec.solarize_threshold, spec)
        )
    return out


def photometric(
    views: torch.Tensor,
    spec: ViewSpec,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (N, 3, S, S), any memory format -> normalised float32 (N, 3, S, S), contiguous.

    Per-view random parameters.

    Run it where the batch lives (the GPU when training on one); `generator` must be
    on that device (or None for torch's default generator). `out`: see
    `apply_photometric`.
    """
    params = sample_photometric_params(views.shape[0], spec, generator, views.device)
    return apply_photometric(views, spec, params, out)
