"""Guidance nodes: guiders with more than one guidance direction (DualCFGGuider, PerpNegGuider) and the model
patches that change the CFG formula (ComfyUI's names, signatures and numerics). The maths lives in
nodes.diffusion.guidance; the patches go through the model-patch API (nodes.diffusion.patches), so each returns a
new MODEL and the input MODEL is left as it was."""

from __future__ import annotations

import functools
from typing import Annotated, Any

from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CONDITIONING, GUIDER, MODEL, Combo, Float, Output, Socket

from .diffusion import guidance
from .diffusion.models import DiffusionModel
from .sampling import CUSTOM, CfgInput, _check_choice, _check_context_width

GUIDERS = f"{CUSTOM}/guiders"
DUAL_CFG_STYLES = ("regular", "nested")
NegScaleInput = Annotated[float, Float(min=0.0, max=100.0, step=0.01)]


class DualCFGGuider(Node):
    category = GUIDERS
    outputs = (Output(GUIDER),)

    model: Annotated[Any, Socket(MODEL)]
    cond1: Annotated[Any, Socket(CONDITIONING)]
    cond2: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    cfg_conds: CfgInput = 8.0
    cfg_cond2_negative: CfgInput = 8.0
    style: Annotated[str, Combo(DUAL_CFG_STYLES)] = "regular"

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        style = _check_choice(self.style, DUAL_CFG_STYLES, "style")
        conds = {name: _check_context_width(getattr(self, name), name, model)
                 for name in ("cond1", "cond2", "negative")}
        return (guidance.DualCFGGuider(model, conds["cond1"], conds["cond2"], conds["negative"], self.cfg_conds,
                                       self.cfg_cond2_negative, nested=style == "nested"),)


class PerpNegGuider(Node):
    category = "_for_testing"
    experimental = True
    outputs = (Output(GUIDER),)

    model: Annotated[Any, Socket(MODEL)]
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    empty_conditioning: Annotated[Any, Socket(CONDITIONING)]
    cfg: CfgInput = 8.0
    neg_scale: NegScaleInput = 1.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        conds = {name: _check_context_width(getattr(self, name), name, model)
                 for name in ("positive", "negative", "empty_conditioning")}
        return (guidance.PerpNegGuider(model, conds["positive"], conds["negative"], conds["empty_conditioning"],
                                       self.cfg, self.neg_scale),)



# --- CFG model patches -----------------------------------------------------------------------------------------

GUIDANCE = "advanced/guidance"


class RescaleCFG(Node):
    category = "advanced/model"
    outputs = (Output(MODEL),)

    model: Annotated[Any, Socket(MODEL)]
    multiplier: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.7

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (model.set_sampler_cfg_function(functools.partial(guidance.rescale_cfg, multiplier=self.multiplier)),)


class CFGNorm(Node):
    category = GUIDANCE
    experimental = True
    outputs = (Output(MODEL, "patched_model"),)

    model: Annotated[Any, Socket(MODEL)]
    strength: Annotated[float, Float(min=0.0, max=100.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (model.add_sampler_post_cfg_function(functools.partial(guidance.cfg_norm, strength=self.strength)),)


class CFGZeroStar(Node):
    category = GUIDANCE
    outputs = (Output(MODEL, "patched_model"),)

    model: Annotated[Any, Socket(MODEL)]

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (model.add_sampler_post_cfg_function(guidance.cfg_zero_star),)


class APG(Node):
    display_name = "Adaptive Projected Guidance"
    category = CUSTOM
    outputs = (Output(MODEL),)

    model: Annotated[Any, Socket(MODEL)]
    eta: Annotated[float, Float(min=-10.0, max=10.0, step=0.01, tooltip=(
        "Controls the scale of the parallel guidance vector. Default CFG behavior at a setting of 1."))] = 1.0
    norm_threshold: Annotated[float, Float(min=0.0, max=50.0, step=0.1, tooltip=(
        "Normalize guidance vector to this value, normalization disable at a setting of 0."))] = 5.0
    momentum: Annotated[float, Float(min=-5.0, max=1.0, step=0.01, tooltip=(
        "Controls a running average of guidance during diffusion, disabled at a setting of 0."))] = 0.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        apg = guidance.AdaptiveProjectedGuidance(self.eta, self.norm_threshold, self.momentum)
        return (model.add_sampler_pre_cfg_function(apg),)


class TCFG(Node):
    display_name = "Tangential Damping CFG"
    category = GUIDANCE
    description = ("TCFG – Tangential Damping CFG (2503.18137)\n\nRefine the uncond (negative) to align with the "
                   "cond (positive) for improving quality.")
    outputs = (Output(MODEL, "patched_model"),)

    model: Annotated[Any, Socket(MODEL)]

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (model.add_sampler_pre_cfg_function(guidance.tangential_damping_cfg),)


class Mahiro(Node):
    display_name = "Mahiro is so cute that she deserves a better guidance function!! (。・ω・。)"
    category = "_for_testing"
    description = ("Modify the guidance to scale more on the 'direction' of the positive prompt rather than the "
                   "difference between the negative prompt.")
    experimental = True
    outputs = (Output(MODEL, "patched_model"),)

    model: Annotated[Any, Socket(MODEL)]

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        return (model.add_sampler_post_cfg_function(guidance.mahiro),)


class PerpNeg(Node):
    display_name = "Perp-Neg (DEPRECATED by PerpNegGuider)"
    category = "_for_testing"
    experimental = True
    deprecated = True
    outputs = (Output(MODEL),)

    model: Annotated[Any, Socket(MODEL)]
    empty_conditioning: Annotated[Any, Socket(CONDITIONING)]
    neg_scale: NegScaleInput = 1.0

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        empty = _check_context_width(self.empty_conditioning, "empty_conditioning", model)
        return (model.set_sampler_cfg_function(functools.partial(guidance.perp_neg_cfg, empty_conditioning=empty,
                                                                 neg_scale=self.neg_scale)),)


NODES = [DualCFGGuider, PerpNegGuider, RescaleCFG, CFGNorm, CFGZeroStar, APG, TCFG, Mahiro, PerpNeg]
