"""Flux nodes with ComfyUI's names and signatures: CLIPTextEncodeFlux (comfy_extras/nodes_flux.py) and
ModelMergeFlux1 (nodes_model_merging_model_specific.py).

The model call itself is nodes.diffusion.dit_flux; FluxGuidance, FluxDisableGuidance, ReferenceLatent and
FluxKontext* are option-only nodes in nodes.model_families.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, Float, Output, Socket, String

from .conditioning import _encode, _tokenize
from .merging import TransformerBlockMerge, block_merge_node

PROMPT = String(multiline=True, dynamicPrompts=True)


class CLIPTextEncodeFlux(Node):
    category = "advanced/conditioning/flux"
    outputs = (Output(CONDITIONING),)
    clip: Annotated[Any, Socket(CLIP)]
    clip_l: Annotated[str, PROMPT]
    t5xxl: Annotated[str, PROMPT]
    guidance: Annotated[float, Float(min=0.0, max=100.0, step=0.1)] = 3.5

    def run(self, ctx: RunContext):
        t5_tokens = _tokenize(ctx, self.clip, self.t5xxl)
        if "t5xxl" not in t5_tokens:
            raise InputError("clip", "has no T5-XXL encoder; CLIPTextEncodeFlux needs a Flux CLIP "
                                     "(DualCLIPLoader type flux: clip_l + t5xxl)")
        tokens = _tokenize(ctx, self.clip, self.clip_l)
        tokens["t5xxl"] = t5_tokens["t5xxl"]
        return (_encode(ctx, self.clip, tokens, {"guidance": self.guidance}),)


# diffusers FluxTransformer2DModel parameter prefixes -> ComfyUI's Flux names (what the block ratios are keyed on).
_FLUX_NAMES = (
    (re.compile(r"^x_embedder\."), "img_in."),
    (re.compile(r"^time_text_embed\.timestep_embedder\."), "time_in."),
    (re.compile(r"^time_text_embed\.guidance_embedder\."), "guidance_in."),
    (re.compile(r"^time_text_embed\.text_embedder\."), "vector_in."),
    (re.compile(r"^context_embedder\."), "txt_in."),
    (re.compile(r"^transformer_blocks\.(\d+)\."), r"double_blocks.\1."),
    (re.compile(r"^single_transformer_blocks\.(\d+)\."), r"single_blocks.\1."),
    (re.compile(r"^(norm_out|proj_out)\."), r"final_layer.\1."),
)


def flux_block_name(name: str) -> str:
    """A diffusers Flux parameter's name with ComfyUI's block prefix (the rest of the name is kept as is)."""
    for pattern, replacement in _FLUX_NAMES:
        renamed, count = pattern.subn(replacement, name, count=1)
        if count:
            return renamed
    return name


class _FluxBlockMerge(TransformerBlockMerge):
    family = "flux"
    family_label = "Flux"
    comfy_name = staticmethod(flux_block_name)


FLUX1_PREFIXES = (["img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in."]
                  + [f"double_blocks.{i}." for i in range(19)] + [f"single_blocks.{i}." for i in range(38)]
                  + ["final_layer."])


ModelMergeFlux1 = block_merge_node("ModelMergeFlux1", FLUX1_PREFIXES, _FluxBlockMerge, __name__)


NODES = [CLIPTextEncodeFlux, ModelMergeFlux1]
