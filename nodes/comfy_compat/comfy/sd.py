"""`comfy.sd`: loading checkpoints and applying LoRA state dicts the way packs call them, over our loaders.

Results are the pack views of model_objects.py (ModelPatcher / PackClip / PackVAE), as ComfyUI's functions return
its own objects. `VAE` and `CLIP` are those view classes (for isinstance checks); constructing one from a raw
state dict, as ComfyUI allows, is not provided.
"""

from __future__ import annotations

from typing import Any

from ...diffusion import checkpoint
from ...lora import LoraTensors, apply_lora
from ..context import NoEngineError, current_env, current_node
from ..model_objects import ModelPatcher, PackClip, PackVAE, engine_value, pack_view

VAE = PackVAE
CLIP = PackClip


def _manager() -> Any:
    ctx = current_node()
    return ctx.models if ctx is not None else current_env().models


def _views(loaded: checkpoint.LoadedCheckpoint, output_model: bool, output_vae: bool, output_clip: bool
           ) -> tuple[Any, ...]:
    return (pack_view(loaded.model) if output_model else None,
            pack_view(loaded.clip) if output_clip and loaded.clip is not None else None,
            pack_view(loaded.vae) if output_vae and loaded.vae is not None else None)


def load_checkpoint_guess_config(ckpt_path: str, output_vae: bool = True, output_clip: bool = True,
                                 output_clipvision: bool = False, embedding_directory: Any = None,
                                 output_model: bool = True, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """(MODEL, CLIP, VAE, CLIP_VISION) of a single-file checkpoint; the CLIP vision part is always None."""
    loaded = checkpoint.load_checkpoint(ckpt_path, _manager())
    return (*_views(loaded, output_model, output_vae, output_clip), None)


def load_diffusers_folder(model_path: str, output_vae: bool = True, output_clip: bool = True) -> tuple[Any, ...]:
    return _views(checkpoint.load_diffusers_folder(model_path, _manager()), True, output_vae, output_clip)


def load_lora_for_models(model: Any, clip: Any, lora: dict[str, Any], strength_model: float,
                         strength_clip: float) -> tuple[Any, Any]:
    """Clones of model / clip with a LoRA state dict applied (our LoRA loader's key matching and math)."""
    ctx = current_node()
    if ctx is None:
        raise NoEngineError("comfy.sd.load_lora_for_models can only be called while a node runs")
    tensors = LoraTensors(dict(lora), {}, "LoRA state dict")
    new_model, new_clip = apply_lora(ctx, "lora", tensors, engine_value(model), engine_value(clip),
                                     strength_model, strength_clip)
    return pack_view(new_model), pack_view(new_clip)


def _unsupported(name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"comfy.sd.{name} builds ComfyUI's own model classes, which latentloom does not "
                                  "provide; load models through nodes.CheckpointLoaderSimple / nodes.VAELoader / "
                                  "nodes.CLIPLoader instead")
    call.__name__ = name
    return call


load_checkpoint = _unsupported("load_checkpoint")
load_clip = _unsupported("load_clip")
load_diffusion_model = _unsupported("load_diffusion_model")
load_unet = _unsupported("load_unet")

__all__ = ["CLIP", "VAE", "ModelPatcher", "load_checkpoint_guess_config", "load_diffusers_folder",
           "load_lora_for_models"]
