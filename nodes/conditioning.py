"""Text encoding and conditioning nodes, with ComfyUI's class names, inputs and semantics.

CONDITIONING is a list of [cond tensor [1, 77k, D], options dict] pairs. Nodes never change the lists or dicts
they receive: each returns new pairs with copied option dicts (the tensors themselves are shared, read-only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Annotated, Any, Protocol

import torch
import torch.nn.functional as F

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import (
    CLIP,
    CONDITIONING,
    IMAGE,
    LATENT,
    MASK,
    VAE,
    Boolean,
    Combo,
    Float,
    Int,
    Output,
    Socket,
    String,
)
from latentloom.nodes.diffusion import hooks as hook_api
from latentloom.nodes.diffusion.clip import ClipModel, pad_token_chunks
from latentloom.nodes.diffusion.embeddings import EmbeddingLibrary
from latentloom.nodes.diffusion.vae import VAEModel, crop_to_multiple
from latentloom.nodes.vae_nodes import inpaint_inputs

MAX_RESOLUTION = 16384

Conditioning = list[list[Any]]


class PromptClip(Protocol):
    """What prompt encoding reads of a CLIP link: ClipModel, FamilyClip and the other families' clips all fit."""

    @property
    def options(self) -> Mapping[str, Any]: ...

    def tokenize(self, text: str, resolve_embedding: Any = None, warn: Any = None) -> dict[str, Any]: ...

    def encode_tokens(self, tokens: Any, manager: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def _encode(ctx: RunContext, clip: PromptClip, tokens: dict, extra: dict[str, Any] | None = None) -> Conditioning:
    hooks = clip.options.get(hook_api.CONDITIONING_HOOKS)  # SetClipHooks(apply_to_conds=True)
    marks = {"hooks": hooks} if hooks is not None else {}
    result = []
    for variant, values in hook_api.clip_encodes(clip):  # several only for a scheduled SetClipHooks
        encoded = variant.encode_tokens(tokens, manager=ctx.models)
        cond, pooled = encoded
        more = getattr(encoded, "options", {})  # e.g. HiDream's Llama states (nodes.diffusion.hidream_text)
        result.append([cond, {"pooled_output": pooled, **more, **values, **marks, **(extra or {})}])
    return result


def _tokenize(ctx: RunContext, clip: PromptClip, text: str) -> dict:
    # Without an embedding library, "embedding:NAME" is encoded as plain text.
    return clip.tokenize(text, resolve_embedding=ctx.find_service(EmbeddingLibrary), warn=ctx.warn)


def set_values(conditioning: Conditioning, values: dict[str, Any]) -> Conditioning:
    """Each pair with `values` merged into a copy of its options."""
    return [[cond, {**options, **values}] for cond, options in conditioning]


PROMPT = String(multiline=True, dynamicPrompts=True, tooltip="The text to encode.")


class CLIPTextEncode(Node):
    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    description = "Encodes a text prompt with a CLIP model into conditioning that guides the diffusion model."
    outputs = (Output(CONDITIONING, tooltip="The encoded text, used to guide the diffusion model."),)

    text: Annotated[str, PROMPT]
    clip: Annotated[Any, Socket(CLIP, tooltip="The CLIP model used for encoding the text.")]

    def run(self, ctx: RunContext):
        return (_encode(ctx, self.clip, _tokenize(ctx, self.clip, self.text)),)


class CLIPSetLastLayer(Node):
    display_name = "CLIP Set Last Layer"
    category = "conditioning"
    outputs = (Output(CLIP),)

    clip: Annotated[Any, Socket(CLIP)]
    stop_at_clip_layer: Annotated[int, Int(min=-24, max=-1, step=1)] = -1

    def run(self, ctx: RunContext):
        return (self.clip.clone_with_layer(self.stop_at_clip_layer),)


class CLIPTextEncodeSDXL(Node):
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)

    clip: Annotated[Any, Socket(CLIP)]
    width: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 1024
    height: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 1024
    crop_w: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 0
    crop_h: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 0
    target_width: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 1024
    target_height: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 1024
    text_g: Annotated[str, String(multiline=True, dynamicPrompts=True)]
    text_l: Annotated[str, String(multiline=True, dynamicPrompts=True)]

    def run(self, ctx: RunContext):
        clip: ClipModel = self.clip
        if set(clip.roles) != {"l", "g"}:
            raise InputError("clip", f"must be an SDXL CLIP (clip_l + clip_g), got a {clip.family} one")
        tokens = _tokenize(ctx, clip, self.text_g)
        tokens["l"] = _tokenize(ctx, clip, self.text_l)["l"]
        # Different prompts can chunk differently; the shorter side is filled with empty-prompt chunks.
        tokens = pad_token_chunks(tokens, clip.empty_tokens())
        extra = {"width": self.width, "height": self.height, "crop_w": self.crop_w, "crop_h": self.crop_h,
                 "target_width": self.target_width, "target_height": self.target_height}
        return (_encode(ctx, clip, tokens, extra),)


