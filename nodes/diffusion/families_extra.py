"""AuraFlow and Chroma diffusion transformers from ComfyUI's single files (detection, config, weight names).

Detection follows ComfyUI's comfy/model_detection.py: AuraFlow's MMDiT has `double_layers.0.attn.w1q.weight`
(ComfyUI's files keep it under `model.`); Chroma is Flux's layout (`double_blocks.*`, `img_in`) with the
`distilled_guidance_layer.*` modulation approximator in place of Flux's per-block modulation weights.

Config from the shapes (ComfyUI hard-codes most of these for the full-size models; tiny files need them read):

* AuraFlow: width = init_x_linear rows, patch 2 (ComfyUI's fixed value: the linear patch embedder cannot tell
  patch size from channels), in/out channels = init_x_linear columns / final_linear rows over the 4 patch cells,
  text width from cond_seq_linear, positional table size from positional_encoding, double / single layer counts.
  The q/k norms carry no weights, so the head count cannot be read: AuraFlow's heads are 256 wide (3072 / 12).
* Chroma: width = img_in rows, head width = the qk-norm scale length (128, the rotary split (16, 56, 56)), text
  width from txt_in, approximator width / depth / input width from distilled_guidance_layer.

Weights: AuraFlow through diffusers' convert_auraflow_transformer_checkpoint_to_diffusers (it reads every size from
the file). diffusers' Chroma converter hard-codes the 3072 width, so Chroma's double / single blocks go through
the Flux mapping of families.py (the same names) and the approximator is renamed here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .offline import ensure_offline

AURAFLOW_MARKER = "double_layers.0.attn.w1q.weight"
CHROMA_KEY = "distilled_guidance_layer."
AURAFLOW_HEAD_WIDTH = 256
AURAFLOW_PATCH = 2


def _count(state: Mapping[str, Any], prefix: str, block: str) -> int:
    regex = re.compile(re.escape(prefix + block) + r"\.(\d+)\.")
    return len({int(m.group(1)) for key in state if (m := regex.match(key))})


def _shape_reader(state: Mapping[str, torch.Tensor], prefix: str, family: str, error: type[Exception]):
    def shape(name: str) -> torch.Size:
        if prefix + name not in state:
            raise error(f"{family} weights without {name}")
        return state[prefix + name].shape
    return shape


def is_auraflow(state: Mapping[str, Any], prefix: str) -> bool:
    return prefix + AURAFLOW_MARKER in state


def is_chroma(state: Mapping[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix + CHROMA_KEY) for key in state)


def auraflow_config(state: Mapping[str, torch.Tensor], prefix: str, error: type[Exception]) -> dict[str, Any]:
    shape = _shape_reader(state, prefix, "AuraFlow", error)
    width, patch_inputs = shape("init_x_linear.weight")
    cells = AURAFLOW_PATCH * AURAFLOW_PATCH
    if width % AURAFLOW_HEAD_WIDTH or patch_inputs % cells:
        raise error(f"AuraFlow width {width} is not a multiple of its {AURAFLOW_HEAD_WIDTH}-wide heads, or its "
                    f"patch embedder ({patch_inputs} inputs) does not take 2x2 patches")
    if shape("t_embedder.mlp.0.weight")[0] != width:
        raise error("AuraFlow's conditioning width differs from its width (diffusers needs them equal)")
    doubles, singles = _count(state, prefix, "double_layers"), _count(state, prefix, "single_layers")
    if not singles:  # ComfyUI then builds the last double layer without its text MLP; diffusers has no such block
        raise error("AuraFlow without single layers is not supported")
    return {
        "sample_size": 64,
        "patch_size": AURAFLOW_PATCH,
        "in_channels": patch_inputs // cells,
        "num_mmdit_layers": doubles,
        "num_single_dit_layers": singles,
        "attention_head_dim": AURAFLOW_HEAD_WIDTH,
        "num_attention_heads": width // AURAFLOW_HEAD_WIDTH,
        "joint_attention_dim": shape("cond_seq_linear.weight")[1],
        "caption_projection_dim": width,
        "out_channels": shape("final_linear.weight")[0] // cells,
        "pos_embed_max_size": shape("positional_encoding")[1],
    }


def chroma_config(state: Mapping[str, torch.Tensor], prefix: str, error: type[Exception],
                  rope_axes: tuple[int, ...]) -> dict[str, Any]:
    shape = _shape_reader(state, prefix, "Chroma", error)
    width, in_channels = shape("img_in.weight")
    head_width = shape("double_blocks.0.img_attn.norm.key_norm.scale")[0]
    if head_width != sum(rope_axes) or width % head_width:
        raise error(f"Chroma heads {head_width} wide (width {width}): only 128-wide heads (rotary axes "
                    f"{rope_axes}) are known")
    if shape("double_blocks.0.img_mlp.0.weight")[0] != 4 * width:
        raise error(f"Chroma MLP width is not 4 x {width}")
    hidden, approximator_inputs = shape("distilled_guidance_layer.in_proj.weight")
    if shape("distilled_guidance_layer.out_proj.weight")[0] != width or approximator_inputs % 4:
        raise error("Chroma's modulation approximator does not fit its width")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shape("final_layer.linear.weight")[0],
        "num_layers": _count(state, prefix, "double_blocks"),
        "num_single_layers": _count(state, prefix, "single_blocks"),
        "attention_head_dim": head_width,
        "num_attention_heads": width // head_width,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "axes_dims_rope": rope_axes,
        "approximator_num_channels": approximator_inputs,
        "approximator_hidden_dim": hidden,
        "approximator_layers": _count(state, prefix, "distilled_guidance_layer.layers"),
    }


def auraflow_to_diffusers(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    ensure_offline()
    from diffusers.loaders.single_file_utils import convert_auraflow_transformer_checkpoint_to_diffusers

    own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return convert_auraflow_transformer_checkpoint_to_diffusers(own)  # pops from `own`, a dict of our own


_APPROXIMATOR_LAYER = {"in_layer": "linear_1", "out_layer": "linear_2"}


def chroma_to_diffusers(state: Mapping[str, torch.Tensor], prefix: str, width: int, flux_mapping: Any) \
        -> dict[str, torch.Tensor]:
    """Chroma's names -> ChromaTransformer2DModel's: the approximator renamed here (layers.N.in_layer/out_layer ->
    linear_1/linear_2, norms.N.scale -> .weight), everything else by Flux's mapping `flux_mapping`."""
    approximator = prefix + CHROMA_KEY
    out: dict[str, torch.Tensor] = {}
    for full_key, value in state.items():
        if not full_key.startswith(approximator):
            continue
        key = full_key[len(prefix):]
        parts = key.split(".")
        if parts[1] == "layers" and parts[3] in _APPROXIMATOR_LAYER:
            key = ".".join(parts[:3] + [_APPROXIMATOR_LAYER[parts[3]]] + parts[4:])
        elif parts[1] == "norms" and parts[-1] == "scale":
            key = ".".join(parts[:-1] + ["weight"])
        out[key] = value
    rest = {key: value for key, value in state.items() if key.startswith(prefix) and not key.startswith(approximator)}
    out.update(flux_mapping(rest, prefix, width))
    return out


