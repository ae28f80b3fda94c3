"""State-dict conversion between the original (LDM / single-file) layout and diffusers / transformers layouts.

LDM → diffusers goes through the converters diffusers ships (`diffusers.loaders.single_file_utils`); diffusers
ships no writer, so diffusers → LDM is ours (used by the tests and the toy-model training script to write
single-file checkpoints). The two are exact inverses: a round trip gives identical tensors.

Prefixes inside a single-file checkpoint:
    model.diffusion_model.                          UNet
    first_stage_model.                              VAE
    cond_stage_model.transformer.text_model.        SD1 CLIP-L (transformers layout)
    cond_stage_model.model.                         SD2 OpenCLIP-H (open_clip layout)
    conditioner.embedders.0.transformer.text_model. SDXL CLIP-L
    conditioner.embedders.1.model.                  SDXL OpenCLIP-G (refiner: conditioner.embedders.0.model.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from .offline import ensure_offline

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."

_RESNET_TO_LDM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER_TO_LDM = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def with_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {prefix + key: value for key, value in state.items()}


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def has_prefix(state: Mapping[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state)


def diffusers_config(module: torch.nn.Module) -> Any:
    """A diffusers model's `config` (the FrozenDict of its constructor arguments). To a type checker any attribute
    of an nn.Module is a submodule or a tensor, hence this typed accessor."""
    return module.config


def _rename_first(name: str, table: Mapping[str, str]) -> str:
    """Replace the leading component(s) of `name` that appear in `table` (longest match)."""
    for old in sorted(table, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return table[old] + name[len(old):]
    return name


# diffusers → LDM ---------------------------------------------------------------------------------------------

ValueT = TypeVar("ValueT")


def unet_to_ldm(state: Mapping[str, ValueT], layers_per_block: int) -> dict[str, ValueT]:
    """A diffusers UNet2DConditionModel state dict in LDM (openaimodel) names, without the UNet prefix. Values are
    carried through untouched (LoRA key maps rename parameter names with it)."""
    per_down = layers_per_block + 1   # input blocks per level: resnets + the downsampler
    per_up = layers_per_block + 1     # output blocks per level: one more resnet than down
    # Which up blocks have attentions decides whether the upsampler sits at index 1 or 2 of its output block.
    up_with_attention = {int(key.split(".")[1]) for key in state if key.startswith("up_blocks.") and
                         key.split(".")[2] == "attentions"}
    fixed = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    }
    out: dict[str, ValueT] = {}
    for key, value in state.items():
        parts = key.split(".")
        head_length = 1 if parts[0] in fixed else 2
        head = ".".join(parts[:head_length])
        if head in fixed:
            out[fixed[head] + "." + ".".join(parts[head_length:])] = value
            continue
        if parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.* -> input_blocks.n.0.op.*
                n = (level + 1) * per_down
                out[f"input_blocks.{n}.0.op." + ".".join(parts[5:])] = value
                continue
            j, rest = int(parts[3]), ".".join(parts[4:])
            n = 1 + level * per_down + j
            if kind == "resnets":
                out[f"input_blocks.{n}.0." + _rename_first(rest, _RESNET_TO_LDM)] = value
            else:
                out[f"input_blocks.{n}.1." + rest] = value
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                out[f"middle_block.{2 * j}." + _rename_first(rest, _RESNET_TO_LDM)] = value
            else:
                out[f"middle_block.{2 * j + 1}." + rest] = value
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # up_blocks.b.upsamplers.0.conv.* -> output_blocks.n.{1|2}.conv.*
                n = level * per_up + layers_per_block
                slot = 2 if level in up_with_attention else 1
                out[f"output_blocks.{n}.{slot}.conv." + ".".join(parts[5:])] = value
                continue
            j, rest = int(parts[3]), ".".join(parts[4:])
            n = level * per_up + j
            if kind == "resnets":
                out[f"output_blocks.{n}.0." + _rename_first(rest, _RESNET_TO_LDM)] = value
            else:
                out[f"output_blocks.{n}.1." + rest] = value
        else:
            raise ValueError(f"unet_to_ldm: no LDM name for diffusers key {key!r}")
    return out


def vae_to_ldm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A diffusers AutoencoderKL state dict in LDM names (without the first_stage_model. prefix)."""
    up_levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    out: StateDict = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        side, rest = parts[0], parts[1:]
        if rest[0] == "conv_norm_out":
            out[f"{side}.norm_out." + ".".join(rest[1:])] = value
        elif rest[0] in ("conv_in", "conv_out"):
            out[key] = value
        elif rest[0] in ("down_blocks", "up_blocks"):
            level = int(rest[1])
            ldm_level = level if rest[0] == "down_blocks" else up_levels - 1 - level
            stage = "down" if rest[0] == "down_blocks" else "up"
            if rest[2] == "resnets":
                tail = _rename_first(".".join(rest[4:]), _VAE_RESNET_TO_LDM)
                out[f"{side}.{stage}.{ldm_level}.block.{rest[3]}.{tail}"] = value
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sampler = "downsample" if stage == "down" else "upsample"
                out[f"{side}.{stage}.{ldm_level}.{sampler}." + ".".join(rest[4:])] = value
        elif rest[0] == "mid_block":
            if rest[1] == "resnets":
                tail = _rename_first(".".join(rest[3:]), _VAE_RESNET_TO_LDM)
                out[f"{side}.mid.block_{int(rest[2]) + 1}.{tail}"] = value
            else:
                tail = ".".join(rest[3:])
                renamed = _rename_first(tail, _VAE_ATTENTION_TO_LDM)
                # diffusers uses Linear q/k/v/out; LDM uses 1x1 convolutions.
                if value.ndim == 2:
                    value = value[:, :, None, None]
                out[f"{side}.mid.attn_1.{renamed}"] = value
        else:
            raise ValueError(f"vae_to_ldm: no LDM name for diffusers key {key!r}")
    return out


