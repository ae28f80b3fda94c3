"""Maths of the model-patch nodes (nodes/model_patches.py), as hook functions for the patch API.

FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net") as ComfyUI applies it: on every output block
whose backbone features h have 4× (b1, s1) or 2× (b2, s2) the model's base width, the first half of h's channels
is scaled by b (V2: by 1 + (b − 1)·m, m the per-image min-max-normalised channel mean of h), and the skip
features are Fourier-filtered: the 2×2 lowest frequencies (after fftshift) multiplied by s.
Epsilon scaling (Ning et al. 2023, "Elucidating the Exposure Bias in Diffusion Models"): the guided noise
prediction divided by a constant factor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

OutputBlockPatch = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """x with the central (2·threshold)² block of its shifted 2-D spectrum multiplied by `scale` (in float32)."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = spectrum.shape[-2:]
    mask = torch.ones(spectrum.shape[-2:], device=x.device)
    mask[h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def freeu_patch(base_width: int, b1: float, b2: float, s1: float, s2: float, version: int = 1) -> OutputBlockPatch:
    """ComfyUI's FreeU (version 1) / FreeU_V2 (version 2) output-block patch for a UNet of base width
    `base_width` (SD1.5: 320)."""
    scales = {base_width * 4: (b1, s1), base_width * 2: (b2, s2)}

    def patch(h: torch.Tensor, skip: torch.Tensor, _options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scales.get(int(h.shape[1]))
        if scale is None:
            return h, skip
        backbone, skip_scale = scale
        half = h.shape[1] // 2
        if version == 2:
            mean = h.mean(1, keepdim=True)
            flat = mean.flatten(1)
            low = flat.min(dim=1).values.reshape(-1, 1, 1, 1)
            high = flat.max(dim=1).values.reshape(-1, 1, 1, 1)
            factor: torch.Tensor | float = (backbone - 1) * (mean - low) / (high - low) + 1
        else:
            factor = backbone
        h = torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)
        return h, fourier_filter(skip, threshold=1, scale=skip_scale)

    return patch


def epsilon_scaling(factor: float) -> Callable[[dict[str, Any]], torch.Tensor]:
    """Post-CFG function: D' = x − (x − D) / factor."""
    factor = factor if factor != 0 else 1e-9

    def scale(args: dict[str, Any]) -> torch.Tensor:
        x = args["input"]
        return x - (x - args["denoised"]) / factor

    return scale


def attention_weight_names(module: torch.nn.Module, suffixes: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Parameter name -> which factor applies ("q" | "k" | "v" | "out"), for names ending in one of the
    projection paths given per factor (e.g. {"q": ("attn1.to_q",)}) followed by .weight or .bias."""
    found: dict[str, str] = {}
    for name, _ in module.named_parameters():
        stem, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias"):
            continue
        for factor, paths in suffixes.items():
            if any(stem.endswith(path) for path in paths):
                found[name] = factor
    return found
