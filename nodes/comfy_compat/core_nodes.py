"""ComfyUI's `nodes` module for packs: MAX_RESOLUTION, common_ksampler, NODE_CLASS_MAPPINGS, and every built-in
node as a V1-style class callable the old way (`nodes.CLIPTextEncode().encode(clip, text)`,
`nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)`, `nodes.SaveImage().save_images(images, "x")`).

A call runs our real node inside the running pack node (its context: folders, progress, interrupt), and answers
as ComfyUI's function does: the output tuple, or {"ui": ..., "result": ...} for nodes with UI data. Positional
arguments follow ComfyUI's function signatures where they differ from the input order (V1_CALLS).
"""

from __future__ import annotations

import inspect
from typing import Any

from latentloom.engine.node import Node, NodeOutput
from latentloom.engine.registry import node_info

from .. import builtin_nodes
from ..conditioning import MAX_RESOLUTION
from .context import NoEngineError, acting_for, current_env, current_node
from .model_objects import engine_value, pack_view
from .v1 import run_awaitable

# ComfyUI's FUNCTION name and positional parameter order, for the core nodes packs call directly (parameters we
# take from the node context instead, like SaveImage's prompt, are accepted and ignored). Others get FUNCTION
# "execute" and their inputs' order.
V1_CALLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "CheckpointLoaderSimple": ("load_checkpoint", ("ckpt_name",)),
    "CLIPTextEncode": ("encode", ("clip", "text")),
    "CLIPSetLastLayer": ("set_last_layer", ("clip", "stop_at_clip_layer")),
    "LoraLoader": ("load_lora", ("model", "clip", "lora_name", "strength_model", "strength_clip")),
    "LoraLoaderModelOnly": ("load_lora_model_only", ("model", "lora_name", "strength_model")),
    "VAELoader": ("load_vae", ("vae_name",)),
    "VAEDecode": ("decode", ("vae", "samples")),
    "VAEEncode": ("encode", ("vae", "pixels")),
    "VAEDecodeTiled": ("decode", ("vae", "samples", "tile_size", "overlap", "temporal_size", "temporal_overlap")),
    "VAEEncodeForInpaint": ("encode", ("vae", "pixels", "mask", "grow_mask_by")),
    "KSampler": ("sample", ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                            "latent_image", "denoise")),
    "KSamplerAdvanced": ("sample", ("model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler",
                                    "positive", "negative", "latent_image", "start_at_step", "end_at_step",
                                    "return_with_leftover_noise")),
    "EmptyLatentImage": ("generate", ("width", "height", "batch_size")),
    "LatentUpscale": ("upscale", ("samples", "upscale_method", "width", "height", "crop")),
    "LatentUpscaleBy": ("upscale", ("samples", "upscale_method", "scale_by")),
    "SaveImage": ("save_images", ("images", "filename_prefix", "prompt", "extra_pnginfo")),
    "PreviewImage": ("save_images", ("images", "filename_prefix", "prompt", "extra_pnginfo")),
    "LoadImage": ("load_image", ("image",)),
    "LoadImageMask": ("load_image", ("image", "channel")),
    "ImageScale": ("upscale", ("image", "upscale_method", "width", "height", "crop")),
    "ImageScaleBy": ("upscale", ("image", "upscale_method", "scale_by")),
    "ImageInvert": ("invert", ("image",)),
    "ImageBatch": ("batch", ("image1", "image2")),
    "ImagePadForOutpaint": ("expand_image", ("image", "left", "top", "right", "bottom", "feathering")),
    "ConditioningCombine": ("combine", ("conditioning_1", "conditioning_2")),
    "ConditioningSetArea": ("append", ("conditioning", "width", "height", "x", "y", "strength")),
    "ConditioningSetMask": ("append", ("conditioning", "mask", "strength", "set_cond_area")),
    "ConditioningZeroOut": ("zero_out", ("conditioning",)),
    "ConditioningSetTimestepRange": ("set_range", ("conditioning", "start", "end")),
    "ControlNetLoader": ("load_controlnet", ("control_net_name",)),
    "ControlNetApply": ("apply_controlnet", ("conditioning", "control_net", "image", "strength")),
    "ControlNetApplyAdvanced": ("apply_controlnet", ("positive", "negative", "control_net", "image", "strength",
                                                     "start_percent", "end_percent", "vae")),
    "UpscaleModelLoader": ("load_model", ("model_name",)),
    "ImageUpscaleWithModel": ("upscale", ("upscale_model", "image")),
    "SetLatentNoiseMask": ("set_mask", ("samples", "mask")),
    "RepeatLatentBatch": ("repeat", ("samples", "amount")),
    "LatentFromBatch": ("frombatch", ("samples", "batch_index", "length")),
}


