"""Qwen-Image (and Qwen-Image Edit) model calls: diffusers' QwenImageTransformer2DModel blocks with ComfyUI's inputs.

ComfyUI's comfy/ldm/qwen_image/model.py is the specification:
* the latent [N, 16, H, W] is padded to even sides (circular), cut into 2x2 patches and packed to [N, H/2·W/2, 64]
  (channel-major inside a patch); the output tokens are unpacked the same way and cropped back;
* the timestep reaches the network as σ (multiplier 1; the timestep projection scales it by 1000 itself, in
  ComfyUI and in diffusers alike);
* the text context is used whole, with no attention mask (ComfyUI drops an all-ones mask and never pads);
* rotary positions: image tokens (frame index, row − h//2, column − w//2) over the patch grid, text tokens at
  max(h//2, w//2) + i on all three axes. diffusers centres odd grids one step lower and starts the text after
  the largest image including references; ComfyUI's positions are used here, so the blocks are driven directly
  with rotary tables computed the ComfyUI way (identical to diffusers' for even grids without references);
* Edit's reference latents (options["reference_latents"], raw VAE latents) are brought into the model's space
  and appended as extra image tokens, at frame index 1, 2, ... ("index" method) or beside the image ("offset");
  their outputs are dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from . import convert, dit_calls
from .latent_formats import WAN21_LATENT

PATCH = 2
ROPE_THETA = 10000.0
REFERENCE_PREFIX = "reference_latent_"
REFERENCE_METHOD = "reference_method_index"  # 1.0: "index" (ComfyUI's default), 0.0: "offset"


def conditioning(options: dict[str, Any], latent_shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
    """Each reference latent (in the model's normalised space) under its own key; chunks with different
    references never share a call (their keys or shapes differ)."""
    references = options.get("reference_latents") or []
    extra: dict[str, torch.Tensor] = {}
    for index, latent in enumerate(references):
        if latent.ndim == 5:  # a video-shaped [B, C, 1, h, w] latent from ComfyUI-style nodes
            latent = latent[:, :, 0]
        extra[f"{REFERENCE_PREFIX}{index}"] = WAN21_LATENT.process_in(latent.to(device=device, dtype=torch.float32))
    if references:
        method = options.get("reference_latents_method", "index")
        extra[REFERENCE_METHOD] = torch.tensor([[1.0 if method == "index" else 0.0]], device=device)
    return extra


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] (even H, W) -> [N, H/2·W/2, C·4] tokens, as ComfyUI's process_img and diffusers' _pack_latents."""
    n, c, h, w = latent.shape
    tokens = latent.view(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(n, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of pack for a padded latent of size height x width."""
    n = tokens.shape[0]
    grid = tokens.view(n, height // PATCH, width // PATCH, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(n, channels, height, width)


def _pad(latent: torch.Tensor) -> torch.Tensor:
    return dit_calls.pad_to_patch(latent, PATCH)


def image_positions(height: int, width: int, index: int = 0, h_offset: int = 0, w_offset: int = 0) -> torch.Tensor:
    """ComfyUI's ids of a latent height x width (before padding): [rows·cols, 3] (frame, row, column)."""
    rows, cols = (height + PATCH // 2) // PATCH, (width + PATCH // 2) // PATCH
    h_offset, w_offset = (h_offset + PATCH // 2) // PATCH, (w_offset + PATCH // 2) // PATCH
    row = torch.arange(rows, dtype=torch.float64) + h_offset - rows // 2
    col = torch.arange(cols, dtype=torch.float64) + w_offset - cols // 2
    ids = torch.zeros(rows, cols, 3, dtype=torch.float64)
    ids[..., 0] = index
    ids[..., 1] = row[:, None]
    ids[..., 2] = col[None, :]
    return ids.reshape(-1, 3)


def rotary_table(ids: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Complex rotations [S, Σaxes/2] for positions ids [S, len(axes)] (θ = 10000 per axis, as ComfyUI's rope)."""
    parts = []
    for axis, dim in enumerate(axes):
        omega = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = (ids[:, axis:axis + 1] * omega[None, :]).to(torch.float32)
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=1)


def _reference_tokens(references: list[torch.Tensor], by_index: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Packed tokens and positions of the reference latents, placed as ComfyUI places them."""
    tokens, positions = [], []
    h = w = 0
    index = 0
    for reference in references:
        if by_index:
            index, h_offset, w_offset = index + 1, 0, 0
        else:  # "offset": beside the previous references, along the shorter extent
            index, h_offset, w_offset = 1, 0, 0
            if reference.shape[-2] + h > reference.shape[-1] + w:
                w_offset = w
            else:
                h_offset = h
            h = max(h, reference.shape[-2] + h_offset)
            w = max(w, reference.shape[-1] + w_offset)
        tokens.append(pack(_pad(reference)))
        positions.append(image_positions(reference.shape[-2], reference.shape[-1], index, h_offset, w_offset))
    return tokens, positions


def forward(network: torch.nn.Module, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            extra: dict[str, torch.Tensor], transformer_options: dict[str, Any]) -> torch.Tensor:
    height, width = x_in.shape[-2:]
    padded = _pad(x_in)
    dtype = x_in.dtype
    image = pack(padded)
    image_count = image.shape[1]
    positions = [image_positions(height, width)]
    references = [extra[key].to(dtype) for key in sorted(
        (k for k in extra if k.startswith(REFERENCE_PREFIX)), key=lambda k: int(k[len(REFERENCE_PREFIX):]))]
    if references:
        by_index = bool(extra[REFERENCE_METHOD].reshape(-1)[0] > 0.5)
        ref_tokens, ref_positions = _reference_tokens(references, by_index)
        image = torch.cat([image, *ref_tokens], dim=1)
        positions += ref_positions

    rows, cols = (height + PATCH // 2) // PATCH, (width + PATCH // 2) // PATCH
    text_start = max(rows // 2, cols // 2)
    text_ids = (torch.arange(context.shape[1], dtype=torch.float64) + text_start)[:, None].repeat(1, 3)
    axes = tuple(int(a) for a in convert.diffusers_config(network).axes_dims_rope)
    rotary = (rotary_table(torch.cat(positions), axes).to(x_in.device),
              rotary_table(text_ids, axes).to(x_in.device))

    with dit_calls.block_patches(network, transformer_options):
        out = _run_blocks(network, image, context.to(dtype), timestep, rotary, transformer_options, x_in)
    out = out[:, :image_count]
    channels = out.shape[-1] // (PATCH * PATCH)
    return unpack(out, channels, padded.shape[-2], padded.shape[-1])[..., :height, :width]


def _run_blocks(network: Any, image: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor], transformer_options: dict[str, Any],
                latent: torch.Tensor) -> torch.Tensor:
    """The network's forward with our rotary tables, and ComfyUI's "dit" double-block replace / patch hooks."""
    hidden = network.img_in(image)
    text = network.txt_in(network.txt_norm(text))
    temb = network.time_text_embed(timestep.to(hidden.dtype), hidden)
    replace = transformer_options.get("patches_replace", {}).get("dit", {})
    after_block = transformer_options.get("patches", {}).get("double_block", ())
    for index, block in enumerate(network.transformer_blocks):
        if ("double_block", index) in replace:
            def original(args: dict[str, Any], block: torch.nn.Module = block) -> dict[str, torch.Tensor]:
                txt, img = block(hidden_states=args["img"], encoder_hidden_states=args["txt"],
                                 encoder_hidden_states_mask=None, temb=args["vec"], image_rotary_emb=args["pe"])
                return {"txt": txt, "img": img}

            result = replace[("double_block", index)](
                {"img": hidden, "txt": text, "vec": temb, "pe": rotary, "transformer_options": transformer_options},
                {"original_block": original})
            hidden, text = result["img"], result["txt"]
        else:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                                 temb=temb, image_rotary_emb=rotary)
        for patch in after_block:
            result = patch({"img": hidden, "txt": text, "x": latent, "block_index": index,
                            "transformer_options": transformer_options})
            hidden, text = result["img"], result["txt"]
    return network.proj_out(network.norm_out(hidden, temb))
