"""SD3 / SD3.5 nodes and the DiT guidance nodes (ComfyUI's names, signatures and semantics:
comfy_extras/nodes_sd3.py, nodes_slg.py, nodes_model_merging_model_specific.py).

CLIPTextEncodeSD3 gives CLIP-L, CLIP-G and T5-XXL their own prompts. The SkipLayerGuidance nodes re-run the
network with some transformer blocks skipped, through transformer_options["patches_replace"]["dit"] (realised on
the diffusers blocks by nodes.diffusion.dit_calls.block_patches): SkipLayerGuidanceDiT / SD3 add
scale·(cond − cond with blocks skipped) after CFG, SkipLayerGuidanceDiTSimple skips the blocks in the negative
pass itself. The SD3 block merges take ComfyUI's block prefixes (joint_blocks.N. & co.) and map them onto the
diffusers transformer's parameter names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, cast

import torch

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, MODEL, Combo, Float, Output, Socket, String

from .conditioning import _encode, _tokenize
from .diffusion import patches as patch_api
from .diffusion.family_clip import FamilyClip
from .diffusion.models import DiffusionModel
from .diffusion.schedules import schedule_for
from .merging import TransformerBlockMerge, block_merge_node

PROMPT = String(multiline=True, dynamicPrompts=True)
PERCENT = dict(min=0.0, max=1.0, step=0.001)
LAYERS = String(multiline=False)

# --- CLIPTextEncodeSD3 ---------------------------------------------------------------------------------------------


class CLIPTextEncodeSD3(Node):
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)
    clip: Annotated[Any, Socket(CLIP)]
    clip_l: Annotated[str, PROMPT]
    clip_g: Annotated[str, PROMPT]
    t5xxl: Annotated[str, PROMPT]
    empty_padding: Annotated[str, Combo(("none", "empty_prompt"))]

    def run(self, ctx: RunContext):
        clip = self.clip
        if not isinstance(clip, FamilyClip) or clip.family != "sd3":
            kind = clip.family if isinstance(clip, FamilyClip) else "SD1/SD2/SDXL"
            raise InputError("clip", f"must be an SD3 CLIP (TripleCLIPLoader, or DualCLIPLoader / CLIPLoader with "
                                     f"type sd3), got a {kind} one")
        no_padding = self.empty_padding == "none"
        # The CLIP texts are tokenized without T5 (its tokenizer file may be missing when only T5's text is empty).
        clip_only = _without_t5(clip)
        tokens: dict[str, Any] = {"l": [], "g": []}
        if clip_only is not None:
            tokens["g"] = [] if not self.clip_g and no_padding else _tokenize(ctx, clip_only, self.clip_g).get("g", [])
            tokens["l"] = [] if not self.clip_l and no_padding else _tokenize(ctx, clip_only, self.clip_l).get("l", [])
            if len(tokens["l"]) != len(tokens["g"]):  # the shorter side gets empty-prompt chunks
                empty = _tokenize(ctx, clip_only, "")
                for key in ("l", "g"):
                    missing = max(len(tokens["l"]), len(tokens["g"])) - len(tokens[key])
                    tokens[key] = tokens[key] + empty.get(key, []) * missing
        if "t5xxl" in clip.encoders:
            # An empty list: T5 encodes its end token alone (ComfyUI's empty token list).
            tokens["t5xxl"] = [] if not self.t5xxl and no_padding else _tokenize(ctx, clip, self.t5xxl)["t5xxl"]
        return (_encode(ctx, clip, tokens),)


def _without_t5(clip: FamilyClip) -> FamilyClip | None:
    """The clip's CLIP-L / CLIP-G encoders alone (a view sharing the modules), or None when it has neither."""
    encoders = {key: module for key, module in clip.encoders.items() if key != "t5xxl"}
    if not encoders:
        return None
    return dataclasses.replace(clip, encoders=torch.nn.ModuleDict(encoders), options=dict(clip.options))


# --- block merges -------------------------------------------------------------------------------------------------