def clip_to_hf_legacy(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A transformers CLIP text model state dict in the legacy `text_model.*` layout used by checkpoints
    (transformers >= 5.6 drops that level for CLIPTextModel; CLIPTextModelWithProjection keeps it)."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("text_model.") or key.startswith("text_projection."):
            out[key] = value
        else:
            out["text_model." + key] = value
    return out


def clip_to_open_clip(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A transformers CLIP text model (optionally with projection) in open_clip names: fused in_proj q/k/v,
    `text_projection` stored transposed ([width, embed_dim])."""
    legacy = clip_to_hf_legacy(state)
    out: StateDict = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in legacy.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        name = key[len("text_model."):]
        if name == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif name == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif name.startswith("embeddings.position_ids"):
            continue
        elif name.startswith("final_layer_norm."):
            out["ln_final." + name.split(".", 1)[1]] = value
        elif name.startswith("encoder.layers."):
            parts = name.split(".")
            index, rest = parts[2], ".".join(parts[3:])
            if rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.rsplit(".", 1)[1]  # weight | bias
                fused.setdefault(f"transformer.resblocks.{index}.attn.in_proj_{kind}", {})[rest.split(".")[1]] = value
            else:
                out[f"transformer.resblocks.{index}." + _rename_first(rest, _OPEN_CLIP_LAYER_TO_LDM)] = value
        else:
            raise ValueError(f"clip_to_open_clip: no open_clip name for {key!r}")
    for name, pieces in fused.items():
        out[name] = torch.cat([pieces["q_proj"], pieces["k_proj"], pieces["v_proj"]], dim=0)
    return out


def build_single_file(unet: StateDict, unet_layers_per_block: int, vae: StateDict | None,
                      text_encoders: list[tuple[str, str, StateDict]]) -> StateDict:
    """One LDM checkpoint from diffusers components. text_encoders: (prefix, "hf"|"open_clip", state)."""
    checkpoint = with_prefix(unet_to_ldm(unet, unet_layers_per_block), UNET_PREFIX)
    if vae is not None:
        checkpoint.update(with_prefix(vae_to_ldm(vae), VAE_PREFIX))
    for prefix, layout, state in text_encoders:
        converted = clip_to_open_clip(state) if layout == "open_clip" else clip_to_hf_legacy(state)
        checkpoint.update(with_prefix(converted, prefix))
    return checkpoint


# Where each family's text encoders sit in a single file, and in which layout.
CHECKPOINT_TEXT_ENCODERS: dict[str, list[tuple[str, str, str]]] = {  # family -> [(slot, prefix, layout)]
    "sd1": [("l", SD1_CLIP_PREFIX, "hf")],
    "sd2": [("h", SD2_CLIP_PREFIX, "open_clip")],
    "sdxl": [("l", SDXL_CLIP_L_PREFIX, "hf"), ("g", SDXL_CLIP_G_PREFIX, "open_clip")],
    "sdxl_refiner": [("g", REFINER_CLIP_G_PREFIX, "open_clip")],
}


def ldm_checkpoint(family: str, unet: torch.nn.Module, vae: torch.nn.Module | None = None,
                   text_encoders: Mapping[str, torch.nn.Module] | None = None) -> StateDict:
    """A single-file (LDM layout) state dict from diffusers / transformers modules: a diffusers
    UNet2DConditionModel, an AutoencoderKL, and text encoders by CLIP slot ("l", "h", "g") as the family has them
    (SD1 {"l"}, SD2 {"h"}, SDXL {"l", "g"}, refiner {"g"})."""
    text_encoders = dict(text_encoders or {})
    layout = CHECKPOINT_TEXT_ENCODERS[family]
    unknown = set(text_encoders) - {slot for slot, _, _ in layout}
    if unknown:
        raise ValueError(f"a {family} checkpoint has no text encoder slot {sorted(unknown)}")
    return build_single_file(
        unet.state_dict(), diffusers_config(unet).layers_per_block, vae.state_dict() if vae is not None else None,
        [(prefix, kind, text_encoders[slot].state_dict()) for slot, prefix, kind in layout if slot in text_encoders],
    )


# LDM → diffusers (through diffusers' converters) -------------------------------------------------------------

def unet_from_ldm(checkpoint: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any],
                  prefix: str = UNET_PREFIX) -> StateDict:
    ensure_offline()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    # diffusers' converter expects the model.diffusion_model. prefix; re-prefix what we found.
    state = with_prefix(strip_prefix(checkpoint, prefix), UNET_PREFIX) if prefix != UNET_PREFIX else checkpoint
    return convert_ldm_unet_checkpoint(dict(state), dict(unet_config))


def vae_from_ldm(checkpoint: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]) -> StateDict:
    """VAE weights with or without the first_stage_model. prefix, in LDM names; diffusers-named VAE files
    (encoder.down_blocks...) pass through unchanged."""
    ensure_offline()
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if has_prefix(checkpoint, VAE_PREFIX):
        state = strip_prefix(checkpoint, VAE_PREFIX)
    else:
        state = dict(checkpoint)
    if any(key.startswith("encoder.down_blocks.") for key in state):
        return state
    # The converter strips a known prefix or, when none is present, keeps keys as they are.
    return convert_ldm_vae_checkpoint(state, dict(vae_config))


def clip_from_hf_layout(checkpoint: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """CLIP text weights under `prefix` in the legacy transformers layout (text_model.*), position_ids dropped."""
    state = strip_prefix(checkpoint, prefix)
    return {key if key.startswith(("text_model.", "text_projection")) else "text_model." + key: value
            for key, value in state.items() if not key.endswith("position_ids")}


def clip_from_open_clip(checkpoint: Mapping[str, torch.Tensor], prefix: str, text_model: Any) -> StateDict:
    """OpenCLIP text weights under `prefix` in transformers names (text_model.* + text_projection.weight)."""
    ensure_offline()
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    # diffusers skips a hard-coded list of SD2 keys (layer 23 and the projection) when they carry the
    # cond_stage_model.model. prefix, because its SD2 pipeline runs 23 layers. We keep every layer (the CLIP
    # object picks the penultimate one, as ComfyUI does), so hand the weights over under a neutral prefix.
    neutral = "open_clip."
    state = with_prefix(strip_prefix(checkpoint, prefix), neutral)
    converted = convert_open_clip_checkpoint(text_model, state, prefix=neutral)
    return {key: value for key, value in converted.items() if not key.endswith("position_ids")}


def load_text_model_weights(model: torch.nn.Module, legacy_state: Mapping[str, torch.Tensor]) -> None:
    """Load text_model.*-named weights into a transformers CLIP text model, whichever layout its class uses.
    Raises ValueError listing missing/unexpected keys (a strict load)."""
    own = set(model.state_dict())
    flat = not any(key.startswith("text_model.") for key in own)
    state = {}
    for key, value in legacy_state.items():
        if flat and key.startswith("text_model."):
            key = key[len("text_model."):]
        state[key] = value
    if "text_projection.weight" in state and "text_projection.weight" not in own:
        state.pop("text_projection.weight")  # a projection the chosen class does not use
    missing = sorted(own - set(state) - {k for k in own if k.endswith("position_ids")})
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"text encoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
