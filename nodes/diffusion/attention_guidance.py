"""Maths of the guidance patches that re-run or re-shape the UNet's prediction (nodes/attention_patches.py), as
hook functions for the patch API (nodes.diffusion.patches), with ComfyUI 0.3.64's numerics.

Self-Attention Guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using Self-Attention
Guidance"): the middle block's self-attention map of the negative pass says which latent cells the model attends
to most (per key token, the head-averaged attention summed over queries > 1). Those cells of the negative's x0
are Gaussian-blurred (9×9 kernel), the blurred x0 is re-noised with the negative's own noise and denoised again
with the negative conditioning, and the guided x0 moves by scale·(blurred − re-denoised).

Perturbed-Attention Guidance (Ahn et al. 2024): the positive is evaluated again with the middle block's
self-attention replaced by its value projection (identity attention map); x0 += scale·(cond − perturbed).

FreSca (Huang et al. 2025, "FreSca: Scaling in Frequency Space"): the guidance cond − uncond has its centred 2-D
spectrum scaled, scale_low inside a (2·cutoff)² window, scale_high outside.

Differential Diffusion (Levin & Fried 2023): a soft inpainting mask becomes a per-step binary mask, a cell being
repainted while its mask value ≥ how far (in timesteps) sampling still has to go; `strength` < 1 blends it
with the soft mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import patches as patch_api
from .unet_hooks import default_attention

SAG_THRESHOLD = 1.0   # attention mass (summed over queries) above which a key cell counts as attended to
SAG_KERNEL = 9        # Gaussian kernel size of the adversarial blur


# ---------------------------------------------------------------------------------------------------------------
# Self-attention guidance


def attention_with_probabilities(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                                 precision: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention on [B, N, heads·d] projections, also returning the softmax map [B·heads, Nq, Nk]
    (batch-major: image b's heads are rows b·heads … b·heads + heads − 1)."""
    b, _, inner = q.shape
    d = inner // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, -1, heads, d).permute(0, 2, 1, 3).reshape(b * heads, -1, d)

    qh, kh, vh = split(q), split(k), split(v)
    if precision == torch.float32:
        qh, kh = qh.float(), kh.float()
    probabilities = (torch.bmm(qh, kh.transpose(1, 2)) * d ** -0.5).softmax(dim=-1)
    out = torch.bmm(probabilities.to(vh.dtype), vh)
    return out.reshape(b, heads, -1, d).permute(0, 2, 1, 3).reshape(b, -1, heads * d), probabilities


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of [B, C, H, W] per channel, reflect-padded (sigma 0: unchanged)."""
    if sigma <= 0:
        return image
    half = (kernel_size - 1) * 0.5
    offsets = torch.linspace(-half, half, steps=kernel_size)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(device=image.device, dtype=image.dtype)
    kernel = torch.outer(weights, weights).expand(image.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    padded = F.pad(image, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(padded, kernel, groups=image.shape[-3])


def attended_cells(x0: torch.Tensor, probabilities: torch.Tensor, threshold: float = SAG_THRESHOLD) -> torch.Tensor:
    """The [B, 1, H, W] 0/1 map of latent cells whose middle-block token gets more than `threshold` attention mass,
    upsampled (nearest) from the middle block's grid to x0's size."""
    _, queries, keys = probabilities.shape
    b, _, height, width = x0.shape
    mass = probabilities.reshape(b, -1, queries, keys).mean(1).sum(1) > threshold
    # ComfyUI's way to the middle block's grid: the downsampling ratio rounded up to a power of two.
    ratio = 2 ** (math.ceil(math.sqrt(height * width / queries)) - 1).bit_length()
    grid = (math.ceil(height / ratio), math.ceil(width / ratio))
    cells = mass.reshape(b, *grid).unsqueeze(1).to(probabilities.dtype)
    return F.interpolate(cells, (height, width))


def blur_attended(x0: torch.Tensor, probabilities: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 with its attended cells replaced by a Gaussian blur of x0."""
    cells = attended_cells(x0, probabilities)
    return gaussian_blur(x0, SAG_KERNEL, sigma) * cells + x0 * (1 - cells)


