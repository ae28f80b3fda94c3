"""SigLIP vision encoders from ComfyUI's models/clip_vision files (sigclip_vision_patch14_384 for Flux Redux).

The files use transformers' SiglipVisionModel names under `vision_model.` (patch embedding with a bias, no class
token, no pre-layer-norm; an attention-pooling `head.*` that ComfyUI does not load). The configuration is read
from the shapes; what shapes cannot tell follows ComfyUI's clip_vision_siglip_384 / _512 configs: 16 heads,
gelu (tanh approximation), mean = std = 0.5 preprocessing — and ComfyUI's layer norms use torch's default
eps 1e-5 (transformers' SigLIP config says 1e-6).

The output as ComfyUI's ClipVisionModel gives it for SigLIP: last_hidden_state after the post layer norm,
image_embeds = that same token sequence (ComfyUI has no projection or pooling for SigLIP: [B, tokens, width]),
penultimate_hidden_states = the output of the second-to-last layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import ModelFileError, _materialize
from .clip_vision import ClipVisionModel
from .offline import ensure_offline

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
SIGLIP_HEADS = 16
COMFYUI_LAYER_NORM_EPS = 1e-5
PREFIX = "vision_model."


def is_siglip(state: Mapping[str, torch.Tensor]) -> bool:
    """A SigLIP vision tower: a biased patch embedding and no CLIP pre-layer-norm / class token."""
    return (f"{PREFIX}embeddings.patch_embedding.bias" in state
            and f"{PREFIX}encoder.layers.0.layer_norm1.weight" in state
            and f"{PREFIX}pre_layrnorm.weight" not in state and f"{PREFIX}embeddings.class_embedding" not in state)


def _layer_count(state: Mapping[str, torch.Tensor]) -> int:
    count = 0
    while f"{PREFIX}encoder.layers.{count}.layer_norm1.weight" in state:
        count += 1
    return count


def siglip_config(state: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    """SiglipVisionConfig keyword arguments read from the weights' shapes."""
    patch = state[f"{PREFIX}embeddings.patch_embedding.weight"]
    positions = state[f"{PREFIX}embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ModelFileError(f"{what}: {positions} SigLIP position embeddings are not a square grid")
    hidden = patch.shape[0]
    if f"{PREFIX}post_layernorm.weight" not in state:
        raise ModelFileError(f"{what}: the SigLIP vision model has no post_layernorm")
    return {
        "hidden_size": hidden, "num_channels": patch.shape[1], "patch_size": patch.shape[2],
        "image_size": grid * patch.shape[2], "num_hidden_layers": _layer_count(state),
        "num_attention_heads": SIGLIP_HEADS if hidden % SIGLIP_HEADS == 0 else 1,
        "intermediate_size": state[f"{PREFIX}encoder.layers.0.mlp.fc1.weight"].shape[0],
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": COMFYUI_LAYER_NORM_EPS, "vision_use_head": False,
    }


@dataclass(frozen=True, eq=False)
class SiglipVision(ClipVisionModel):
    """What a CLIP_VISION link carries for a SigLIP file: transformers' SiglipVisionModel and its preprocessing
    (CLIP's, with SigLIP's mean and std). SigLIP has no projection: its image embeddings are the last tokens."""

    image_mean: tuple[float, ...] = SIGLIP_MEAN
    image_std: tuple[float, ...] = SIGLIP_STD

    def image_embeds_of(self, out: Any) -> torch.Tensor:
        return out.last_hidden_state


def build_siglip_vision(state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str,
                        source: str = "") -> SiglipVision:
    """A SiglipVision from a file's weights (`vision_model.*`); the pooling head and other extras are left out,
    missing weights are an error."""
    ensure_offline()
    from transformers import SiglipVisionConfig, SiglipVisionModel

    settings = siglip_config(state, what)
    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig(**settings))
    own = set(model.state_dict())
    # (transformers' own names may or may not keep the vision_model. prefix)
    rename = (lambda key: key) if any(key.startswith(PREFIX) for key in own) else (lambda key: key[len(PREFIX):])
    weights = {rename(key): value for key, value in state.items() if key.startswith(PREFIX)}
    weights = {key: value for key, value in weights.items() if key in own}
    return SiglipVision(model=_materialize(model, weights, dtype, what).eval(), image_size=int(settings["image_size"]),
                        source=source)
