"""ControlNet: loading files into diffusers' ControlNetModel, and the control object the denoiser calls.

Files (docs/comfyui-reference.md#controlnet-and-lora): LDM layout with `control_model.` prefix or bare
(`zero_convs.*`, `input_hint_block.*`, `input_blocks.*`, `middle_block.*`, `middle_block_out.*`), or diffusers names
(`controlnet_cond_embedding.*`, `controlnet_down_blocks.*`, `down_blocks.*`). The architecture is read from tensor
shapes (the UNet part through nodes.diffusion.detect, the hint encoder from its convolutions); LDM weights go
through diffusers' own converter. "Diff" ControlNets (a `difference` marker key) store their UNet-shaped weights
relative to a base UNet and need that model to load (DiffControlNetLoader). A file name ending in `_shuffle` turns
on global average pooling.

`ControlNet` is what a CONTROL_NET link carries (weights only). `AppliedControlNet` is what ControlNetApply[Advanced]
put into a conditioning's options["control"]: the net plus hint image, strength, σ window and the previously
applied ControlNet; it implements the protocol of nodes.diffusion.denoiser (`residuals(...)`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import convert, detect
from .checkpoint import ModelFileError, _materialize, read_state_dict
from .models import DiffusionModel
from .offline import ensure_offline
from .resize import common_upscale
from .schedules import schedule_for

StateDict = dict[str, torch.Tensor]
LDM_PREFIX = "control_model."
# Keys of the ControlNet-only parts in LDM names (everything else is UNet-shaped).
_CONTROL_ONLY = ("zero_convs.", "input_hint_block.", "middle_block_out.")


# ---------------------------------------------------------------------------------------------------------------
# Formats


def controlnet_to_ldm(state: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ControlNetModel names → LDM (cldm) names without prefix. Values are carried through untouched.

    The UNet-shaped part uses the UNet writer; controlnet_down_blocks.i → zero_convs.i.0, controlnet_mid_block →
    middle_block_out.0, and the hint encoder conv_in / blocks.k / conv_out → input_hint_block.0 / 2k+2 / 2n+2 (the
    SiLUs sit at the odd indices of the LDM Sequential)."""
    hint_blocks = {int(key.split(".")[2]) for key in state if key.startswith("controlnet_cond_embedding.blocks.")}
    layers_per_block = len({key.split(".")[3] for key in state if key.startswith("down_blocks.0.resnets.")})
    unet_like: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "controlnet_down_blocks":
            out[f"zero_convs.{parts[1]}.0.{parts[2]}"] = value
        elif parts[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{parts[1]}"] = value
        elif parts[0] == "controlnet_cond_embedding":
            index = {"conv_in": 0, "conv_out": 2 * len(hint_blocks) + 2}.get(parts[1])
            if index is None:
                index = 2 * int(parts[2]) + 2
            out[f"input_hint_block.{index}.{parts[-1]}"] = value
        else:
            unet_like[key] = value
    out.update(convert.unet_to_ldm(unet_like, max(layers_per_block, 1)))
    return out


def _hint_indices(ldm: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for key in ldm if (m := re.match(r"input_hint_block\.(\d+)\.weight$", key))})