class SelfAttentionGuidance:
    """The two hooks of SAG: `record` (the middle block's attn1 replacement, keeping the negative's attention map)
    and `guide` (the post-CFG function). One instance per patched model: the map recorded by the latest UNet call
    that evaluated a negative is the one the next post-CFG call uses (ComfyUI keeps it the same way)."""

    def __init__(self, scale: float, blur_sigma: float):
        self.scale = scale
        self.blur_sigma = blur_sigma
        self.negative_map: torch.Tensor | None = None

    def record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        heads = extra["n_heads"]
        owners = list(extra["cond_or_uncond"])
        if 1 not in owners:
            return default_attention(q, k, v, heads)
        out, probabilities = attention_with_probabilities(q, k, v, heads, extra.get("attn_precision"))
        per_chunk = heads * (q.shape[0] // len(owners))
        first = per_chunk * owners.index(1)
        self.negative_map = probabilities[first:first + per_chunk]
        return out

    def guide(self, args: dict[str, Any]) -> torch.Tensor:
        denoised = args["denoised"]
        negative_map = self.negative_map
        # Too small for the blur's reflect padding, or no negative was evaluated: nothing to guide with.
        if min(denoised.shape[2:]) <= SAG_KERNEL // 2 or negative_map is None:
            return denoised
        x, uncond_x0 = args["input"], args["uncond_denoised"]
        degraded = blur_attended(uncond_x0, negative_map, self.blur_sigma)
        renoised = degraded + (x - uncond_x0)
        (again,) = args["model"].calc_cond_batch([args["uncond"]], renoised, args["sigma"], args["model_options"])
        return denoised + (degraded - again) * self.scale


# ---------------------------------------------------------------------------------------------------------------
# Perturbed-attention guidance


def value_only_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any],
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention with the identity map: each token's output is its own value."""
    return v


def perturbed_attention_guidance(scale: float, block: tuple[str, int] = ("middle", 0)) \
        -> Callable[[dict[str, Any]], torch.Tensor]:
    """Post-CFG function: x0 + scale·(cond x0 − cond x0 with `block`'s self-attention replaced by its values)."""

    def guide(args: dict[str, Any]) -> torch.Tensor:
        denoised = args["denoised"]
        if scale == 0:
            return denoised
        options = patch_api.with_transformer_replace(args["model_options"], "attn1", value_only_attention, *block)
        (perturbed,) = args["model"].calc_cond_batch([args["cond"]], args["input"], args["sigma"], options)
        return denoised + (args["cond_denoised"] - perturbed) * scale

    return guide


# ---------------------------------------------------------------------------------------------------------------
# FreSca


def frequency_scaled(x: torch.Tensor, scale_low: float, scale_high: float, cutoff: int) -> torch.Tensor:
    """x [B, C, H, W] with its fftshifted spectrum multiplied by scale_low in the centre rows and columns
    [H//2 − cutoff, H//2 + cutoff) × [W//2 − cutoff, W//2 + cutoff) and by scale_high elsewhere, in float32.

    The window bounds are Python slice bounds as ComfyUI writes them: a negative start counts from the end (so a
    cutoff a little above H//2 leaves only the last rows low), one far above it covers everything."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = spectrum.shape[-2:]
    weights = torch.full(spectrum.shape, scale_high, device=x.device)
    weights[..., h // 2 - cutoff:h // 2 + cutoff, w // 2 - cutoff:w // 2 + cutoff] = scale_low
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * weights, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def fresca(scale_low: float, scale_high: float, cutoff: int) -> Callable[[dict[str, Any]], list[torch.Tensor]]:
    """Pre-CFG function: cond ← uncond + frequency_scaled(cond − uncond)."""

    def scale_guidance(args: dict[str, Any]) -> list[torch.Tensor]:
        cond, uncond = args["conds_out"][0], args["conds_out"][1]
        return [frequency_scaled(cond - uncond, scale_low, scale_high, cutoff) + uncond, uncond]

    return scale_guidance


# ---------------------------------------------------------------------------------------------------------------
# Differential diffusion


def differential_mask(strength: float) -> Callable[..., torch.Tensor]:
    """Denoise-mask function (model option `denoise_mask_function`, called by the inpainting denoiser with the
    step's sigma, the prepared mask and {"model", "sigmas"}): cells with mask ≥ (t − t_end) / (t_start − t_end)
    are repainted, t the schedule's timestep of sigma, t_start / t_end those of the first and last sigma (the
    last no lower than the schedule's sigma_min); strength < 1 blends the binary mask with the soft one."""

    def mask_at(sigma: torch.Tensor, denoise_mask: torch.Tensor, extra_options: dict[str, Any]) -> torch.Tensor:
        schedule = extra_options["model"].inner_model.model_sampling
        sigmas = extra_options["sigmas"]
        sigma_to = schedule.sigma_min
        if sigmas[-1] > sigma_to:
            sigma_to = sigmas[-1]
        t_from, t_to = schedule.timestep(sigmas[0]), schedule.timestep(sigma_to)
        threshold = (schedule.timestep(sigma[0]) - t_to) / (t_from - t_to)
        binary = (denoise_mask >= threshold).to(denoise_mask.dtype)
        if strength and strength < 1:
            return strength * binary + (1 - strength) * denoise_mask
        return binary

    return mask_at