# diffusers SD3Transformer2DModel name prefixes -> ComfyUI's MMDiT ones (the rest of a name is left as diffusers
# spells it: the merge nodes match prefixes only). ComfyUI's "pos_embed" has no dot, so its "pos_embed." ratio never
# matches it and it takes the first ratio, which is that same input.
SD3_PREFIXES = (("pos_embed.pos_embed", "pos_embed"), ("pos_embed.proj.", "x_embedder.proj."),
                ("context_embedder.", "context_embedder."), ("time_text_embed.timestep_embedder.", "t_embedder.mlp."),
                ("time_text_embed.text_embedder.", "y_embedder.mlp."), ("transformer_blocks.", "joint_blocks."),
                ("norm_out.", "final_layer.adaLN_modulation."), ("proj_out.", "final_layer.linear."))


def sd3_comfy_name(name: str) -> str:
    for diffusers_prefix, comfy_prefix in SD3_PREFIXES:
        if name.startswith(diffusers_prefix):
            return comfy_prefix + name[len(diffusers_prefix):]
    return name


class _SD3BlockMerge(TransformerBlockMerge):
    family = "sd3"
    family_label = "SD3 / SD3.5"
    comfy_name = staticmethod(sd3_comfy_name)


def _sd3_merge_node(name: str, blocks: int) -> type[TransformerBlockMerge]:
    prefixes = ["pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder."]
    prefixes += [f"joint_blocks.{i}." for i in range(blocks)] + ["final_layer."]
    return cast(type[TransformerBlockMerge], block_merge_node(name, prefixes, _SD3BlockMerge, __name__))


ModelMergeSD3_2B = _sd3_merge_node("ModelMergeSD3_2B", 24)  # noqa: N816 (ComfyUI's node type names)
ModelMergeSD35_Large = _sd3_merge_node("ModelMergeSD35_Large", 38)  # noqa: N816


# --- skip layer guidance ------------------------------------------------------------------------------------------

BlockPatch = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def layer_numbers(text: str) -> list[int]:
    """ComfyUI's reading of a layers input: every run of digits is a block number ("7, 8, 9", "[7 8]", ...)."""
    return [int(number) for number in re.findall(r"\d+", text)]


