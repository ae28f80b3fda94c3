"""Live previews: the sampler's current x0 estimate projected to RGB with the latent format's factors (no VAE)."""

from __future__ import annotations

import io

import torch

from .models import LatentFormat

MAX_PREVIEW_SIZE = 512


def latent_to_rgb(x0: torch.Tensor, fmt: LatentFormat) -> torch.Tensor | None:
    """First image of a [B, C, h, w] scaled latent → uint8 [h, w, 3]; None when the format has no factors."""
    if fmt.rgb_factors is None or x0.ndim != 4 or x0.shape[1] != len(fmt.rgb_factors):
        return None
    factors = torch.tensor(fmt.rgb_factors, dtype=torch.float32, device=x0.device)
    rgb = x0[0].float().permute(1, 2, 0) @ factors
    if fmt.rgb_bias is not None:
        rgb = rgb + torch.tensor(fmt.rgb_bias, dtype=torch.float32, device=x0.device)
    return ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).cpu()


def preview_jpeg(x0: torch.Tensor, fmt: LatentFormat, max_size: int = MAX_PREVIEW_SIZE) -> bytes | None:
    """A small JPEG of the current estimate (ComfyUI's Latent2RGB preview), or None if it cannot be made."""
    from PIL import Image

    rgb = latent_to_rgb(x0, fmt)
    if rgb is None:
        return None
    image = Image.fromarray(rgb.numpy(), "RGB")
    image.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
