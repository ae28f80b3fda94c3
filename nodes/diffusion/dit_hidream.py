"""HiDream-I1 model calls: diffusers' HiDreamImageTransformer2DModel with ComfyUI's inputs.

ComfyUI's HiDream model (comfy/ldm/hidream/model.py) takes x, the timestep σ·1000 (discrete flow, multiplier
1000), `context` = the T5 hidden states, `y` = the pooled CLIP-L ‖ CLIP-G output and, from the conditioning's
"conditioning_llama3" option, the Llama hidden states of every layer [1, layers, T, D]; it returns the negated
network output (CONST: x0 = x − σ·out), as diffusers' HiDreamImagePipeline negates it.

The latent is padded to the 2×2 patches (circular, ComfyUI's pad_to_patch_size) and cropped back. It is patched
here, in ComfyUI's token order, and handed to the network with an all-ones token mask: for non-square latents
diffusers' own patching would pad the sequence to 64×64 patches and mask the padding (keys scaled by 0, which
still take part in the softmax), which ComfyUI never does; multiplying keys by 1 changes nothing.

Block i reads Llama layer min(i, L − 1) (ComfyUI's llama_layers for L = 32: 0..31, then 31 for the remaining
single blocks).
"""

from __future__ import annotations

from typing import Any, cast

import torch

from . import convert, dit_calls

PATCH = 2
LLAMA_OPTION = "conditioning_llama3"
POOLED_WIDTH = 768 + 1280  # ComfyUI's zeros for a conditioning without a pooled output


class MissingLlamaStates(ValueError):
    """A HiDream model sampled with conditioning that has no Llama hidden states."""


def conditioning(options: dict[str, Any], latent_shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
    llama = options.get(LLAMA_OPTION)
    if llama is None:
        raise MissingLlamaStates("HiDream needs conditioning with the Llama-3.1 hidden states: encode the prompts "
                                 "with a HiDream CLIP (QuadrupleCLIPLoader, or DualCLIPLoader / CLIPLoader type "
                                 "hidream) and CLIPTextEncode or CLIPTextEncodeHiDream")
    pooled = options.get("pooled_output")
    if pooled is None:
        pooled = torch.zeros((1, POOLED_WIDTH))
    llama = torch.as_tensor(llama)
    return {"pooled_embeds": pooled.to(device=device, dtype=torch.float32).reshape(pooled.shape[0], -1),
            "llama3": llama.to(device=device, dtype=torch.float32)}


def _patched(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """[N, C, H, W] -> tokens [N, (H/2)(W/2), 2·2·C] ((p1 p2 C) order) and their position ids [N, S, 3]."""
    batch, channels, height, width = x.shape
    rows, cols = height // PATCH, width // PATCH
    tokens = x.reshape(batch, channels, rows, PATCH, cols, PATCH).permute(0, 2, 4, 3, 5, 1)
    tokens = tokens.reshape(batch, rows * cols, PATCH * PATCH * channels)
    ids = torch.zeros(rows, cols, 3, device=x.device)
    ids[..., 1] += torch.arange(rows, device=x.device)[:, None]
    ids[..., 2] += torch.arange(cols, device=x.device)[None, :]
    return tokens, ids.reshape(1, rows * cols, 3).repeat(batch, 1, 1), rows, cols


def llama_per_block(llama: torch.Tensor, blocks: int) -> torch.Tensor:
    """[N, L, T, D] -> [blocks, N, T, D]: block i reads layer min(i, L − 1)."""
    layers = llama.shape[1]
    return llama.movedim(1, 0)[[min(i, layers - 1) for i in range(blocks)]]


def forward(network: torch.nn.Module, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            extra: dict[str, torch.Tensor], transformer_options: dict[str, Any]) -> torch.Tensor:
    height, width = x_in.shape[-2:]
    x_in = dit_calls.pad_to_patch(x_in, PATCH)
    dtype = x_in.dtype
    tokens, ids, rows, cols = _patched(x_in)
    config = getattr(network, "config", None) or convert.diffusers_config(cast(torch.nn.Module, network.module))
    llama = llama_per_block(extra["llama3"], int(config.num_layers) + int(config.num_single_layers))
    with dit_calls.block_patches(network, transformer_options):
        out = network(hidden_states=tokens, timesteps=timestep.float(), encoder_hidden_states_t5=context.to(dtype),
                      encoder_hidden_states_llama3=llama.to(dtype), pooled_embeds=extra["pooled_embeds"].to(dtype),
                      img_ids=ids, img_sizes=[(rows, cols)] * tokens.shape[0],
                      hidden_states_masks=torch.ones(tokens.shape[:2], dtype=dtype, device=tokens.device),
                      return_dict=False)[0]
    return -out[..., :height, :width]
