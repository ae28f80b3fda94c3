"""Flux (dev, schnell, Kontext) model calls: diffusers' FluxTransformer2DModel with ComfyUI's inputs.

ComfyUI's Flux (comfy/ldm/flux/model.py) pads the latent to even sizes (circular), packs 2×2 patches into tokens
("b c (h ph) (w pw) -> b (h w) (c ph pw)"), gives image tokens the position ids (0, row, col) and text tokens
zeros, and reads the timestep σ and the guidance scaled by 1000 (time_factor) — diffusers multiplies both by 1000
inside the transformer, so σ goes in as it is (ModelSamplingFlux's multiplier is 1). `y` is CLIP-L's pooled output
(pooled_projections). Guidance comes from FluxGuidance (options["guidance"], 3.5 when absent, None from
FluxDisableGuidance: no guidance embedding at all); schnell has no guidance embedder and ignores it.

Kontext / edit reference latents (ReferenceLatent, options["reference_latents"]) are processed into the model's
latent space, packed, and appended to the image tokens with their own ids — index 1 at (row, col) offsets that
place them beside each other ("offset", the default), index 1, 2, ... ("index"), or index 0 past the image
("uxo"; FluxKontextMultiReferenceLatentMethod) — and their output tokens are dropped. They are packed here in
`conditioning` ("reference_tokens" [B, L, 64] + "reference_ids" [1, L, 3]), so entries with the same reference
sizes batch together; the ids of every batch row must agree for one call (diffusers takes one set of ids), so
rows with different ids run one call each.

Flux Fill / Depth / Canny read extra input channels (the masked picture's latent, the mask folded into 64
channels): nodes.diffusion.flux_fill. A conditioning's attention mask (StyleModelApply's attn_bias for Redux
tokens) is resized to the call's tokens by nodes.diffusion.flux_attention_mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from . import dit_calls, flux_attention_mask, flux_fill
from .latent_formats import FLUX_LATENT

PATCH = 2
DEFAULT_GUIDANCE = 3.5  # ComfyUI's Flux extra_conds when no FluxGuidance set one
POOLED_WIDTH = 768      # CLIP-L; zeros when a conditioning has no pooled output
REFERENCE_METHODS = ("offset", "index", "uxo")


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (H, W even) -> [B, H/2·W/2, C·4] tokens."""
    b, c, h, w = latent.shape
    tokens = latent.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B, rows·cols, C·4] -> [B, C, 2·rows, 2·cols] (the inverse of `pack`)."""
    b, _, width = tokens.shape
    c = width // (PATCH * PATCH)
    latent = tokens.reshape(b, rows, cols, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return latent.reshape(b, c, rows * PATCH, cols * PATCH)


def pad_to_patches(latent: torch.Tensor) -> torch.Tensor:
    return dit_calls.pad_to_patch(latent, PATCH)


def position_ids(height: int, width: int, index: int = 0, row_offset: int = 0, col_offset: int = 0) \
        -> torch.Tensor:
    """[rows·cols, 3] ids (index, row, col) of a latent's tokens; offsets in latent cells, as ComfyUI rounds them."""
    rows, cols = (height + PATCH // 2) // PATCH, (width + PATCH // 2) // PATCH
    row_offset, col_offset = (row_offset + PATCH // 2) // PATCH, (col_offset + PATCH // 2) // PATCH
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None] + row_offset
    ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :] + col_offset
    return ids.reshape(rows * cols, 3)


