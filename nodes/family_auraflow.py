"""AuraFlow's model-specific node: ModelMergeAuraflow (ComfyUI's comfy_extras/nodes_model_merging_model_specific.py).

Its ratio inputs are prefixes of ComfyUI's original AuraFlow parameter names (init_x_linear., double_layers.N.,
single_layers.N., modF., ...), matched by the longest prefix as every block merge; our network is diffusers'
AuraFlowTransformer2DModel, so each of its parameter names is first written in the original naming.
"""

from __future__ import annotations

from latentloom.engine.inputs import InputError
from latentloom.engine.node import RunContext

from .diffusion import merge
from .merging import block_merge_node, report_merge

# diffusers prefix -> ComfyUI's original prefix (the rest of a name only needs the right block for the ratio)
_AURAFLOW_PREFIXES = (("pos_embed.proj.", "init_x_linear."), ("pos_embed.pos_embed", "positional_encoding"),
                      ("context_embedder.", "cond_seq_linear."), ("register_tokens", "register_tokens"),
                      ("time_step_proj.", "t_embedder."), ("joint_transformer_blocks.", "double_layers."),
                      ("single_transformer_blocks.", "single_layers."), ("norm_out.", "modF."),
                      ("proj_out.", "final_linear."))


def original_auraflow_name(name: str) -> str:
    for ours, original in _AURAFLOW_PREFIXES:
        if name.startswith(ours):
            return original + name[len(ours):]
    return name


_MergeBase = block_merge_node(
    "ModelMergeAuraflowBase",
    ["init_x_linear.", "positional_encoding", "cond_seq_linear.", "register_tokens", "t_embedder."]
    + [f"double_layers.{i}." for i in range(4)] + [f"single_layers.{i}." for i in range(32)]
    + ["modF.", "final_linear."])


class ModelMergeAuraflow(_MergeBase):  # type: ignore[misc, valid-type]
    def run(self, ctx: RunContext):
        model1, model2 = self.model1, self.model2
        for name, model in (("model1", model1), ("model2", model2)):
            if model.family != "auraflow":
                raise InputError(name, f"is a {model.family} model; ModelMergeAuraflow merges AuraFlow models")
        ratios = self.block_ratios()

        def strengths(name: str) -> tuple[float, float]:
            ratio = merge.prefix_ratio(original_auraflow_name(name), ratios)
            return 1.0 - ratio, ratio

        plan = merge.plan_merge(model1.unet, model2.unet, strengths)
        report_merge(ctx, plan, "model2", "model1")
        patch = merge.MergePatch(model1.patches, model2.unet, model2.patches, plan.entries, ctx.models)
        return (model1.clone(patches=(patch,)),)


NODES = [ModelMergeAuraflow]