class CLIPTextEncodeSDXLRefiner(Node):
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)

    ascore: Annotated[float, Float(min=0.0, max=1000.0, step=0.01)] = 6.0
    width: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 1024
    height: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 1024
    text: Annotated[str, String(multiline=True, dynamicPrompts=True)]
    clip: Annotated[Any, Socket(CLIP)]

    def run(self, ctx: RunContext):
        clip: ClipModel = self.clip
        extra = {"aesthetic_score": self.ascore, "width": self.width, "height": self.height}
        return (_encode(ctx, clip, _tokenize(ctx, clip, self.text), extra),)


class ConditioningCombine(Node):
    display_name = "Conditioning (Combine)"
    category = "conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning_1: Annotated[Any, Socket(CONDITIONING)]
    conditioning_2: Annotated[Any, Socket(CONDITIONING)]

    def run(self, ctx: RunContext):
        return (list(self.conditioning_1) + list(self.conditioning_2),)


def _first_of(ctx: RunContext, conditioning_from: Conditioning) -> tuple[torch.Tensor, Any]:
    if not conditioning_from:
        raise InputError("conditioning_from", "is empty")
    if len(conditioning_from) > 1:
        ctx.warn("conditioning_from contains more than one entry; only the first is used")
    cond, options = conditioning_from[0]
    return cond, options.get("pooled_output")


class ConditioningAverage(Node):
    # ComfyUI 0.3.64 lists this node under its class name (its display-name mapping has a typo in the key).
    display_name = "ConditioningAverage"
    category = "conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning_to: Annotated[Any, Socket(CONDITIONING)]
    conditioning_from: Annotated[Any, Socket(CONDITIONING)]
    conditioning_to_strength: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        cond_from, pooled_from = _first_of(ctx, self.conditioning_from)
        strength = self.conditioning_to_strength
        result = []
        for cond_to, options in self.conditioning_to:
            # `from` is cut or zero-padded to the length of `to` along the token axis.
            matched = cond_from[:, :cond_to.shape[1]]
            if matched.shape[1] < cond_to.shape[1]:
                padding = torch.zeros(1, cond_to.shape[1] - matched.shape[1], cond_to.shape[2],
                                      dtype=matched.dtype, device=matched.device)
                matched = torch.cat([matched, padding], dim=1)
            new_options = dict(options)
            pooled_to = options.get("pooled_output", pooled_from)
            if pooled_from is not None and pooled_to is not None:
                new_options["pooled_output"] = pooled_to * strength + pooled_from * (1.0 - strength)
            elif pooled_from is not None:
                new_options["pooled_output"] = pooled_from
            result.append([cond_to * strength + matched * (1.0 - strength), new_options])
        return (result,)


class ConditioningConcat(Node):
    display_name = "Conditioning (Concat)"
    category = "conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning_to: Annotated[Any, Socket(CONDITIONING)]
    conditioning_from: Annotated[Any, Socket(CONDITIONING)]

    def run(self, ctx: RunContext):
        cond_from, _ = _first_of(ctx, self.conditioning_from)
        return ([[torch.cat([cond_to, cond_from], dim=1), dict(options)]
                 for cond_to, options in self.conditioning_to],)


