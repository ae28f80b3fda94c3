"""Conditioning nodes that steer the UNet by other means than text, with ComfyUI's class names, inputs and outputs.

InstructPixToPixConditioning gives both conditionings the edited image's (unscaled) VAE latent; the sampler feeds it
to 8-channel InstructPix2Pix UNets (nodes.diffusion.sampling_conds.ip2p_concat), with ordinary two-way CFG as in
ComfyUI (the image on both sides), not diffusers' three-way image guidance. SD_4XUpscale_Conditioning records the
low-resolution image and its noise augmentation for the x4 upscaler, whose checkpoints do not load here (7-channel
UNets): the node works, a graph sampling such a model stops at the loader. CLIPTextEncodeControlnet gives the
ControlNets their own text (`cross_attn_controlnet`; ComfyUI stores `pooled_output_controlnet` too and reads it
nowhere). SetUnionControlNetType records the union type; only union ControlNets read it, and they do not load here,
so it changes nothing for the ControlNets and T2I-Adapters that do (as in ComfyUI for non-union ones).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import (
    CLIP,
    CONDITIONING,
    CONTROL_NET,
    IMAGE,
    LATENT,
    VAE,
    Combo,
    Float,
    Output,
    Socket,
    String,
)

from .diffusion.embeddings import EmbeddingLibrary
from .diffusion.resize import common_upscale
from .diffusion.vae import crop_to_multiple

# ComfyUI's UNION_CONTROLNET_TYPES (comfy/cldm/control_types.py): name -> the union ControlNet's task index.
UNION_CONTROLNET_TYPES = {
    "openpose": 0, "depth": 1, "hed/pidi/scribble/ted": 2, "canny/lineart/anime_lineart/mlsd": 3, "normal": 4,
    "segment": 5, "tile": 6, "repaint": 7,
}


def _with_options(conditioning: list, values: dict[str, Any]) -> list:
    """New pairs with `values` merged into copies of the options (the inputs stay untouched)."""
    return [[cond, {**options, **values}] for cond, options in conditioning]


class InstructPixToPixConditioning(Node):
    category = "conditioning/instructpix2pix"
    outputs = (Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative"), Output(LATENT, "latent"))
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    vae: Annotated[Any, Socket(VAE)]
    pixels: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        pixels = crop_to_multiple(self.pixels, 8)  # centred, as ComfyUI crops before encoding
        if pixels.shape[1] == 0 or pixels.shape[2] == 0:
            raise InputError("pixels", f"the image ({self.pixels.shape[2]}x{self.pixels.shape[1]}) is smaller than "
                                       f"8x8 pixels")
        latent = self.vae.encode(pixels, manager=ctx.models, progress=ctx.progress)
        values = {"concat_latent_image": latent}
        return (_with_options(self.positive, values), _with_options(self.negative, values),
                {"samples": torch.zeros_like(latent)})


class SetUnionControlNetType(Node):
    display_name = "SetUnionControlNetType"
    category = "conditioning/controlnet"
    outputs = (Output(CONTROL_NET),)
    control_net: Annotated[Any, Socket(CONTROL_NET)]
    type: Annotated[str, Combo(("auto", *UNION_CONTROLNET_TYPES))]

    def run(self, ctx: RunContext):
        index = UNION_CONTROLNET_TYPES.get(self.type)
        # A copy sharing the weights ("auto" clears the choice), as ComfyUI's set_extra_arg("control_type", ...).
        return (dataclasses.replace(self.control_net, control_type=() if index is None else (index,)),)


class CLIPTextEncodeControlnet(Node):
    category = "_for_testing/conditioning"
    experimental = True
    outputs = (Output(CONDITIONING),)
    clip: Annotated[Any, Socket(CLIP)]
    conditioning: Annotated[Any, Socket(CONDITIONING)]
    text: Annotated[str, String(multiline=True, dynamicPrompts=True)]

    def run(self, ctx: RunContext):
        tokens = self.clip.tokenize(self.text, resolve_embedding=ctx.find_service(EmbeddingLibrary), warn=ctx.warn)
        cond, pooled = self.clip.encode_tokens(tokens, manager=ctx.models)
        return (_with_options(self.conditioning, {"cross_attn_controlnet": cond,
                                                  "pooled_output_controlnet": pooled}),)


class SD_4XUpscale_Conditioning(Node):  # noqa: N801 - ComfyUI's class name
    category = "conditioning/upscale_diffusion"
    outputs = (Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative"), Output(LATENT, "latent"))
    images: Annotated[Any, Socket(IMAGE)]
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    scale_ratio: Annotated[float, Float(min=0.0, max=10.0, step=0.01)] = 4.0
    noise_augmentation: Annotated[float, Float(min=0.0, max=1.0, step=0.001)] = 0.0

    def run(self, ctx: RunContext):
        images = self.images
        width = max(1, round(images.shape[2] * self.scale_ratio))
        height = max(1, round(images.shape[1] * self.scale_ratio))
        if width < 4 or height < 4:
            raise InputError("scale_ratio", f"{self.scale_ratio} makes a {width}x{height} image; the upscaler's "
                                            f"latent needs at least 4x4 pixels")
        # The low-resolution image in -1..1 at the latent's size (a quarter of the output).
        pixels = common_upscale(images.movedim(-1, 1).float() * 2.0 - 1.0, width // 4, height // 4, "bilinear",
                                "center")
        values = {"concat_image": pixels, "noise_augmentation": float(self.noise_augmentation)}
        latent = torch.zeros((images.shape[0], 4, height // 4, width // 4))
        return (_with_options(self.positive, values), _with_options(self.negative, values), {"samples": latent})


NODES = [InstructPixToPixConditioning, SetUnionControlNetType, CLIPTextEncodeControlnet, SD_4XUpscale_Conditioning]
