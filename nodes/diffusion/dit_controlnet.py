"""ControlNets of the diffusion-transformer families (SD3 / SD3.5 and Flux), ComfyUI's semantics on diffusers'
SD3ControlNetModel / FluxControlNetModel.

Files (ComfyUI's comfy/controlnet.py load_controlnet_state_dict tells them apart by their keys):

* SD3 ControlNets (InstantX, alimama inpainting; `controlnet_blocks.*` + `pos_embed_input.proj.*`) use diffusers'
  SD3ControlNetModel names as they are. The hint image is VAE-encoded and scaled with SD3's latent scale but no
  shift (ComfyUI's "SD3 controlnet weirdness"; diffusers' InstantX pipeline agrees), the pooled input is zeros.
* Flux InstantX / union / alimama inpainting ControlNets (`controlnet_x_embedder.*`) use diffusers'
  FluxControlNetModel names. The hint is VAE-encoded into Flux's latent space, padded and packed like the latent;
  union nets prepend their mode embedding (SetUnionControlNetType) to the text tokens.
* Flux XLabs ControlNets (`double_blocks.*` in BFL names, `input_hint_block.*`, `pos_embed_input.*`): the hint
  pixels (2·x − 1) go through the net's own convolutional encoder; no VAE.

An inpainting net (one extra hint channel) gets the mask (1 = keep) resized to the latent after the hint latent.

ComfyUI maps a net's block outputs onto the main model's blocks as follows, with `depth` its main model's block
count (ComfyUI reads 24 / 38 from the hidden size for SD3 and hard-codes 19 / 38 for Flux: the block counts of the
real models, so the main network's own counts are used here):

* SD3: output j serves depth // n consecutive joint blocks (the last block, which has no image output, none);
* Flux InstantX: output j serves ceil(depth / n) consecutive blocks (double and single blocks alike);
* Flux XLabs: the outputs repeat cyclically over the double blocks.

`transformer_residuals` returns ComfyUI's control dict with those lists expanded to one tensor per main block:
{"input": [..] joint / double blocks, "output": [..] single blocks} (zeros where a block gets nothing); the
family's forward hands the lists to the diffusers transformer (see nodes.diffusion.dit_calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch

from . import convert, families
from .checkpoint import ModelFileError, _materialize
from .controlnet import ControlChainLink, broadcast_hint
from .dit_flux import pack, pad_to_patches, position_ids
from .latent_formats import FLUX_LATENT, SD3_LATENT
from .models import DiffusionModel, LatentFormat
from .offline import ensure_offline
from .resize import common_upscale
from .sampling_conds import repeat_to_batch

StateDict = dict[str, torch.Tensor]
Control = dict[str, list[torch.Tensor]]

# ComfyUI's SD3 ControlNets scale the hint latent without SD3's shift.
SD3_CONTROL_LATENT = dataclasses.replace(SD3_LATENT, shift_factor=0.0)
XLABS_HINT_CONVS = 8  # the stock hint encoder: 3→16 conv, three (conv, strided conv) pairs, a last conv

# Known transformer ControlNet layouts this module does not build, with what they are.
_NOT_BUILT = (
    ("transformer_blocks.0.adaLN_modulation.1.bias", "a Stability SD3.5 Large ControlNet (blur / canny / depth)"),
    ("controlnet_blocks.0.linear.weight", "a Flux MistoLine ControlNet"),
    ("transformer_blocks.0.img_mlp.net.0.proj.weight", "a Qwen-Image InstantX ControlNet"),
    ("after_proj_list.18.bias", "a Hunyuan-DiT ControlNet"),
)


def is_transformer_controlnet(state: Mapping[str, Any]) -> bool:
    return any(key in state for key in ("controlnet_blocks.0.weight", "controlnet_blocks.0.linear.weight",
                                         "after_proj_list.18.bias"))


def controlnet_kind(state: Mapping[str, Any], what: str) -> str:
    """"sd3" | "flux_instantx" | "flux_xlabs", in the order ComfyUI checks them; a clear error otherwise."""
    for marker, description in _NOT_BUILT:
        if marker in state:
            raise ModelFileError(f"{what}: {description}; this kind of ControlNet is not supported yet (SD3 "
                                 f"InstantX-style, Flux InstantX / union / XLabs ControlNets are)")
    if "double_blocks.0.img_attn.norm.key_norm.scale" in state:
        return "flux_xlabs"
    if "pos_embed_input.proj.weight" in state:
        return "sd3"
    if "controlnet_x_embedder.weight" in state:
        return "flux_instantx"
    sample = ", ".join(sorted(state)[:6])
    raise ModelFileError(f"{what}: a diffusion-transformer ControlNet of an unknown layout (keys {sample}, ...): "
                         f"known are SD3 (pos_embed_input.proj.*), Flux InstantX (controlnet_x_embedder.*) and "
                         f"Flux XLabs (double_blocks.*, input_hint_block.*)")


def _count(state: Mapping[str, Any], block: str) -> int:
    return len({int(m.group(1)) for key in state if (m := re.match(rf"{block}\.(\d+)\.", key))})


def sd3_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """SD3ControlNetModel keyword arguments read from the shapes."""
    inner, in_channels, patch, _ = state["pos_embed.proj.weight"].shape
    norm_q = state.get("transformer_blocks.0.attn.norm_q.weight")
    head_width = int(norm_q.shape[0]) if norm_q is not None else 64  # SD3 without qk-norm: 64-wide heads
    dual = tuple(i for i in range(_count(state, "transformer_blocks"))
                 if f"transformer_blocks.{i}.attn2.to_q.weight" in state)
    return {
        "patch_size": int(patch), "in_channels": int(in_channels), "out_channels": int(in_channels),
        "num_layers": _count(state, "transformer_blocks"), "attention_head_dim": head_width,
        "num_attention_heads": int(inner) // head_width,
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(state["context_embedder.weight"].shape[0]),
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "pos_embed_max_size": round(math.sqrt(state["pos_embed.pos_embed"].shape[1])),
        "extra_conditioning_channels": int(state["pos_embed_input.proj.weight"].shape[1]) - int(in_channels),
        "qk_norm": None if norm_q is None else "rms_norm", "dual_attention_layers": dual,
        "force_zeros_for_pooled_projection": True,
    }


def _flux_heads(width: int, head_width: int, what: str) -> dict[str, Any]:
    if head_width != sum(families.FLUX_ROPE_AXES) or width % head_width:
        raise ModelFileError(f"{what}: Flux ControlNet heads {head_width} wide (width {width}): only 128-wide heads "
                             f"are known")
    return {"attention_head_dim": head_width, "num_attention_heads": width // head_width,
            "axes_dims_rope": families.FLUX_ROPE_AXES}


def flux_instantx_config(state: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    width, in_channels = state["x_embedder.weight"].shape
    config = {
        "patch_size": 1, "in_channels": int(in_channels), "num_layers": _count(state, "transformer_blocks"),
        "num_single_layers": _count(state, "single_transformer_blocks"),
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in state,
        **_flux_heads(int(width), int(state["transformer_blocks.0.attn.norm_q.weight"].shape[0]), what),
    }
    if "controlnet_mode_embedder.weight" in state:
        config["num_mode"] = int(state["controlnet_mode_embedder.weight"].shape[0])
    return config


_XLABS_OWN = ("controlnet_blocks.", "controlnet_single_blocks.", "pos_embed_input.", "input_hint_block.")


def flux_xlabs_weights(state: Mapping[str, torch.Tensor], what: str) -> tuple[dict[str, Any], StateDict]:
    """(FluxControlNetModel config, its weights) of an XLabs file: the transformer part through the Flux
    converter, the hint encoder's Sequential indices 0, 2, ..., 14 onto conv_in, blocks.0-5, conv_out."""
    width, in_channels = state["img_in.weight"].shape
    hints = sorted({int(m.group(1)) for key in state if (m := re.match(r"input_hint_block\.(\d+)\.weight$", key))})
    if len(hints) != XLABS_HINT_CONVS:
        raise ModelFileError(f"{what}: an XLabs Flux ControlNet with {len(hints)} hint convolutions; the known "
                             f"encoder has {XLABS_HINT_CONVS}")
    config = {
        "patch_size": 2, "in_channels": int(in_channels), "num_layers": _count(state, "double_blocks"),
        "num_single_layers": _count(state, "single_blocks"),
        "joint_attention_dim": int(state["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(state["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in state, "conditioning_embedding_channels": 16,
        **_flux_heads(int(width), int(state["double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]), what),
    }
    transformer = {key: value for key, value in state.items() if not key.startswith(_XLABS_OWN)}
    try:
        weights = families.flux_to_diffusers(transformer, "", int(width))
    except families.UnknownTransformer as error:
        raise ModelFileError(f"{what}: {error}") from error
    names = ["conv_in"] + [f"blocks.{i}" for i in range(len(hints) - 2)] + ["conv_out"]
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if key.startswith(("controlnet_blocks.", "controlnet_single_blocks.")):
            weights[key] = value
        elif stem == "pos_embed_input":
            weights[f"controlnet_x_embedder.{leaf}"] = value
        elif key.startswith("input_hint_block."):
            weights[f"input_hint_block.{names[hints.index(int(key.split('.')[1]))]}.{leaf}"] = value
    return config, weights


def load_transformer_controlnet(state: StateDict, path: Path, manager: Any = None,
                                dtype: torch.dtype | None = None) -> TransformerControlNet:
    ensure_offline()
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    what = path.name
    kind = controlnet_kind(state, what)
    if dtype is None:
        dtype = manager.dtype_for("diffusion") if manager is not None else torch.float32
    try:
        if kind == "sd3":
            config, weights, cls = sd3_config(state), dict(state), SD3ControlNetModel
        elif kind == "flux_instantx":
            config, weights, cls = flux_instantx_config(state, what), dict(state), FluxControlNetModel
        else:
            (config, weights), cls = flux_xlabs_weights(state, what), FluxControlNetModel
    except KeyError as error:
        raise ModelFileError(f"{what}: a {kind} ControlNet without {error.args[0]}") from error
    with torch.device("meta"):
        module = cls(**config)
        hint_width = weights.get("controlnet_x_embedder.weight")
        if hint_width is not None and hint_width.shape[1] != config["in_channels"]:
            # Inpainting nets read latent + mask patches (17·4 inputs) beside the 16·4-wide latent.
            module.controlnet_x_embedder = torch.nn.Linear(hint_width.shape[1], hint_width.shape[0])
    module = _materialize(module, weights, dtype, f"{what} ({kind} ControlNet)")
    return TransformerControlNet(module, "sd3" if kind == "sd3" else "flux", kind, str(path), manager)


# ---------------------------------------------------------------------------------------------------------------
# The loaded net and the control object the denoiser calls


@dataclass(frozen=True, eq=False)
class TransformerControlNet:
    """What a CONTROL_NET link carries for a diffusion-transformer ControlNet."""

    module: torch.nn.Module
    family: str                   # the model family it fits: "sd3" | "flux"
    kind: str                     # "sd3" | "flux_instantx" | "flux_xlabs"
    source: str = ""
    manager: Any = None
    control_type: tuple[int, ...] = ()  # SetUnionControlNetType's choice (union nets)
    takes_vae: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return Path(self.source).name or "the ControlNet"

    @property
    def latent_format(self) -> LatentFormat | None:
        """The hint's latent space (None: the hint stays pixels)."""
        return {"sd3": SD3_CONTROL_LATENT, "flux_instantx": FLUX_LATENT}.get(self.kind)

    @property
    def needs_vae(self) -> bool:
        return self.latent_format is not None

    @property
    def concat_mask(self) -> bool:
        """An inpainting net: one mask channel after the hint latent."""
        if self.kind == "sd3":
            return int(convert.diffusers_config(self.module).extra_conditioning_channels) == 1
        if self.kind != "flux_instantx":
            return False
        embedder = cast(torch.nn.Linear, self.module.get_submodule("controlnet_x_embedder"))
        return embedder.in_features == 17 * 4

    @property
    def context_dim(self) -> int:
        return int(convert.diffusers_config(self.module).joint_attention_dim)

    def cache_nbytes(self) -> int:
        return 0  # the weights belong to the model memory manager

    def check_context_width(self, width: int) -> None:
        if width != self.context_dim:
            raise ValueError(f"the {self.family} ControlNet {self.name} expects text conditioning {self.context_dim} "
                             f"wide but the conditioning is {width} wide: the ControlNet is for another model")

    def applied(self, hint: torch.Tensor, strength: float, start_percent: float = 0.0, end_percent: float = 1.0,
                previous: Any = None, vae: Any = None,
                extra_concat: tuple[torch.Tensor, ...] = ()) -> AppliedTransformerControlNet:
        """hint: IMAGE [B, H, W, C] in 0..1; `vae` encodes it for the nets that read latents."""
        if self.needs_vae and vae is None:
            raise ValueError(f"the {self.family} ControlNet {self.name} needs a VAE: connect one to the apply node's "
                             f"vae input (ControlNetApplyAdvanced, ControlNetApplySD3)")
        if self.concat_mask and not extra_concat:
            extra_concat = (torch.ones((1, 1, 1, 1)),)  # ComfyUI: an inpainting net without a mask keeps everything
        hint = hint.movedim(-1, 1).float().contiguous()
        return AppliedTransformerControlNet(self, hint, float(strength), float(start_percent), float(end_percent),
                                            previous, vae, tuple(extra_concat))


@dataclass(frozen=True, eq=False)
class AppliedTransformerControlNet(ControlChainLink):
    net: TransformerControlNet
    hint: torch.Tensor            # [B, C, H, W] float32 0..1
    strength: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: Any = None
    vae: Any = None
    extra_concat: tuple[torch.Tensor, ...] = ()
    # The prepared hint by (latent size, batch, ...): ComfyUI encodes it once per latent size.
    _hints: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def residuals(self, x_in: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                  model: DiffusionModel, **_: Any) -> None:
        """The UNet protocol: a transformer ControlNet on a UNet model is refused clearly."""
        raise ValueError(f"the {self.net.family} ControlNet {self.net.name} is for {self.net.family} models, not "
                         f"{model.family} ones")

    def transformer_residuals(self, x_in: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor,
                              context: torch.Tensor, model: DiffusionModel, extra: Mapping[str, torch.Tensor],
                              batched_number: int = 1) -> Control | None:
        """Per-block residuals of this net and the ones applied before it (summed), each with its own strength
        and σ window; None when none is active."""
        total: Control | None = None
        for link in reversed(self.chain()):  # the first applied runs first, as in ComfyUI
            run = getattr(link, "own_transformer_residuals", None)
            if run is None:
                raise ValueError(f"a UNet ControlNet is chained with the {self.net.family} ControlNet "
                                 f"{self.net.name}: it does not fit a {model.family} model")
            own = run(x_in, sigma, timestep, context, model, extra, batched_number)
            if own is None:
                continue
            total = own if total is None else {key: [a + b for a, b in zip(total[key], own[key], strict=True)]
                                               for key in total}
        return total

    def own_transformer_residuals(self, x_in: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor,
                                  context: torch.Tensor, model: DiffusionModel, extra: Mapping[str, torch.Tensor],
                                  batched_number: int) -> Control | None:
        net = self.net
        if net.family != model.family:
            raise ValueError(f"the {net.family} ControlNet {net.name} does not fit a {model.family} model")
        if not self.active_at(float(sigma.reshape(-1)[0]), model):
            return None
        net.check_context_width(context.shape[-1])
        lease = net.manager.use(net.module) if net.manager is not None else contextlib.nullcontext(net.module)
        with lease as module, torch.no_grad():
            parameter = next(module.parameters())
            dtype, device = parameter.dtype, parameter.device
            hint = self.prepared_hint(x_in, batched_number).to(device=device, dtype=dtype)
            x = x_in.to(device=device, dtype=dtype)
            context = context.to(device=device, dtype=dtype)
            single: list[torch.Tensor] = []  # SD3 nets have no single-block outputs
            if net.family == "sd3":
                samples = _sd3_outputs(module, x, timestep.to(device), context, hint, self.strength)
            else:
                samples, single = _flux_outputs(module, net, x, timestep.to(device), context, hint, extra,
                                                self.strength)
        network_config = convert.diffusers_config(model.unet)
        double_count = int(network_config.num_layers)
        if net.kind == "sd3":
            per_block = _sd3_blocks(samples, double_count)
        elif net.kind == "flux_xlabs":
            per_block = [samples[i % len(samples)] for i in range(double_count)]
        else:
            per_block = _consecutive(samples, double_count)
        single_count = int(getattr(network_config, "num_single_layers", 0) or 0)
        out = {"input": [r.to(x_in.device) for r in per_block],
               "output": [r.to(x_in.device) for r in _consecutive(single, single_count)] if single else []}
        return out

    def prepared_hint(self, x_in: torch.Tensor, batched_number: int) -> torch.Tensor:
        """The hint as the net reads it for latents like x_in: VAE latent (+ mask) [N, C, h, w], or pixels in
        −1..1 at 8× the (padded) latent size for XLabs nets."""
        rows, cols = x_in.shape[-2:]
        key = (rows, cols, x_in.shape[0], batched_number)
        cached = self._hints.get(key)
        if cached is not None:
            return cached
        fmt = self.net.latent_format
        if fmt is None:  # XLabs: pixels for its own encoder, at the size of the padded latent
            rows, cols = rows + rows % 2, cols + cols % 2
            hint = common_upscale(self.hint, cols * 8, rows * 8, "nearest-exact", "center") * 2.0 - 1.0
        else:
            ratio = _vae_ratio(self.vae)
            pixels = common_upscale(self.hint, cols * ratio, rows * ratio, "nearest-exact", "center")
            hint = fmt.process_in(self.vae.encode(pixels.movedim(1, -1), manager=self.net.manager).float())
            extras = [repeat_to_batch(common_upscale(c.float(), hint.shape[-1], hint.shape[-2], "nearest-exact",
                                                     "center"), hint.shape[0]) for c in self.extra_concat]
            hint = torch.cat([hint, *extras], dim=1)
        hint = broadcast_hint(hint, x_in.shape[0], batched_number)
        self._hints.clear()
        self._hints[key] = hint
        return hint


def _vae_ratio(vae: Any) -> int:
    """Pixels per latent cell of the VAE (ComfyUI's spacial_compression_encode): one halving per down block."""
    config = getattr(getattr(vae, "autoencoder", None), "config", None)
    blocks = getattr(config, "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else int(getattr(vae, "downscale_ratio", 8))


def _sd3_outputs(module: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 hint: torch.Tensor, strength: float) -> list[torch.Tensor]:
    config = convert.diffusers_config(module)
    patch = int(config.patch_size)
    pad = (0, (-x.shape[-1]) % patch, 0, (-x.shape[-2]) % patch)
    if any(pad):  # the patch embedders pad circularly, as the SD3 model does (nodes.diffusion.dit_sd3)
        x, hint = (torch.nn.functional.pad(t, pad, mode="circular") for t in (x, hint))
    pooled = torch.zeros((x.shape[0], config.pooled_projection_dim), device=x.device, dtype=x.dtype)
    return list(module(hidden_states=x, controlnet_cond=hint, conditioning_scale=strength, timestep=timestep.to(x),
                       encoder_hidden_states=context, pooled_projections=pooled, return_dict=False)[0])


def _flux_outputs(module: Any, net: TransformerControlNet, x: torch.Tensor, timestep: torch.Tensor,
                  context: torch.Tensor, hint: torch.Tensor, extra: Mapping[str, torch.Tensor],
                  strength: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    height, width = x.shape[-2:]
    hidden = pack(pad_to_patches(x))
    if net.kind == "flux_instantx":
        hint = pack(pad_to_patches(hint))
    guidance = None
    if module.config.guidance_embeds:
        guidance = extra.get("guidance")
        if guidance is None:
            raise ValueError(f"the Flux ControlNet {net.name} reads a guidance value, and the conditioning has none "
                             f"(FluxDisableGuidance)")
        guidance = guidance.to(x)
    mode = None
    union = bool(getattr(module, "union", False))
    if union and net.control_type:
        mode = torch.tensor(net.control_type[:1], device=x.device).reshape(1, 1).expand(x.shape[0], 1)
    arguments = dict(hidden_states=hidden, controlnet_cond=hint, controlnet_mode=mode, conditioning_scale=strength,
                     encoder_hidden_states=context, pooled_projections=extra["pooled_projections"].to(x),
                     timestep=timestep.to(x), img_ids=position_ids(height, width).to(x.device),
                     txt_ids=torch.zeros(context.shape[1], 3, device=x.device), guidance=guidance, return_dict=False)
    if union and mode is None:
        # ComfyUI runs a union net without a type ("auto") without the mode token; diffusers insists on one.
        module.union = False
        try:
            double, single = module(**arguments)
        finally:
            module.union = True
    else:
        double, single = module(**arguments)
    return list(double or []), list(single or [])


def _consecutive(samples: list[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    """Output j for ceil(blocks / n) consecutive blocks (ComfyUI's InstantX repetition)."""
    if not samples:
        return []
    run = -(-blocks // len(samples))
    return [samples[i // run] for i in range(blocks)]


def _sd3_blocks(samples: list[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    """Output j for blocks // n consecutive joint blocks, one less for the last; zeros for the blocks left."""
    count = blocks // len(samples)
    per_block = [sample for j, sample in enumerate(samples) for _ in range(count - (j == len(samples) - 1))]
    zeros = torch.zeros_like(samples[0])
    return (per_block + [zeros] * blocks)[:blocks]
