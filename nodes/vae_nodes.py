"""VAE nodes: decode latents to images and encode images to latents (plain, tiled, and for inpainting)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from latentloom.engine.node import Node
from latentloom.engine.types import IMAGE, LATENT, MASK, VAE, Int, Output, Socket

from .diffusion.vae import VAEModel, crop_to_multiple


def _vae(value: Any, node: str) -> VAEModel:
    if not isinstance(value, VAEModel):
        raise ValueError(f"{node}: input 'vae' must be a VAE, got {type(value).__name__}")
    return value


def _latent_samples(value: Any, node: str) -> torch.Tensor:
    if not isinstance(value, dict) or not isinstance(value.get("samples"), torch.Tensor):
        raise ValueError(f"{node}: input 'samples' must be a LATENT (a dict with a 'samples' tensor)")
    return value["samples"]


def _image(value: Any, node: str, name: str = "pixels") -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        raise ValueError(f"{node}: input '{name}' must be an IMAGE [B,H,W,C]")
    return value


def _manager(ctx: Any) -> Any:
    env = getattr(ctx, "env", None)
    services = getattr(env, "services", None) or {}
    return services.get("models")


def _progress(ctx: Any):
    return getattr(ctx, "progress", None)


class VAEDecode(Node):
    display_name = "VAE Decode"
    category = "latent"
    description = "Decodes latent images back into pixel space images."
    outputs = (Output(IMAGE, tooltip="The decoded image."),)

    samples: Annotated[Any, Socket(LATENT, tooltip="The latent to be decoded.")]
    vae: Annotated[Any, Socket(VAE, tooltip="The VAE model used for decoding the latent.")]

    def run(self, ctx):
        vae = _vae(self.vae, "VAEDecode")
        samples = _latent_samples(self.samples, "VAEDecode")
        return (vae.decode(samples, manager=_manager(ctx), progress=_progress(ctx)),)


class VAEEncode(Node):
    display_name = "VAE Encode"
    category = "latent"
    outputs = (Output(LATENT),)

    pixels: Annotated[Any, Socket(IMAGE)]
    vae: Annotated[Any, Socket(VAE)]

    def run(self, ctx):
        vae = _vae(self.vae, "VAEEncode")
        pixels = _image(self.pixels, "VAEEncode")
        return ({"samples": vae.encode(pixels, manager=_manager(ctx), progress=_progress(ctx))},)


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

    def run(self, ctx):
        vae = _vae(self.vae, "VAEDecodeTiled")
        samples = _latent_samples(self.samples, "VAEDecodeTiled")
        overlap = self.overlap
        if self.tile_size < overlap * 4:
            overlap = self.tile_size // 4
        ratio = vae.downscale_ratio
        images = vae.decode_tiled(samples, tile=self.tile_size // ratio, overlap=overlap // ratio,
                                  manager=_manager(ctx), progress=_progress(ctx))
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

    def run(self, ctx):
        vae = _vae(self.vae, "VAEEncodeTiled")
        pixels = _image(self.pixels, "VAEEncodeTiled")
        samples = vae.encode_tiled(pixels, tile=self.tile_size, overlap=self.overlap, manager=_manager(ctx),
                                   progress=_progress(ctx))
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

    def run(self, ctx):
        vae = _vae(self.vae, "VAEEncodeForInpaint")
        pixels = _image(self.pixels, "VAEEncodeForInpaint")
        if not isinstance(self.mask, torch.Tensor) or self.mask.ndim not in (2, 3, 4):
            raise ValueError("VAEEncodeForInpaint: input 'mask' must be a MASK [B,H,W]")
        prepared, noise_mask = inpaint_inputs(pixels, self.mask, self.grow_mask_by)
        samples = vae.encode(prepared, manager=_manager(ctx), progress=_progress(ctx))
        return ({"samples": samples, "noise_mask": noise_mask},)


NODES = [VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled, VAEEncodeForInpaint]
