"""ComfyUI's MODEL_PATCH files (models/model_patches, ModelPatchLoader): which kind a file is, and the one kind the
engine runs, DiffSynth's block-wise ControlNet for Qwen-Image (comfy_extras/nodes_model_patch.py is the
specification).

The DiffSynth net turns a control image's latent into image tokens (Wan 2.1 normalisation on the first 16 channels,
2x2 patches packed channel-major, a linear `img_in`), and after transformer block i adds
    strength · output_proj(gelu(input_proj(rms(img)·w_x + rms(control)·w_y)))
to the image tokens of the sampled latent (reference-latent tokens are left alone). The USO style projector (a
SigLIP multi-layer projection Flux reads as extra text tokens) is recognised but not run: the engine has neither the
Flux input patch nor SigLIP's per-layer hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from .checkpoint import ModelFileError, read_state_dict
from .dit_calls import pad_to_patch
from .latent_formats import WAN21_LATENT

DIFFSYNTH_MARKER = "controlnet_blocks.0.y_rms.weight"
USO_MARKER = "feature_embedder.mid_layer_norm.bias"
BASE_IN_DIM = 64  # 16 latent channels x 2x2 patch
RMS_EPS = 1e-6
PATCH = 2


class ModelPatchUnsupported(ModelFileError):
    """A model patch file of a kind the engine recognises but does not run."""


class DiffSynthControlNet(torch.nn.Module):
    """The weights of a DiffSynth block-wise ControlNet (diffusers-free: plain parameters in ComfyUI's names)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.img_in = torch.nn.Linear(state["img_in.weight"].shape[1], state["img_in.weight"].shape[0])
        count = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("controlnet_blocks."))
        dim = self.img_in.out_features
        self.controlnet_blocks = torch.nn.ModuleList(_ControlBlock(dim) for _ in range(count))
        self.load_state_dict(state)
        self.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.img_in.out_features

    @property
    def additional_in_dim(self) -> int:
        return self.img_in.in_features - BASE_IN_DIM

    def image_tokens(self, latent: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[B, 16 (+ mask channels), h, w] raw VAE latent -> [B, tokens, dim] control tokens."""
        latent = latent.to(device=device, dtype=torch.float32).clone()
        latent[:, :16] = WAN21_LATENT.process_in(latent[:, :16])
        latent = pad_to_patch(latent, PATCH)
        n, c, h, w = latent.shape
        tokens = latent.view(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(n, (h // PATCH) * (w // PATCH), c * PATCH * PATCH).to(dtype)
        return _linear(tokens, self.img_in)

    def control(self, img: torch.Tensor, control: torch.Tensor, index: int) -> torch.Tensor:
        block = cast(_ControlBlock, self.controlnet_blocks[index])
        x = F.rms_norm(img, (img.shape[-1],), block.x_rms.to(img), eps=RMS_EPS)
        y = F.rms_norm(control, (control.shape[-1],), block.y_rms.to(img), eps=RMS_EPS)
        return _linear(F.gelu(_linear(x + y, block.input_proj)), block.output_proj)


class _ControlBlock(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.x_rms = torch.nn.Parameter(torch.ones(dim))
        self.y_rms = torch.nn.Parameter(torch.ones(dim))
        self.input_proj = torch.nn.Linear(dim, dim)
        self.output_proj = torch.nn.Linear(dim, dim)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # ComfyUI's RMSNorm keeps its scale at "<name>.weight".
        for name in ("x_rms", "y_rms"):
            if prefix + name + ".weight" in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + name + ".weight")
        super()._load_from_state_dict(state_dict, prefix, *args)


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """The layer run in x's device and dtype (the patch's weights stay wherever the memory manager keeps them)."""
    bias = None if layer.bias is None else layer.bias.to(x)
    return F.linear(x, layer.weight.to(x), bias)


@dataclass
class ModelPatch:
    """What a MODEL_PATCH link carries."""

    kind: str  # "diffsynth_controlnet", the one kind that loads
    net: DiffSynthControlNet
    source: str = ""

    def cache_nbytes(self) -> int:
        return 0  # the weights are owned (and counted) by the model memory manager


def load_model_patch_file(path: str | Path) -> ModelPatch:
    """A model patch from a file, kept in float32 (small; cast to the network's dtype per call)."""
    path = Path(path)
    state = read_state_dict(path)
    if DIFFSYNTH_MARKER in state:
        if "img_in.weight" not in state:
            raise ModelFileError(f"{path.name}: a DiffSynth ControlNet without img_in.weight")
        state = {key: value.float() for key, value in state.items()}
        return ModelPatch("diffsynth_controlnet", DiffSynthControlNet(state), str(path))
    if USO_MARKER in state:
        raise ModelPatchUnsupported(f"{path.name}: USO style projector patches are not supported yet (they need "
                                    "Flux's post-input patch and SigLIP's per-layer hidden states)")
    raise ModelFileError(f"{path.name}: not a model patch this engine knows (expected a DiffSynth Qwen-Image "
                         f"ControlNet with '{DIFFSYNTH_MARKER}')")
