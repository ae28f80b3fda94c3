"""ControlNet nodes with ComfyUI's class names, inputs and outputs.

ControlNetLoader / DiffControlNetLoader load ControlNet and T2I-Adapter files (nodes.diffusion.t2i_adapter) through
the model memory manager (like every model). The apply nodes attach an AppliedControlNet (net + hint + strength +
σ window + the ControlNet already on that conditioning) to copies of the conditioning options; the sampler's
denoiser calls it at every step.
"""

from __future__ import annotations

from typing import Annotated, Any

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CONDITIONING, CONTROL_NET, IMAGE, MODEL, VAE, Combo, Float, Output, Socket

from .diffusion.controlnet import ControlNet, load_controlnet
from .model_files import (
    file_identity,
    load_model,
    locate_model,
    model_choices,
    model_fingerprint,
    model_key,
)

STRENGTH = Float(min=0.0, max=10.0, step=0.01)
PERCENT = Float(min=0.0, max=1.0, step=0.001)


def _check_fits(net: ControlNet, conditioning: list) -> None:
    """A ControlNet made for another architecture is reported here, against this node, not mid-sampling."""
    for cond, _ in conditioning:
        try:
            net.check_context_width(int(cond.shape[-1]))
        except ValueError as error:
            raise InputError("control_net", str(error)) from error


class ControlNetLoader(Node):
    display_name = "Load ControlNet Model"
    category = "loaders"
    outputs = (Output(CONTROL_NET),)
    control_net_name: Annotated[str, Combo(model_choices("controlnet"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "controlnet", constants.get("control_net_name"), "controlnet")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "control_net_name", "controlnet", self.control_net_name)
        manager = ctx.models
        key = model_key("controlnet", file_identity(path))
        net = load_model(ctx, "control_net_name", self.control_net_name, key,
                         lambda: load_controlnet(path, manager))
        return (net,)


class DiffControlNetLoader(Node):
    display_name = "Load ControlNet Model (diff)"
    category = "loaders"
    outputs = (Output(CONTROL_NET),)
    model: Annotated[Any, Socket(MODEL)]
    control_net_name: Annotated[str, Combo(model_choices("controlnet"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        # The base model is a link, so its part of the key cannot be known here; file changes still count.
        return model_fingerprint(env, "controlnet", constants.get("control_net_name"), "diff_controlnet")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "control_net_name", "controlnet", self.control_net_name)
        manager = ctx.models
        # A diff ControlNet's weights depend on the base model, so the model's identity is part of the key.
        key = model_key("diff_controlnet", file_identity(path), id(self.model.unet), self.model.source)
        net = load_model(ctx, "control_net_name", self.control_net_name, key,
                         lambda: load_controlnet(path, manager, base_model=self.model))
        return (net,)


class ControlNetApply(Node):
    display_name = "Apply ControlNet (OLD)"
    category = "conditioning/controlnet"
    deprecated = True
    outputs = (Output(CONDITIONING),)
    conditioning: Annotated[Any, Socket(CONDITIONING)]
    control_net: Annotated[Any, Socket(CONTROL_NET)]
    image: Annotated[Any, Socket(IMAGE)]
    strength: Annotated[float, STRENGTH] = 1.0

    def run(self, ctx: RunContext):
        if self.strength == 0:
            return (self.conditioning,)
        net, image = self.control_net, self.image
        _check_fits(net, self.conditioning)
        out = []
        for cond, options in self.conditioning:
            # Each entry chains onto its own previous ControlNet; the sampler copies it onto the negative side.
            applied = net.applied(image, self.strength, previous=options.get("control"))
            out.append([cond, {**options, "control": applied, "control_apply_to_uncond": True}])
        return (out,)


class ControlNetApplyAdvanced(Node):
    display_name = "Apply ControlNet"
    category = "conditioning/controlnet"
    outputs = (Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative"))
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    control_net: Annotated[Any, Socket(CONTROL_NET)]
    image: Annotated[Any, Socket(IMAGE)]
    strength: Annotated[float, STRENGTH] = 1.0
    start_percent: Annotated[float, PERCENT] = 0.0
    end_percent: Annotated[float, PERCENT] = 1.0
    vae: Annotated[Any, Socket(VAE, optional=True)] = None

    def run(self, ctx: RunContext):
        if self.strength == 0:
            return (self.positive, self.negative)
        net, image = self.control_net, self.image
        _check_fits(net, list(self.positive) + list(self.negative))
        # SD3 / Flux ControlNets (nodes.diffusion.dit_controlnet) read the hint through the VAE.
        if getattr(net, "needs_vae", False) and self.vae is None:
            raise InputError("vae", f"the {net.family} ControlNet encodes its hint image with a VAE: connect one")
        vae_argument = {"vae": self.vae} if getattr(net, "takes_vae", False) else {}
        # One applied object per previous ControlNet, shared by positive and negative so they still batch together.
        by_previous: dict[int, Any] = {}
        results = []
        for conditioning in (self.positive, self.negative):
            out = []
            for cond, options in conditioning:
                previous = options.get("control")
                applied = by_previous.get(id(previous))
                if applied is None:
                    applied = net.applied(image, self.strength, self.start_percent, self.end_percent, previous,
                                          **vae_argument)
                    by_previous[id(previous)] = applied
                out.append([cond, {**options, "control": applied, "control_apply_to_uncond": False}])
            results.append(out)
        return tuple(results)


NODES = [ControlNetLoader, DiffControlNetLoader, ControlNetApply, ControlNetApplyAdvanced]
