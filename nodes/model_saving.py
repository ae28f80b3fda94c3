"""Saving models with ComfyUI's nodes (comfy_extras/nodes_model_merging.py: CheckpointSave, ModelSave, CLIPSave,
VAESave; nodes_lora_extract.py: LoraSave).

Each writes the weights a model runs with (its LoRA / merge patches applied) as ordinary files that our loaders
and ComfyUI's read back: a single-file LDM checkpoint (output/checkpoints, output/diffusion_models), one
transformers-layout file per text encoder (output/clip, suffixed _clip_l / _clip_g / _clip_h), an LDM-named VAE
(output/vae), a kohya-format LoRA (output/loras). Names follow ComfyUI's counter, `<prefix>_<NNNNN>_.safetensors`
(nodes.image_files.save_target); files are written atomically (nodes.diffusion.saving.write_safetensors). The
header metadata carries the prompt and extra_pnginfo as JSON strings unless metadata is disabled, plus the
modelspec / prediction keys ComfyUI writes into checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, MODEL, VAE, Boolean, Combo, Int, Socket, String

from .diffusion import convert, lora_extract, saving
from .diffusion.clip import ClipModel
from .diffusion.models import DiffusionModel
from .diffusion.vae import VAEModel
from .image_files import SaveTarget, save_target

SUFFIX = ".safetensors"


def _target(ctx: RunContext, prefix: str) -> SaveTarget:
    try:
        return save_target(Path(ctx.env.output_dir), prefix)
    except ValueError as error:
        raise InputError("filename_prefix", str(error)) from None


def _file(target: SaveTarget) -> Path:
    return target.folder / f"{target.basename}_{target.counter:05}_{SUFFIX}"


def prompt_metadata(ctx: RunContext) -> dict[str, str]:
    """ComfyUI's "prompt" and extra_pnginfo entries as JSON strings; empty when metadata is disabled."""
    if getattr(ctx.env, "disable_metadata", False):
        return {}
    metadata = {"prompt": json.dumps(ctx.prompt) if ctx.prompt is not None else ""}
    extra = (ctx.extra_data or {}).get("extra_pnginfo")
    for key, value in (extra if isinstance(extra, dict) else {}).items():
        metadata[str(key)] = json.dumps(value)
    return metadata


def save_checkpoint(ctx: RunContext, prefix: str, model: DiffusionModel, clip: ClipModel | None = None,
                    vae: VAEModel | None = None) -> Path:
    """ComfyUI's save_checkpoint: one LDM file with the model (and clip / vae when given), patches applied."""
    if clip is not None and clip.family != model.family:
        raise InputError("clip", f"is a {clip.family} text encoder; a {model.family} checkpoint needs its own")
    target = _target(ctx, prefix)
    manager = ctx.models
    metadata, markers = saving.model_metadata(model, f"{target.basename} {target.counter}")
    state = saving.checkpoint_state(model, saving.unet_state(model, manager),
                                    saving.clip_states(clip, manager) if clip is not None else None,
                                    saving.vae_state(vae) if vae is not None else None)
    state.update(markers)
    metadata.update(prompt_metadata(ctx))
    path = _file(target)
    saving.write_safetensors(path, state, metadata)
    return path


class CheckpointSave(Node):
    display_name = "Save Checkpoint"
    category = "advanced/model_merging"
    output_node = True
    model: Annotated[Any, Socket(MODEL)]
    clip: Annotated[Any, Socket(CLIP)]
    vae: Annotated[Any, Socket(VAE)]
    filename_prefix: Annotated[str, String()] = "checkpoints/ComfyUI"

    def run(self, ctx: RunContext):
        save_checkpoint(ctx, self.filename_prefix, self.model, self.clip, self.vae)
        return ()


class ModelSave(Node):
    category = "advanced/model_merging"
    output_node = True
    model: Annotated[Any, Socket(MODEL)]
    filename_prefix: Annotated[str, String()] = "diffusion_models/ComfyUI"

    def run(self, ctx: RunContext):
        save_checkpoint(ctx, self.filename_prefix, self.model)
        return ()


class CLIPSave(Node):
    """One file per text encoder: `<prefix>_clip_l_00001_.safetensors` and so on, in transformers names."""

    category = "advanced/model_merging"
    output_node = True
    clip: Annotated[Any, Socket(CLIP)]
    filename_prefix: Annotated[str, String()] = "clip/ComfyUI"

    def run(self, ctx: RunContext):
        clip: ClipModel = self.clip
        metadata = prompt_metadata(ctx)
        if metadata:
            metadata = {"format": "pt", **metadata}
        states = saving.clip_states(clip, ctx.models)
        for slot in sorted(states, key=list(saving.CLIP_SLOT_NAMES).index):
            target = _target(ctx, f"{self.filename_prefix}_{saving.CLIP_SLOT_NAMES[slot]}")
            saving.write_safetensors(_file(target), saving.clip_file_state(states[slot]), metadata)
        return ()


class VAESave(Node):
    category = "advanced/model_merging"
    output_node = True
    vae: Annotated[Any, Socket(VAE)]
    filename_prefix: Annotated[str, String()] = "vae/ComfyUI_vae"

    def run(self, ctx: RunContext):
        target = _target(ctx, self.filename_prefix)
        state = saving.vae_file_state(saving.vae_state(self.vae))
        saving.write_safetensors(_file(target), state, prompt_metadata(ctx))
        return ()


class LoraSave(Node):
    """A LoRA extracted from the weights of a difference model (ModelMergeSubtract / CLIPMergeSubtract output)."""

    display_name = "Extract and Save Lora"
    category = "_for_testing"
    output_node = True
    experimental = True
    filename_prefix: Annotated[str, String()] = "loras/ComfyUI_extracted_lora"
    rank: Annotated[int, Int(min=1, max=4096, step=1)] = 8
    lora_type: Annotated[str, Combo(list(lora_extract.LORA_TYPES))] = "standard"
    bias_diff: Annotated[bool, Boolean()] = True
    model_diff: Annotated[Any, Socket(MODEL, optional=True,
                                      tooltip="The ModelSubtract output to be converted to a lora.")] = None
    text_encoder_diff: Annotated[Any, Socket(CLIP, optional=True,
                                             tooltip="The CLIPSubtract output to be converted to a lora.")] = None

    def run(self, ctx: RunContext):
        if self.model_diff is None and self.text_encoder_diff is None:
            return ()
        target = _target(ctx, self.filename_prefix)
        tensors: dict[str, Any] = {}
        failed: list[str] = []
        if self.model_diff is not None:
            model: DiffusionModel = self.model_diff
            state = saving.unet_state(model, ctx.models)
            keys = lora_extract.unet_module_keys(state, convert.diffusers_config(model.unet).layers_per_block)
            found, bad = lora_extract.extract_lora(state, keys, self.rank, self.lora_type, self.bias_diff)
            tensors.update(found)
            failed += bad
        if self.text_encoder_diff is not None:
            for slot, encoder_state in saving.clip_states(self.text_encoder_diff, ctx.models).items():
                keys = lora_extract.clip_module_keys(slot, encoder_state)
                found, bad = lora_extract.extract_lora(encoder_state, keys, self.rank, self.lora_type,
                                                       self.bias_diff)
                tensors.update(found)
                failed += [f"{slot}.{name}" for name in bad]
        if failed:
            ctx.warn(f"no LoRA factors for {len(failed)} weights (SVD / quantile failed): {', '.join(failed[:5])}")
        saving.write_safetensors(_file(target), tensors)
        return ()


NODES = [CheckpointSave, ModelSave, CLIPSave, VAESave, LoraSave]
