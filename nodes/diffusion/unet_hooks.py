"""ComfyUI's UNet patch points on the diffusers UNet2DConditionModel, for one call at a time.

ComfyUI's openaimodel UNet calls patches from `transformer_options` at fixed points, naming blocks by their LDM
ids: input blocks 0 (conv_in), then per level `layers_per_block` resnet(+attention) blocks and a downsampler;
middle 0; output blocks per level `layers_per_block + 1`. Here the same points are reached through diffusers'
own extension points only: attention processors (attn1 = self-attention, attn2 = cross-attention of each
BasicTransformerBlock) and module forward hooks / pre-hooks. `installed(unet, transformer_options)` puts them on
for the block and takes every one of them off again, so the module is untouched between calls.

Semantics (ComfyUI's BasicTransformerBlock and UNetModel._forward):
  attnN_patch(n, context, value, extra_options) -> (n, context, value)   before the attention's projections
  patches_replace["attnN"][(block, id[, index])](q, k, v, extra_options) -> out   instead of the attention maths
  attnN_output_patch(out, extra_options) -> out                          after to_out
  input_block_patch(h, transformer_options) -> h                         on an input block's output (skip too)
  input_block_patch_after_skip(h, transformer_options) -> h              on what goes on, not on the skip
  output_block_patch(h, hsp, transformer_options) -> (h, hsp)            before h and the skip are concatenated
  middle_patch(x, extra_options) -> x                                     in each transformer block, on the hidden
                                                                          states after self-attention, before
                                                                          cross-attention (GLIGEN)

The output-block patch runs where h is produced (a forward pre-hook on the up block for its first resnet, a
forward hook on the module before each later resnet), because diffusers concatenates h with the skip inside the
up block's forward: a patch that resizes h (PatchModelAddDownscale) must act before that. A skip the patch
changes (FreeU) is put into the concatenation by a pre-hook on the resnet that receives it.

The middle patch uses diffusers' GLIGEN slot: a BasicTransformerBlock given cross_attention_kwargs["gligen"] runs
`hidden_states = self.fuser(hidden_states, objs)` exactly there. For the call, each block gets a `fuser` that
runs the patches (set in its instance dict, so a real fuser module stays untouched) and each transformer a
pre-hook that adds the "gligen" entry. `transformer_options["transformer_index"]` counts the transformers in the
order they run, as ComfyUI's does.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BlockLayout:
    """Where ComfyUI's LDM-numbered blocks are in a diffusers UNet."""

    # (LDM input id, module whose output is the block's output, module that receives the block's input)
    inputs: list[tuple[int, torch.nn.Module, torch.nn.Module]] = field(default_factory=list)
    # (LDM output id, the resnet that receives cat(h, skip), channels of h in that concatenation)
    outputs: list[tuple[int, torch.nn.Module, int]] = field(default_factory=list)
    # (up block, LDM output ids of its resnets, the module whose output is h for each resnet after the first)
    up_blocks: list[tuple[torch.nn.Module, list[int], list[torch.nn.Module]]] = field(default_factory=list)
    # (Transformer2DModel, ("input" | "middle" | "output", LDM id))
    transformers: list[tuple[Any, tuple[str, int]]] = field(default_factory=list)
    middle: torch.nn.Module | None = None


def block_layout(unet: Any) -> BlockLayout:
    layout = BlockLayout()
    layout.inputs.append((0, unet.conv_in, unet.conv_in))
    block_id = 1
    for down in unet.down_blocks:
        attentions = getattr(down, "attentions", None)
        for j, resnet in enumerate(down.resnets):
            end = attentions[j] if attentions is not None else resnet
            layout.inputs.append((block_id, end, resnet))
            if attentions is not None:
                layout.transformers.append((attentions[j], ("input", block_id)))
            block_id += 1
        if down.downsamplers is not None:
            layout.inputs.append((block_id, down.downsamplers[0], down.downsamplers[0]))
            block_id += 1
    layout.middle = unet.mid_block
    for attention in getattr(unet.mid_block, "attentions", None) or ():
        layout.transformers.append((attention, ("middle", 0)))
    block_id = 0
    widths = list(reversed(unet.config.block_out_channels))
    previous_width = widths[0]  # the middle block's output
    for level, up in enumerate(unet.up_blocks):
        attentions = getattr(up, "attentions", None)
        producers = [attentions[j] if attentions is not None else up.resnets[j] for j in range(len(up.resnets) - 1)]
        layout.up_blocks.append((up, list(range(block_id, block_id + len(up.resnets))), producers))
        for j, resnet in enumerate(up.resnets):
            layout.outputs.append((block_id, resnet, previous_width if j == 0 else widths[level]))
            if attentions is not None:
                layout.transformers.append((attentions[j], ("output", block_id)))
            block_id += 1
        previous_width = widths[level]
    return layout