def transformer_class(family: str) -> Any:
    from . import model_code

    if family == "auraflow":
        return model_code.transformer_class("auraflow_transformer_2d", "AuraFlowTransformer2DModel")
    return model_code.transformer_class("transformer_chroma", "ChromaTransformer2DModel")


def default_sampling(family: str) -> dict[str, Any]:
    """ComfyUI's defaults: AuraFlow = FLOW with shift 1.73, multiplier 1 (ModelSamplingAuraFlow); Chroma = the
    Flux schedule (model type FLUX) with its default shift 1.15, multiplier 1."""
    if family == "auraflow":
        return {"prediction": "const", "schedule": "discrete_flow", "shift": 1.73, "multiplier": 1.0}
    return {"prediction": "const", "schedule": "flux", "shift": 1.15, "multiplier": 1.0}


def rebuild_chroma_tables(transformer: torch.nn.Module) -> None:
    """Chroma's modulation-index embedding is a computed, non-persistent buffer (not in files), which a network
    built on the meta device leaves without data: rebuild that embedder on the CPU."""
    embedder: Any = transformer.get_submodule("time_text_embed")
    with torch.device("cpu"):
        rebuilt = type(embedder)(num_channels=embedder.time_proj.num_channels, out_dim=embedder.mod_proj.shape[0])
    transformer.time_text_embed = rebuilt
