"""AuraFlow model calls: diffusers' AuraFlowTransformer2DModel with ComfyUI's inputs.

ComfyUI's AuraFlow (comfy/ldm/aura/mmdit.py) takes the latent, the timestep σ (ModelSamplingAuraFlow: FLOW with
multiplier 1; the network embeds 1000·t, as diffusers' does) and the Pile-T5 context; no pooled vector. The latent
is padded to 2x2 patches (circular). Its learned positional table (a side × side grid) is cropped around the
centre at offset (side − h) // 2 for an h-token side, and bilinearly enlarged first when the image has more tokens
a side than the table. diffusers crops at side // 2 − h // 2 and never enlarges: the same for even token counts
within the table; otherwise ComfyUI's positions replace the patch embedder's output for the call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import dit_calls


def conditioning(options: dict[str, Any], latent_shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
    return {}


def comfy_positions(table: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """ComfyUI's positional embeddings [1, rows·columns, D] from the learned table [1, side², D]."""
    side = round(math.sqrt(table.shape[1]))
    grid = table.reshape(1, side, side, -1)
    if max(rows, columns) > side:
        side = max(rows, columns)
        grid = F.interpolate(grid.movedim(-1, 1), (side, side), mode="bilinear").movedim(1, -1)
    top, left = (side - rows) // 2, (side - columns) // 2
    return grid[:, top:top + rows, left:left + columns].reshape(1, rows * columns, -1)


def _diffusers_positions_agree(side: int, rows: int, columns: int) -> bool:
    return all(n <= side and side // 2 - n // 2 == (side - n) // 2 for n in (rows, columns))


@contextlib.contextmanager
def _comfy_positions(network: torch.nn.Module, rows: int, columns: int) -> Iterator[None]:
    embedder: Any = network.get_submodule("pos_embed")
    table = embedder.pos_embed
    if _diffusers_positions_agree(round(math.sqrt(table.shape[1])), rows, columns):
        yield
        return
    patch = embedder.patch_size

    def with_comfy_positions(module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        latent = inputs[0]
        n, c = latent.shape[:2]
        tokens = latent.reshape(n, c, rows, patch, columns, patch).permute(0, 2, 4, 1, 3, 5)
        projected = module.proj(tokens.reshape(n, rows * columns, c * patch * patch))
        return projected + comfy_positions(module.pos_embed, rows, columns).to(projected.dtype)

    handle = embedder.register_forward_hook(with_comfy_positions)
    try:
        yield
    finally:
        handle.remove()


def forward(network: torch.nn.Module, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            extra: dict[str, torch.Tensor], transformer_options: dict[str, Any]) -> torch.Tensor:
    patch = int(cast(Any, network).config.patch_size)
    height, width = x_in.shape[-2:]
    x_in = dit_calls.pad_to_patch(x_in, patch)
    rows, columns = x_in.shape[-2] // patch, x_in.shape[-1] // patch
    dtype = x_in.dtype
    with dit_calls.block_patches(network, transformer_options), _comfy_positions(network, rows, columns):
        out = network(hidden_states=x_in, encoder_hidden_states=context.to(dtype), timestep=timestep.to(dtype),
                      return_dict=False)[0]
    return out[..., :height, :width]
