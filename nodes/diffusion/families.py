"""The diffusion-transformer families (SD3 / SD3.5 MMDiT, Flux dev / schnell, Qwen-Image) from ComfyUI's files.

Detection follows ComfyUI's comfy/model_detection.py: an MMDiT has `joint_blocks.0.context_block.attn.qkv.weight`,
Flux has `double_blocks.0.img_attn.norm.key_norm.scale` and `img_in.weight` (dev: also `guidance_in.*`); both may
sit under `model.diffusion_model.` (all-in-one checkpoints). The diffusers configs are read from the shapes:

* SD3: width = x_embedder rows, 64-wide heads (so heads = width / 64, as MMDiT's depth rule), patch size from the
  patch conv, text width / caption width from context_embedder, pooled width from y_embedder, positional grid
  side = sqrt(pos_embed length), dual-attention (SD3.5 M) layers from `attn2`, RMS qk-norm from `ln_q`.
* Flux: width = img_in rows, head width = the qk-norm scale length (heads = width / head width), text width from
  txt_in, pooled width from vector_in, guidance embedding when `guidance_in` is present. The rotary axes split
  (16, 56, 56) belongs to 128-wide heads; other head widths are refused.
* Qwen-Image (`txt_norm.weight`): width = img_in rows, head width = the qk-norm length, text width from txt_in,
  2x2 patches; its files already use diffusers' QwenImageTransformer2DModel names.

Weights: SD3 through diffusers' own convert_sd3_transformer_checkpoint_to_diffusers. diffusers' Flux converter
hard-codes Flux's 3072 width when splitting the single blocks' fused projection, so the Flux mapping (the same
renames and splits, read from that converter) is done here for any width.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import families_extra, families_hidream, families_lumina
from .offline import ensure_offline

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "model.", "")
SD3_MARKER = "joint_blocks.0.context_block.attn.qkv.weight"
FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
QWEN_IMAGE_MARKER = "txt_norm.weight"
MARKERS = (SD3_MARKER, FLUX_MARKER, QWEN_IMAGE_MARKER, families_extra.AURAFLOW_MARKER, families_lumina.LUMINA2_MARKER,
           families_hidream.HIDREAM_MARKER)
FLUX_ROPE_AXES = (16, 56, 56)  # Flux's rotary split of a 128-wide head (time/index, height, width)


class UnknownTransformer(ValueError):
    """Weights that are not a diffusion transformer of a family this engine builds."""


@dataclass(frozen=True)
class DetectedTransformer:
    family: str                            # "sd3" | "flux" | "qwen_image"
    variant: str                           # "sd3" | "sd3.5" | "flux_dev" | "flux_schnell" | "qwen_image"
    prefix: str                            # key prefix of the transformer's tensors in the file
    config: dict[str, Any] = field(default_factory=dict)   # diffusers model keyword arguments
    notes: tuple[str, ...] = ()            # things the loader should warn about


def _count(state: Mapping[str, Any], prefix: str, block: str) -> int:
    regex = re.compile(re.escape(prefix + block) + r"\.(\d+)\.")
    return len({int(m.group(1)) for key in state if (m := regex.match(key))})


def find_transformer_prefix(state: Mapping[str, Any]) -> str | None:
    for prefix in TRANSFORMER_PREFIXES:
        if any(prefix + marker in state for marker in MARKERS):
            return prefix
    return None


def _sd3_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    def shape(name: str) -> torch.Size:
        if prefix + name not in state:
            raise UnknownTransformer(f"MMDiT weights without {name}")
        return state[prefix + name].shape

    patch = shape("x_embedder.proj.weight")
    width, in_channels, patch_size = patch[0], patch[1], patch[2]
    if width % 64:
        raise UnknownTransformer(f"MMDiT width {width} is not a multiple of its 64-wide heads")
    dual = sorted({int(key[len(prefix):].split(".")[1]) for key in state
                   if key.startswith(prefix + "joint_blocks.") and ".x_block.attn2.qkv.weight" in key})
    return {
        "sample_size": 128,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": _count(state, prefix, "joint_blocks"),
        "attention_head_dim": 64,
        "num_attention_heads": width // 64,
        "joint_attention_dim": shape("context_embedder.weight")[1],
        "caption_projection_dim": shape("context_embedder.weight")[0],
        "pooled_projection_dim": shape("y_embedder.mlp.0.weight")[1],
        "out_channels": shape("final_layer.linear.weight")[0] // (patch_size * patch_size),
        "pos_embed_max_size": round(math.sqrt(shape("pos_embed")[1])),
        "dual_attention_layers": tuple(dual),
        "qk_norm": "rms_norm" if prefix + "joint_blocks.0.context_block.attn.ln_q.weight" in state else None,
    }


def _flux_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    def shape(name: str) -> torch.Size:
        if prefix + name not in state:
            raise UnknownTransformer(f"Flux weights without {name}")
        return state[prefix + name].shape

    width, in_channels = shape("img_in.weight")
    head_width = shape(FLUX_MARKER)[0]
    if head_width != sum(FLUX_ROPE_AXES) or width % head_width:
        raise UnknownTransformer(f"Flux heads {head_width} wide (width {width}): only 128-wide heads "
                                 f"(rotary axes {FLUX_ROPE_AXES}) are known")
    mlp_width = shape("double_blocks.0.img_mlp.0.weight")[0]
    if mlp_width != 4 * width:
        raise UnknownTransformer(f"Flux MLP width {mlp_width} is not 4 x {width}")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shape("final_layer.linear.weight")[0],
        "num_layers": _count(state, prefix, "double_blocks"),
        "num_single_layers": _count(state, prefix, "single_blocks"),
        "attention_head_dim": head_width,
        "num_attention_heads": width // head_width,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
        "guidance_embeds": prefix + "guidance_in.in_layer.weight" in state,
        "axes_dims_rope": FLUX_ROPE_AXES,
    }


def _qwen_image_config(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    def shape(name: str) -> torch.Size:
        if prefix + name not in state:
            raise UnknownTransformer(f"Qwen-Image weights without {name}")
        return state[prefix + name].shape

    width, in_channels = shape("img_in.weight")
    head_width = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    if head_width != sum(FLUX_ROPE_AXES) or width % head_width:
        raise UnknownTransformer(f"Qwen-Image heads {head_width} wide (width {width}): only 128-wide heads "
                                 f"(rotary axes {FLUX_ROPE_AXES}) are known")
    patch_size = 2
    return {
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight")[0] // (patch_size * patch_size),
        "num_layers": _count(state, prefix, "transformer_blocks"),
        "attention_head_dim": head_width,
        "num_attention_heads": width // head_width,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "axes_dims_rope": FLUX_ROPE_AXES,
    }


def detect_transformer(state: Mapping[str, torch.Tensor]) -> DetectedTransformer:
    """The family and diffusers config of a diffusion-transformer file. Raises UnknownTransformer."""
    prefix = find_transformer_prefix(state)
    if prefix is None:
        raise UnknownTransformer("no SD3 (joint_blocks.*), Flux (double_blocks.*) or Qwen-Image (txt_norm) "
                                 "transformer in the weights")
    if prefix + QWEN_IMAGE_MARKER in state:
        return DetectedTransformer("qwen_image", "qwen_image", prefix, _qwen_image_config(state, prefix))
    if families_hidream.is_hidream(state, prefix):
        return DetectedTransformer("hidream", "hidream", prefix,
                                   families_hidream.hidream_config(state, prefix, UnknownTransformer))
    if families_lumina.is_lumina2(state, prefix):
        return DetectedTransformer("lumina2", "lumina2", prefix,
                                   families_lumina.lumina2_config(state, prefix, UnknownTransformer))
    if families_extra.is_auraflow(state, prefix):
        return DetectedTransformer("auraflow", "auraflow", prefix,
                                   families_extra.auraflow_config(state, prefix, UnknownTransformer))
    if prefix + SD3_MARKER in state:
        config = _sd3_config(state, prefix)
        variant = "sd3.5" if config["qk_norm"] else "sd3"
        return DetectedTransformer("sd3", variant, prefix, config)
    if prefix + "img_in.weight" not in state:
        raise UnknownTransformer("Flux-style double blocks without img_in (Chroma / Chroma Radiance are not "
                                 "supported yet)")
    if families_extra.is_chroma(state, prefix):
        return DetectedTransformer("chroma", "chroma", prefix,
                                   families_extra.chroma_config(state, prefix, UnknownTransformer, FLUX_ROPE_AXES))
    config = _flux_config(state, prefix)
    return DetectedTransformer("flux", "flux_dev" if config["guidance_embeds"] else "flux_schnell", prefix, config)


def describe_keys(state: Mapping[str, Any], limit: int = 6) -> str:
    """A short description of what a file holds, for errors about unknown layouts: its top-level key groups."""
    groups = sorted({".".join(key.split(".")[:2]) if key.startswith("model.") else key.split(".")[0]
                     for key in state})
    more = f" and {len(groups) - limit} more" if len(groups) > limit else ""
    return f"{len(state)} tensors; key groups {', '.join(groups[:limit])}{more}"


# Weight conversion -----------------------------------------------------------------------------------------

def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(shift, scale) -> (scale, shift): the original AdaLayerNorm output order vs diffusers'."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_to_diffusers(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    ensure_offline()
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return convert_sd3_transformer_checkpoint_to_diffusers(own)  # pops from `own`, a dict of our own


_FLUX_TOP = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
             "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
_FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
                "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
                "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out"}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm.scale": "attn.norm_q.weight",
                "norm.key_norm.scale": "attn.norm_k.weight", "linear2": "proj_out"}


def flux_to_diffusers(state: Mapping[str, torch.Tensor], prefix: str, width: int) -> dict[str, torch.Tensor]:
    """Original Flux names -> FluxTransformer2DModel names (fused qkv / qkv+mlp projections split)."""
    out: dict[str, torch.Tensor] = {}
    for full_key, value in state.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        stem, _, leaf = key.rpartition(".")
        parts = key.split(".")
        if stem in _FLUX_TOP:
            out[f"{_FLUX_TOP[stem]}.{leaf}"] = value
        elif key.startswith("final_layer.adaLN_modulation.1."):
            out[f"norm_out.linear.{leaf}"] = _swap_halves(value)
        elif parts[0] == "double_blocks":
            block, rest = f"transformer_blocks.{parts[1]}", ".".join(parts[2:])
            if rest.endswith(".qkv.weight") or rest.endswith(".qkv.bias"):
                names = ("to_q", "to_k", "to_v") if rest.startswith("img_attn") else \
                    ("add_q_proj", "add_k_proj", "add_v_proj")
                for name, piece in zip(names, value.chunk(3, dim=0), strict=True):
                    out[f"{block}.attn.{name}.{leaf}"] = piece
            elif rest in _FLUX_DOUBLE:
                out[f"{block}.{_FLUX_DOUBLE[rest]}"] = value
            elif rest.rpartition(".")[0] in _FLUX_DOUBLE:
                out[f"{block}.{_FLUX_DOUBLE[rest.rpartition('.')[0]]}.{leaf}"] = value
            else:
                raise UnknownTransformer(f"unexpected Flux tensor {key}")
        elif parts[0] == "single_blocks":
            block, rest = f"single_transformer_blocks.{parts[1]}", ".".join(parts[2:])
            if rest.startswith("linear1."):
                q, k, v, mlp = torch.split(value, [width, width, width, value.shape[0] - 3 * width], dim=0)
                for name, piece in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                    out[f"{block}.{name}.{leaf}"] = piece
            elif rest in _FLUX_SINGLE:
                out[f"{block}.{_FLUX_SINGLE[rest]}"] = value
            elif rest.rpartition(".")[0] in _FLUX_SINGLE:
                out[f"{block}.{_FLUX_SINGLE[rest.rpartition('.')[0]]}.{leaf}"] = value
            else:
                raise UnknownTransformer(f"unexpected Flux tensor {key}")
        else:
            raise UnknownTransformer(f"unexpected Flux tensor {key}")
    return out


def transformer_class(family: str) -> Any:
    from . import model_code

    if family == "sd3":
        return model_code.transformer_class("transformer_sd3", "SD3Transformer2DModel")
    if family == "qwen_image":
        return model_code.transformer_class("transformer_qwenimage", "QwenImageTransformer2DModel")
    if family in ("auraflow", "chroma"):
        return families_extra.transformer_class(family)
    if family == "lumina2":
        return families_lumina.transformer_class()
    if family == "hidream":
        return families_hidream.transformer_class()
    return model_code.transformer_class("transformer_flux", "FluxTransformer2DModel")


def diffusers_weights(state: Mapping[str, torch.Tensor], found: DetectedTransformer) -> dict[str, torch.Tensor]:
    if found.family == "sd3":
        return sd3_to_diffusers(state, found.prefix)
    if found.family == "auraflow":
        return families_extra.auraflow_to_diffusers(state, found.prefix)
    if found.family == "hidream":
        return families_hidream.hidream_to_diffusers(state, found.prefix)
    if found.family == "lumina2":
        return families_lumina.lumina2_to_diffusers(state, found.prefix, found.config, UnknownTransformer)
    if found.family == "chroma":
        width = found.config["num_attention_heads"] * found.config["attention_head_dim"]
        return families_extra.chroma_to_diffusers(state, found.prefix, width, flux_to_diffusers)
    if found.family == "qwen_image":  # ComfyUI's Qwen-Image files use diffusers' own names
        return {key[len(found.prefix):]: value for key, value in state.items() if key.startswith(found.prefix)}
    config = found.config
    return flux_to_diffusers(state, found.prefix, config["num_attention_heads"] * config["attention_head_dim"])


def default_sampling(found: DetectedTransformer) -> dict[str, Any]:
    """SamplingConfig fields of ComfyUI's default model sampling for the family: SD3 / SD3.5 flow with shift 3,
    Flux dev and Qwen-Image Flux's schedule with its default μ 1.15; Flux schnell the plain flow schedule (ComfyUI's
    FLOW type, shift 1 and multiplier 1: σ = t)."""
    if found.family in ("auraflow", "chroma"):
        return families_extra.default_sampling(found.family)
    if found.family == "lumina2":
        return families_lumina.default_sampling()
    if found.family == "hidream":
        return families_hidream.default_sampling()
    if found.family == "sd3":
        return {"prediction": "const", "schedule": "discrete_flow", "shift": 3.0, "multiplier": 1000.0}
    if found.family == "flux" and found.variant != "flux_dev":
        return {"prediction": "const", "schedule": "discrete_flow", "shift": 1.0, "multiplier": 1.0}
    return {"prediction": "const", "schedule": "flux", "shift": 1.15, "multiplier": 1.0}  # Flux dev, Qwen-Image


def rebuild_rotary_tables(transformer: torch.nn.Module, found: DetectedTransformer) -> None:
    """Qwen-Image keeps its rotary frequency tables as plain tensors (neither weights nor buffers), which a
    network built on the meta device leaves without data: rebuild that embedder on the CPU."""
    if found.family == "lumina2":
        families_lumina.rebuild_rotary_tables(transformer, found.config)
        return
    if found.family == "chroma":
        families_extra.rebuild_chroma_tables(transformer)
    if found.family != "qwen_image":
        return
    rope = transformer.get_submodule("pos_embed")
    with torch.device("cpu"):
        rebuilt = type(rope)(theta=10000, axes_dim=list(found.config["axes_dims_rope"]), scale_rope=True)
    transformer.pos_embed = rebuilt
