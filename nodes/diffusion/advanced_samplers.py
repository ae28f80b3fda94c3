"""Samplers only the custom-sampling nodes offer (ComfyUI's nodes_advanced_samplers): LCM with upscaling between
steps, and the "alternative" Euler CFG++. Same call convention as nodes.diffusion.samplers."""

from __future__ import annotations

import numpy as np
import torch

from .resize import common_upscale
from .sampler_steps import batch_ones, report, seed_of, to_d


def _fresh_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def lcm_upscale(model, x, sigmas, extra_args=None, callback=None, total_upscale=2.0, upscale_method="bislerp",
                upscale_steps=None):
    """LCM whose denoised estimate is resized by a growing factor (1 → total_upscale over the first
    `upscale_steps` steps; half the steps + 1 by default) before it is re-noised to the next sigma.

    ComfyUI draws that noise from torch's global generator, so its results are not reproducible; here it comes
    from a private generator on the latent's device seeded with the sampling seed (one randn per step, in the
    latent's current size)."""
    extra_args = extra_args or {}
    if upscale_steps is None:
        upscale_steps = max(len(sigmas) // 2 + 1, 2)
    else:
        upscale_steps = min(upscale_steps + 1, len(sigmas) + 1)
    factors = np.linspace(1.0, total_upscale, upscale_steps)[1:]
    height, width = x.shape[-2], x.shape[-1]
    seed = seed_of(extra_args)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * batch_ones(x), **extra_args)
        report(callback, i, denoised, x)
        x = denoised
        if i < len(factors):
            x = common_upscale(x, round(width * factors[i]), round(height * factors[i]), upscale_method, "disabled")
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * _fresh_noise(x, generator)
    return x


def euler_cfg_pp_alternative(model, x, sigmas, extra_args=None, callback=None):
    """SamplerEulerCFG++ "alternative": Euler with d = (x − 2·D + D_uncond)/σ, i.e. the step direction of x shifted
    by the guidance (D_uncond − D). The unguided prediction is always evaluated (ComfyUI disables the cfg = 1
    shortcut for it)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised, uncond = model(x, sigmas[i] * batch_ones(x), return_uncond=True, **extra_args)
        d = to_d(x - denoised + uncond, sigmas[i], denoised)
        report(callback, i, denoised, x)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x