def skip_block(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A "dit" block replacement that returns the block's inputs: the block is skipped."""
    return args


def with_block_patches(options: Mapping[str, Any], double: list[int], single: list[int],
                       patch: BlockPatch) -> dict[str, Any]:
    """A copy of model options with `patch` replacing the given double / single DiT blocks."""
    result = patch_api.copy_options(options)
    table = result.setdefault(patch_api.TRANSFORMER_OPTIONS, {}).setdefault("patches_replace", {}) \
        .setdefault("dit", {})
    for index in double:
        table[("double_block", index)] = patch
    for index in single:
        table[("single_block", index)] = patch
    return result


def _sigma_range(model: DiffusionModel, start_percent: float, end_percent: float) -> tuple[float, float]:
    schedule = schedule_for(model.sampling)
    return schedule.percent_to_sigma(start_percent), schedule.percent_to_sigma(end_percent)


def skip_layer_guidance(model: DiffusionModel, scale: float, start_percent: float, end_percent: float,
                        double_layers: str, single_layers: str = "", rescaling_scale: float = 0.0) \
        -> DiffusionModel:
    """SkipLayerGuidanceDiT: after CFG, for σ in [σ(end_percent), σ(start_percent)],
    denoised += scale·(cond_denoised − cond_denoised with the blocks skipped), then optionally rescaled towards
    cond_denoised's standard deviation."""
    double, single = layer_numbers(double_layers), layer_numbers(single_layers)
    if not double and not single:
        return model
    sigma_start, sigma_end = _sigma_range(model, start_percent, end_percent)

    def post_cfg(args: dict[str, Any]) -> torch.Tensor:
        result = args["denoised"]
        sigma = float(args["sigma"][0])
        if scale > 0 and sigma_end <= sigma <= sigma_start:
            options = with_block_patches(args["model_options"], double, single, skip_block)
            (skipped,) = args["model"].calc_cond_batch([args["cond"]], args["input"], args["sigma"], options)
            result = result + (args["cond_denoised"] - skipped) * scale
            if rescaling_scale != 0:
                factor = args["cond_denoised"].std() / result.std()
                result = result * (rescaling_scale * factor + (1 - rescaling_scale))
        return result

    return model.add_sampler_post_cfg_function(post_cfg)


class SkipLayerGuidanceDiT(Node):
    category = "advanced/guidance"
    description = "Generic version of SkipLayerGuidance node that can be used on every DiT model."
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    double_layers: Annotated[str, LAYERS] = "7, 8, 9"
    single_layers: Annotated[str, LAYERS] = "7, 8, 9"
    scale: Annotated[float, Float(min=0.0, max=10.0, step=0.1)] = 3.0
    start_percent: Annotated[float, Float(**PERCENT)] = 0.01
    end_percent: Annotated[float, Float(**PERCENT)] = 0.15
    rescaling_scale: Annotated[float, Float(min=0.0, max=10.0, step=0.01)] = 0.0

    def run(self, ctx: RunContext):
        return (skip_layer_guidance(self.model, self.scale, self.start_percent, self.end_percent, self.double_layers,
                                    self.single_layers, self.rescaling_scale),)


class SkipLayerGuidanceSD3(Node):
    category = "advanced/guidance"
    description = "Generic version of SkipLayerGuidance node that can be used on every DiT model."
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    layers: Annotated[str, LAYERS] = "7, 8, 9"
    scale: Annotated[float, Float(min=0.0, max=10.0, step=0.1)] = 3.0
    start_percent: Annotated[float, Float(**PERCENT)] = 0.01
    end_percent: Annotated[float, Float(**PERCENT)] = 0.15

    def run(self, ctx: RunContext):
        # ComfyUI: SkipLayerGuidanceDiT with these layers as double blocks, no single blocks, no rescaling.
        return (skip_layer_guidance(self.model, self.scale, self.start_percent, self.end_percent, self.layers),)


def _negative_rows(transformer_options: Mapping[str, Any], batch: int) -> torch.Tensor:
    """Per batch row of a model call, whether it belongs to a negative (uncond) chunk."""
    owners = torch.tensor(transformer_options.get("cond_or_uncond") or [0])
    return (owners == 1).repeat_interleave(batch // owners.numel())


def skip_in_negative_pass(double_layers: str, single_layers: str, sigma_start: float,
                          sigma_end: float) -> Callable[[DiffusionModel], DiffusionModel]:
    """SkipLayerGuidanceDiTSimple: for σ in [sigma_end, sigma_start] the negative pass runs with the blocks
    skipped (the positive pass as usual). ComfyUI evaluates the two in separate calls; here they may share a batch
    and the skip applies to the negative rows only (rows of a call never interact)."""
    double, single = layer_numbers(double_layers), layer_numbers(single_layers)

    def skip_negative_rows(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        options = args["transformer_options"]
        sigma = float(options["sigmas"][0])
        rows = _negative_rows(options, args["img"].shape[0])
        if not (sigma_end <= sigma <= sigma_start) or not bool(rows.any()):
            return extra["original_block"](args)
        if bool(rows.all()):
            return args
        out = extra["original_block"](args)
        keep = rows.to(args["img"].device).view(-1, 1, 1)
        return {key: value if args.get(key) is None or value is None else torch.where(keep, args[key], value)
                for key, value in out.items()}

    def apply(model: DiffusionModel) -> DiffusionModel:
        if not double and not single:
            return model
        return model.clone(options=with_block_patches(model.options, double, single, skip_negative_rows))

    return apply


class SkipLayerGuidanceDiTSimple(Node):
    category = "advanced/guidance"
    description = "Simple version of the SkipLayerGuidanceDiT node that only modifies the uncond pass."
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    double_layers: Annotated[str, LAYERS] = "7, 8, 9"
    single_layers: Annotated[str, LAYERS] = "7, 8, 9"
    start_percent: Annotated[float, Float(**PERCENT)] = 0.0
    end_percent: Annotated[float, Float(**PERCENT)] = 1.0

    def run(self, ctx: RunContext):
        sigma_start, sigma_end = _sigma_range(self.model, self.start_percent, self.end_percent)
        return (skip_in_negative_pass(self.double_layers, self.single_layers, sigma_start, sigma_end)(self.model),)


NODES = [CLIPTextEncodeSD3, ModelMergeSD3_2B, ModelMergeSD35_Large, SkipLayerGuidanceDiT, SkipLayerGuidanceSD3,
         SkipLayerGuidanceDiTSimple]
