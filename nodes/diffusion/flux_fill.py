"""The extra input channels of Flux Fill (inpainting / outpainting) and Flux Depth / Canny models.

These Flux transformers read more than the 16 latent channels: ComfyUI's Flux.concat_cond appends, before the
network pads and packs its input, the processed latent of a picture (Depth / Canny: the control image; Fill: the
masked picture) and, for Fill, the mask folded into 64 channels (each latent cell's 8×8 pixel block). How many
channels a model takes is read from its img_in width (packed 2×2: in_channels / 4), as ComfyUI does:
    ≤ 16 (plain Flux): nothing appended; ≤ 32 (Depth / Canny): the picture; more (Fill, 96): picture + mask.

The picture and mask come from the conditioning (InpaintModelConditioning / InstructPixToPixConditioning set
`concat_latent_image` and `concat_mask`); they are resized here per entry (`conditioning_inputs`, batched like
the other per-entry inputs) and appended in the call (`channels`). Without them a model that needs them gets what
ComfyUI gives it: a zero latent (processed) and an all-ones mask. (ComfyUI falls back to the sampler's denoise
mask when a conditioning has no concat_mask; the per-entry inputs do not see the denoise mask, so that case gets
the all-ones mask.)
"""

from __future__ import annotations

from typing import Any, cast

import torch

from . import convert
from .latent_formats import FLUX_LATENT
from .resize import common_upscale
from .sampling_conds import resize_to_batch

PIXELS_PER_CELL = 8  # ComfyUI folds the mask's 8×8 pixel blocks into channels whatever the VAE's factor
IMAGE_KEY, MASK_KEY = "fill_image", "fill_mask"


def fold_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pixel mask [B, C, h, w] (channels averaged) -> [B, 64, height, width]: resized to 8·height × 8·width
    (bilinear, centre crop) and each latent cell's 8×8 block put into channels (row-major within the block)."""
    cell = PIXELS_PER_CELL
    mask = torch.mean(mask.float(), dim=1, keepdim=True)
    mask = common_upscale(mask, width * cell, height * cell, "bilinear", "center")
    batch = mask.shape[0]
    mask = mask.view(batch, height, cell, width, cell).permute(0, 2, 4, 1, 3)
    return mask.reshape(batch, cell * cell, height, width)


def _pixel_mask(mask: torch.Tensor) -> torch.Tensor:
    """concat_mask as [B, C, H, W] (a MASK [B, H, W] or [H, W] gets its channel axis)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4:
        raise ValueError(f"concat_mask must be a [B, H, W] or [B, 1, H, W] mask, got shape {tuple(mask.shape)}")
    return mask


def conditioning_inputs(options: dict[str, Any], latent_shape: torch.Size, device: torch.device) \
        -> dict[str, torch.Tensor]:
    """{"fill_image": [B, 16, H, W] processed latent, "fill_mask": [B, 64, H, W]} of one conditioning entry
    (B = the noise batch), or {} when the entry carries neither concat_latent_image nor concat_mask."""
    image, mask = options.get("concat_latent_image"), options.get("concat_mask")
    if image is None and mask is None:
        return {}
    batch, height, width = latent_shape[0], latent_shape[-2], latent_shape[-1]
    if image is None:
        image = torch.zeros((batch, FLUX_LATENT.channels, height, width))
    image = common_upscale(image.to(device=device, dtype=torch.float32), width, height, "bilinear", "center")
    image = FLUX_LATENT.process_in(resize_to_batch(image, batch))
    if mask is None:
        mask = torch.ones((batch, 1, height * PIXELS_PER_CELL, width * PIXELS_PER_CELL))
    mask = resize_to_batch(fold_mask(_pixel_mask(mask).to(device), height, width), batch)
    return {IMAGE_KEY: image, MASK_KEY: mask}


def channels(network: torch.nn.Module, extra: dict[str, torch.Tensor], x_in: torch.Tensor) -> torch.Tensor | None:
    """The channels to append to x_in [N, 16, H, W] for this network (None for a plain Flux)."""
    config = convert.diffusers_config(network)
    wanted = int(config.in_channels) // 4 - x_in.shape[1]  # packed 2×2: latent channels = in_channels / 4
    if wanted <= 0:
        return None
    latent_channels = int(config.out_channels or config.in_channels) // 4
    batch, height, width = x_in.shape[0], x_in.shape[-2], x_in.shape[-1]
    image, mask = extra.get(IMAGE_KEY), extra.get(MASK_KEY)
    if image is None:  # no picture / mask in the conditioning: ComfyUI's zero latent and all-ones mask
        image = FLUX_LATENT.process_in(torch.zeros((batch, latent_channels, height, width), device=x_in.device))
        mask = torch.ones((batch, PIXELS_PER_CELL * PIXELS_PER_CELL, height, width), device=x_in.device)
    if image.shape[-2:] != (height, width):
        raise ValueError(f"Flux Fill / Depth / Canny models cannot take area conditioning: their picture and mask "
                         f"cover the whole {image.shape[-1]}×{image.shape[-2]} latent, the area is {width}×{height}")
    parts = [image] if wanted <= latent_channels else [image, cast(torch.Tensor, mask)]  # set with the image
    concat = torch.cat(parts, dim=1)
    if concat.shape[1] != wanted:
        raise ValueError(f"the Flux model reads {wanted} extra input channels; only Fill ({latent_channels} + 64) "
                         f"and Depth / Canny ({latent_channels}) models are known")
    return concat.to(x_in)
