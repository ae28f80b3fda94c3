"""Qwen-Image nodes with ComfyUI's names and signatures: TextEncodeQwenImageEdit and TextEncodeQwenImageEditPlus
(comfy_extras/nodes_qwen.py), ModelMergeQwenImage (nodes_model_merging_model_specific.py).

The model call is nodes.diffusion.dit_qwen_image, the text encoder nodes.diffusion.qwen_text (its vision tower
nodes.diffusion.qwen_vision), the VAE nodes.diffusion.wan_vae. As ComfyUI's Edit nodes:
* TextEncodeQwenImageEdit: the image is area-resized to about 1024x1024 pixels (sides rounded, aspect kept); it
  goes to the vision tower (the edit template with one picture) and, with a vae, its latent is appended to the
  conditioning's reference_latents. Without an image: the plain text template.
* TextEncodeQwenImageEditPlus: each given image is area-resized to about 384x384 for the vision tower ("Picture N:"
  before the prompt, N its input's number) and, with a vae, to about 1024x1024 in multiples of 8 for its reference
  latent; the edit template always.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, IMAGE, VAE, Output, Socket, String

from .conditioning import _encode
from .diffusion.qwen_text import EDIT_TEMPLATE, NO_VISION_TOWER, PICTURE_PROMPT
from .diffusion.resize import common_upscale
from .merging import TransformerBlockMerge, block_merge_node

PROMPT = String(multiline=True, dynamicPrompts=True)


EDIT_AREA = 1024 * 1024    # pixels of the image TextEncodeQwenImageEdit encodes (vision and reference latent)
PLUS_VISION_AREA = 384 * 384
PLUS_REFERENCE_AREA = 1024 * 1024


def _qwen_clip(clip: Any, images: dict[str, Any]) -> Any:
    if getattr(clip, "family", None) != "qwen_image":
        raise InputError("clip", "is not a Qwen-Image text encoder (CLIPLoader type qwen_image)")
    for name, image in images.items():
        if not (isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[-1] >= 3
                and image.shape[1] > 0 and image.shape[2] > 0):
            raise InputError(name, f"is not an IMAGE [batch, height, width, 3] (got {_describe(image)})")
        if not clip.has_vision:
            raise InputError(name, NO_VISION_TOWER)
    return clip


def _describe(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _scaled(image: torch.Tensor, area: int, multiple: int | None = None) -> torch.Tensor:
    """ComfyUI's resize to about `area` pixels, aspect kept ("area" filter): sides rounded, or rounded to
    multiples of `multiple`."""
    height, width = image.shape[1], image.shape[2]
    scale = math.sqrt(area / (width * height))
    if multiple is None:
        new_width, new_height = round(width * scale), round(height * scale)
    else:
        new_width = round(width * scale / multiple) * multiple
        new_height = round(height * scale / multiple) * multiple
    return common_upscale(image.movedim(-1, 1), new_width, new_height, "area", "disabled").movedim(1, -1)


def _reference_latent(ctx: RunContext, vae: Any, image: torch.Tensor) -> torch.Tensor:
    try:
        return vae.encode(image[..., :3], manager=ctx.models)
    except (AttributeError, ValueError) as error:
        raise InputError("vae", f"could not encode the image: {error}") from error


def _with_references(conditioning: list, references: list[torch.Tensor]) -> list:
    if not references:
        return conditioning
    return [[cond, {**options, "reference_latents": list(options.get("reference_latents") or []) + references}]
            for cond, options in conditioning]


class TextEncodeQwenImageEdit(Node):
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)
    clip: Annotated[Any, Socket(CLIP)]
    prompt: Annotated[str, PROMPT]
    vae: Annotated[Any, Socket(VAE, optional=True)] = None
    image: Annotated[Any, Socket(IMAGE, optional=True)] = None

    def run(self, ctx: RunContext):
        clip = _qwen_clip(self.clip, {} if self.image is None else {"image": self.image})
        images, references = [], []
        if self.image is not None:
            image = _scaled(self.image, EDIT_AREA)[..., :3]
            images.append(image)
            if self.vae is not None:
                references.append(_reference_latent(ctx, self.vae, image))
        tokens = clip.tokenize(self.prompt, images=images)
        return (_with_references(_encode(ctx, clip, tokens), references),)


class TextEncodeQwenImageEditPlus(Node):
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)
    clip: Annotated[Any, Socket(CLIP)]
    prompt: Annotated[str, PROMPT]
    vae: Annotated[Any, Socket(VAE, optional=True)] = None
    image1: Annotated[Any, Socket(IMAGE, optional=True)] = None
    image2: Annotated[Any, Socket(IMAGE, optional=True)] = None
    image3: Annotated[Any, Socket(IMAGE, optional=True)] = None

    def run(self, ctx: RunContext):
        given = {name: image for name in ("image1", "image2", "image3")
                 if (image := getattr(self, name)) is not None}
        clip = _qwen_clip(self.clip, given)
        pictures, images, references = "", [], []
        for number, name in enumerate(("image1", "image2", "image3"), start=1):
            if name not in given:
                continue
            images.append(_scaled(given[name], PLUS_VISION_AREA))
            if self.vae is not None:
                references.append(_reference_latent(ctx, self.vae, _scaled(given[name], PLUS_REFERENCE_AREA, 8)))
            pictures += PICTURE_PROMPT.format(number)
        # ComfyUI always uses the edit template here, with or without pictures.
        tokens = clip.tokenize(pictures + self.prompt, images=images, llama_template=EDIT_TEMPLATE)
        return (_with_references(_encode(ctx, clip, tokens), references),)


class _QwenImageBlockMerge(TransformerBlockMerge):
    """ComfyUI's names are diffusers' own, so the prefixes match the parameters directly (`pos_embeds.` has no
    weights: the rotary tables are computed)."""

    family = "qwen_image"
    family_label = "Qwen-Image"


QWEN_IMAGE_PREFIXES = (["pos_embeds.", "img_in.", "txt_norm.", "txt_in.", "time_text_embed."]
                       + [f"transformer_blocks.{i}." for i in range(60)] + ["proj_out."])


ModelMergeQwenImage = block_merge_node("ModelMergeQwenImage", QWEN_IMAGE_PREFIXES, _QwenImageBlockMerge, __name__)


NODES = [TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus, ModelMergeQwenImage]
