"""VAE nodes: decode latents to images and encode images to latents (plain, tiled, and for inpainting)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import IMAGE, LATENT, MASK, VAE, Int, Output, Socket

from .diffusion.vae import VAEModel, crop_to_multiple


class VAEDecode(Node):
    display_name = "VAE Decode"
    category = "latent"
    description = "Decodes latent images back into pixel space images."
    outputs = (Output(IMAGE, tooltip="The decoded image."),)

    samples: Annotated[Any, Socket(LATENT, tooltip="The latent to be decoded.")]
    vae: Annotated[Any, Socket(VAE, tooltip="The VAE model used for decoding the latent.")]

    def run(self, ctx: RunContext):
        vae: VAEModel = self.vae
        samples = self.samples["samples"]
        return (vae.decode(samples, manager=ctx.models, progress=ctx.progress),)


class VAEEncode(Node):
    display_name = "VAE Encode"
    category = "latent"
    outputs = (Output(LATENT),)

    pixels: Annotated[Any, Socket(IMAGE)]
    vae: Annotated[Any, Socket(VAE)]

    def run(self, ctx: RunContext):
        vae: VAEModel = self.vae
        pixels = self.pixels
        return ({"samples": vae.encode(pixels, manager=ctx.models, progress=ctx.progress)},)


class VAEDecodeTiled(Node):
    display_name = "VAE Decode (Tiled)"
    category = "_for_testing"
    outputs = (Output(IMAGE),)

    samples: Annotated[Any, Socket(LATENT)]
    vae: Annotated[Any, Socket(VAE)]
    tile_size: Annotated[int, Int(min=64, max=4096, step=32)] = 512
    overlap: Annotated[int, Int(min=0, max=4096, step=32)] = 64
    # Only used by video VAEs; kept so ComfyUI workflows validate and map their widgets unchanged.
    temporal_size: Annotated[int, Int(min=8, max=4096, step=4, tooltip="Only used for video VAEs.")] = 64
    temporal_overlap: Annotated[int, Int(min=4, max=4096, step=4, tooltip="Only used for video VAEs.")] = 8

    def run(self, ctx: RunContext):
        vae: VAEModel = self.vae
        samples = self.samples["samples"]
        overlap = self.overlap
        if self.tile_size < overlap * 4:
            overlap = self.tile_size // 4
        ratio = vae.downscale_ratio
        images = vae.decode_tiled(samples, tile=self.tile_size // ratio, overlap=overlap // ratio,
                                  manager=ctx.models, progress=ctx.progress)
        return (images,)


class VAEEncodeTiled(Node):
    display_name = "VAE Encode (Tiled)"
    category = "_for_testing"
    outputs = (Output(LATENT),)

    pixels: Annotated[Any, Socket(IMAGE)]
    vae: Annotated[Any, Socket(VAE)]
    tile_size: Annotated[int, Int(min=64, max=4096, step=64)] = 512
    overlap: Annotated[int, Int(min=0, max=4096, step=32)] = 64
    temporal_size: Annotated[int, Int(min=8, max=4096, step=4, tooltip="Only used for video VAEs.")] = 64
    temporal_overlap: Annotated[int, Int(min=4, max=4096, step=4, tooltip="Only used for video VAEs.")] = 8

    def run(self, ctx: RunContext):
        vae: VAEModel = self.vae
        pixels = self.pixels
        samples = vae.encode_tiled(pixels, tile=self.tile_size, overlap=self.overlap, manager=ctx.models,
                                   progress=ctx.progress)
        return ({"samples": samples},)


def inpaint_inputs(pixels: torch.Tensor, mask: torch.Tensor, grow_mask_by: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's VAEEncodeForInpaint preparation: pixels with the masked area set to 0.5 grey, and the noise mask.

    The mask is bilinearly resized to the image, both are cropped (centred) to multiples of 8, masked pixels
    (round(mask) = 1) become 0.5, and the noise mask is round(mask) grown by a grow_mask_by x grow_mask_by box
    (a dilation: any masked pixel within the box marks the centre), at pixel resolution.
    """
    height, width = pixels.shape[1], pixels.shape[2]
    mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(), size=(height, width),
                         mode="bilinear")
    pixels = crop_to_multiple(pixels).clone()
    mask = crop_to_multiple(mask.movedim(1, -1)).movedim(-1, 1)
    rounded = mask.round()
    if grow_mask_by == 0:
        grown = mask
    else:
        kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
        padding = math.ceil((grow_mask_by - 1) / 2)
        grown = torch.clamp(F.conv2d(rounded, kernel, padding=padding), 0, 1)
    keep = (1.0 - rounded).squeeze(1)[..., None]
    pixels[..., :3] = (pixels[..., :3] - 0.5) * keep + 0.5
    noise_mask = grown[:, :, :pixels.shape[1], :pixels.shape[2]].round()
    return pixels, noise_mask


class VAEEncodeForInpaint(Node):
    display_name = "VAE Encode (for Inpainting)"
    category = "latent/inpaint"
    outputs = (Output(LATENT),)

    pixels: Annotated[Any, Socket(IMAGE)]
    vae: Annotated[Any, Socket(VAE)]
    mask: Annotated[Any, Socket(MASK)]
    grow_mask_by: Annotated[int, Int(min=0, max=64, step=1)] = 6

    def run(self, ctx: RunContext):
        vae: VAEModel = self.vae
        pixels = self.pixels
        prepared, noise_mask = inpaint_inputs(pixels, self.mask, self.grow_mask_by)
        samples = vae.encode(prepared, manager=ctx.models, progress=ctx.progress)
        return ({"samples": samples, "noise_mask": noise_mask},)


NODES = [VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled, VAEEncodeForInpaint]
