"""Latent arithmetic that ComfyUI's latent nodes share (comfy_extras/nodes_latent.py, nodes_mask.py), written out.

All tensors are [batch, channels, height, width]. The LATENT_OPERATION socket carries a callable
`operation(latent=tensor) -> tensor`; ours are frozen dataclasses (picklable, so a Ray worker can ship them), and
an operation from a third-party pack may be any callable taking `latent=`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .resize import common_upscale
from .sampling_conds import repeat_to_batch

LATENT_OPERATION = "LATENT_OPERATION"


def match_latent_shape(target_shape: torch.Size, latent: torch.Tensor, repeat_batch: bool = True) -> torch.Tensor:
    """`latent` brought to target's height and width (bilinear, centre-cropped to the aspect ratio) when anything
    but the batch differs, then cycled or cut to target's batch size if `repeat_batch`."""
    if latent.shape[1:] != target_shape[1:]:
        latent = common_upscale(latent, target_shape[-1], target_shape[-2], "bilinear", "center")
    return repeat_to_batch(latent, target_shape[0]) if repeat_batch else latent


def mix_directions_and_lengths(first: torch.Tensor, second: torch.Tensor, ratio: float) -> torch.Tensor:
    """LatentInterpolate: the per-pixel channel vectors' directions mixed linearly (then renormalised) and their
    lengths mixed linearly; `ratio` is the weight of `first`. Zero vectors count as direction 0.

    The norms are taken per item (ComfyUI's code divides [B,C,H,W] by [B,H,W], which broadcasts the same way only
    for a batch of one and fails or mixes items for larger batches)."""
    first_norm = torch.linalg.vector_norm(first, dim=1, keepdim=True)
    second_norm = torch.linalg.vector_norm(second, dim=1, keepdim=True)
    first_dir = torch.nan_to_num(first / first_norm)
    second_dir = torch.nan_to_num(second / second_norm)
    mixed = first_dir * ratio + second_dir * (1.0 - ratio)
    mixed_dir = torch.nan_to_num(mixed / torch.linalg.vector_norm(mixed, dim=1, keepdim=True))
    return mixed_dir * (first_norm * ratio + second_norm * (1.0 - ratio))


