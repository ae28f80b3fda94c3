"""A conditioning's attention mask on Flux (StyleModelApply's attn_bias strength for Redux tokens).

StyleModelApply keeps options["attention_mask"]: an additive bias [B, q, k] over the text tokens followed by
`attention_mask_img_shape` (rows × cols, (1, 1) by default) image positions. ComfyUI's Flux.extra_conds resizes the
image part to the call's token grid (ceil(H / 2) × ceil(W / 2)): each image axis of the mask bilinearly, as
comfy.utils.upscale_dit_mask does, and the network adds it in every attention of every double and single block
(joint sequence: text then image tokens — diffusers' order too, where it is the blocks' `attention_mask`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PATCH = 2


def _resize_grid(values: torch.Tensor, size_in: tuple[int, int], size_out: tuple[int, int]) -> torch.Tensor:
    """[b, n, hi·wi] -> [b, n, ho·wo]: the last axis seen as an image, resized bilinearly."""
    b, n, _ = values.shape
    grid = values.reshape(b, n, *size_in)
    return F.interpolate(grid, size=size_out, mode="bilinear").reshape(b, n, size_out[0] * size_out[1])


def upscale_mask(mask: torch.Tensor, size_in: tuple[int, int], size_out: tuple[int, int]) -> torch.Tensor:
    """[b, t + hi·wi, t + hi·wi] -> [b, t + ho·wo, t + ho·wo] (the text quadrant unchanged)."""
    if tuple(size_in) == tuple(size_out):
        return mask
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"attention_mask has shape {list(mask.shape)}; expected [batch, queries, keys]")
    text = mask.shape[1] - size_in[0] * size_in[1]
    txt_txt, txt_img = mask[:, :text, :text], mask[:, :text, text:]
    img_txt, img_img = mask[:, text:, :text], mask[:, text:, text:]
    txt_img = _resize_grid(txt_img, size_in, size_out)
    img_txt = _resize_grid(img_txt.transpose(1, 2), size_in, size_out).transpose(1, 2)
    img_img = _resize_grid(img_img, size_in, size_out)  # keys
    img_img = _resize_grid(img_img.transpose(1, 2), size_in, size_out).transpose(1, 2)  # then queries
    return torch.cat([torch.cat([txt_txt, txt_img], dim=2), torch.cat([img_txt, img_img], dim=2)], dim=1)


def mask_for_call(options: dict, latent_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """The entry's attention bias [B, L, L] (float32) for latents of `latent_shape`, or None."""
    mask = options.get("attention_mask")
    if mask is None:
        return None
    size_in = tuple(options.get("attention_mask_img_shape", (1, 1)))
    tokens = (math.ceil(latent_shape[-2] / PATCH), math.ceil(latent_shape[-1] / PATCH))
    mask = mask.to(device)
    if mask.dtype == torch.bool:  # a boolean mask: allowed (0) or not (−inf)
        mask = torch.log(mask.float())
    return upscale_mask(mask.float(), size_in, tokens)


def call_arguments(extra: dict[str, torch.Tensor], rows: list[int], tokens: int, dtype: torch.dtype) \
        -> dict[str, object]:
    """The network's joint_attention_kwargs for batch rows `rows` ({} without a mask); `tokens` = text + image."""
    mask = extra.get("attention_mask")
    if mask is None:
        return {}
    if mask.shape[-1] != tokens:
        raise ValueError(f"the conditioning's attention mask covers {mask.shape[-1]} tokens, the Flux call has "
                         f"{tokens} (reference latents or another latent size than the mask was made for)")
    return {"joint_attention_kwargs": {"attention_mask": mask[rows][:, None].to(dtype)}}
