"""The device half of a view: photometric augmentation, batched over N views.

Input uint8 (N, 3, S, S) on any device, output float32 (N, 3, S, S) normalised.
Each view gets its own random parameters, drawn with the distributions of the
torchvision recipe that SimCLR/BYOL use (`ColorJitter` in a random order per view,
`RandomGrayscale`, `GaussianBlur`, `RandomSolarize`); each op matches torchvision's
tensor functional (`torchvision/transforms/_functional_tensor.py`), but runs once
per batch on the subset of views that draws it, not once per image.
"""

from __future__ import annotations

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

    def rows(self, start: int, stop: int) -> PhotometricParams:
        return PhotometricParams(**{k: v[start:stop] for k, v in vars(self).items()})


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


def _per_view(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma, torchvision `rgb_to_grayscale`."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_view(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each view's mean luma (torchvision `adjust_contrast`)."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_view(factor)
    return (f * x + (1 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each pixel's luma (torchvision `adjust_saturation`)."""
    f = _per_view(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` turns: torchvision's RGB -> HSV -> RGB, in closed form.

    Hue (in sixths) as torchvision's `_rgb2hsv`; the way back uses
    channel_n = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1
    (the "alternative" HSV -> RGB formula), with V = max and chroma C = max - min, so
    S is never formed. Written in place: on the CPU the cost is memory passes.
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    torch.sub(maxc, chroma, out=chroma)
    inv_chroma = chroma.clamp_min(1e-12).reciprocal_()  # chroma 0: numerators are 0 too
    is_r = maxc == r
    is_g = maxc == g
    is_g.logical_and_(~is_r)
    hue6 = torch.sub(r, g).mul_(inv_chroma).add_(4.0)  # max is b
    tmp = torch.sub(b, r).mul_(inv_chroma).add_(2.0)
    torch.where(is_g, tmp, hue6, out=hue6)
    torch.sub(g, b, out=tmp).mul_(inv_chroma)
    torch.where(is_r, tmp, hue6, out=hue6)
    hue6.add_((6.0 * shift).view(-1, 1, 1))
    out = torch.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(hue6 + n, 6.0, out=tmp)
        plane = out[:, channel]
        torch.mul(k, -1.0, out=plane).add_(4.0)
        torch.minimum(k, plane, out=k).clamp_(0.0, 1.0).mul_(chroma)
        torch.sub(maxc, k, out=plane)
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-view Gaussian blur, separable, reflect padding (torchvision `gaussian_blur`).

    The kernel is cut at 4 sigma (at most `kernel_size`): beyond it lies < 1e-4 of
    the mass, below a uint8 step. Views are grouped by kernel radius so that each
    group is one grouped convolution per axis.
    """
    n, c, h, w = x.shape
    max_radius = min(kernel_size // 2, h - 1, w - 1)
    radii = torch.ceil(4 * sigma).clamp_(1, max(max_radius, 1)).long()
    out = x.clone()
    for radius in radii.unique().tolist():
        idx = (radii == radius).nonzero().squeeze(1)
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps / sigma[idx].view(-1, 1)) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        group = x.index_select(0, idx).reshape(1, -1, h, w)
        group = F.pad(group, (radius, radius, 0, 0), mode="reflect")
        group = F.conv2d(group, kernel.view(-1, 1, 1, 2 * radius + 1), groups=group.shape[1])
        group = F.pad(group, (0, 0, radius, radius), mode="reflect")
        group = F.conv2d(group, kernel.view(-1, 1, 2 * radius + 1, 1), groups=group.shape[1])
        out.index_copy_(0, idx, group.view(-1, c, h, w))
    return out


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert pixels >= threshold (torchvision `solarize` on [0, 1] tensors)."""
    return torch.where(x >= threshold, 1.0 - x, x)


_JITTER_OPS = {
    BRIGHTNESS: ("brightness", adjust_brightness),
    CONTRAST: ("contrast", adjust_contrast),
    SATURATION: ("saturation", adjust_saturation),
    HUE: ("hue", adjust_hue),
}


def _apply_where(x: torch.Tensor, mask: torch.Tensor, op, *args: torch.Tensor) -> None:
    """x[mask] = op(x[mask], *args[mask]), in place, skipping empty subsets."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    subset_args = [a.index_select(0, idx) for a in args]
    x.index_copy_(0, idx, op(x.index_select(0, idx), *subset_args))


# On the CPU, elementwise ops are bound by memory passes: chunks of ~2^18 pixels keep
# the temporaries in cache (at 224 px, 5 views; 128-view chunks ran 3x slower).
_CPU_CHUNK_PIXELS = 1 << 18


def apply_photometric(
    views: torch.Tensor, spec: ViewSpec, params: PhotometricParams
) -> torch.Tensor:
    """Apply drawn parameters: jitter (random order) -> grayscale -> blur -> solarize -> normalise."""
    if views.dtype != torch.uint8 or views.ndim != 4 or views.shape[1] != 3:
        raise ValueError(
            f"photometric: views must be uint8 (N, 3, S, S), got {views.dtype} {tuple(views.shape)}"
        )
    params = params.to(views.device)
    n, _, h, w = views.shape
    chunk = max(1, _CPU_CHUNK_PIXELS // (h * w)) if views.device.type == "cpu" else max(n, 1)
    out = torch.empty(views.shape, dtype=torch.float32, device=views.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        out[start:stop] = _photometric_chunk(views[start:stop], spec, params.rows(start, stop))
    return out


def _photometric_chunk(
    views: torch.Tensor, spec: ViewSpec, params: PhotometricParams
) -> torch.Tensor:
    x = views.to(torch.float32).div_(255.0)
    for slot in range(4):
        for op_index, (name, op) in _JITTER_OPS.items():
            mask = params.jitter & (params.order[:, slot] == op_index)
            _apply_where(x, mask, op, getattr(params, name))
    _apply_where(x, params.grayscale, lambda v: grayscale(v).expand(-1, 3, -1, -1))
    if spec.blur_p > 0:
        _apply_where(
            x, params.blur, lambda v, s: gaussian_blur(v, s, spec.blur_kernel), params.sigma
        )
    if spec.solarize_p > 0:
        _apply_where(x, params.solarize, lambda v: solarize(v, spec.solarize_threshold))
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def photometric(
    views: torch.Tensor, spec: ViewSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> normalised float32 (N, 3, S, S), per-view random parameters.

    Run it where the batch lives (the GPU when training on one); `generator` must be
    on that device (or None for torch's default generator).
    """
    params = sample_photometric_params(views.shape[0], spec, generator, views.device)
    return apply_photometric(views, spec, params)
