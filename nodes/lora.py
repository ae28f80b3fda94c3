"""LoRA nodes with ComfyUI's class names, inputs and outputs: LoraLoader, LoraLoaderModelOnly.

The nodes never touch the network: they return clones of MODEL / CLIP carrying a LoraPatch (the model-patch API,
nodes.diffusion.patches). The UNet's patch is applied by the memory manager for the sampling call and kept there
while the same patch set is asked for again (swapped exactly when another set is); CLIP's is applied and restored
around each encode. Changing a LoRA or its strength re-runs only this node and its consumers, never the
checkpoint loader, and no other graph or branch ever sees a patched model. The file's tensors are
held by the model memory manager (keyed by path, size and mtime) so a strength change does not re-read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, MODEL, Combo, Float, Output, Socket

from .diffusion import lora as lora_math
from .diffusion.checkpoint import read_state_dict
from .diffusion.clip import ClipModel
from .diffusion.models import DiffusionModel
from .model_files import file_identity, load_model, locate_model, model_choices, model_fingerprint, model_key

# Spellings of text-encoder keys: ignored (not "unmatched") when there is no CLIP to patch.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_prior_te")
STRENGTH = Float(min=-100.0, max=100.0, step=0.01)
SHOWN_KEYS = 5


class LoraTensors(torch.nn.Module):
    """A LoRA file's tensors as buffers, so the memory manager counts (and can drop) them like any model."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], source: str):
        super().__init__()
        self.names = list(tensors)
        for index, name in enumerate(self.names):
            self.register_buffer(f"t{index}", tensors[name], persistent=False)
        self.metadata = metadata
        self.source = source

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"t{index}") for index, name in enumerate(self.names)}


def read_lora_file(path: Path) -> LoraTensors:
    tensors = read_state_dict(path)  # first: it turns a damaged file into a ModelFileError naming the file
    metadata: dict[str, Any] = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = lora_math.read_adapter_metadata(handle.metadata())
    return LoraTensors(tensors, metadata, str(path))


def load_lora(ctx: RunContext, lora_name: str) -> LoraTensors:
    path = locate_model(ctx, "lora_name", "loras", lora_name)
    key = model_key("lora", file_identity(path))
    return load_model(ctx, "lora_name", lora_name, key, lambda: read_lora_file(path))


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def apply_lora(ctx: RunContext, lora_name: str, lora_file: LoraTensors, model: DiffusionModel | None,
               clip: ClipModel | None, strength_model: float, strength_clip: float) \
        -> tuple[DiffusionModel | None, ClipModel | None]:
    """Clones of model / clip with the file's adapters at the given strengths (strength 0: left as they are)."""
    key_map: dict[str, lora_math.Target] = {}
    if model is not None:
        key_map.update(lora_math.key_map_unet(model.unet))
    if clip is not None:
        key_map.update(lora_math.key_map_clip(clip.encoders, clip.family))
    try:
        parsed = lora_math.parse_lora(lora_file.tensors(), key_map, lora_file.metadata,
                                      () if clip is not None else TEXT_ENCODER_PREFIXES)
    except lora_math.LoraFormatError as error:
        raise InputError("lora_name", f"{lora_name}: not a usable LoRA file: {error}") from error
    if not parsed.adapters:
        family = model.family if model is not None else clip.family if clip is not None else "?"
        found = parsed.unmatched + parsed.ignored
        if parsed.unmatched or not found:
            raise InputError("lora_name", f"{lora_name}: none of its {len(found)} adapted layers match this "
                             f"{family} model (e.g. {_shown(found) or 'no LoRA tensors at all'}); the LoRA is for "
                             f"another architecture or is not a LoRA file")
    where = f"input 'lora_name' ({lora_name})"
    if parsed.unmatched:
        ctx.warn(f"{where}: {len(parsed.unmatched)} LoRA keys match no layer and were not loaded: "
                 f"{_shown(parsed.unmatched)}")
    if parsed.unusable:
        ctx.warn(f"{where}: {len(parsed.unusable)} tensors are not supported adapter parts and were ignored: "
                 f"{_shown(parsed.unusable)}")
    results: list[Any] = []
    for owner, target, strength in (("model", model, strength_model), ("clip", clip, strength_clip)):
        entries = tuple((t.parameter, adapter, float(strength)) for t, adapter in parsed.adapters
                        if t.owner == owner)
        module = None if target is None else target.unet if isinstance(target, DiffusionModel) else target.encoders
        if module is not None:
            # Bias offsets (diff_b) of layers that have no bias are dropped, as ComfyUI drops them.
            present = {name for name, _ in module.named_parameters()}
            entries = tuple(entry for entry in entries if entry[0] in present or not entry[0].endswith(".bias"))
        if target is None or module is None or not entries or strength == 0:
            results.append(target)
            continue
        patch = lora_math.LoraPatch(entries)
        try:
            patch.check(module)
        except lora_math.LoraFormatError as error:
            raise InputError("lora_name", f"{lora_name}: does not fit this {target.family} model: {error}") \
                from error
        results.append(lora_math.attach(target, patch))
    return results[0], results[1]


class LoraLoader(Node):
    display_name = "Load LoRA"
    category = "loaders"
    description = ("LoRAs modify diffusion and CLIP models, altering how latents are denoised; several can be "
                   "chained.")
    outputs = (Output(MODEL, tooltip="The modified diffusion model."),
               Output(CLIP, tooltip="The modified CLIP model."))
    model: Annotated[Any, Socket(MODEL, tooltip="The diffusion model the LoRA will be applied to.")]
    clip: Annotated[Any, Socket(CLIP, tooltip="The CLIP model the LoRA will be applied to.")]
    lora_name: Annotated[str, Combo(model_choices("loras"), tooltip="The name of the LoRA.")]
    strength_model: Annotated[float, STRENGTH] = 1.0
    strength_clip: Annotated[float, STRENGTH] = 1.0

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "loras", constants.get("lora_name"), "lora")

    def run(self, ctx: RunContext):
        if self.strength_model == 0 and self.strength_clip == 0:
            return (self.model, self.clip)
        lora_file = load_lora(ctx, self.lora_name)
        return apply_lora(ctx, self.lora_name, lora_file, self.model, self.clip, self.strength_model,
                          self.strength_clip)


class LoraLoaderModelOnly(Node):
    display_name = "LoraLoaderModelOnly"
    category = "loaders"
    description = "A LoRA applied to the diffusion model only."
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    lora_name: Annotated[str, Combo(model_choices("loras"))]
    strength_model: Annotated[float, STRENGTH] = 1.0

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "loras", constants.get("lora_name"), "lora")

    def run(self, ctx: RunContext):
        if self.strength_model == 0:
            return (self.model,)
        lora_file = load_lora(ctx, self.lora_name)
        model, _ = apply_lora(ctx, self.lora_name, lora_file, self.model, None, self.strength_model, 0.0)
        return (model,)


NODES = [LoraLoader, LoraLoaderModelOnly]
