"""Canny edge detection for ControlNet hints, as ComfyUI's Canny node computes it.

ComfyUI runs kornia's `filters.canny` (RGB → grayscale, 5×5 Gaussian with σ 1, Sobel gradients, non-maximum
suppression, double threshold on the gradient magnitude in 0..1 units, hysteresis) and hands on the binary edge
map as a 3-channel image. kornia is used here too, so the same thresholds give the same edges: OpenCV's Canny
takes 0..255 thresholds on an unnormalised, L1-by-default gradient and tracks edges differently, so it would not
reproduce ComfyUI's hints. kornia is pure PyTorch (it installs beside the existing torch without pulling another).
"""

from __future__ import annotations

import torch


def canny_edges(image: torch.Tensor, low_threshold: float, high_threshold: float,
                device: torch.device | str | None = None) -> torch.Tensor:
    """IMAGE [B, H, W, C] in 0..1 → edge IMAGE [B, H, W, 3] of 0.0 / 1.0, float32 on the CPU.

    Images with an alpha channel are taken without it; single-channel images are used as they are."""
    from kornia.filters import canny

    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE [batch, height, width, 1|3|4 channels], got {tuple(image.shape)}")
    if not 0.0 < low_threshold <= high_threshold < 1.0:
        raise ValueError(f"thresholds must satisfy 0 < low ({low_threshold}) <= high ({high_threshold}) < 1")
    pixels = image[..., :3].movedim(-1, 1).to(device=device or image.device, dtype=torch.float32)
    with torch.no_grad():
        _, edges = canny(pixels, low_threshold, high_threshold)
    return edges.repeat(1, 3 // edges.shape[1], 1, 1).movedim(1, -1).float().cpu()