class ConditioningSetArea(Node):
    display_name = "Conditioning (Set Area)"
    category = "conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning: Annotated[Any, Socket(CONDITIONING)]
    width: Annotated[int, Int(min=64, max=MAX_RESOLUTION, step=8)] = 64
    height: Annotated[int, Int(min=64, max=MAX_RESOLUTION, step=8)] = 64
    x: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    y: Annotated[int, Int(min=0, max=MAX_RESOLUTION, step=8)] = 0
    strength: Annotated[float, Float(min=0.0, max=10.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        # The area is kept in latent cells (pixels // 8), ordered (height, width, y, x).
        area = (self.height // 8, self.width // 8, self.y // 8, self.x // 8)
        return (set_values(self.conditioning, {"area": area, "strength": self.strength,
                                               "set_area_to_bounds": False}),)


class ConditioningSetAreaPercentage(Node):
    display_name = "Conditioning (Set Area with Percentage)"
    category = "conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning: Annotated[Any, Socket(CONDITIONING)]
    width: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0
    height: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 1.0
    x: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.0
    y: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.0
    strength: Annotated[float, Float(min=0.0, max=10.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        area = ("percentage", self.height, self.width, self.y, self.x)
        return (set_values(self.conditioning, {"area": area, "strength": self.strength,
                                               "set_area_to_bounds": False}),)


class ConditioningSetAreaStrength(Node):
    category = "conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning: Annotated[Any, Socket(CONDITIONING)]
    strength: Annotated[float, Float(min=0.0, max=10.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        return (set_values(self.conditioning, {"strength": self.strength}),)


class ConditioningSetMask(Node):
    display_name = "Conditioning (Set Mask)"
    category = "conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning: Annotated[Any, Socket(CONDITIONING)]
    mask: Annotated[Any, Socket(MASK)]
    strength: Annotated[float, Float(min=0.0, max=10.0, step=0.01)] = 1.0
    set_cond_area: Annotated[str, Combo(("default", "mask bounds"))] = "default"

    def run(self, ctx: RunContext):
        mask = self.mask.reshape(-1, self.mask.shape[-2], self.mask.shape[-1])  # [H,W] / [B,1,H,W] -> [B,H,W]
        return (set_values(self.conditioning, {"mask": mask, "set_area_to_bounds": self.set_cond_area != "default",
                                               "mask_strength": self.strength}),)


class ConditioningZeroOut(Node):
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning: Annotated[Any, Socket(CONDITIONING)]

    def run(self, ctx: RunContext):
        result = []
        for cond, options in self.conditioning:
            new_options = dict(options)
            if new_options.get("pooled_output") is not None:
                new_options["pooled_output"] = torch.zeros_like(new_options["pooled_output"])
            result.append([torch.zeros_like(cond), new_options])
        return (result,)


class ConditioningSetTimestepRange(Node):
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)

    conditioning: Annotated[Any, Socket(CONDITIONING)]
    start: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.0
    end: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 1.0

    def run(self, ctx: RunContext):
        return (set_values(self.conditioning, {"start_percent": self.start, "end_percent": self.end}),)


class InpaintModelConditioning(Node):
    """Inputs for inpainting models (9-channel UNets): the masked picture's latent and the mask ride on both
    conditionings (`concat_latent_image`, `concat_mask`), which the sampler feeds to the UNet's extra channels.

    The mask is resized bilinearly to the picture and both are cropped (centred) to multiples of 8; the masked
    picture has round(mask) = 1 pixels set to 0.5 grey. The returned latent encodes the unmasked picture and,
    with `noise_mask`, carries the resized (unrounded) mask so sampling only changes the masked area.
    """

    display_name = "InpaintModelConditioning"
    category = "conditioning/inpaint"
    outputs = (Output(CONDITIONING, name="positive"), Output(CONDITIONING, name="negative"),
               Output(LATENT, name="latent"))

    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    vae: Annotated[Any, Socket(VAE)]
    pixels: Annotated[Any, Socket(IMAGE)]
    mask: Annotated[Any, Socket(MASK)]
    noise_mask: Annotated[bool, Boolean(tooltip="Add a noise mask to the latent so sampling only happens within "
                                                "the mask.")] = True

    def run(self, ctx: RunContext):
        vae: VAEModel = self.vae
        pixels, mask = self.pixels, self.mask
        mask_batch = mask.shape[0] if mask.ndim == 3 else 1
        if mask_batch not in (1, pixels.shape[0]):
            raise InputError("mask", f"has {mask_batch} masks for {pixels.shape[0]} images; give one mask or "
                                     f"one per image")
        masked_pixels, _ = inpaint_inputs(pixels, mask, grow_mask_by=0)
        pixel_mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                                   size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
        pixel_mask = crop_to_multiple(pixel_mask.movedim(1, -1)).movedim(-1, 1)  # [B, 1, H, W] like the pixels
        concat_latent = vae.encode(masked_pixels, manager=ctx.models, progress=ctx.progress)
        latent: dict[str, Any] = {"samples": vae.encode(pixels, manager=ctx.models, progress=ctx.progress)}
        if self.noise_mask:
            latent["noise_mask"] = pixel_mask
        values = {"concat_latent_image": concat_latent, "concat_mask": pixel_mask}
        return (set_values(self.positive, values), set_values(self.negative, values), latent)


class LotusConditioning(Node):
    """The fixed conditioning of Lotus (dense prediction on an SD2 UNet): Lotus runs its frozen text encoder on a
    null prompt, so the result is a constant, shipped as data (data/lotus_null_conditioning.json, provenance in
    data/LICENSE.md) instead of loading an 800 MB encoder to recompute it."""

    category = "conditioning/lotus"
    outputs = (Output(CONDITIONING, name="conditioning"),)

    def run(self, ctx: RunContext):
        return ([[lotus_null_embedding(), {}]],)


def lotus_null_embedding() -> torch.Tensor:
    """Lotus's null-prompt text embedding, [1, 2, 1024] float32 (the stored values are exact float16)."""
    text = resources.files("latentloom.nodes.diffusion.data").joinpath("lotus_null_conditioning.json").read_text()
    stored = json.loads(text)
    values = torch.tensor(stored["values"], dtype=torch.float16)
    return values.reshape(stored["shape"]).float()


NODES = [
    CLIPTextEncode, CLIPSetLastLayer, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner,
    ConditioningCombine, ConditioningAverage, ConditioningConcat,
    ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetAreaStrength, ConditioningSetMask,
    ConditioningZeroOut, ConditioningSetTimestepRange, InpaintModelConditioning, LotusConditioning,
]