def paste_masked(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None = None,
                 multiplier: int = 8, resize_source: bool = False) -> torch.Tensor:
    """ComfyUI's masked composite (LatentCompositeMasked with multiplier 8, pixel coordinates; 1 for images in
    [B,C,H,W]): `source` (optionally first stretched bilinearly to the destination's size, then cycled to its
    batch) is blended in at (x, y) // multiplier with `mask` (bilinearly resized to the source, cycled to its
    batch; all ones when absent), clipped to the destination. Writes into `destination` and returns it."""
    source = source.to(destination.device)
    if resize_source:
        source = F.interpolate(source, size=(destination.shape[-2], destination.shape[-1]), mode="bilinear")
    source = repeat_to_batch(source, destination.shape[0])
    x = max(-source.shape[-1] * multiplier, min(x, destination.shape[-1] * multiplier))
    y = max(-source.shape[-2] * multiplier, min(y, destination.shape[-2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[-1], top + source.shape[-2]
    if mask is None:
        weight = torch.ones_like(source)
    else:
        weight = mask.to(destination.device, dtype=torch.float32).reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        weight = F.interpolate(weight, size=(source.shape[-2], source.shape[-1]), mode="bilinear")
        weight = repeat_to_batch(weight, source.shape[0])
    visible_width = destination.shape[-1] - left + min(0, x)
    visible_height = destination.shape[-2] - top + min(0, y)
    weight = weight[:, :, :visible_height, :visible_width]
    region = destination[..., top:bottom, left:right]
    destination[..., top:bottom, left:right] = (weight * source[..., :visible_height, :visible_width]
                                                + (1.0 - weight) * region)
    return destination


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """[size, size] Gaussian on the grid linspace(-1, 1, size)² (ComfyUI's post-processing kernel: `sigma` is in
    units of the kernel's half width, not pixels), normalised to sum 1."""
    axis = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    weights = torch.exp(-(rows * rows + cols * cols) / (2.0 * sigma * sigma))
    return weights / weights.sum()


@dataclass(frozen=True)
class TonemapReinhard:
    """Compresses each pixel's channel-vector length m with Reinhard's curve m / (1 + m / top), where
    top = multiplier * (mean + 5 std) of the lengths over the item; directions are kept."""

    multiplier: float

    def __call__(self, latent: torch.Tensor, **_: Any) -> torch.Tensor:
        magnitude = torch.linalg.vector_norm(latent, dim=1, keepdim=True) + 1e-10
        direction = latent / magnitude
        if self.multiplier == 0:
            return torch.zeros_like(latent)  # the curve's limit as top -> 0 (ComfyUI divides by zero here)
        mean = magnitude.mean(dim=(1, 2, 3), keepdim=True)
        std = magnitude.std(dim=(1, 2, 3), keepdim=True)
        top = (std * 5 + mean) * self.multiplier
        scaled = magnitude * (1.0 / top)
        return direction * (scaled / (scaled + 1.0) * top)


@dataclass(frozen=True)
class Sharpen:
    """Unsharp-style sharpening of the channel vectors' directions (lengths kept): a (2r+1)² kernel that is
    -10·alpha·gaussian off-centre and 1 - (sum of those) at the centre, applied per channel after reflect padding."""

    radius: int
    sigma: float
    alpha: float

    def kernel(self) -> torch.Tensor:
        size = self.radius * 2 + 1
        kernel = gaussian_kernel(size, self.sigma) * (self.alpha * -10)
        centre = size // 2
        kernel[centre, centre] = kernel[centre, centre] - kernel.sum() + 1.0
        return kernel

    def __call__(self, latent: torch.Tensor, **_: Any) -> torch.Tensor:
        radius = self.radius
        if radius >= latent.shape[-1] or radius >= latent.shape[-2]:
            raise ValueError(f"sharpen_radius {radius} needs a latent larger than {radius}x{radius} "
                             f"(got {latent.shape[-1]}x{latent.shape[-2]})")
        luminance = torch.linalg.vector_norm(latent, dim=1, keepdim=True) + 1e-6
        direction = latent / luminance
        channels = latent.shape[1]
        weights = self.kernel().to(latent.device, latent.dtype).repeat(channels, 1, 1).unsqueeze(1)
        padded = F.pad(direction, (radius, radius, radius, radius), mode="reflect")
        # The zero padding of the conv on top of the reflect padding is cut off again: ComfyUI's exact border.
        sharpened = F.conv2d(padded, weights, padding=radius, groups=channels)
        return luminance * sharpened[:, :, radius:-radius, radius:-radius]


def apply_operation(operation: Any, latent: torch.Tensor) -> torch.Tensor:
    """Call a LATENT_OPERATION and insist on a tensor of the input's shape back."""
    result = operation(latent=latent)
    if not isinstance(result, torch.Tensor) or result.shape != latent.shape:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise ValueError(f"the operation returned {got} for a latent of shape {tuple(latent.shape)}")
    return result


@dataclass(frozen=True)
class OperationOnGuidance:
    """A pre-CFG hook (LatentApplyOperationCFG): the operation acts on the guidance direction cond − uncond of
    the denoised predictions (on cond alone when there is no uncond), so CFG then scales the changed direction."""

    operation: Any

    def __call__(self, args: dict[str, Any]) -> list[torch.Tensor]:
        conds_out = list(args["conds_out"])
        if len(conds_out) == 2:
            conds_out[0] = self.operation(latent=conds_out[0] - conds_out[1]) + conds_out[1]
        else:
            conds_out[0] = self.operation(latent=conds_out[0])
        return conds_out
