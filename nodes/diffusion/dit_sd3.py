"""SD3 / SD3.5 (MMDiT) model calls: diffusers' SD3Transformer2DModel with ComfyUI's inputs.

ComfyUI's SD3 model takes x, the timestep σ·1000 (ModelSamplingDiscreteFlow, multiplier 1000), the joint text
context and `y` = the pooled CLIP-L + CLIP-G output (2048 wide), which diffusers calls pooled_projections. The
latent is padded to a multiple of the patch size (circular padding, as ComfyUI's patch embedder) and cropped back.
"""

from __future__ import annotations

from typing import Any

import torch

from . import convert, dit_calls


def conditioning(options: dict[str, Any], latent_shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
    pooled = options.get("pooled_output")
    if pooled is None:
        pooled = torch.zeros((1, 2048))  # ComfyUI's SD3 y when the conditioning has no pooled output
    return {"pooled_projections": pooled.to(device=device, dtype=torch.float32).reshape(pooled.shape[0], -1)}


ACCEPTS_CONTROL = True  # ControlNet residuals (nodes.diffusion.dit_controlnet), one per joint block


def forward(network: torch.nn.Module, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            extra: dict[str, torch.Tensor], transformer_options: dict[str, Any],
            control: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
    patch = int(convert.diffusers_config(network).patch_size)
    height, width = x_in.shape[-2:]
    x_in = dit_calls.pad_to_patch(x_in, patch)
    dtype = x_in.dtype
    pooled = extra["pooled_projections"].to(dtype)
    residuals = None if control is None else [r.to(dtype) for r in control["input"]]
    with dit_calls.block_patches(network, transformer_options):
        out = network(hidden_states=x_in, encoder_hidden_states=context.to(dtype), pooled_projections=pooled,
                      timestep=timestep.to(dtype), block_controlnet_hidden_states=residuals, return_dict=False)[0]
    return out[..., :height, :width]
