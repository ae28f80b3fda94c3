"""Model merging nodes with ComfyUI's names and signatures (comfy_extras/nodes_model_merging.py and
nodes_model_merging_model_specific.py), and HypernetworkLoader (nodes_hypernetwork.py).

A merge returns a clone of model1 / clip1 carrying one MergePatch (nodes.diffusion.merge): references to the
other network and its patches, no weight copies. Nothing changes in either input; the merged weights exist only
while the merged model runs (applied and kept by the memory manager like a LoRA) or is saved. Conventions are
ComfyUI's: W ← ratio·W1 + (1 − ratio)·W2 (ratio 1 keeps model1), m·(W1 − W2) for Subtract, W1 + W2 for Add,
and block ratios chosen by the longest prefix of the LDM parameter name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import create_model

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, MODEL, Combo, Float, Output, Socket

from .diffusion import hypernetwork, merge
from .diffusion.clip import ClipModel
from .diffusion.models import DiffusionModel
from .model_files import locate_model, model_choices, model_fingerprint

RATIO = Float(min=0.0, max=1.0, step=0.01)
MULTIPLIER = Float(min=-10.0, max=10.0, step=0.01)
SHOWN = 5
Strengths = Callable[[str], tuple[float, float]]


def _shown(names: tuple[str, ...]) -> str:
    return ", ".join(names[:SHOWN]) + (f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def report_merge(ctx: RunContext, plan: merge.MergePlan, other: str, first: str) -> None:
    if not plan.entries:
        raise InputError(other, f"shares no weight of the same name and shape with {first}: the two are "
                                f"different architectures")
    if plan.shape_mismatch:
        ctx.warn(f"input '{other}': {len(plan.shape_mismatch)} weights have other shapes than in {first} and were "
                 f"not merged: {_shown(plan.shape_mismatch)}")
    if plan.only_in_source:
        ctx.warn(f"input '{other}': {len(plan.only_in_source)} weights have no counterpart in {first} and were "
                 f"ignored: {_shown(plan.only_in_source)}")


def merge_models(ctx: RunContext, model1: DiffusionModel, model2: DiffusionModel,
                 strengths: Strengths) -> DiffusionModel:
    """model1 with model2 patched in; `strengths(ldm_name)` = (strength_patch, strength_model). Models of two
    families are refused: only their few same-shaped weights would merge (ComfyUI merges those and logs the rest),
    which gives no usable model."""
    if model1.family != model2.family:
        raise InputError("model2", f"is a {model2.family} model and model1 a {model1.family} model; merging needs "
                                   f"two models of one architecture")
    names = merge.ldm_names(model2.unet)
    plan = merge.plan_merge(model1.unet, model2.unet, lambda name: strengths(names.get(name, name)))
    report_merge(ctx, plan, "model2", "model1")
    patch = merge.MergePatch(model1.patches, model2.unet, model2.patches, plan.entries, ctx.models)
    return model1.clone(patches=(patch,))


def merge_clips(ctx: RunContext, clip1: ClipModel, clip2: ClipModel, strengths: Strengths) -> ClipModel:
    plan = merge.plan_merge(clip1.encoders, clip2.encoders, strengths,
                            skip=lambda name: name.endswith(merge.CLIP_SKIPPED_SUFFIXES))
    report_merge(ctx, plan, "clip2", "clip1")
    patch = merge.MergePatch(clip1.patches, clip2.encoders, clip2.patches, plan.entries, ctx.models)
    return dataclasses.replace(clip1, patches=(patch,), options=dict(clip1.options))


class ModelMergeSimple(Node):
    category = "advanced/model_merging"
    outputs = (Output(MODEL),)
    model1: Annotated[Any, Socket(MODEL)]
    model2: Annotated[Any, Socket(MODEL)]
    ratio: Annotated[float, RATIO] = 1.0

    def run(self, ctx: RunContext):
        ratio = self.ratio
        return (merge_models(ctx, self.model1, self.model2, lambda _: (1.0 - ratio, ratio)),)


class ModelMergeSubtract(Node):
    category = "advanced/model_merging"
    outputs = (Output(MODEL),)
    model1: Annotated[Any, Socket(MODEL)]
    model2: Annotated[Any, Socket(MODEL)]
    multiplier: Annotated[float, MULTIPLIER] = 1.0

    def run(self, ctx: RunContext):
        m = self.multiplier
        return (merge_models(ctx, self.model1, self.model2, lambda _: (-m, m)),)


class ModelMergeAdd(Node):
    category = "advanced/model_merging"
    outputs = (Output(MODEL),)
    model1: Annotated[Any, Socket(MODEL)]
    model2: Annotated[Any, Socket(MODEL)]

    def run(self, ctx: RunContext):
        return (merge_models(ctx, self.model1, self.model2, lambda _: (1.0, 1.0)),)


class _BlockMerge(Node):
    """Ratios by LDM block prefix: every input after model1/model2 is a prefix (ModelMergeBlocks' `input`
    covers input_blocks.*, `out` output_blocks.* and out.*); weights no prefix matches take the first ratio."""

    category = "advanced/model_merging"
    outputs = (Output(MODEL),)
    model1: Annotated[Any, Socket(MODEL)]
    model2: Annotated[Any, Socket(MODEL)]

    def block_ratios(self) -> list[tuple[str, float]]:
        return [(name, float(getattr(self, name))) for name in type(self).input_specs()
                if name not in ("model1", "model2")]

    def run(self, ctx: RunContext):
        ratios = self.block_ratios()

        def strengths(ldm_name: str) -> tuple[float, float]:
            ratio = merge.prefix_ratio(ldm_name, ratios)
            return 1.0 - ratio, ratio

        return (merge_models(ctx, self.model1, self.model2, strengths),)


class ModelMergeBlocks(_BlockMerge):
    input: Annotated[float, RATIO] = 1.0
    middle: Annotated[float, RATIO] = 1.0
    out: Annotated[float, RATIO] = 1.0


class ModelSpecificMerge(_BlockMerge):
    """Base of the per-block nodes built below: their ratio inputs are named by LDM prefixes."""

    category = "advanced/model_merging/model_specific"


def block_merge_node(name: str, prefixes: list[str], base: type[_BlockMerge] = ModelSpecificMerge,
                     module: str = __name__) -> type[_BlockMerge]:
    fields: dict[str, Any] = {prefix: (Annotated[float, RATIO], 1.0) for prefix in prefixes}
    return create_model(name, __base__=base, __module__=module, **fields)


class TransformerBlockMerge(ModelSpecificMerge):
    """ComfyUI's ModelMergeBlocks rule on a diffusion transformer of one family: W <- ratio*W1 + (1 - ratio)*W2,
    the ratio of the longest ComfyUI prefix matching the parameter's ComfyUI name (the first input's when none
    matches). Subclasses name the family and map diffusers parameter names to ComfyUI's."""

    family: ClassVar[str] = ""
    family_label: ClassVar[str] = ""

    @staticmethod
    def comfy_name(name: str) -> str:
        return name

    def run(self, ctx: RunContext):
        model1: DiffusionModel = self.model1
        model2: DiffusionModel = self.model2
        for name, model in (("model1", model1), ("model2", model2)):
            if model.family != self.family:
                raise InputError(name, f"is a {model.family} model; {type(self).__name__} merges "
                                       f"{self.family_label} models")
        ratios = self.block_ratios()

        def strengths(name: str) -> tuple[float, float]:
            ratio = merge.prefix_ratio(self.comfy_name(name), ratios)
            return 1.0 - ratio, ratio

        plan = merge.plan_merge(model1.unet, model2.unet, strengths)
        report_merge(ctx, plan, "model2", "model1")
        patch = merge.MergePatch(model1.patches, model2.unet, model2.patches, plan.entries, ctx.models)
        return (model1.clone(patches=(patch,)),)


