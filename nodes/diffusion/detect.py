"""Architecture detection from state-dict tensor shapes, and the diffusers / transformers configs for what was found.

Everything is read from the weights (widths, depths, levels, context size, projection style, conditioning
inputs), so non-standard and tiny checkpoints load as well as the stock ones. What shapes cannot tell:

* attention heads: SD1-style UNets (conv proj_in) use 8 heads; SD2/SDXL-style (linear proj_in) use 64-wide
  heads, i.e. width // 64 (at least 1). CLIP text encoders use width // 64 heads (L: 12, H: 16, G: 20).
* SDXL's size-conditioning embedding is 256 wide per value (6 values for base, 5 for the refiner).
* prediction type (eps / v): see `_prediction`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .convert import (
    REFINER_CLIP_G_PREFIX,
    SD1_CLIP_PREFIX,
    SD2_CLIP_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    VAE_PREFIX,
    has_prefix,
    strip_prefix,
    vae_to_ldm,
)

SDXL_TIME_EMBED_DIM = 256
# ComfyUI's SD2 v-prediction test: the std of this bias exceeds 0.09 in v models (768-v) and not in eps ones.
V_PREDICTION_STD_THRESHOLD = 0.09
UNET_PREFIXES = ("model.diffusion_model.", "model.model.", "net.")


class UnknownArchitecture(ValueError):
    """The weights are not an SD1.x / SD2.x / SDXL checkpoint this engine can run."""


@dataclass(frozen=True)
class UNetShape:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    transformer_depth: tuple[int, ...]   # per level, 0 = no attention at that level
    mid_depth: int | None                # None: no middle block; 0: middle block without attention
    context_dim: int | None
    linear_projection: bool
    adm_in_channels: int | None
    time_embed_dim: int


@dataclass(frozen=True)
class TextEncoderShape:
    prefix: str
    layout: str                          # "hf" (transformers names) | "open_clip"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    max_positions: int
    projection_dim: int | None


@dataclass(frozen=True)
class Detected:
    family: str                          # "sd1" | "sd2" | "sdxl" | "sdxl_refiner"
    prediction: str                      # "eps" | "v"
    unet: UNetShape
    unet_prefix: str
    variant: str = ""                    # "" | "inpaint" (9 input channels) | "instruct_pix2pix" (8)
    text_encoders: dict[str, TextEncoderShape] = field(default_factory=dict)   # "l" | "g" | "h" -> shape
    has_vae: bool = False
    notes: tuple[str, ...] = ()          # things the loader should warn about


# UNet --------------------------------------------------------------------------------------------------------

def find_unet_prefix(state: Mapping[str, Any]) -> str | None:
    """ComfyUI's rule: the first of the known prefixes with more than 5 keys, else `model.` (if it holds an
    SD-style UNet), else no prefix when the file is a bare UNet."""
    for prefix in UNET_PREFIXES:
        if sum(1 for key in state if key.startswith(prefix)) > 5:
            return prefix
    for prefix in ("model.", ""):
        if f"{prefix}input_blocks.0.0.weight" in state:
            return prefix
    return None


def _indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state if (m := regex.match(key))})


def read_unet_shape(state: Mapping[str, torch.Tensor], prefix: str) -> UNetShape:
    unet = strip_prefix(state, prefix)
    if "input_blocks.0.0.weight" not in unet:
        raise UnknownArchitecture("no SD-style UNet (input_blocks.0.0.weight) in the weights")
    conv_in = unet["input_blocks.0.0.weight"]
    model_channels = conv_in.shape[0]
    levels: list[list[int]] = [[]]  # per level: the transformer depth of each res block
    widths: list[int] = []
    for n in _indices(unet, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in unet:
            levels.append([])
            continue
        if f"input_blocks.{n}.0.in_layers.0.weight" not in unet:
            raise UnknownArchitecture(f"input block {n} is neither a res block nor a downsampler")
        if len(levels[-1]) == 0:
            widths.append(unet[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0])
        levels[-1].append(len(_indices(unet, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\.")))
    if len({len(blocks) for blocks in levels}) != 1 or not levels[0]:
        raise UnknownArchitecture(f"uneven res blocks per level: {[len(b) for b in levels]}")
    if any(len(set(blocks)) != 1 for blocks in levels):
        raise UnknownArchitecture("transformer depth varies inside one level")
    mid_depth: int | None = None
    if "middle_block.0.in_layers.0.weight" in unet:
        mid_depth = len(_indices(unet, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    context = next((t.shape[1] for k, t in unet.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((t for k, t in unet.items() if k.endswith(".proj_in.weight")), None)
    label = unet.get("label_emb.0.0.weight")
    if model_channels != widths[0]:
        raise UnknownArchitecture(f"first level width {widths[0]} differs from conv_in width {model_channels}")
    return UNetShape(
        in_channels=conv_in.shape[1],
        out_channels=unet["out.2.weight"].shape[0],
        block_out_channels=tuple(widths),
        layers_per_block=len(levels[0]),
        transformer_depth=tuple(blocks[0] for blocks in levels),
        mid_depth=mid_depth,
        context_dim=context,
        linear_projection=proj_in is not None and proj_in.ndim == 2,
        adm_in_channels=label.shape[1] if label is not None else None,
        time_embed_dim=unet["time_embed.0.weight"].shape[0],
    )


def unet_family(shape: UNetShape, state: Mapping[str, Any] | None = None) -> str:
    if shape.adm_in_channels is None:
        return "sd2" if shape.linear_projection else "sd1"
    if not shape.linear_projection:
        raise UnknownArchitecture("UNet with class/size conditioning but conv projections (not SD1/SD2/SDXL)")
    if shape.context_dim == 1024 and shape.adm_in_channels in (1536, 2048):
        return "sd2"  # SD2.1-unCLIP (L: 768-wide image embeds, H: 1024): its adm input is the class embedding
    if state is not None:
        if has_prefix(state, REFINER_CLIP_G_PREFIX):
            return "sdxl_refiner"
        if has_prefix(state, SDXL_CLIP_G_PREFIX):
            return "sdxl"
    # Refiner: pooled (1280) + 5 size values; its context is the pooled width too. Base: pooled + 6 values.
    if shape.adm_in_channels - 5 * SDXL_TIME_EMBED_DIM == shape.context_dim:
        return "sdxl_refiner"
    return "sdxl"


def unet_heads(shape: UNetShape) -> tuple[int, ...]:
    if not shape.linear_projection:
        return tuple(8 for _ in shape.block_out_channels)
    return tuple(max(1, width // 64) for width in shape.block_out_channels)


def unet_config(shape: UNetShape, family: str) -> dict[str, Any]:
    """UNet2DConditionModel keyword arguments for the shape."""
    attention = [depth > 0 for depth in shape.transformer_depth]
    if shape.mid_depth and attention[-1] and shape.mid_depth != shape.transformer_depth[-1]:
        raise UnknownArchitecture("middle block depth differs from the last level's depth (not expressible)")
    depth_for_blocks = [depth or (shape.mid_depth or 1) for depth in shape.transformer_depth]
    config: dict[str, Any] = {
        "sample_size": {"sdxl": 128, "sdxl_refiner": 128}.get(family, 64),
        "in_channels": shape.in_channels,
        "out_channels": shape.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": list(shape.block_out_channels),
        "layers_per_block": shape.layers_per_block,
        "cross_attention_dim": shape.context_dim or 768,
        # diffusers' historical naming: attention_head_dim holds the number of heads.
        "attention_head_dim": list(unet_heads(shape)),
        "use_linear_projection": shape.linear_projection,
        "transformer_layers_per_block": depth_for_blocks,
        "norm_num_groups": 32,
        "mid_block_type": None if shape.mid_depth is None else
        ("UNetMidBlock2DCrossAttn" if shape.mid_depth > 0 else "UNetMidBlock2D"),
    }
    if shape.time_embed_dim != shape.block_out_channels[0] * 4:
        config["time_embedding_dim"] = shape.time_embed_dim
    if shape.adm_in_channels is not None and family == "sd2":  # SD2.1-unCLIP: image embeds + noise level
        config.update(class_embed_type="projection", projection_class_embeddings_input_dim=shape.adm_in_channels)
    elif shape.adm_in_channels is not None:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=shape.adm_in_channels)
    return config


def prediction_type(family: str, shape: UNetShape, unet: Mapping[str, torch.Tensor],
                    state: Mapping[str, Any], yaml_text: str | None) -> tuple[str, tuple[str, ...]]:
    """eps or v. In order: a sidecar .yaml's `parameterization: "v"`; a `v_pred` marker key (SDXL v models);
    for SD2 with 4 input channels ComfyUI's weight statistic (std of the last output block's first transformer
    norm1 bias above 0.09 means v); otherwise eps. Also returns warnings for the loader to pass on."""
    if yaml_text is not None:
        match = re.search(r"parameterization:\s*['\"]?(\w+)", yaml_text)
        if match:
            return ("v" if match.group(1) == "v" else "eps"), ()
    if "edm_mean" in state or "edm_vpred.sigma_max" in state:
        raise UnknownArchitecture("EDM-parameterised SDXL variants (Playground 2.5, EDM v-pred) are not supported")
    if "v_pred" in state:
        if "ztsnr" in state:
            return "v", ("zero-terminal-SNR marker ignored: sampled with the standard schedule",)
        return "v", ()
    if family == "sd2" and shape.adm_in_channels is not None:
        return "v", ()  # SD2.1-unCLIP models are v-prediction (ComfyUI's SD21UNCLIP)
    if family == "sd2" and shape.in_channels == 4:
        blocks = _indices(unet, r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias")
        if blocks:
            bias = unet[f"output_blocks.{blocks[-1]}.1.transformer_blocks.0.norm1.bias"].float()
            return ("v" if bias.std().item() > V_PREDICTION_STD_THRESHOLD else "eps"), ()
    return "eps", ()


# Text encoders -----------------------------------------------------------------------------------------------

def read_text_encoder_shape(state: Mapping[str, torch.Tensor], prefix: str) -> TextEncoderShape:
    """The shape of a CLIP text encoder stored under `prefix`, in either layout."""
    inner = strip_prefix(state, prefix)
    if "token_embedding.weight" in inner:  # open_clip
        tokens = inner["token_embedding.weight"]
        projection = inner.get("text_projection")
        return TextEncoderShape(
            prefix=prefix, layout="open_clip", vocab_size=tokens.shape[0], hidden_size=tokens.shape[1],
            intermediate_size=inner["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_layers=len(_indices(inner, r"transformer\.resblocks\.(\d+)\.")),
            max_positions=inner["positional_embedding"].shape[0],
            projection_dim=projection.shape[1] if projection is not None else None,
        )
    names = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in inner.items()}
    if "embeddings.token_embedding.weight" not in names:
        raise UnknownArchitecture(f"no CLIP text encoder under {prefix!r}")
    tokens = names["embeddings.token_embedding.weight"]
    projection = names.get("text_projection.weight")
    return TextEncoderShape(
        prefix=prefix, layout="hf", vocab_size=tokens.shape[0], hidden_size=tokens.shape[1],
        intermediate_size=names["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_layers=len(_indices(names, r"encoder\.layers\.(\d+)\.")),
        max_positions=names["embeddings.position_embedding.weight"].shape[0],
        projection_dim=projection.shape[0] if projection is not None else None,
    )


def text_encoder_config(shape: TextEncoderShape, slot: str) -> dict[str, Any]:
    """CLIPTextConfig keyword arguments for a CLIP slot: OpenAI CLIP-L ("l") uses quick_gelu, the OpenCLIP
    models (H, G) gelu. Token ids are the real CLIP vocabulary's."""
    openai = slot == "l"
    return {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": max(1, shape.hidden_size // 64),
        "max_position_embeddings": shape.max_positions,
        "hidden_act": "quick_gelu" if openai else "gelu",
        "projection_dim": shape.projection_dim or shape.hidden_size,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1 if openai else 0,
    }


