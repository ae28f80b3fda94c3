"""HiDream-I1 (full / dev / fast) transformers from ComfyUI's single files.

Detection follows ComfyUI's comfy/model_detection.py: HiDream has `caption_projection.0.linear.weight` (one text
projection per block for the Llama states, plus one for T5), bare in diffusion_models/ files, under
`model.diffusion_model.` in all-in-one checkpoints. The three variants share one architecture (they differ in
their weights and in the sampling settings their workflows use), so they are one family here.

ComfyUI hard-codes the full-size shapes (20 heads of 128, 16 double + 32 single blocks, 4 routed experts of which
2 are active, 2×2 patches, 16 channels, rotary axes (64, 32, 32)); here the sizes are read from the tensors so that
any size loads: width from x_embedder, depths from the block counts, caption widths (T5, Llama) from the caption
projections, pooled width from p_embedder, the expert count from the MoE feed-forward. The head width stays 128
(its q/k norms span the whole width, so the files cannot tell heads apart) with the rotary split (64, 32, 32), and
two experts are active per token, as in ComfyUI.

Weights: ComfyUI's files already use the names of diffusers' HiDreamImageTransformer2DModel (diffusers' own
single-file converter only strips the prefix).

Llama layers: the network reads one Llama hidden state per block. ComfyUI lists them in its config (block i reads
layer min(i, 31) of the 32 Llama-3.1 outputs); here the call module (nodes.diffusion.dit_hidream) picks them at
call time by the same rule for whatever depth the text encoder has, so the network's own table is the identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

HIDREAM_MARKER = "caption_projection.0.linear.weight"
PATCH = 2                    # ComfyUI's fixed patch size (the linear patch embedder cannot tell it from channels)
HEAD_WIDTH = 128             # ComfyUI's attention_head_dim
ROPE_AXES = (64, 32, 32)     # ComfyUI's axes_dims_rope: a full 128-wide head
ACTIVE_EXPERTS = 2           # ComfyUI's num_activated_experts (not recorded in the weights)
FFN_ROUNDING = 256           # the SwiGLU feed-forward's multiple_of


def _count(state: Mapping[str, Any], prefix: str, block: str) -> int:
    regex = re.compile(re.escape(prefix + block) + r"\.(\d+)\.")
    return len({int(m.group(1)) for key in state if (m := regex.match(key))})


def is_hidream(state: Mapping[str, Any], prefix: str) -> bool:
    return prefix + HIDREAM_MARKER in state


def swiglu_width(hidden: int) -> int:
    """The inner width of HiDream's FeedForwardSwiGLU(dim, hidden): 2/3 of it, rounded up to 256."""
    inner = int(2 * hidden / 3)
    return FFN_ROUNDING * ((inner + FFN_ROUNDING - 1) // FFN_ROUNDING)


def hidream_config(state: Mapping[str, torch.Tensor], prefix: str, error: type[Exception]) -> dict[str, Any]:
    """HiDreamImageTransformer2DModel keyword arguments read from the shapes."""
    def shape(name: str) -> torch.Size:
        if prefix + name not in state:
            raise error(f"HiDream weights without {name}")
        return state[prefix + name].shape

    width, patch_inputs = shape("x_embedder.proj.weight")
    if width % HEAD_WIDTH or patch_inputs % (PATCH * PATCH):
        raise error(f"HiDream width {width} / patch inputs {patch_inputs} do not fit its layout "
                    f"({HEAD_WIDTH}-wide heads, 2x2 patches)")
    double, single = _count(state, prefix, "double_stream_blocks"), _count(state, prefix, "single_stream_blocks")
    projections = _count(state, prefix, "caption_projection")
    if not double or projections != double + single + 1:
        raise error(f"HiDream weights with {double} double / {single} single blocks but {projections} caption "
                    f"projections (one per block plus one for T5 expected)")
    experts = _count(state, prefix, "double_stream_blocks.0.block.ff_i.experts")
    if experts:
        expert_rows = shape("double_stream_blocks.0.block.ff_i.experts.0.w1.weight")[0]
        shared_rows = shape("double_stream_blocks.0.block.ff_i.shared_experts.w1.weight")[0]
        if (expert_rows, shared_rows) != (swiglu_width(4 * width), swiglu_width(2 * width)):
            raise error(f"HiDream experts {expert_rows} / shared expert {shared_rows} wide do not fit width {width}")
    return {
        "patch_size": PATCH,
        "in_channels": patch_inputs // (PATCH * PATCH),
        "out_channels": shape("final_layer.linear.weight")[0] // (PATCH * PATCH),
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": HEAD_WIDTH,
        "num_attention_heads": width // HEAD_WIDTH,
        "caption_channels": (int(shape(f"caption_projection.{projections - 1}.linear.weight")[1]),
                             int(shape(HIDREAM_MARKER)[1])),
        "text_emb_dim": int(shape("p_embedder.pooled_embedder.linear_1.weight")[1]),
        "num_routed_experts": experts,
        "num_activated_experts": min(ACTIVE_EXPERTS, experts),
        "axes_dims_rope": ROPE_AXES,
        "max_resolution": (128, 128),
        "llama_layers": list(range(double + single)),
    }


def hidream_to_diffusers(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def transformer_class() -> Any:
    from . import model_code

    return model_code.transformer_class("transformer_hidream_image", "HiDreamImageTransformer2DModel")


def default_sampling() -> dict[str, Any]:
    """ComfyUI's HiDream model config: FLOW (discrete flow, CONST prediction), multiplier 1000 and shift 1.0 (its
    supported_models entry sets shift 3.0 and then overrides the settings with an empty dict); the workflows set
    the variant's shift with ModelSamplingSD3 (full 3.0, dev 6.0, fast 3.0)."""
    return {"prediction": "const", "schedule": "discrete_flow", "shift": 1.0, "multiplier": 1000.0}
