"""Attention and guidance patch nodes (ComfyUI's names and signatures): Self-Attention Guidance, Perturbed
Attention Guidance, FreSca, Differential Diffusion, HyperTile and ToMe. Each returns a clone of its MODEL carrying
the patch (nodes.diffusion.patches); the maths is in nodes.diffusion.attention_guidance and .token_patches.
"""

from __future__ import annotations

from typing import Annotated, Any

from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import MODEL, Boolean, Float, Int, Output, Socket

from .diffusion import attention_guidance, token_patches


class SelfAttentionGuidance(Node):
    category = "_for_testing"
    display_name = "Self-Attention Guidance"
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    scale: Annotated[float, Float(min=-2.0, max=5.0, step=0.01)] = 0.5
    blur_sigma: Annotated[float, Float(min=0.0, max=10.0, step=0.1)] = 2.0

    def run(self, ctx: RunContext):
        sag = attention_guidance.SelfAttentionGuidance(self.scale, self.blur_sigma)
        # The middle block's first transformer (diffusers: mid_block.attentions[0].transformer_blocks[0].attn1).
        model = self.model.add_sampler_post_cfg_function(sag.guide, disable_cfg1_optimization=True)
        return (model.set_model_attn1_replace(sag.record, "middle", 0, 0),)


class PerturbedAttentionGuidance(Node):
    category = "model_patches/unet"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    scale: Annotated[float, Float(min=0.0, max=100.0, step=0.01, round=0.01)] = 3.0

    def run(self, ctx: RunContext):
        return (self.model.add_sampler_post_cfg_function(attention_guidance.perturbed_attention_guidance(self.scale)),)


class FreSca(Node):
    category = "_for_testing"
    display_name = "FreSca"
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    scale_low: Annotated[float, Float(min=0, max=10, step=0.01)] = 1.0
    scale_high: Annotated[float, Float(min=0, max=10, step=0.01)] = 1.25
    freq_cutoff: Annotated[int, Int(min=1, max=10000, step=1)] = 20

    def run(self, ctx: RunContext):
        return (self.model.add_sampler_pre_cfg_function(
            attention_guidance.fresca(self.scale_low, self.scale_high, self.freq_cutoff)),)


class DifferentialDiffusion(Node):
    category = "_for_testing"
    display_name = "Differential Diffusion"
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    strength: Annotated[float, Float(min=0.0, max=1.0, step=0.01, optional=True)] = 1.0

    def run(self, ctx: RunContext):
        return (self.model.set_model_denoise_mask_function(attention_guidance.differential_mask(self.strength)),)


class HyperTile(Node):
    category = "model_patches/unet"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    tile_size: Annotated[int, Int(min=1, max=2048)] = 256
    swap_size: Annotated[int, Int(min=1, max=128)] = 2
    max_depth: Annotated[int, Int(min=0, max=10)] = 0
    scale_depth: Annotated[bool, Boolean()] = False

    def run(self, ctx: RunContext):
        patch = token_patches.HyperTilePatch(self.tile_size, self.swap_size, self.max_depth, self.scale_depth)
        return (self.model.set_model_attn1_patch(patch.split).set_model_attn1_output_patch(patch.merge),)


class TomePatchModel(Node):
    category = "model_patches/unet"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    ratio: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.3

    def run(self, ctx: RunContext):
        patch = token_patches.TokenMergePatch(self.ratio)
        return (self.model.set_model_attn1_patch(patch.split).set_model_attn1_output_patch(patch.restore),)


NODES = [SelfAttentionGuidance, PerturbedAttentionGuidance, FreSca, DifferentialDiffusion, HyperTile,
         TomePatchModel]