def default_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [B, N, heads·d] projections (ComfyUI's optimized_attention)."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


class PatchedAttentionProcessor:
    """A diffusers attention processor that runs ComfyUI's attention patches around the original processor."""

    def __init__(self, original: Any, kind: str, block: tuple[str, int], block_index: int,
                 options: dict[str, Any]):
        self.original = original
        self.kind = kind                    # "attn1" | "attn2"
        self.block = block
        self.block_index = block_index
        self.options = options

    def extra_options(self, attn: Any) -> dict[str, Any]:
        extra = {k: v for k, v in self.options.items() if k not in ("patches", "patches_replace")}
        extra.update(block=self.block, block_index=self.block_index, n_heads=attn.heads,
                     dim_head=attn.inner_dim // attn.heads if hasattr(attn, "inner_dim") else None,
                     attn_precision=None)
        return extra

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        patches = self.options.get("patches", {})
        replace_table = self.options.get("patches_replace", {}).get(self.kind, {})
        replace = replace_table.get((*self.block, self.block_index)) or replace_table.get(self.block)
        before = patches.get(f"{self.kind}_patch", ())
        after = patches.get(f"{self.kind}_output_patch", ())
        extra = self.extra_options(attn)
        n = hidden_states
        context = n if encoder_hidden_states is None else encoder_hidden_states
        value: torch.Tensor | None = None
        if before:
            value = context
            for patch in before:
                n, context, value = patch(n, context, value, extra)
        # ComfyUI's own attention maths whenever diffusers' processor would differ: a replacement, a separate
        # value, or queries re-batched against unchanged keys (HyperTile's tiles: ComfyUI reshapes k and v to
        # the queries' batch, so each tile attends to one contiguous run of tokens).
        regrouped = n.shape[0] != context.shape[0]
        if replace is not None or regrouped or (value is not None and value is not context):
            q = attn.to_q(n)
            k = attn.to_k(context)
            v = attn.to_v(value if value is not None else context)
            out = replace(q, k, v, extra) if replace is not None else default_attention(q, k, v, attn.heads)
            out = attn.to_out[1](attn.to_out[0](out))
        else:
            self_attention = encoder_hidden_states is None and context is n
            out = self.original(attn, n, encoder_hidden_states=None if self_attention else context,
                                attention_mask=attention_mask, **kwargs)
        for patch in after:
            out = patch(out, extra)
        return out



# diffusers inspects a processor's __call__ signature at every attention call (see model_code).
PatchedAttentionProcessor.__call__.__dict__["__signature__"] = inspect.signature(PatchedAttentionProcessor.__call__)

def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


@contextlib.contextmanager
def installed(unet: Any, options: dict[str, Any]) -> Iterator[None]:
    """The patches of `options` (one call's transformer_options, written to as ComfyUI does: block,
    activations_shape) installed on `unet` for the block."""
    layout = block_layout(unet)
    patches = options.get("patches", {})
    handles: list[Any] = []
    processors: list[tuple[Any, Any]] = []
    middle_patches = patches.get("middle_patch", ())
    with_fuser: list[torch.nn.Module] = []
    try:
        for transformer_index, (transformer, block) in enumerate(layout.transformers):
            def record_shape(_module: Any, args: tuple, kwargs: dict, block: tuple[str, int] = block,
                             transformer_index: int = transformer_index) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                options["activations_shape"] = list(hidden.shape)
                options["block"] = block
                options["transformer_index"] = transformer_index
            handles.append(transformer.register_forward_pre_hook(record_shape, with_kwargs=True))
            if middle_patches:
                handles.append(transformer.register_forward_pre_hook(_ask_for_fuser, with_kwargs=True))
                for index, basic in enumerate(transformer.transformer_blocks):
                    vars(basic)["fuser"] = _MiddlePatches(middle_patches, block, index, basic.attn1, options)
                    with_fuser.append(basic)
            for index, basic in enumerate(transformer.transformer_blocks):
                for kind in ("attn1", "attn2"):
                    attn = getattr(basic, kind, None)
                    if attn is None:
                        continue
                    processors.append((attn, attn.processor))
                    attn.set_processor(PatchedAttentionProcessor(attn.processor, kind, block, index, options))
        input_patches = patches.get("input_block_patch", ())
        after_skip = patches.get("input_block_patch_after_skip", ())
        for position, (block_id, end, _) in enumerate(layout.inputs):
            if input_patches:
                handles.append(end.register_forward_hook(_input_hook(block_id, input_patches, options)))
            if after_skip:
                following = layout.inputs[position + 1][2] if position + 1 < len(layout.inputs) else layout.middle
                if following is not None:
                    handles.append(following.register_forward_pre_hook(
                        _after_skip_hook(block_id, after_skip, options)))
        output_patches = patches.get("output_block_patch", ())
        if output_patches:
            _install_output_patches(layout, output_patches, options, handles)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for attn, original in reversed(processors):
            attn.set_processor(original)
        for basic in with_fuser:
            vars(basic).pop("fuser", None)


def _ask_for_fuser(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Transformer2DModel pre-hook: diffusers' GLIGEN entry, so that each block calls its `fuser`."""
    extra = dict(kwargs.get("cross_attention_kwargs") or {})
    extra["gligen"] = {"objs": None}
    return args, {**kwargs, "cross_attention_kwargs": extra}


class _MiddlePatches:
    """A BasicTransformerBlock's `fuser` for one call: ComfyUI's middle_patch list on its hidden states."""

    def __init__(self, patches: list[Callable], block: tuple[str, int], block_index: int, attn: Any,
                 options: dict[str, Any]):
        self.patches = patches
        self.extra = PatchedAttentionProcessor(None, "attn1", block, block_index, options).extra_options
        self.attn = attn

    def __call__(self, hidden_states: torch.Tensor, _objs: Any) -> torch.Tensor:
        extra = self.extra(self.attn)
        for patch in self.patches:
            hidden_states = patch(hidden_states, extra)
        return hidden_states


def _input_hook(block_id: int, patches: list[Callable], options: dict[str, Any]) -> Callable:
    def hook(_module: Any, _args: tuple, output: Any) -> Any:
        options["block"] = ("input", block_id)
        h = _first(output)
        for patch in patches:
            h = patch(h, options)
        return _replace_first(output, h)
    return hook


def _after_skip_hook(block_id: int, patches: list[Callable], options: dict[str, Any]) -> Callable:
    def hook(_module: Any, args: tuple) -> tuple:
        options["block"] = ("input", block_id)
        h = args[0]
        for patch in patches:
            h = patch(h, options)
        return (h, *args[1:])
    return hook


class _UpBlockSkips:
    """One up block's skips during a call, and the skips the output patches returned (by LDM output id)."""

    def __init__(self) -> None:
        self.skips: tuple[torch.Tensor, ...] = ()
        self.patched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (skip given, skip returned)


def _run_output_patches(block_id: int, h: torch.Tensor, skip: torch.Tensor, patches: list[Callable],
                        options: dict[str, Any], state: _UpBlockSkips) -> torch.Tensor:
    options["block"] = ("output", block_id)
    patched_skip = skip
    for patch in patches:
        h, patched_skip = patch(h, patched_skip, options)
    state.patched[block_id] = (skip, patched_skip)
    return h


def _install_output_patches(layout: BlockLayout, patches: list[Callable], options: dict[str, Any],
                            handles: list[Any]) -> None:
    for up, block_ids, producers in layout.up_blocks:
        state = _UpBlockSkips()

        def first(_module: Any, args: tuple, kwargs: dict, first_id: int = block_ids[0],
                  state: _UpBlockSkips = state) -> tuple[tuple, dict]:
            skips = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
            state.skips, state.patched = tuple(skips), {}
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden = _run_output_patches(first_id, hidden, state.skips[-1], patches, options, state)
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        handles.append(up.register_forward_pre_hook(first, with_kwargs=True))
        for index, producer in enumerate(producers, start=1):
            def later(_module: Any, _args: tuple, output: Any, block_id: int = block_ids[index], index: int = index,
                      state: _UpBlockSkips = state) -> Any:
                h = _run_output_patches(block_id, _first(output), state.skips[-(index + 1)], patches, options,
                                        state)
                return _replace_first(output, h)

            handles.append(producer.register_forward_hook(later))
        resnets: list[torch.nn.Module] = list(up.resnets)  # type: ignore[arg-type]
        for block_id, resnet in zip(block_ids, resnets, strict=True):
            def substitute(_module: Any, args: tuple, block_id: int = block_id,
                           state: _UpBlockSkips = state) -> tuple | None:
                if block_id not in state.patched:
                    return None
                given, returned = state.patched.pop(block_id)
                if returned is given:
                    return None
                joined = args[0]
                h = joined[:, :joined.shape[1] - given.shape[1]]
                return (torch.cat([h, returned], dim=1), *args[1:])

            handles.append(resnet.register_forward_pre_hook(substitute))
