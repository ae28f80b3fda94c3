"""How the sampler's model call reaches each diffusion-transformer family's network.

The UNet families go straight to diffusers' UNet2DConditionModel (nodes.diffusion.denoiser). A transformer family
has a module `nodes.diffusion.dit_<name>` with two functions:

    conditioning(options, latent_shape, device) -> dict[str, Tensor]
        the per-entry extra inputs (pooled projections, guidance, reference latents, ...) from one
        conditioning entry's options, each with a leading batch dimension (they are batched like SDXL's
        text_embeds: concatenated along dim 0 over the chunks that share a call);
    forward(network, x_in, timestep, context, extra, transformer_options) -> Tensor
        the network's raw output for latents `x_in` [N, C, H, W] (already in the network's dtype), network
        timesteps [N] (the schedule's σ→t), text context [N, T, D] and the batched `extra`; returns [N, C, H, W]
        (any patch packing and padding undone) for the family's prediction type to turn into x0.

Chunks of a DiT family only share a call when their contexts have the same length: joint attention over
repeated text tokens would change the result (ComfyUI's CONDRegular for these models).

ControlNets. A family whose module sets `ACCEPTS_CONTROL = True` takes a keyword `control` in `forward`: ComfyUI's
control dict {"input": [one residual per joint / double block], "output": [one per single block]} (image tokens
[N, L, width]; lists as long as the network's block lists, so block i adds entry i), handed to the diffusers
transformer (SD3: block_controlnet_hidden_states; Flux: controlnet_block_samples / controlnet_single_block_samples).
The conditioning entry's control object (options["control"]) makes it with
`transformer_residuals(x_in, sigma, timestep, context, model, extra, batched_number)` (None when inactive; the
UNet ControlNets' `residuals` protocol is nodes.diffusion.denoiser's); nodes.diffusion.dit_controlnet has them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

# family -> module of nodes.diffusion that calls its network
_MODULES = {
    "sd3": "dit_sd3",
    "flux": "dit_flux",
    "qwen_image": "dit_qwen_image",
    "auraflow": "dit_auraflow",
    "lumina2": "dit_lumina2",
    "chroma": "dit_chroma",
    "hidream": "dit_hidream",
}



def pad_to_patch(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """The latent padded on the bottom / right to multiples of the patch size, circularly (ComfyUI's
    pad_to_patch_size); the forwards crop their output back to the unpadded size."""
    pad_h, pad_w = (-latent.shape[-2]) % patch, (-latent.shape[-1]) % patch
    return F.pad(latent, (0, pad_w, 0, pad_h), mode="circular") if pad_h or pad_w else latent


def module_for(family: str) -> ModuleType | None:
    """The family's call module, or None for UNet families (and families with no call module yet)."""
    name = _MODULES.get(family)
    if name is None:
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.{name}":
            raise
        return None


def is_transformer_family(family: str) -> bool:
    return family in _MODULES


def control_residuals(module: ModuleType, control: Any, model: Any, x_in: torch.Tensor, sigma: torch.Tensor,
                      timestep: torch.Tensor, context: torch.Tensor, extra: Mapping[str, torch.Tensor],
                      batched_number: int) -> dict[str, list[torch.Tensor]] | None:
    """The per-block residuals of a conditioning entry's ControlNet for a transformer family's call."""
    run = getattr(control, "transformer_residuals", None)
    if run is None:
        raise ValueError(f"a UNet ControlNet (SD1 / SD2 / SDXL) cannot control a {model.family} model")
    if not getattr(module, "ACCEPTS_CONTROL", False):
        raise ValueError(f"ControlNets are not supported on {model.family} models yet")
    return run(x_in, sigma, timestep, context, model, extra, batched_number)


# ComfyUI's "dit" block kinds -> the diffusers transformer's block list (SD3's joint blocks and Flux's double
# blocks are both `transformer_blocks`; Flux's single-stream blocks are `single_transformer_blocks`).
_BLOCK_LISTS = {"double_block": "transformer_blocks", "single_block": "single_transformer_blocks"}
BlockPatch = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def block_patches(network: Any, transformer_options: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    """What the forwards wrap their network call in: the block replacements of
    transformer_options["patches_replace"]["dit"] (ComfyUI's layout: key ("double_block" | "single_block", index),
    value patch(args, {"original_block": run}) -> dict), installed on the diffusers blocks for one call.

    args as ComfyUI's DiT models pass them: "img" (image tokens; for a single block the text tokens followed by
    the image tokens, as ComfyUI's Flux concatenates them), "txt" (text tokens; double blocks), "vec" (the
    modulation vector), "pe" (rotary embedding, where the model has one) and "transformer_options". A patch that
    returns `args` unchanged skips the block (SkipLayerGuidance); indices the network does not have are ignored,
    as in ComfyUI."""
    table = (transformer_options.get("patches_replace") or {}).get("dit") or {}
    if not table:
        return contextlib.nullcontext()
    module = getattr(network, "module", network)  # a CastNetwork runs its module's blocks
    module = getattr(module, "_orig_mod", module)  # so does a torch.compile wrapper
    stack = contextlib.ExitStack()
    for key, patch in table.items():
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] in _BLOCK_LISTS):
            continue
        blocks = getattr(module, _BLOCK_LISTS[key[0]], None)
        index = key[1]
        if blocks is None or not isinstance(index, int) or not 0 <= index < len(blocks):
            continue
        stack.enter_context(_replaced_forward(blocks[index], patch, key[0] == "single_block",
                                              transformer_options))
    return stack


@contextlib.contextmanager
def _replaced_forward(block: torch.nn.Module, patch: BlockPatch, single: bool,
                      transformer_options: Mapping[str, Any]) -> Iterator[None]:
    """`block.forward` routed through `patch` until the context ends (an instance attribute shadowing the class's
    forward; the previous one, if a patch was already installed, is put back)."""
    previous = block.__dict__.get("forward")
    original = block.forward

    def forward(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                *rest: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        text_length = encoder_hidden_states.shape[1]

        def run(args: dict[str, Any]) -> dict[str, Any]:
            img, txt = args["img"], args.get("txt")
            if single:
                txt, img = img[:, :text_length], img[:, text_length:]
            txt, img = original(img, txt, args["vec"], *rest, **kwargs)
            return {"img": torch.cat([txt, img], dim=1)} if single else {"img": img, "txt": txt}

        args: dict[str, Any] = {"vec": temb, "pe": kwargs.get("image_rotary_emb"),
                                "transformer_options": transformer_options}
        if single:
            args["img"] = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        else:
            args["img"], args["txt"] = hidden_states, encoder_hidden_states
        out = patch(args, {"original_block": run})
        if single:
            return out["img"][:, :text_length], out["img"][:, text_length:]
        return out["txt"], out["img"]

    block.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del block.forward
        else:
            block.forward = previous