def _unet_prefixes(inputs: int, middle: int, outputs: int, dot: str) -> list[str]:
    return (["time_embed.", "label_emb."] + [f"input_blocks.{i}{dot}" for i in range(inputs)]
            + [f"middle_block.{i}{dot}" for i in range(middle)] + [f"output_blocks.{i}{dot}" for i in range(outputs)]
            + ["out."])


ModelMergeSD1 = block_merge_node("ModelMergeSD1", _unet_prefixes(12, 3, 12, "."))
ModelMergeSD2 = block_merge_node("ModelMergeSD2", _unet_prefixes(12, 3, 12, "."))
# ComfyUI's SDXL prefixes have no trailing dot.
ModelMergeSDXL = block_merge_node("ModelMergeSDXL", _unet_prefixes(9, 3, 9, ""))


class CLIPMergeSimple(Node):
    category = "advanced/model_merging"
    outputs = (Output(CLIP),)
    clip1: Annotated[Any, Socket(CLIP)]
    clip2: Annotated[Any, Socket(CLIP)]
    ratio: Annotated[float, RATIO] = 1.0

    def run(self, ctx: RunContext):
        ratio = self.ratio
        return (merge_clips(ctx, self.clip1, self.clip2, lambda _: (1.0 - ratio, ratio)),)


class CLIPMergeSubtract(Node):
    category = "advanced/model_merging"
    outputs = (Output(CLIP),)
    clip1: Annotated[Any, Socket(CLIP)]
    clip2: Annotated[Any, Socket(CLIP)]
    multiplier: Annotated[float, MULTIPLIER] = 1.0

    def run(self, ctx: RunContext):
        m = self.multiplier
        return (merge_clips(ctx, self.clip1, self.clip2, lambda _: (-m, m)),)


class CLIPMergeAdd(Node):
    category = "advanced/model_merging"
    outputs = (Output(CLIP),)
    clip1: Annotated[Any, Socket(CLIP)]
    clip2: Annotated[Any, Socket(CLIP)]

    def run(self, ctx: RunContext):
        return (merge_clips(ctx, self.clip1, self.clip2, lambda _: (1.0, 1.0)),)


class HypernetworkLoader(Node):
    """A hypernetwork file as attn1 and attn2 patches (nodes.diffusion.hypernetwork)."""

    category = "loaders"
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    hypernetwork_name: Annotated[str, Combo(model_choices("hypernetworks"))]
    strength: Annotated[float, MULTIPLIER] = 1.0

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "hypernetworks", constants.get("hypernetwork_name"), "hypernetwork")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "hypernetwork_name", "hypernetworks", self.hypernetwork_name)
        try:
            network = hypernetwork.read_hypernetwork(path)
        except hypernetwork.HypernetworkFileError as error:
            raise InputError("hypernetwork_name", str(error)) from error
        patch = hypernetwork.HypernetworkPatch(network, float(self.strength))
        model: DiffusionModel = self.model
        return (model.set_model_attn1_patch(patch).set_model_attn2_patch(patch),)


NODES = [ModelMergeSimple, ModelMergeBlocks, ModelMergeSubtract, ModelMergeAdd, ModelMergeSD1, ModelMergeSD2,
         ModelMergeSDXL, CLIPMergeSimple, CLIPMergeSubtract, CLIPMergeAdd, HypernetworkLoader]