def controlnet_config(ldm: Mapping[str, torch.Tensor], what: str) -> tuple[dict[str, Any], str]:
    """(ControlNetModel keyword arguments, UNet family) read from LDM-named weights."""
    if "input_blocks.0.0.weight" not in ldm:
        raise ModelFileError(f"{what}: no UNet-shaped weights (input_blocks.0.0) in the ControlNet")
    # The detector reads a whole UNet; a ControlNet has no output head, so give it a stand-in of the right width.
    in_channels = ldm["input_blocks.0.0.weight"].shape[1]
    shape = detect.read_unet_shape({**ldm, "out.2.weight": torch.empty((in_channels, 1, 1, 1), device="meta")}, "")
    family = detect.unet_family(shape)
    unet = detect.unet_config(shape, family)
    hints = _hint_indices(ldm)
    if not hints:
        raise ModelFileError(f"{what}: no hint encoder (input_hint_block) in the ControlNet")
    hint_convs = [ldm[f"input_hint_block.{i}.weight"] for i in hints]
    # conv_in, then (same-width conv, strided conv) pairs, then conv_out: the widths after conv_in and each pair.
    widths = [hint_convs[0].shape[0]] + [conv.shape[0] for conv in hint_convs[2:-1:2]]
    config: dict[str, Any] = {
        "conditioning_channels": hint_convs[0].shape[1],
        "conditioning_embedding_out_channels": widths,
        **{name: unet[name] for name in (
            "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "transformer_layers_per_block", "norm_num_groups")},
        "mid_block_type": unet["mid_block_type"] or "UNetMidBlock2DCrossAttn",
    }
    for name in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if name in unet:
            config[name] = unet[name]
    return config, family


def _ldm_to_diffusers(ldm: StateDict, config: Mapping[str, Any]) -> StateDict:
    ensure_offline()
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(ldm, dict(config))
    # diffusers' converter assumes the stock 7-conv hint encoder; map it from the indices actually present.
    converted = {k: v for k, v in converted.items() if not k.startswith("controlnet_cond_embedding.")}
    hints = _hint_indices(ldm)
    names = (["conv_in"] + [f"blocks.{n}" for n in range(len(hints) - 2)] + ["conv_out"])
    for name, index in zip(names, hints, strict=False):
        for kind in ("weight", "bias"):
            converted[f"controlnet_cond_embedding.{name}.{kind}"] = ldm[f"input_hint_block.{index}.{kind}"]
    # ... and leaves out SDXL's size-conditioning embedding.
    for ldm_name, diffusers_name in (("label_emb.0.0", "add_embedding.linear_1"),
                                     ("label_emb.0.2", "add_embedding.linear_2")):
        for kind in ("weight", "bias"):
            if f"{ldm_name}.{kind}" in ldm:
                converted[f"{diffusers_name}.{kind}"] = ldm[f"{ldm_name}.{kind}"]
    return {k: v for k, v in converted.items() if v is not None}


def _unsupported_kind(state: Mapping[str, Any]) -> str | None:
    keys = list(state)
    if any(k.startswith(("lora_", "lycoris_")) or ".lora_" in k or ".hada_" in k for k in keys):
        return "a LoRA or Control-LoRA file (Control-LoRAs are not supported; LoRAs go in models/loras)"
    if any(k.startswith(("adapter.", "body.0.")) for k in keys):
        return "a T2I-Adapter of an unknown layout"
    if any(k.startswith(detect.UNET_PREFIXES) for k in keys):
        return "a model checkpoint, not a ControlNet"
    return None


def ldm_weights(state: StateDict, what: str) -> tuple[StateDict, str]:
    """The ControlNet's weights in LDM names (no prefix) and the format found ("ldm" | "diffusers")."""
    if any(key.startswith(LDM_PREFIX) for key in state):
        return convert.strip_prefix(state, LDM_PREFIX), "ldm"
    if "input_hint_block.0.weight" in state and any(key.startswith("zero_convs.") for key in state):
        return dict(state), "ldm"
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return controlnet_to_ldm(state), "diffusers"
    kind = _unsupported_kind(state)
    raise ModelFileError(f"{what}: not a ControlNet" + (f": it looks like {kind}" if kind else
                                                         " (no control_model.*, zero_convs.* or "
                                                         "controlnet_cond_embedding.* weights)"))


# ---------------------------------------------------------------------------------------------------------------
# The loaded network


@dataclass(frozen=True, eq=False)
class ControlNet:
    """What a CONTROL_NET link carries: a diffusers ControlNetModel and what it fits."""

    module: torch.nn.Module
    family: str                   # the UNet family its shapes match ("sd1" | "sd2" | "sdxl" | ...)
    source: str = ""
    manager: Any = None           # the model memory manager that owns the weights (moves them when used)
    # SetUnionControlNetType's choice (ComfyUI's control_type extra argument): only union ControlNets read it, and
    # their files do not load here, so it changes nothing for the nets this class holds (as in ComfyUI).
    control_type: tuple[int, ...] = ()

    @property
    def context_dim(self) -> int:
        return int(convert.diffusers_config(self.module).cross_attention_dim)

    @property
    def needs_added_conditioning(self) -> bool:
        return bool(convert.diffusers_config(self.module).addition_embed_type == "text_time")

    def cache_nbytes(self) -> int:
        return 0  # the weights belong to the model memory manager

    def applied(self, hint: torch.Tensor, strength: float, start_percent: float = 0.0, end_percent: float = 1.0,
                previous: AppliedControlNet | None = None) -> AppliedControlNet:
        """hint: IMAGE [B, H, W, C] in 0..1."""
        # Contiguous NCHW: a channels-last view would pick other conv kernels (results differing in the 6th digit).
        hint = hint.movedim(-1, 1).float().contiguous()
        return AppliedControlNet(self, hint, float(strength), float(start_percent), float(end_percent), previous)

    def check_context_width(self, width: int) -> None:
        if width != self.context_dim:
            raise ValueError(f"the ControlNet {Path(self.source).name or ''} expects text conditioning "
                             f"{self.context_dim} wide ({self.family}-shaped) but the conditioning is {width} wide: "
                             f"the ControlNet is for another model architecture")


def load_controlnet(path: str | os.PathLike, manager: Any = None, dtype: torch.dtype | None = None,
                    base_model: DiffusionModel | None = None) -> Any:
    """A ControlNet file as a ControlNet, or a T2I-Adapter file as a T2IAdapter (nodes.diffusion.t2i_adapter; both
    load through ComfyUI's ControlNet loaders). `base_model` is required for "diff" ControlNets (their UNet-shaped
    weights are added to the base UNet's); `dtype` defaults to the manager's diffusion dtype (fp32 without one)."""
    ensure_offline()
    from diffusers import ControlNetModel

    from .t2i_adapter import is_t2i_adapter, load_t2i_adapter

    path = Path(path)
    what = path.name
    state = read_state_dict(path)
    from .dit_controlnet import is_transformer_controlnet, load_transformer_controlnet

    if is_transformer_controlnet(state):  # SD3 / Flux ControlNets (controlnet_blocks.*)
        return load_transformer_controlnet(state, path, manager, dtype)
    if not any(key.startswith((LDM_PREFIX, "zero_convs.", "controlnet_")) for key in state) and is_t2i_adapter(state):
        return load_t2i_adapter(state, path, manager)
    is_difference = "difference" in state
    state.pop("difference", None)
    ldm, file_format = ldm_weights(state, what)
    try:
        config, family = controlnet_config(ldm, what)
    except detect.UnknownArchitecture as error:
        raise ModelFileError(f"{what}: unknown or unsupported ControlNet architecture: {error}") from error
    if is_difference:
        if base_model is None:
            raise ModelFileError(f"{what}: a diff ControlNet needs the model it was made from (DiffControlNetLoader)")
        if manager is not None:  # the base weights, not a LoRA the memory manager may have left applied
            manager.restore(base_model.unet)
        ldm = add_base_unet(ldm, base_model, what)
        file_format = "ldm"
    config["global_pool_conditions"] = path.stem.endswith("_shuffle")
    weights = _ldm_to_diffusers(ldm, config) if file_format == "ldm" else dict(state)
    if dtype is None:
        dtype = manager.dtype_for("diffusion") if manager is not None else torch.float32
    with torch.device("meta"):
        module = ControlNetModel(**config)
    module = _materialize(module, weights, dtype, f"{what} (ControlNet)")
    return ControlNet(module, family, str(path), manager)


def add_base_unet(ldm: StateDict, base_model: DiffusionModel, what: str) -> StateDict:
    """Diff ControlNet weights + the base UNet's weights of the same LDM name (control-only parts unchanged)."""
    unet = base_model.unet
    base = convert.unet_to_ldm(unet.state_dict(), convert.diffusers_config(unet).layers_per_block)
    combined = {}
    for key, value in ldm.items():
        if key.startswith(_CONTROL_ONLY) or key not in base:
            combined[key] = value
            continue
        if base[key].shape != value.shape:
            raise ModelFileError(f"{what}: diff weight {key} {tuple(value.shape)} does not fit the model's "
                                 f"{tuple(base[key].shape)}: the diff ControlNet is for another model")
        combined[key] = value.float() + base[key].float()
    return combined


# ---------------------------------------------------------------------------------------------------------------
# The control object handed to the denoiser


def broadcast_hint(hint: torch.Tensor, batch: int, batched_number: int | None) -> torch.Tensor:
    """The hint batch matched to the model batch: one image serves all; otherwise each conditioning chunk of the
    batch gets the hint images in order, repeated cyclically (ComfyUI's broadcast_image_to). Without the chunk
    count, the whole batch is filled cyclically (the same result whenever the hint batch divides the latent batch)."""
    if hint.shape[0] == batch:
        return hint
    if hint.shape[0] == 1:
        return hint.expand(batch, *hint.shape[1:])
    chunks = batched_number if batched_number and batch % batched_number == 0 else 1
    per_chunk = batch // chunks
    repeats = -(-per_chunk // hint.shape[0])
    one_chunk = hint.repeat(repeats, 1, 1, 1)[:per_chunk]
    return one_chunk.repeat(chunks, 1, 1, 1)


# (down-block residuals, mid-block residual) that a ControlNet adds to the UNet's skip connections.
Residuals = tuple[tuple[torch.Tensor, ...], torch.Tensor]


class ControlChainLink:
    """What every applied control (ControlNet, T2I-Adapter, transformer ControlNet) shares: each link of a chain
    names the one applied before it (`previous`), holds its hint and is active in a σ window."""

    hint: torch.Tensor
    previous: Any
    start_percent: float
    end_percent: float

    def chain(self) -> list[Any]:
        links, node = [], self
        while node is not None:
            links.append(node)
            node = node.previous
        return links

    def cache_nbytes(self) -> int:
        return sum(link.hint.numel() * link.hint.element_size() for link in self.chain())

    def active_at(self, sigma: float, model: DiffusionModel) -> bool:
        """ComfyUI's σ window: active while percent_to_sigma(end) ≤ σ ≤ percent_to_sigma(start)."""
        schedule = schedule_for(model.sampling)
        return schedule.percent_to_sigma(self.end_percent) <= sigma <= schedule.percent_to_sigma(self.start_percent)


@dataclass(frozen=True, eq=False)
class AppliedControlNet(ControlChainLink):
    net: ControlNet
    hint: torch.Tensor            # [B, C, H, W] float32 0..1 (not normalised)
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: AppliedControlNet | None = None
    # Resized hints by (height, width, batch, device, dtype): the same hint serves every step of a run.
    _hints: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)


    def prepared_hint(self, x_in: torch.Tensor, dtype: torch.dtype, batched_number: int | None) -> torch.Tensor:
        height, width = x_in.shape[2] * 8, x_in.shape[3] * 8
        key = (height, width, x_in.shape[0], batched_number, x_in.device, dtype)
        cached = self._hints.get(key)
        if cached is None:
            resized = self.hint
            if resized.shape[2] != height or resized.shape[3] != width:
                resized = common_upscale(resized, width, height, "nearest-exact", "center")
            cached = broadcast_hint(resized, x_in.shape[0], batched_number).to(device=x_in.device, dtype=dtype)
            self._hints.clear()
            self._hints[key] = cached
        return cached

    def residuals(self, x_in: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                  model: DiffusionModel, **kwargs: Any) -> Residuals | None:
        """Summed (down residuals, mid residual) of this ControlNet and those applied before it, each scaled by
        its own strength and gated by its own σ window; None when none of them is active."""
        total: Residuals | None = None
        for link in reversed(self.chain()):  # the first applied runs first, as in ComfyUI
            own = link.own_residuals(x_in, sigma, timestep, context, model, **kwargs)
            if own is None:
                continue
            if total is None:
                total = own
            else:
                total = (tuple(a + b for a, b in zip(total[0], own[0], strict=False)), total[1] + own[1])
        return total

    def intrablock_residuals(self, x_in: torch.Tensor, sigma: torch.Tensor, model: DiffusionModel,
                             batched_number: int | None = None) -> list[torch.Tensor] | None:
        """Summed T2I-Adapter features of the chain (diffusers' down_intrablock_additional_residuals: one per down
        block, SDXL's last after the middle block), each scaled and σ-gated on its own; None when none is active."""
        total: list[torch.Tensor] | None = None
        for link in reversed(self.chain()):
            own = link.own_intrablock(x_in, sigma, model, batched_number)
            if own is None:
                continue
            total = own if total is None else [a + b for a, b in zip(total, own, strict=True)]
        return total

    def own_intrablock(self, x_in: torch.Tensor, sigma: torch.Tensor, model: DiffusionModel,
                       batched_number: int | None = None) -> list[torch.Tensor] | None:
        return None  # a ControlNet adds to the skip connections only (residuals)

    def own_residuals(self, x_in: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor,
                      context: torch.Tensor, model: DiffusionModel,
                      added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                      batched_number: int | None = None, **_: Any) -> Residuals | None:
        if not self.active_at(float(sigma.reshape(-1)[0]), model):
            return None
        net = self.net
        net.check_context_width(context.shape[-1])
        added = added_cond_kwargs or {}
        if net.needs_added_conditioning and not added:
            raise ValueError(f"the ControlNet {Path(net.source).name} is an SDXL ControlNet but the model is "
                             f"{model.family}: the ControlNet is for another model architecture")
        lease = net.manager.use(net.module) if net.manager is not None else contextlib.nullcontext(net.module)
        with lease as module, torch.no_grad():
            dtype = next(module.parameters()).dtype
            device = next(module.parameters()).device
            hint = self.prepared_hint(x_in, dtype, batched_number).to(device)
            extra = {}
            if net.needs_added_conditioning:
                extra["added_cond_kwargs"] = {k: v.to(device=device, dtype=dtype) for k, v in added.items()}
            down, mid = module(x_in.to(device=device, dtype=dtype), timestep.to(device),
                               encoder_hidden_states=context.to(device=device, dtype=dtype), controlnet_cond=hint,
                               conditioning_scale=self.strength, guess_mode=False, return_dict=False, **extra)
        return tuple(r.to(x_in.device) for r in down), mid.to(x_in.device)
