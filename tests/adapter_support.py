"""Helpers for the LoRA / ControlNet / embedding tests and tools/bench_lora.py (helpers, not tests)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tiny_models import tiny_components  # noqa: E402

from latentloom.nodes.diffusion.checkpoint import latent_format_for  # noqa: E402
from latentloom.nodes.diffusion.clip import ClipModel  # noqa: E402
from latentloom.nodes.diffusion.models import DiffusionModel, SamplingConfig  # noqa: E402


def tiny_objects(family: str = "sd1", seed: int = 0) -> tuple[DiffusionModel, ClipModel]:
    """A MODEL and a CLIP built straight from the tiny diffusers/transformers components."""
    parts = tiny_components(family, seed)
    model = DiffusionModel(unet=parts.unet.requires_grad_(False), family=parts.family,
                           sampling=SamplingConfig(prediction=parts.prediction),
                           latent_format=latent_format_for(parts.family), source=f"tiny-{family}-{seed}")
    clip = ClipModel(encoders=torch.nn.ModuleDict({k: v.requires_grad_(False) for k, v in parts.text_encoders.items()}),
                     family=parts.family, source=f"tiny-{family}-{seed}")
    return model, clip


def lora_factors(weight_shape: torch.Size, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random up/down factors for a Linear [out, in] or Conv2d [out, in, kh, kw] weight (LoCon for kernels > 1)."""
    out_features, in_features = weight_shape[0], weight_shape[1]
    if len(weight_shape) == 4:
        down = torch.randn((rank, in_features, weight_shape[2], weight_shape[3]), generator=generator) * 0.1
        up = torch.randn((out_features, rank, 1, 1), generator=generator) * 0.1
    else:
        down = torch.randn((rank, in_features), generator=generator) * 0.1
        up = torch.randn((out_features, rank), generator=generator) * 0.1
    return {"up": up, "down": down}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def kohya_lora_for_all(model: DiffusionModel, clip: ClipModel | None, rank: int = 4, alpha: float = 2.0,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya file (diffusers module names) adapting every Linear and Conv2d of the UNet's transformer blocks and
    resnets and every linear of the text encoders' layers: a LoRA as large as real ones are, relatively."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (".attentions." in name or ".resnets." in name):
            key = "lora_unet_" + name.replace(".", "_")
            factors = lora_factors(module.weight.shape, rank, generator)
            tensors[f"{key}.lora_up.weight"] = factors["up"]
            tensors[f"{key}.lora_down.weight"] = factors["down"]
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    if clip is not None:
        prefix = "lora_te_" if clip.family != "sdxl" else None
        for slot, encoder in clip.encoders.items():
            kohya = prefix or ("lora_te1_" if slot == "l" else "lora_te2_")
            for name, module in encoder.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in name:
                    path = name[name.index("encoder.layers."):]
                    key = kohya + "text_model_" + path.replace(".", "_")
                    factors = lora_factors(module.weight.shape, rank, generator)
                    tensors[f"{key}.lora_up.weight"] = factors["up"]
                    tensors[f"{key}.lora_down.weight"] = factors["down"]
                    tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def tiny_controlnet(family: str = "sd1", seed: int = 0) -> torch.nn.Module:
    """A diffusers ControlNetModel shaped like the tiny UNet of `family`, every weight perturbed (zero convs too,
    so the residuals are not zero)."""
    from diffusers import ControlNetModel

    parts = tiny_components(family, seed)
    net = ControlNetModel.from_unet(parts.unet)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return net.eval().requires_grad_(False)


def write_controlnet(path: Path, net: torch.nn.Module, layout: str = "ldm") -> Path:
    """layout: "ldm" (control_model.*), "bare" (LDM names without prefix) or "diffusers"."""
    from latentloom.nodes.diffusion.controlnet import controlnet_to_ldm

    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if layout != "diffusers":
        state = controlnet_to_ldm(state)
        if layout == "ldm":
            state = {"control_model." + k: v for k, v in state.items()}
    return save_safetensors(state, path)
