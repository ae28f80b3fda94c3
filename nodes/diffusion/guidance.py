"""Guidance beyond plain CFG: guiders that combine three conditionings (DualCFGGuider, PerpNegGuider) and the CFG
formulas of the guidance model patches (nodes.guidance). ComfyUI's formulas (comfy_extras/nodes_perpneg.py,
nodes_custom_sampler.py, nodes_cfg.py, nodes_apg.py, nodes_tcfg.py, nodes_mahiro.py, RescaleCFG), on the denoised
predictions D (x0) unless a hook's contract says noise (x − D).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import patches as patch_api
from .denoiser import GuidedDenoiser, Guider, HookModel, ModelCall
from .models import DiffusionModel
from .sampling_conds import CondEntry, prepare_conditioning


def as_negative_prompt(conditioning: list) -> list:
    """The conditioning marked as a negative prompt (ComfyUI's prompt_type), for the model inputs that differ
    between positive and negative prompts (SDXL refiner aesthetic score)."""
    return [[tensor, {**options, "prompt_type": "negative"}] for tensor, options in conditioning]


def perp_neg(noise_pos: torch.Tensor, noise_neg: torch.Tensor, noise_empty: torch.Tensor, neg_scale: float,
             cond_scale: float) -> torch.Tensor:
    """Perp-Neg (arXiv 2304.04968): CFG against the empty prompt, minus neg_scale times the part of the negative
    direction perpendicular to the positive one (projection over the whole batch, as ComfyUI computes it).
    Works alike on noise or on denoised predictions (the formula is linear and sign-symmetric)."""
    pos = noise_pos - noise_empty
    neg = noise_neg - noise_empty
    perpendicular = neg - (torch.mul(neg, pos).sum() / torch.norm(pos) ** 2) * pos
    return noise_empty + cond_scale * (pos - perpendicular * neg_scale)


class DualCFGDenoiser(GuidedDenoiser):
    """Two guidance scales: cond1 against cond2 (cfg_conds) and cond2 against the negative (cfg_cond2_negative).

    regular: CFG(cond2 vs negative, cfg_cond2_negative) + (cond1 − cond2)·cfg_conds, the first part through the
    model's CFG hooks; the negative is skipped at cfg_cond2_negative ≈ 1, cond2 too when cfg_conds ≈ 1 as well.
    nested: D_neg + cfg_cond2_negative·(CFG(cond1 vs cond2, cfg_conds) − D_neg), everything evaluated.
    """

    def __init__(self, call: ModelCall, cond1: list[CondEntry], cond2: list[CondEntry] | None,
                 negative: list[CondEntry] | None, cfg_conds: float, cfg_cond2_negative: float, nested: bool):
        super().__init__(call, cond1, negative, cfg_conds)
        self.middle = cond2
        self.cfg_middle_negative = cfg_cond2_negative
        self.nested = nested

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, return_uncond: bool = False, **_: Any):
        options = self.call.model.options
        negative, middle = self.negative, self.middle
        if self.nested:
            out = self.weighted_predictions(x, sigma, [negative, middle, self.positive], options)
            inner = GuidedDenoiser(self.call, self.positive, middle, self.cfg)
            text = inner.combine(x, sigma, out[2], out[1], options, middle, HookModel(inner))
            denoised = out[0] + self.cfg_middle_negative * (text - out[0])
            return (denoised, out[1]) if return_uncond else denoised
        # CFG++ samplers (return_uncond) need every prediction, like disable_cfg1_optimization.
        if not (return_uncond or options.get(patch_api.DISABLE_CFG1, False)) \
                and math.isclose(self.cfg_middle_negative, 1.0):
            negative = None
            if math.isclose(self.cfg, 1.0):
                middle = None
        out = self.weighted_predictions(x, sigma, [negative, middle, self.positive], options)
        outer = GuidedDenoiser(self.call, middle, negative, self.cfg_middle_negative)  # type: ignore[arg-type]
        denoised = outer.combine(x, sigma, out[1], out[0], options, negative, HookModel(outer)) \
            + (out[2] - out[1]) * self.cfg
        return (denoised, out[0]) if return_uncond else denoised


class DualCFGGuider(Guider):
    def __init__(self, model: DiffusionModel, cond1: list, cond2: list, negative: list, cfg_conds: float,
                 cfg_cond2_negative: float, nested: bool = False):
        super().__init__(model, {"positive": cond1, "middle": as_negative_prompt(cond2), "negative": negative},
                         cfg_conds)
        self.cfg_cond2_negative = cfg_cond2_negative
        self.nested = nested

    def make_denoiser(self, call: ModelCall, prepared: dict[str, list[CondEntry]]) -> GuidedDenoiser:
        return DualCFGDenoiser(call, prepared.get("positive", []), prepared.get("middle"), prepared.get("negative"),
                               self.cfg, self.cfg_cond2_negative, self.nested)


class PerpNegDenoiser(GuidedDenoiser):
    """Perp-Neg with the three predictions (positive, negative, empty) from one batched evaluation; the model's
    pre- and post-CFG hooks run around the formula (its CFG-function hook does not: Perp-Neg replaces CFG)."""

    def __init__(self, call: ModelCall, positive: list[CondEntry], negative: list[CondEntry] | None,
                 empty: list[CondEntry] | None, cfg: float, neg_scale: float):
        super().__init__(call, positive, negative, cfg)
        self.empty = empty
        self.neg_scale = neg_scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, return_uncond: bool = False, **_: Any):
        options = self.call.model.options
        negative, empty = self.negative, self.empty
        if not (return_uncond or options.get(patch_api.DISABLE_CFG1, False)) and math.isclose(self.neg_scale, 0.0):
            negative = None
            if math.isclose(self.cfg, 1.0):
                empty = None
        conds = [self.positive, negative, empty]
        out = self.weighted_predictions(x, sigma, conds, options)
        hook_model = HookModel(self)
        for pre in options.get(patch_api.PRE_CFG_FUNCTIONS, ()):
            out = pre({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": sigma, "input": x,
                       "sigma": sigma, "model": hook_model, "model_options": options})
        pos, neg, empty_pred = out
        result = perp_neg(pos, neg, empty_pred, self.neg_scale, self.cfg)
        for post in options.get(patch_api.POST_CFG_FUNCTIONS, ()):
            result = post({"denoised": result, "cond": self.positive, "uncond": negative, "cond_scale": self.cfg,
                           "model": hook_model, "uncond_denoised": neg, "cond_denoised": pos, "sigma": sigma,
                           "model_options": options, "input": x, "empty_cond": empty,
                           "empty_cond_denoised": empty_pred})
        return (result, neg) if return_uncond else result


class PerpNegGuider(Guider):
    def __init__(self, model: DiffusionModel, positive: list, negative: list, empty: list, cfg: float,
                 neg_scale: float):
        super().__init__(model, {"positive": positive, "empty_negative_prompt": as_negative_prompt(empty),
                                 "negative": negative}, cfg)
        self.neg_scale = neg_scale

    def make_denoiser(self, call: ModelCall, prepared: dict[str, list[CondEntry]]) -> GuidedDenoiser:
        return PerpNegDenoiser(call, prepared.get("positive", []), prepared.get("negative"),
                               prepared.get("empty_negative_prompt"), self.cfg, self.neg_scale)


# --- CFG hooks of the guidance model patches (ComfyUI's argument dicts: nodes.diffusion.patches) ------------------

def _per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))


def rescale_cfg(args: dict[str, Any], multiplier: float) -> torch.Tensor:
    """RescaleCFG (arXiv 2305.08891), a sampler_cfg_function: CFG on the v-prediction, rescaled to the standard
    deviation of the positive v, blended with plain CFG by `multiplier`; returns noise (x − D)."""
    x_orig = args["input"]
    sigma = _per_sample(args["sigma"], args["cond"].ndim)
    x = x_orig / (sigma * sigma + 1.0)
    # eps → v: v = (x/(σ²+1) − D)·√(σ²+1)/σ, with D = x_orig − noise.
    cond = ((x - (x_orig - args["cond"])) * (sigma ** 2 + 1.0) ** 0.5) / sigma
    uncond = ((x - (x_orig - args["uncond"])) * (sigma ** 2 + 1.0) ** 0.5) / sigma
    v_cfg = uncond + args["cond_scale"] * (cond - uncond)
    rescaled = v_cfg * (torch.std(cond, dim=(1, 2, 3), keepdim=True) / torch.std(v_cfg, dim=(1, 2, 3), keepdim=True))
    v_final = multiplier * rescaled + (1.0 - multiplier) * v_cfg
    return x_orig - (x - v_final * sigma / (sigma * sigma + 1.0) ** 0.5)


def cfg_norm(args: dict[str, Any], strength: float) -> torch.Tensor:
    """CFGNorm, a post-CFG function: the guided prediction scaled down, per pixel, to at most the channel norm of
    the positive prediction, times `strength`."""
    guided = args["denoised"]
    cond_norm = torch.norm(args["cond_denoised"], dim=1, keepdim=True)
    scale = (cond_norm / (torch.norm(guided, dim=1, keepdim=True) + 1e-8)).clamp(min=0.0, max=1.0)
    return guided * scale * strength


def optimized_scale(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s s* = ⟨positive, negative⟩ / ‖negative‖² per batch item, shaped to broadcast."""
    positive_flat = positive.reshape(positive.shape[0], -1)
    negative_flat = negative.reshape(negative.shape[0], -1)
    dot = torch.sum(positive_flat * negative_flat, dim=1, keepdim=True)
    squared_norm = torch.sum(negative_flat ** 2, dim=1, keepdim=True) + 1e-8
    return (dot / squared_norm).reshape([positive.shape[0]] + [1] * (positive.ndim - 1))


def cfg_zero_star(args: dict[str, Any]) -> torch.Tensor:
    """CFG-Zero* (arXiv 2503.18886), a post-CFG function: the negative prediction scaled by s* (fitted on the
    noise predictions) inside the CFG formula."""
    x, cond, uncond = args["input"], args["cond_denoised"], args["uncond_denoised"]
    alpha = optimized_scale(x - cond, x - uncond)
    return args["denoised"] + uncond * (alpha - 1.0) + args["cond_scale"] * uncond * (1.0 - alpha)


def _project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v0's components parallel and orthogonal to v1, per batch item (over the last three dimensions)."""
    v1 = torch.nn.functional.normalize(v1, dim=[-1, -2, -3])  # type: ignore[arg-type]  # torch takes a list
    parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    return parallel, v0 - parallel


class AdaptiveProjectedGuidance:
    """APG (arXiv 2410.02416), a pre-CFG function: the guidance cond − uncond, optionally averaged with momentum
    over the steps and capped in norm, has its component parallel to the positive prediction scaled by eta; the
    positive prediction is rewritten so that plain CFG produces that guidance.

    With momentum the running average is state: it lives in this object (one per patched MODEL, as ComfyUI's
    closure) and restarts when sigma rises (a new sampling pass)."""

    def __init__(self, eta: float, norm_threshold: float, momentum: float):
        self.eta = eta
        self.norm_threshold = norm_threshold
        self.momentum = momentum
        self.running_average: torch.Tensor | None = None
        self.previous_sigma: torch.Tensor | None = None

    def __call__(self, args: dict[str, Any]) -> list[torch.Tensor]:
        conds_out = args["conds_out"]
        if len(conds_out) == 1:
            return conds_out
        cond, uncond = conds_out[0], conds_out[1]
        sigma = args["sigma"][0]
        if self.previous_sigma is not None and sigma > self.previous_sigma:
            self.running_average = None
        self.previous_sigma = sigma
        guidance = cond - uncond
        if self.momentum != 0:
            if self.running_average is None:
                self.running_average = guidance
            else:
                self.running_average = self.momentum * self.running_average + guidance
            guidance = self.running_average
        if self.norm_threshold > 0:
            norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
            guidance = guidance * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        parallel, orthogonal = _project(guidance, cond)
        modified = orthogonal + self.eta * parallel
        return [(uncond + modified) + (cond - uncond) / args["cond_scale"], uncond, *conds_out[2:]]


def tangential_damping(cond_score: torch.Tensor, uncond_score: torch.Tensor) -> torch.Tensor:
    """TCFG's damped negative: uncond_score projected on the first right-singular vector of the 2×N matrix
    [uncond; cond] (per batch item), dropping its tangential part."""
    batch = cond_score.shape[0]
    cond_flat = cond_score.reshape(batch, 1, -1).float()
    uncond_flat = uncond_score.reshape(batch, 1, -1).float()
    _, _, vh = torch.linalg.svd(torch.cat((uncond_flat, cond_flat), dim=1), full_matrices=False)
    principal = vh[:, 0:1, :]
    damped = (uncond_flat @ principal.transpose(-2, -1)) * principal
    return damped.reshape_as(uncond_score).to(uncond_score.dtype)


def tangential_damping_cfg(args: dict[str, Any]) -> list[torch.Tensor]:
    """TCFG (arXiv 2503.18137), a pre-CFG function on the noise predictions; skipped while cond or uncond is
    not evaluated."""
    conds_out = args["conds_out"]
    if len(conds_out) <= 1 or any(entries is None for entries in args["conds"][:2]):
        return conds_out
    x = args["input"]
    cond_pred, uncond_pred = conds_out[0], conds_out[1]
    return [cond_pred, x - tangential_damping(x - cond_pred, x - uncond_pred), *conds_out[2:]]


def mahiro(args: dict[str, Any]) -> torch.Tensor:
    """Mahiro, a post-CFG function: the CFG result blended with the scaled positive prediction, weighted by how
    much the (square-root compressed) negative agrees with their mean (cosine similarity over channels)."""
    scale = args["cond_scale"]
    leap = args["cond_denoised"] * scale
    negative_leap = args["uncond_denoised"] * scale
    guided = args["denoised"]
    merge = (leap + guided) / 2
    compressed_negative = torch.sqrt(negative_leap.abs()) * negative_leap.sign()
    compressed_merge = torch.sqrt(merge.abs()) * merge.sign()
    similarity = torch.nn.functional.cosine_similarity(compressed_negative, compressed_merge).mean()
    weight = 2 * (similarity + 1)
    return (weight * guided + (4 - weight) * leap) / 4


def perp_neg_cfg(args: dict[str, Any], empty_conditioning: list, neg_scale: float) -> torch.Tensor:
    """PerpNeg (the model patch), a sampler_cfg_function: evaluates the empty prompt as well and returns the
    Perp-Neg combination as noise (x − D)."""
    hook_model = args["model"]
    x, sigma = args["input"], args["sigma"]
    model: DiffusionModel = hook_model.diffusion_model
    empty = as_negative_prompt(empty_conditioning)
    prepared = prepare_conditioning({"negative": empty}, x.shape, hook_model.model_sampling, x.device,
                                    model.unet.config, model.family)["negative"]
    (empty_pred,) = hook_model.calc_cond_batch([prepared], x, sigma, args["model_options"])
    return x - perp_neg(args["cond_denoised"], args["uncond_denoised"], empty_pred, neg_scale, args["cond_scale"])
