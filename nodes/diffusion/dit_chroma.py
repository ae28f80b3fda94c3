"""Chroma model calls: diffusers' ChromaTransformer2DModel with ComfyUI's inputs.

ComfyUI's Chroma (comfy/ldm/chroma/model.py) is Flux's packing without a pooled vector or guidance embedder: the
latent is padded to 2x2 patches (circular), packed to tokens [N, (H/2)(W/2), 4C], image position ids are
(0, row, column) and text ids zeros; the timestep is σ (multiplier 1, the network embeds 1000·t). Its modulation
approximator also embeds a guidance value, `guidance` of the conditioning (FluxGuidance) or 0 when unset (ComfyUI's
Chroma.extra_conds default); diffusers' network always embeds 0, so another value is put into its input vector
for the duration of the call. ComfyUI 0.3.64 passes no text attention mask: the T5 tokens are the prompt's and its
end token, unpadded. The packing and ids are Flux's (nodes.diffusion.dit_flux).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from . import dit_calls
from .dit_flux import PATCH, pack, pad_to_patches, position_ids, unpack


def conditioning(options: dict[str, Any], latent_shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
    guidance = options.get("guidance")
    return {"guidance": torch.tensor([float(guidance) if guidance is not None else 0.0], device=device)}


@contextlib.contextmanager
def _guidance_embedded(network: torch.nn.Module, guidance: torch.Tensor) -> Iterator[None]:
    """While active, the network's approximator input carries `guidance` (embedded as 1000·g, as ComfyUI's
    timestep_embedding) where diffusers puts the embedding of 0. Nothing is installed when all guidance is 0."""
    if not bool(guidance.ne(0).any()):
        yield
        return
    embedder = network.get_submodule("time_text_embed")

    def replace_guidance(module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        width = module.guidance_proj.num_channels
        embedded = module.guidance_proj(guidance.to(output.device, torch.float32) * 1000).to(output.dtype)
        output = output.clone()
        output[:, :, width:2 * width] = embedded[:, None, :]
        return output

    handle = embedder.register_forward_hook(replace_guidance)
    try:
        yield
    finally:
        handle.remove()


def forward(network: torch.nn.Module, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            extra: dict[str, torch.Tensor], transformer_options: dict[str, Any]) -> torch.Tensor:
    batch, _, height, width = x_in.shape
    x_in = pad_to_patches(x_in)
    padded_h, padded_w = x_in.shape[-2:]
    dtype = x_in.dtype
    img_ids = position_ids(padded_h, padded_w).to(device=x_in.device, dtype=dtype)
    txt_ids = torch.zeros(context.shape[1], 3, device=x_in.device, dtype=dtype)
    guidance = extra.get("guidance", torch.zeros(1))
    guidance = guidance.reshape(-1).expand(batch) if guidance.numel() == 1 else guidance.reshape(batch)
    with dit_calls.block_patches(network, transformer_options), _guidance_embedded(network, guidance):
        out = network(hidden_states=pack(x_in), encoder_hidden_states=context.to(dtype), timestep=timestep.to(dtype),
                      img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    return unpack(out, padded_h // PATCH, padded_w // PATCH)[..., :height, :width]
