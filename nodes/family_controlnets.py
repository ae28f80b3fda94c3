"""ControlNet apply nodes with a VAE input (ComfyUI's comfy_extras/nodes_sd3.py ControlNetApplySD3 and
nodes_controlnet.py ControlNetInpaintingAliMamaApply): SD3 and Flux ControlNets read their hint through the VAE
(nodes.diffusion.dit_controlnet). ControlNetApplyAdvanced (nodes.controlnet) takes the same nets with its optional
vae input.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CONDITIONING, CONTROL_NET, IMAGE, MASK, VAE, Output, Socket

from .controlnet import PERCENT, STRENGTH, _check_fits
from .diffusion.resize import common_upscale


def apply_controlnet(positive: list, negative: list, net: Any, image: torch.Tensor, strength: float,
                     start_percent: float, end_percent: float, vae: Any,
                     extra_concat: tuple[torch.Tensor, ...] = ()) -> tuple[list, list]:
    """ComfyUI's ControlNetApplyAdvanced.apply_controlnet: one applied net per previous ControlNet, shared by the
    positive and negative entries (so they still batch together)."""
    if strength == 0:
        return positive, negative
    _check_fits(net, list(positive) + list(negative))
    if getattr(net, "needs_vae", False) and vae is None:
        raise InputError("vae", f"the {net.family} ControlNet encodes its hint image with a VAE: connect one")
    keywords: dict[str, Any] = {"vae": vae} if getattr(net, "takes_vae", False) else {}
    if extra_concat:
        keywords["extra_concat"] = extra_concat
    by_previous: dict[int, Any] = {}
    results = []
    for conditioning in (positive, negative):
        out = []
        for cond, options in conditioning:
            previous = options.get("control")
            applied = by_previous.get(id(previous))
            if applied is None:
                try:
                    applied = net.applied(image, strength, start_percent, end_percent, previous, **keywords)
                except ValueError as error:
                    raise InputError("control_net", str(error)) from error
                by_previous[id(previous)] = applied
            out.append([cond, {**options, "control": applied, "control_apply_to_uncond": False}])
        results.append(out)
    return results[0], results[1]


class ControlNetApplySD3(Node):
    display_name = "Apply Controlnet with VAE"
    category = "conditioning/controlnet"
    deprecated = True
    outputs = (Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative"))
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    control_net: Annotated[Any, Socket(CONTROL_NET)]
    vae: Annotated[Any, Socket(VAE)]
    image: Annotated[Any, Socket(IMAGE)]
    strength: Annotated[float, STRENGTH] = 1.0
    start_percent: Annotated[float, PERCENT] = 0.0
    end_percent: Annotated[float, PERCENT] = 1.0

    def run(self, ctx: RunContext):
        return apply_controlnet(self.positive, self.negative, self.control_net, self.image, self.strength,
                                self.start_percent, self.end_percent, self.vae)


class ControlNetInpaintingAliMamaApply(Node):
    display_name = "ControlNetInpaintingAliMamaApply"
    category = "conditioning/controlnet"
    outputs = (Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative"))
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    control_net: Annotated[Any, Socket(CONTROL_NET)]
    vae: Annotated[Any, Socket(VAE)]
    image: Annotated[Any, Socket(IMAGE)]
    mask: Annotated[Any, Socket(MASK)]
    strength: Annotated[float, STRENGTH] = 1.0
    start_percent: Annotated[float, PERCENT] = 0.0
    end_percent: Annotated[float, PERCENT] = 1.0

    def run(self, ctx: RunContext):
        image = self.image
        extra_concat: tuple[torch.Tensor, ...] = ()
        if getattr(self.control_net, "concat_mask", False):
            # ComfyUI: the masked area is blanked in the hint image, and the kept area (1 − mask) is the extra
            # channel after the hint latent.
            keep = 1.0 - self.mask.reshape((-1, 1, self.mask.shape[-2], self.mask.shape[-1])).float()
            pixels_kept = common_upscale(keep, image.shape[2], image.shape[1], "bilinear", "center").round()
            image = image * pixels_kept.movedim(1, -1).repeat(1, 1, 1, image.shape[3])
            extra_concat = (keep,)
        return apply_controlnet(self.positive, self.negative, self.control_net, image, self.strength,
                                self.start_percent, self.end_percent, self.vae, extra_concat)


NODES = [ControlNetApplySD3, ControlNetInpaintingAliMamaApply]
