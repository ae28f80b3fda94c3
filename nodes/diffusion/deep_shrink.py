"""Kohya's "Deep Shrink" (PatchModelAddDownscale) as UNet block patches, with ComfyUI's semantics.

While σ is within [σ_end, σ_start] the features leaving input block `block_number` are resized by
1/downscale_factor (so every deeper block runs at the lower resolution: fewer duplicated subjects at sizes above
the training resolution); an output-block patch resizes h back to its skip's size wherever the two differ, before
they are concatenated (nodes.diffusion.unet_hooks calls it there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .resize import common_upscale

RESIZE_METHODS = ("bicubic", "nearest-exact", "bilinear", "area", "bislerp")

InputPatch = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
OutputPatch = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def downscale_patch(block_number: int, downscale_factor: float, sigma_start: float, sigma_end: float,
                    method: str) -> InputPatch:
    """Input-block patch: h of input block `block_number` resized by 1/downscale_factor (rounded) while
    sigma_start ≥ σ ≥ sigma_end (σ of the call's first sample)."""

    def patch(h: torch.Tensor, transformer_options: dict[str, Any]) -> torch.Tensor:
        if transformer_options["block"][1] != block_number:
            return h
        sigma = float(transformer_options["sigmas"][0])
        if not sigma_end <= sigma <= sigma_start:
            return h
        width = round(h.shape[-1] * (1.0 / downscale_factor))
        height = round(h.shape[-2] * (1.0 / downscale_factor))
        return common_upscale(h, width, height, method, "disabled")

    return patch


def match_skip_patch(method: str) -> OutputPatch:
    """Output-block patch: h resized to its skip's height and width when their heights differ."""

    def patch(h: torch.Tensor, skip: torch.Tensor, _options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if h.shape[2] != skip.shape[2]:
            h = common_upscale(h, skip.shape[-1], skip.shape[-2], method, "disabled")
        return h, skip

    return patch
