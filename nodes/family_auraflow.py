"""AuraFlow's model-specific node: ModelMergeAuraflow (ComfyUI's comfy_extras/nodes_model_merging_model_specific.py).

Its ratio inputs are prefixes of ComfyUI's original AuraFlow parameter names (init_x_linear., double_layers.N.,
single_layers.N., modF., ...), matched by the longest prefix as every block merge; our network is diffusers'
AuraFlowTransformer2DModel, so each of its parameter names is first written in the original naming.
"""

from __future__ import annotations

from .merging import TransformerBlockMerge, block_merge_node

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


class _AuraFlowBlockMerge(TransformerBlockMerge):
    family = "auraflow"
    family_label = "AuraFlow"
    comfy_name = staticmethod(original_auraflow_name)


ModelMergeAuraflow = block_merge_node(
    "ModelMergeAuraflow",
    ["init_x_linear.", "positional_encoding", "cond_seq_linear.", "register_tokens", "t_embedder."]
    + [f"double_layers.{i}." for i in range(4)] + [f"single_layers.{i}." for i in range(32)]
    + ["modF.", "final_linear."], _AuraFlowBlockMerge, __name__)


NODES = [ModelMergeAuraflow]