def reference_inputs(references: list[torch.Tensor], method: str, latent_shape: torch.Size) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, L, 64], ids [L, 3]) of raw reference latents, placed as ComfyUI's Flux._forward places them."""
    if method not in REFERENCE_METHODS:
        raise ValueError(f"unknown reference_latents_method {method!r}; known: {', '.join(REFERENCE_METHODS)}")
    rows = (latent_shape[-2] + PATCH // 2) // PATCH
    cols = (latent_shape[-1] + PATCH // 2) // PATCH
    tokens, ids = [], []
    used_h = used_w = index = 0
    for reference in references:
        ref_h, ref_w = reference.shape[-2:]
        row_offset = col_offset = 0
        if method == "index":
            index += 1
        elif method == "uxo":
            index = 0
            row_offset, col_offset = rows * PATCH + used_h, cols * PATCH + used_w
            used_h, used_w = used_h + ref_h, used_w + ref_w
        else:  # offset: the next reference goes below or to the right of those placed so far
            index = 1
            if ref_h + used_h > ref_w + used_w:
                col_offset = used_w
            else:
                row_offset = used_h
            used_h, used_w = max(used_h, ref_h + row_offset), max(used_w, ref_w + col_offset)
        tokens.append(pack(pad_to_patches(FLUX_LATENT.process_in(reference.float()))))
        ids.append(position_ids(ref_h, ref_w, index, row_offset, col_offset))
    batch = max(t.shape[0] for t in tokens)
    tokens = [t.repeat(-(-batch // t.shape[0]), 1, 1)[:batch] for t in tokens]
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)


def conditioning(options: dict[str, Any], latent_shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
    pooled = options.get("pooled_output")
    if pooled is None:
        pooled = torch.zeros((1, POOLED_WIDTH))
    extra = {"pooled_projections": pooled.to(device=device, dtype=torch.float32).reshape(pooled.shape[0], -1)}
    guidance = options.get("guidance", DEFAULT_GUIDANCE)
    if guidance is not None:  # absent key = FluxDisableGuidance: those entries never share a call with guided ones
        extra["guidance"] = torch.tensor([float(guidance)], device=device)
    references = options.get("reference_latents")
    if references:
        method = options.get("reference_latents_method") or "offset"
        tokens, ids = reference_inputs(list(references), method, latent_shape)
        extra["reference_tokens"] = tokens.to(device)
        extra["reference_ids"] = ids[None].to(device)
    extra.update(flux_fill.conditioning_inputs(options, latent_shape, device))  # Fill / Depth / Canny inputs
    mask = flux_attention_mask.mask_for_call(options, latent_shape, device)  # StyleModelApply's attn_bias
    if mask is not None:
        extra["attention_mask"] = mask
    return extra


@contextlib.contextmanager
def _without_guidance_embedding(network: Any) -> Iterator[None]:
    """ComfyUI skips the guidance embedding when the guidance is None; diffusers always adds it on guidance models,
    so its output is zeroed for the call (the sum then equals the skipped term). `network` is diffusers'
    FluxTransformer2DModel (Any: its submodules are read by name)."""
    embedder = network.time_text_embed.guidance_embedder
    handle = embedder.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        yield
    finally:
        handle.remove()


ACCEPTS_CONTROL = True  # ControlNet residuals (nodes.diffusion.dit_controlnet), one per double / single block


def forward(network: torch.nn.Module, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            extra: dict[str, torch.Tensor], transformer_options: dict[str, Any],
            control: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
    height, width = x_in.shape[-2:]
    dtype = x_in.dtype
    concat = flux_fill.channels(network, extra, x_in)  # Fill / Depth / Canny: picture (+ mask) channels
    padded = pad_to_patches(x_in if concat is None else torch.cat([x_in, concat], dim=1))
    rows, cols = padded.shape[-2] // PATCH, padded.shape[-1] // PATCH
    hidden = pack(padded)
    image_tokens = hidden.shape[1]
    ids = position_ids(height, width).to(x_in.device)
    reference_ids = extra.get("reference_ids")
    if reference_ids is not None:
        hidden = torch.cat([hidden, extra["reference_tokens"].to(hidden)], dim=1)
    guided = bool(getattr(network.config, "guidance_embeds", False))
    guidance = extra.get("guidance") if guided else None  # schnell has no guidance embedder: ignored
    skip_guidance = guided and guidance is None
    if skip_guidance:
        guidance = torch.zeros(x_in.shape[0], device=x_in.device)
    arguments = dict(encoder_hidden_states=context.to(dtype), pooled_projections=extra["pooled_projections"].to(dtype),
                     timestep=timestep.to(dtype), txt_ids=torch.zeros(context.shape[1], 3, device=x_in.device))
    rows_out = []
    # One call per group of batch rows that share reference ids (normally the whole batch).
    for group in _rows_sharing_ids(reference_ids, x_in.shape[0]):
        call_ids = ids if reference_ids is None else torch.cat([ids, reference_ids[group[0]].to(ids)], dim=0)
        picked = {key: value[group] for key, value in arguments.items() if key != "txt_ids"}
        with contextlib.ExitStack() as stack:
            stack.enter_context(dit_calls.block_patches(network, transformer_options))
            if skip_guidance:
                stack.enter_context(_without_guidance_embedding(network))
            out = network(hidden_states=hidden[group], img_ids=call_ids, txt_ids=arguments["txt_ids"],
                          guidance=None if guidance is None else guidance[group].to(dtype), return_dict=False,
                          **picked, **_control_arguments(control, group, hidden.shape[1], dtype),
                          **flux_attention_mask.call_arguments(extra, group, context.shape[1] + hidden.shape[1],
                                                               dtype))[0]
        rows_out.append((group, out[:, :image_tokens]))
    out = rows_out[0][1] if len(rows_out) == 1 else _reassemble(rows_out, x_in.shape[0])
    return unpack(out, rows, cols)[..., :height, :width]


def _control_arguments(control: dict[str, list[torch.Tensor]] | None, group: list[int], tokens: int,
                       dtype: torch.dtype) -> dict[str, Any]:
    """A ControlNet's residuals for the rows of `group`; ComfyUI adds them to the image tokens only, so
    reference tokens get zeros."""
    if control is None:
        return {}

    def rows(samples: list[torch.Tensor]) -> list[torch.Tensor] | None:
        picked = [F.pad(s[group], (0, 0, 0, tokens - s.shape[1])).to(dtype) for s in samples]
        return picked or None

    return {"controlnet_block_samples": rows(control["input"]),
            "controlnet_single_block_samples": rows(control["output"])}


def _rows_sharing_ids(reference_ids: torch.Tensor | None, batch: int) -> list[list[int]]:
    if reference_ids is None or reference_ids.shape[0] == 1:
        return [list(range(batch))]
    groups: list[list[int]] = []
    for row in range(batch):
        for group in groups:
            if torch.equal(reference_ids[group[0]], reference_ids[row]):
                group.append(row)
                break
        else:
            groups.append([row])
    return groups


def _reassemble(parts: list[tuple[list[int], torch.Tensor]], batch: int) -> torch.Tensor:
    first = parts[0][1]
    out = first.new_empty((batch, *first.shape[1:]))
    for rows, values in parts:
        out[rows] = values
    return out
