"""Lumina 2 (NextDiT) model calls: diffusers' Lumina2Transformer2DModel with ComfyUI's inputs.

ComfyUI's NextDiT (comfy/ldm/lumina/model.py) runs "time" backwards: it embeds t = 1 − timestep (the timestep is
σ, ModelSamplingAuraFlow-style discrete flow with multiplier 1) and returns the negated network output, so that
CONST's x0 = x − σ·out holds. diffusers' Lumina2Pipeline does the same (timestep 1 − σ, velocity = −output).
The latent is padded to the 2×2 patches (circular, ComfyUI's pad_to_patch_size) and cropped back.

The text context is Gemma's hidden states; its attention mask (options["attention_mask"], [1, T] of 0/1, valid
tokens first, set by the Lumina 2 text encoder) tells the network which caption tokens count. ComfyUI passes it
only when some token is masked; an all-ones mask is the same as none, and diffusers always takes one.
"""

from __future__ import annotations

from typing import Any

import torch

from . import dit_calls

PATCH = 2


def conditioning(options: dict[str, Any], latent_shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
    mask = options.get("attention_mask")
    if mask is None:
        return {}
    mask = torch.as_tensor(mask)
    return {"attention_mask": mask.to(device=device, dtype=torch.float32).reshape(mask.shape[0], -1)}


def forward(network: torch.nn.Module, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            extra: dict[str, torch.Tensor], transformer_options: dict[str, Any]) -> torch.Tensor:
    height, width = x_in.shape[-2:]
    x_in = dit_calls.pad_to_patch(x_in, PATCH)
    dtype = x_in.dtype
    # 1 − σ stays float32 (diffusers makes the sinusoidal embedding in float32 and casts it to the network's
    # dtype, as ComfyUI does): in bfloat16, 1 − σ would keep only ~3 significant digits.
    mask = extra.get("attention_mask")
    if mask is None or mask.shape[-1] != context.shape[1]:
        mask = torch.ones(context.shape[:2], device=context.device)
    with dit_calls.block_patches(network, transformer_options):
        out = network(hidden_states=x_in, timestep=(1.0 - timestep).float(), encoder_hidden_states=context.to(dtype),
                      encoder_attention_mask=mask.to(context.device) > 0.5, return_dict=False)[0]
    return -out[..., :height, :width]