# Class attributes ComfyUI's core node classes carry and packs read (`nodes.ImageScale.upscale_methods`): the
# attribute name -> the input whose (static) choices it lists.
CLASS_LISTS: dict[str, dict[str, str]] = {
    "ImageScale": {"upscale_methods": "upscale_method", "crop_methods": "crop"},
    "ImageScaleBy": {"upscale_methods": "upscale_method"},
    "ImageScaleToTotalPixels": {"upscale_methods": "upscale_method"},
    "LatentUpscale": {"upscale_methods": "upscale_method", "crop_methods": "crop"},
    "LatentUpscaleBy": {"upscale_methods": "upscale_method"},
}


def _class_lists(node_cls: type[Node]) -> dict[str, list[str]]:
    specs = node_cls.input_specs()
    lists: dict[str, list[str]] = {}
    for attribute, input_name in CLASS_LISTS.get(node_cls.class_type(), {}).items():
        choices = specs[input_name].choices if input_name in specs else None
        if isinstance(choices, (list, tuple)):
            lists[attribute] = list(choices)
    return lists


def call_core(node_cls: type[Node], positional: tuple[str, ...], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    """Run a built-in node inside the running pack node; ComfyUI's return shape."""
    name = node_cls.class_type()
    ctx = current_node()
    if ctx is None:
        raise NoEngineError(f"nodes.{name} can only be called while a node runs")
    if len(args) > len(positional):
        raise TypeError(f"nodes.{name}: {len(args)} positional arguments given, at most {len(positional)} taken")
    given = {name: engine_value(value)
             for name, value in {**dict(zip(positional, args, strict=False)), **kwargs}.items()}
    specs = node_cls.input_specs()
    inputs: dict[str, Any] = {}
    for input_name, spec in specs.items():
        if input_name in given:
            inputs[input_name] = given[input_name]
            continue
        default = node_cls.input_default(input_name)
        if default is None and not spec.optional:
            raise TypeError(f"nodes.{name}: missing input '{input_name}'")
        inputs[input_name] = default
    with acting_for(ctx.env, ctx):
        outcome = node_cls.model_construct(**inputs).run(ctx)
        if inspect.isawaitable(outcome):
            outcome = run_awaitable(outcome)
    if isinstance(outcome, NodeOutput):
        values = tuple(pack_view(value) for value in outcome.values)
        return {"ui": outcome.ui, "result": values} if outcome.ui else values
    return tuple(pack_view(value) for value in outcome) if isinstance(outcome, tuple) else outcome


def _catalogue_inputs(node_cls: type[Node]) -> dict[str, Any]:
    try:
        env: Any = current_env()
    except NoEngineError:
        env = None
    return node_info(node_cls, env)["input"]


def v1_class(node_cls: type[Node]) -> type:
    """A V1-style class for one of our nodes (subclassable, as packs subclass core nodes)."""
    name = node_cls.class_type()
    function, positional = V1_CALLS.get(name, ("execute", tuple(node_cls.input_specs())))

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return call_core(node_cls, positional, args, kwargs)

    def input_types(cls: type) -> dict[str, Any]:
        return _catalogue_inputs(node_cls)

    call.__name__ = function
    return type(name, (), {
        "__module__": __name__, "__doc__": node_cls.__doc__, "latentloom_node": node_cls,
        "INPUT_TYPES": classmethod(input_types), "FUNCTION": function, function: call,
        "RETURN_TYPES": tuple(out.type for out in node_cls.outputs),
        "RETURN_NAMES": tuple(out.display_name for out in node_cls.outputs),
        "OUTPUT_IS_LIST": tuple(out.is_list for out in node_cls.outputs),
        "OUTPUT_NODE": node_cls.output_node, "CATEGORY": node_cls.category, "DESCRIPTION": node_cls.description,
        "INPUT_IS_LIST": node_cls.input_is_list, **_class_lists(node_cls),
    })


def common_ksampler(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    positive: Any, negative: Any, latent: Any, denoise: float = 1.0, disable_noise: bool = False,
                    start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> tuple[Any, ...]:
    """ComfyUI's helper behind KSampler / KSamplerAdvanced, over ours."""
    if start_step is None and last_step is None and not disable_noise:
        return NODE_CLASS_MAPPINGS["KSampler"]().sample(model, seed, steps, cfg, sampler_name, scheduler, positive,
                                                       negative, latent, denoise)
    if denoise != 1.0:
        raise ValueError("common_ksampler: denoise other than 1.0 with start/last steps or disabled noise is not "
                         "supported")
    return NODE_CLASS_MAPPINGS["KSamplerAdvanced"]().sample(
        model, "disable" if disable_noise else "enable", seed, steps, cfg, sampler_name, scheduler, positive,
        negative, latent, start_step or 0, 10000 if last_step is None else last_step,
        "disable" if force_full_denoise else "enable")


NODE_CLASS_MAPPINGS: dict[str, type] = {cls.class_type(): v1_class(cls) for cls in builtin_nodes()}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {cls.class_type(): cls.display_name or cls.class_type()
                                              for cls in builtin_nodes()}
globals().update(NODE_CLASS_MAPPINGS)

__all__ = ["MAX_RESOLUTION", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "common_ksampler", "call_core"]
