"""LoRA extraction from a weight difference (ComfyUI's LoraSave, comfy_extras/nodes_lora_extract.py).

The input is a model whose effective weights *are* a difference (the output of ModelMergeSubtract /
CLIPMergeSubtract). Each ≥2-d weight ΔW becomes kohya factors by a truncated SVD: ΔW ≈ up·down with
up = U[:, :r]·diag(S[:r]) and down = Vh[:r] (3×3 convolutions flattened to [out, in·9], 1×1 ones squeezed), both
clamped to ± the 0.99 quantile of their joined values, as ComfyUI does. "full_diff" stores ΔW itself (`.diff`);
1-d weights are stored as `.diff` and biases as `.diff_b` when bias_diff is on. Everything is stored in float16.

Keys are ComfyUI's: `diffusion_model.<LDM module>` for the UNet and `text_encoders.clip_<slot>.transformer.
<transformers module>` for text encoders; nodes.diffusion.lora's key maps read both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import convert

CLAMP_QUANTILE = 0.99
LORA_TYPES = ("standard", "full_diff")


def extract_factors(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down ≈ diff at rank min(rank, out, in), clamped as ComfyUI clamps them."""
    conv = diff.ndim == 4
    kernel = tuple(diff.shape[2:4]) if conv else None
    out_dim, in_dim = diff.shape[0], diff.shape[1]
    rank = min(rank, in_dim, out_dim)
    matrix = diff
    if conv:
        matrix = diff.flatten(start_dim=1) if kernel != (1, 1) else diff.squeeze()
    # The reduced SVD: the first `rank` singular triplets are those of the full one, without an [m, m] U (a text
    # encoder's token embedding would need gigabytes).
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    up = u[:, :rank] @ torch.diag(s[:rank])
    down = vh[:rank, :]
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), CLAMP_QUANTILE)
    up, down = up.clamp(-high, high), down.clamp(-high, high)
    if conv and kernel is not None:
        up = up.reshape(out_dim, rank, 1, 1)
        down = down.reshape(rank, in_dim, kernel[0], kernel[1])
    return up, down


def extract_lora(weights: Mapping[str, torch.Tensor], module_keys: Mapping[str, str], rank: int, lora_type: str,
                 bias_diff: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LoRA tensors for `weights` (parameter name -> difference), named through `module_keys` (parameter name ->
    LoRA module key, without .weight / .bias). Returns (tensors, parameters whose factors could not be computed)."""
    if lora_type not in LORA_TYPES:
        raise ValueError(f"unknown lora_type {lora_type!r}; known: {', '.join(LORA_TYPES)}")
    out: dict[str, torch.Tensor] = {}
    failed: list[str] = []
    for name, value in weights.items():
        key = module_keys.get(name)
        if key is None:
            continue
        if name.endswith(".weight"):
            if lora_type == "full_diff":
                out[f"{key}.diff"] = value.contiguous().half()
            elif value.ndim < 2:
                if bias_diff:
                    out[f"{key}.diff"] = value.contiguous().half()
            else:
                try:
                    up, down = extract_factors(value, rank)
                except RuntimeError:  # e.g. torch.quantile's input-size limit on a huge embedding
                    failed.append(name)
                    continue
                out[f"{key}.lora_up.weight"] = up.contiguous().half()
                out[f"{key}.lora_down.weight"] = down.contiguous().half()
        elif bias_diff and name.endswith(".bias"):
            out[f"{key}.diff_b"] = value.contiguous().half()
    return out, failed


def _module(name: str) -> str | None:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def unet_module_keys(unet_state: Mapping[str, torch.Tensor], layers_per_block: int) -> dict[str, str]:
    """diffusers UNet parameter -> `diffusion_model.<LDM module>`."""
    ldm = convert.unet_to_ldm({name: name for name in unet_state}, layers_per_block)
    keys: dict[str, str] = {}
    for ldm_name, name in ldm.items():
        module = _module(ldm_name)
        if module is not None:
            keys[name] = "diffusion_model." + module
    return keys


def clip_module_keys(slot: str, encoder_state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """A text encoder's parameter -> `text_encoders.clip_<slot>.transformer.<transformers module>`, the names
    ComfyUI's clip patcher gives them (text_model.* whether or not our transformers class is flat)."""
    keys: dict[str, str] = {}
    for name in encoder_state:
        legacy = name if name.startswith(("text_model.", "text_projection")) else "text_model." + name
        module = _module(legacy)
        if module is not None:
            keys[name] = f"text_encoders.clip_{slot}.transformer.{module}"
    return keys
