"""Qwen-Image nodes with ComfyUI's names and signatures: TextEncodeQwenImageEdit and TextEncodeQwenImageEditPlus
(comfy_extras/nodes_qwen.py), ModelMergeQwenImage (nodes_model_merging_model_specific.py).

The model call is nodes.diffusion.dit_qwen_image, the text encoder nodes.diffusion.qwen_text, the VAE
nodes.diffusion.wan_vae. The Edit nodes' text-only path works (no image: the prompt with the plain template, as
ComfyUI); their images need the Qwen2.5-VL vision tower, which is not built, so an image is refused clearly.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import create_model

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, IMAGE, VAE, Output, Socket, String

from .conditioning import _encode
from .diffusion import merge
from .diffusion.models import DiffusionModel
from .diffusion.qwen_text import EDIT_TEMPLATE, VISION_UNAVAILABLE
from .merging import RATIO, ModelSpecificMerge, report_merge

PROMPT = String(multiline=True, dynamicPrompts=True)


def _qwen_tokens(ctx: RunContext, clip: Any, prompt: str, template: str | None = None) -> dict:
    if getattr(clip, "family", None) != "qwen_image":
        raise InputError("clip", "is not a Qwen-Image text encoder (CLIPLoader type qwen_image)")
    return clip.tokenize(prompt, llama_template=template)


class TextEncodeQwenImageEdit(Node):
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)
    clip: Annotated[Any, Socket(CLIP)]
    prompt: Annotated[str, PROMPT]
    vae: Annotated[Any, Socket(VAE, optional=True)] = None
    image: Annotated[Any, Socket(IMAGE, optional=True)] = None

    def run(self, ctx: RunContext):
        if self.image is not None:
            raise InputError("image", VISION_UNAVAILABLE)
        return (_encode(ctx, self.clip, _qwen_tokens(ctx, self.clip, self.prompt)),)


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
        for name in ("image1", "image2", "image3"):
            if getattr(self, name) is not None:
                raise InputError(name, VISION_UNAVAILABLE)
        # ComfyUI always uses the edit template here, with or without pictures.
        return (_encode(ctx, self.clip, _qwen_tokens(ctx, self.clip, self.prompt, EDIT_TEMPLATE)),)


class _QwenImageBlockMerge(ModelSpecificMerge):
    """Block ratios on Qwen-Image transformers: ComfyUI's names are diffusers' own, so the prefixes match the
    parameters directly (`pos_embeds.` has no weights: the rotary tables are computed)."""

    def run(self, ctx: RunContext):
        model1: DiffusionModel = self.model1
        model2: DiffusionModel = self.model2
        for name, model in (("model1", model1), ("model2", model2)):
            if model.family != "qwen_image":
                raise InputError(name, f"is a {model.family} model; ModelMergeQwenImage merges two Qwen-Image models")
        ratios = self.block_ratios()

        def strengths(name: str) -> tuple[float, float]:
            ratio = merge.prefix_ratio(name, ratios)
            return 1.0 - ratio, ratio

        plan = merge.plan_merge(model1.unet, model2.unet, strengths)
        report_merge(ctx, plan, "model2", "model1")
        patch = merge.MergePatch(model1.patches, model2.unet, model2.patches, plan.entries, ctx.models)
        return (model1.clone(patches=(patch,)),)


QWEN_IMAGE_PREFIXES = (["pos_embeds.", "img_in.", "txt_norm.", "txt_in.", "time_text_embed."]
                       + [f"transformer_blocks.{i}." for i in range(60)] + ["proj_out."])
ModelMergeQwenImage = create_model(
    "ModelMergeQwenImage", __base__=_QwenImageBlockMerge, __module__=__name__,
    **{prefix: (Annotated[float, RATIO], 1.0) for prefix in QWEN_IMAGE_PREFIXES})


NODES = [TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus, ModelMergeQwenImage]
