"""Model-patch nodes (ComfyUI's names and signatures): FreeU, FreeU_V2, Epsilon Scaling and the attention
multipliers. Each returns a clone of its MODEL / CLIP carrying one more patch (nodes.diffusion.patches), so the
input model, and every other branch of the graph, stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, MODEL, Float, Output, Socket

from .diffusion import unet_patches
from .diffusion.patches import WeightDiffPatch

FREEU_FACTOR = dict(min=0.0, max=10.0, step=0.01)
MULTIPLIER = Float(min=0.0, max=10.0, step=0.01)


def base_width(model: Any) -> int:
    """ComfyUI's model_channels: the width of the UNet's first level."""
    return int(model.unet.config.block_out_channels[0])


class FreeU(Node):
    category = "model_patches/unet"
    display_name = "FreeU"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    b1: Annotated[float, Float(**FREEU_FACTOR)] = 1.1
    b2: Annotated[float, Float(**FREEU_FACTOR)] = 1.2
    s1: Annotated[float, Float(**FREEU_FACTOR)] = 0.9
    s2: Annotated[float, Float(**FREEU_FACTOR)] = 0.2

    freeu_version: ClassVar[int] = 1

    def run(self, ctx: RunContext):
        patch = unet_patches.freeu_patch(base_width(self.model), self.b1, self.b2, self.s1, self.s2,
                                         self.freeu_version)
        return (self.model.set_model_output_block_patch(patch),)


class FreeU_V2(FreeU):  # noqa: N801 (ComfyUI's type name)
    display_name = "FreeU_V2"
    b1: Annotated[float, Float(**FREEU_FACTOR)] = 1.3
    b2: Annotated[float, Float(**FREEU_FACTOR)] = 1.4
    s1: Annotated[float, Float(**FREEU_FACTOR)] = 0.9
    s2: Annotated[float, Float(**FREEU_FACTOR)] = 0.2

    freeu_version: ClassVar[int] = 2


class EpsilonScaling(Node):
    type_name = "Epsilon Scaling"
    category = "model_patches/unet"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    scaling_factor: Annotated[float, Float(min=0.5, max=1.5, step=0.001, display="number")] = 1.005

    def run(self, ctx: RunContext):
        return (self.model.add_sampler_post_cfg_function(unet_patches.epsilon_scaling(self.scaling_factor)),)


def _scaled(module: Any, paths: Mapping[str, tuple[str, ...]], factors: dict[str, float]) -> WeightDiffPatch | None:
    """A weight patch scaling each matched projection's weight and bias by its factor (ComfyUI's add_patches
    with strength_model = factor), or None when every factor is 1."""
    names = unet_patches.attention_weight_names(module, paths)
    entries = tuple((name, None, 0.0, float(factors[factor])) for name, factor in names.items()
                    if factors[factor] != 1.0)
    return WeightDiffPatch(entries) if entries else None


class UNetSelfAttentionMultiply(Node):
    category = "_for_testing/attention_experiments"
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    q: Annotated[float, MULTIPLIER] = 1.0
    k: Annotated[float, MULTIPLIER] = 1.0
    v: Annotated[float, MULTIPLIER] = 1.0
    out: Annotated[float, MULTIPLIER] = 1.0

    attention: ClassVar[str] = "attn1"

    def run(self, ctx: RunContext):
        a = self.attention
        paths = {"q": (f"{a}.to_q",), "k": (f"{a}.to_k",), "v": (f"{a}.to_v",), "out": (f"{a}.to_out.0",)}
        patch = _scaled(self.model.unet, paths, {"q": self.q, "k": self.k, "v": self.v, "out": self.out})
        return (self.model.with_patches(patch) if patch is not None else self.model.clone(),)


class UNetCrossAttentionMultiply(UNetSelfAttentionMultiply):
    attention: ClassVar[str] = "attn2"


class CLIPAttentionMultiply(Node):
    category = "_for_testing/attention_experiments"
    experimental = True
    outputs = (Output(CLIP),)
    clip: Annotated[Any, Socket(CLIP)]
    q: Annotated[float, MULTIPLIER] = 1.0
    k: Annotated[float, MULTIPLIER] = 1.0
    v: Annotated[float, MULTIPLIER] = 1.0
    out: Annotated[float, MULTIPLIER] = 1.0

    def run(self, ctx: RunContext):
        paths = {"q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
                 "out": ("self_attn.out_proj",)}
        patch = _scaled(self.clip.encoders, paths, {"q": self.q, "k": self.k, "v": self.v, "out": self.out})
        return (self.clip.with_patches(patch) if patch is not None else self.clip,)


NODES = [FreeU, FreeU_V2, EpsilonScaling, UNetSelfAttentionMultiply, UNetCrossAttentionMultiply,
         CLIPAttentionMultiply]
