"""Resizing NCHW tensors the way ComfyUI's upscale nodes do (`common_upscale`).

Used by the latent and image upscale nodes and by anything else that must match their numerics: torch
`interpolate` (align_corners False, no antialias) for the plain modes, `bislerp` (spherical interpolation of the
channel vectors) for latents, and PIL Lanczos on uint8-quantised images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

INTERPOLATE_MODES = ("nearest-exact", "bilinear", "area", "bicubic")
LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")


def center_crop_to_aspect(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Trim the too-long axis so the aspect ratio matches width/height, removing round(excess/2) on each side."""
    old_height, old_width = samples.shape[-2], samples.shape[-1]
    old_aspect = old_width / old_height
    new_aspect = width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_height - 2 * y).narrow(-1, x, old_width - 2 * x)


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Resize [N,C,H,W] to [N,C,height,width] with one of ComfyUI's upscale methods."""
    if width < 1 or height < 1:
        raise ValueError(f"target size must be at least 1x1, got {width}x{height}")
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    elif crop != "disabled":
        raise ValueError(f"unknown crop method '{crop}' (expected one of {', '.join(CROP_METHODS)})")
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    if method not in INTERPOLATE_MODES:
        raise ValueError(f"unknown upscale method '{method}'")
    return F.interpolate(samples, size=(height, width), mode=method)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL Lanczos, applied to each image after truncating it to uint8 (as ComfyUI does)."""
    resized = []
    for image in samples:
        pixels = np.clip(255.0 * image.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
        pil = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
        pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
        array = np.array(pil).astype(np.float32) / 255.0
        if array.ndim == 2:
            array = array[..., None]
        resized.append(torch.from_numpy(array).movedim(-1, 0))
    return torch.stack(resized).to(samples.device, samples.dtype)


def _slerp_rows(start: torch.Tensor, end: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between row vectors [N,C] with ratios [N,1]; the norm is interpolated linearly.

    Nearly parallel pairs take `start` as is, nearly opposite pairs fall back to linear interpolation, and zero
    vectors count as direction 0.
    """
    start_norm = start.norm(dim=-1, keepdim=True)
    end_norm = end.norm(dim=-1, keepdim=True)
    start_dir = torch.where(start_norm == 0, torch.zeros_like(start), start / start_norm)
    end_dir = torch.where(end_norm == 0, torch.zeros_like(end), end / end_norm)
    dot = (start_dir * end_dir).sum(dim=1)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    ratio_flat = ratio.squeeze(1)
    result = ((torch.sin((1.0 - ratio_flat) * omega) / sin_omega).unsqueeze(1) * start_dir
              + (torch.sin(ratio_flat * omega) / sin_omega).unsqueeze(1) * end_dir)
    result = result * (start_norm * (1.0 - ratio) + end_norm * ratio)
    parallel = dot > 1 - 1e-5
    opposite = dot < 1e-5 - 1
    result[parallel] = start[parallel]
    result[opposite] = (start * (1.0 - ratio) + end * ratio)[opposite]
    return result


def _bilinear_source_positions(old_length: int, new_length: int, device: torch.device):
    """For each output index: the left source index, the right one, and the fraction between them.

    Positions come from bilinearly resizing the index ramp itself, so they follow torch's half-pixel mapping
    (clamped at the borders) exactly as `interpolate` would.
    """
    ramp = torch.arange(old_length, dtype=torch.float32, device=device).reshape(1, 1, 1, -1)
    positions = F.interpolate(ramp, size=(1, new_length), mode="bilinear")
    fractions = positions - positions.floor()
    left = positions.to(torch.int64)
    shifted = ramp + 1
    shifted[..., -1] -= 1  # the last source index has no right neighbour: it pairs with itself
    right = F.interpolate(shifted, size=(1, new_length), mode="bilinear").to(torch.int64)
    return fractions, left, right


def _bislerp_last_axis(samples: torch.Tensor, new_length: int) -> torch.Tensor:
    n, c, h, w = samples.shape
    fractions, left, right = _bilinear_source_positions(w, new_length, samples.device)
    left_values = samples.gather(-1, left.expand(n, c, h, -1)).movedim(1, -1).reshape(-1, c)
    right_values = samples.gather(-1, right.expand(n, c, h, -1)).movedim(1, -1).reshape(-1, c)
    ratios = fractions.expand(n, 1, h, -1).movedim(1, -1).reshape(-1, 1)
    blended = _slerp_rows(left_values, right_values, ratios)
    return blended.reshape(n, h, new_length, c).movedim(-1, 1)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resize whose per-pixel blend is a slerp of the channel vectors: first along width, then height."""
    original_dtype = samples.dtype
    result = _bislerp_last_axis(samples.float(), width)
    result = _bislerp_last_axis(result.movedim(-1, -2), height).movedim(-1, -2)
    return result.to(original_dtype)
