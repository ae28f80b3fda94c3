"""Lumina 2 (Lumina-Image 2.0's NextDiT, also the base of Neta Lumina) from ComfyUI's single files.

Detection follows ComfyUI's comfy/model_detection.py: a NextDiT has `cap_embedder.1.weight` (the caption
projection), bare in diffusion_models/ files, under `model.diffusion_model.` in all-in-one checkpoints.

ComfyUI hard-codes the full-size shapes (width 2304, 24 heads of 96, 8 key/value heads, 2×2 patches, 16 channels,
rotary axes (32, 32, 32)); here they are read from the tensors so that any size loads: width and patch inputs from
x_embedder, head width from the q-norm weight, key/value heads from the fused qkv rows, caption width from
cap_embedder, depth / refiner depth from the block counts, feed-forward width from w1. The rotary axes split a
head in three equal parts (Lumina 2's 96 = 32 + 32 + 32).

Weights: diffusers' convert_lumina2_to_diffusers hard-codes the full-size qkv split and two refiner layers, so the
same renames are done here for any size. `norm_final.weight` is dropped: neither ComfyUI's NextDiT nor diffusers'
Lumina2Transformer2DModel uses it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

LUMINA2_MARKER = "cap_embedder.1.weight"
PATCH = 2            # ComfyUI's fixed patch size (the linear patch embedder cannot tell it from the channels)
ROPE_THETA = 10000
# diffusers precomputes rotary tables per axis (caption position, row, column); ComfyUI computes them on the fly,
# so the tables are made long enough for any caption and for 16384-pixel images (1024 patches a side).
ROPE_TABLE_LENGTHS = (8192, 1024, 1024)
FFN_ROUNDING = 256   # NextDiT's multiple_of: the feed-forward width is 4 × width rounded up to it

_BLOCK_RENAMES = {
    "attention.out.weight": "attn.to_out.0.weight",
    "attention.q_norm.weight": "attn.norm_q.weight",
    "attention.k_norm.weight": "attn.norm_k.weight",
    "feed_forward.w1.weight": "feed_forward.linear_1.weight",
    "feed_forward.w2.weight": "feed_forward.linear_2.weight",
    "feed_forward.w3.weight": "feed_forward.linear_3.weight",
    "attention_norm2.weight": "norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
}
_TOP_RENAMES = {
    "x_embedder.weight": "x_embedder.weight",
    "x_embedder.bias": "x_embedder.bias",
    "t_embedder.mlp.0.weight": "time_caption_embed.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_caption_embed.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_caption_embed.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_caption_embed.timestep_embedder.linear_2.bias",
    "cap_embedder.0.weight": "time_caption_embed.caption_embedder.0.weight",
    "cap_embedder.1.weight": "time_caption_embed.caption_embedder.1.weight",
    "cap_embedder.1.bias": "time_caption_embed.caption_embedder.1.bias",
    "final_layer.adaLN_modulation.1.weight": "norm_out.linear_1.weight",
    "final_layer.adaLN_modulation.1.bias": "norm_out.linear_1.bias",
    "final_layer.linear.weight": "norm_out.linear_2.weight",
    "final_layer.linear.bias": "norm_out.linear_2.bias",
}
_UNUSED = {"norm_final.weight"}


def _count(state: Mapping[str, Any], prefix: str, block: str) -> int:
    regex = re.compile(re.escape(prefix + block) + r"\.(\d+)\.")
    return len({int(m.group(1)) for key in state if (m := regex.match(key))})


def is_lumina2(state: Mapping[str, Any], prefix: str) -> bool:
    return prefix + LUMINA2_MARKER in state


def lumina2_config(state: Mapping[str, torch.Tensor], prefix: str, error: type[Exception]) -> dict[str, Any]:
    """Lumina2Transformer2DModel keyword arguments read from the shapes."""
    def shape(name: str) -> torch.Size:
        if prefix + name not in state:
            raise error(f"Lumina 2 weights without {name}")
        return state[prefix + name].shape

    width, patch_inputs = shape("x_embedder.weight")
    head_width = shape("layers.0.attention.q_norm.weight")[0]
    if width % head_width or head_width % 6 or patch_inputs % (PATCH * PATCH):
        raise error(f"Lumina 2 width {width} / head width {head_width} / patch inputs {patch_inputs} do not fit "
                    f"NextDiT's layout (heads dividing the width in 3 even rotary axes, 2x2 patches)")
    heads = width // head_width
    kv_heads = (shape("layers.0.attention.qkv.weight")[0] // head_width - heads) // 2
    refiners = _count(state, prefix, "noise_refiner")
    if refiners != _count(state, prefix, "context_refiner") or kv_heads < 1 or heads % kv_heads:
        raise error("Lumina 2 weights with unequal noise / context refiners or an odd key/value head count")
    ffn_width = shape("layers.0.feed_forward.w1.weight")[0]
    multiple_of, multiplier = FFN_ROUNDING, None
    if FFN_ROUNDING * -(-4 * width // FFN_ROUNDING) != ffn_width:
        # Another rounding: rounding int(m · 4·width) up to a multiple of the width itself gives it back exactly.
        multiple_of, multiplier = ffn_width, ffn_width / (4 * width)
    return {
        "sample_size": 128,
        "patch_size": PATCH,
        "in_channels": patch_inputs // (PATCH * PATCH),
        "out_channels": shape("final_layer.linear.weight")[0] // (PATCH * PATCH),
        "hidden_size": width,
        "num_layers": _count(state, prefix, "layers"),
        "num_refiner_layers": refiners,
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": 1e-5,
        "axes_dim_rope": (head_width // 3,) * 3,
        "axes_lens": ROPE_TABLE_LENGTHS,
        "cap_feat_dim": shape("cap_embedder.1.weight")[1],
    }


def lumina2_to_diffusers(state: Mapping[str, torch.Tensor], prefix: str, config: Mapping[str, Any],
                         error: type[Exception]) -> dict[str, torch.Tensor]:
    """Original NextDiT names -> Lumina2Transformer2DModel names (the fused qkv split by the head counts)."""
    head_width = config["hidden_size"] // config["num_attention_heads"]
    split = [config["num_attention_heads"] * head_width, config["num_kv_heads"] * head_width,
             config["num_kv_heads"] * head_width]
    out: dict[str, torch.Tensor] = {}
    for full_key, value in state.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if key in _UNUSED:
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        match = re.match(r"(noise_refiner|context_refiner|layers)\.(\d+)\.(.+)$", key)
        if match is None:
            raise error(f"unexpected Lumina 2 tensor {key}")
        group, index, rest = match.groups()
        block = f"{group}.{index}"
        if rest == "attention.qkv.weight":
            for name, piece in zip(("to_q", "to_k", "to_v"), torch.split(value, split, dim=0), strict=True):
                out[f"{block}.attn.{name}.weight"] = piece
        elif rest == "attention_norm1.weight":  # the modulated blocks' norm sits inside LuminaRMSNormZero
            out[f"{block}.norm1.weight" if group == "context_refiner" else f"{block}.norm1.norm.weight"] = value
        elif rest in _BLOCK_RENAMES:
            out[f"{block}.{_BLOCK_RENAMES[rest]}"] = value
        else:
            raise error(f"unexpected Lumina 2 tensor {key}")
    return out


def transformer_class() -> Any:
    from . import model_code

    return model_code.transformer_class("transformer_lumina2", "Lumina2Transformer2DModel")


def default_sampling() -> dict[str, Any]:
    """ComfyUI's Lumina2 model config: FLOW (discrete flow, CONST prediction) with shift 6.0, multiplier 1.0."""
    return {"prediction": "const", "schedule": "discrete_flow", "shift": 6.0, "multiplier": 1.0}


def rebuild_rotary_tables(transformer: torch.nn.Module, config: Mapping[str, Any]) -> None:
    """The rotary tables are plain tensors made in the constructor (neither weights nor buffers), which a network
    built on the meta device leaves without data: rebuild that embedder on the CPU."""
    rope = transformer.get_submodule("rope_embedder")
    with torch.device("cpu"):
        transformer.rope_embedder = type(rope)(theta=ROPE_THETA, axes_dim=list(config["axes_dim_rope"]),
                                               axes_lens=list(config["axes_lens"]), patch_size=config["patch_size"])