def checkpoint_text_encoders(state: Mapping[str, Any], family: str) -> dict[str, TextEncoderShape]:
    """The text encoders a single-file checkpoint carries, by CLIP slot name ("l", "h", "g")."""
    found: dict[str, TextEncoderShape] = {}
    slots = {
        "sd1": [("l", SD1_CLIP_PREFIX)],
        "sd2": [("h", SD2_CLIP_PREFIX)],
        "sdxl": [("l", SDXL_CLIP_L_PREFIX), ("g", SDXL_CLIP_G_PREFIX)],
        "sdxl_refiner": [("g", REFINER_CLIP_G_PREFIX)],
    }[family]
    for slot, prefix in slots:
        if has_prefix(state, prefix):
            found[slot] = read_text_encoder_shape(state, prefix)
    return found


# VAE ---------------------------------------------------------------------------------------------------------

def vae_ldm_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAE weights in LDM names without prefix, from a checkpoint or a stand-alone VAE file (LDM- or
    diffusers-named)."""
    inner = strip_prefix(state, VAE_PREFIX) if has_prefix(state, VAE_PREFIX) else dict(state)
    if any(key.startswith("encoder.down_blocks.") for key in inner):
        inner = vae_to_ldm(inner)
    if "decoder.conv_in.weight" not in inner or "encoder.conv_in.weight" not in inner:
        raise UnknownArchitecture("no AutoencoderKL (encoder/decoder conv_in) in the weights")
    return inner


def vae_config(ldm: Mapping[str, torch.Tensor], scaling_factor: float = 0.18215) -> dict[str, Any]:
    """AutoencoderKL keyword arguments from LDM-named VAE weights."""
    levels = _indices(ldm, r"encoder\.down\.(\d+)\.")
    widths = [ldm[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    return {
        "in_channels": ldm["encoder.conv_in.weight"].shape[1],
        "out_channels": ldm["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": len(_indices(ldm, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": ldm["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": 32,
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in ldm,
        "use_post_quant_conv": "post_quant_conv.weight" in ldm,
    }


# Whole checkpoints -------------------------------------------------------------------------------------------

def detect_checkpoint(state: Mapping[str, torch.Tensor], yaml_text: str | None = None) -> Detected:
    """What a single-file checkpoint (or bare UNet file) holds. Raises UnknownArchitecture."""
    prefix = find_unet_prefix(state)
    if prefix is None:
        raise UnknownArchitecture("no diffusion UNet found (expected model.diffusion_model.input_blocks.*)")
    shape = read_unet_shape(state, prefix)
    family = unet_family(shape, state)
    prediction, notes = prediction_type(family, shape, strip_prefix(state, prefix), state, yaml_text)
    variant = {9: "inpaint", 8: "instruct_pix2pix"}.get(shape.in_channels, "")
    if shape.in_channels not in (4, 8, 9):
        raise UnknownArchitecture(f"UNet with {shape.in_channels} input channels is not an SD model")
    return Detected(
        family=family, prediction=prediction, unet=shape, unet_prefix=prefix, variant=variant,
        text_encoders=checkpoint_text_encoders(state, family),
        has_vae=has_prefix(state, VAE_PREFIX), notes=notes,
    )
