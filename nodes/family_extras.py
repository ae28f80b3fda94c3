"""The remaining model-family nodes of ComfyUI, with its names, signatures and formulas (the specification:
comfy_extras/nodes_stable_cascade.py, nodes_pixart.py, nodes_hunyuan.py and nodes_model_patch.py).

Run fully: the Stable Cascade conditioning / latent helpers (with the VAEs this engine loads), PixArt-α's
resolution options on an ordinary text encode, HunyuanImage's refiner latent, ModelPatchLoader for DiffSynth's
Qwen-Image ControlNets and QwenImageDiffsynthControlnet. Refused with a clear error: HunyuanDiT's BERT + mT5-XL text
encoder and USO style references (their networks / hooks are not built).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import (
    CLIP,
    CONDITIONING,
    IMAGE,
    LATENT,
    MASK,
    MODEL,
    VAE,
    Combo,
    Float,
    Int,
    Output,
    Socket,
    String,
)

from .conditioning import _encode, _tokenize, set_values
from .diffusion import patches as patch_api
from .diffusion.model_patch_nets import ModelPatch, load_model_patch_file
from .diffusion.models import DiffusionModel
from .diffusion.resize import common_upscale
from .diffusion.vae import VAEModel
from .image_prompting import CLIP_VISION_OUTPUT
from .model_files import file_identity, load_model, locate_model, model_choices, model_fingerprint, model_key

MAX_RESOLUTION = 16384
MODEL_PATCH = "MODEL_PATCH"
PROMPT = String(multiline=True, dynamicPrompts=True)


# --- Stable Cascade ----------------------------------------------------------------------------------------------

class StableCascade_StageB_Conditioning(Node):  # noqa: N801 (ComfyUI's node type name)
    category = "conditioning/stable_cascade"
    outputs = (Output(CONDITIONING),)
    conditioning: Annotated[Any, Socket(CONDITIONING)]
    stage_c: Annotated[Any, Socket(LATENT)]

    def run(self, ctx: RunContext):
        # Stage B reads the sampled stage C latent as its prior ("stable_cascade_prior", as ComfyUI names it).
        return (set_values(self.conditioning, {"stable_cascade_prior": self.stage_c["samples"]}),)


class StableCascade_StageC_VAEEncode(Node):  # noqa: N801
    category = "latent/stable_cascade"
    outputs = (Output(LATENT, name="stage_c"), Output(LATENT, name="stage_b"))
    image: Annotated[Any, Socket(IMAGE)]
    vae: Annotated[Any, Socket(VAE)]
    compression: Annotated[int, Int(min=4, max=128, step=1)] = 42

    def run(self, ctx: RunContext):
        vae: VAEModel = self.vae
        height, width = self.image.shape[-3], self.image.shape[-2]
        # The image is resized so that the VAE's own downscale gives width // compression latent cells.
        out_width = (width // self.compression) * vae.downscale_ratio
        out_height = (height // self.compression) * vae.downscale_ratio
        if out_width < 1 or out_height < 1:
            raise InputError("compression", f"{self.compression} leaves no latent cell for a {width}x{height} "
                                            "image (the image must be at least `compression` pixels on each side)")
        scaled = common_upscale(self.image.movedim(-1, 1), out_width, out_height, "bicubic", "center").movedim(1, -1)
        stage_c = vae.encode(scaled[..., :3], manager=ctx.models, progress=ctx.progress)
        stage_b = torch.zeros(stage_c.shape[0], 4, (height // 8) * 2, (width // 8) * 2)
        return {"samples": stage_c}, {"samples": stage_b}


class StableCascade_SuperResolutionControlnet(Node):  # noqa: N801
    category = "_for_testing/stable_cascade"
    experimental = True
    outputs = (Output(IMAGE, name="controlnet_input"), Output(LATENT, name="stage_c"),
               Output(LATENT, name="stage_b"))
    image: Annotated[Any, Socket(IMAGE)]
    vae: Annotated[Any, Socket(VAE)]

    def run(self, ctx: RunContext):
        vae: VAEModel = self.vae
        batch, height, width = self.image.shape[0], self.image.shape[-3], self.image.shape[-2]
        # The VAE's latent, channels last, is the ControlNet's hint image (as ComfyUI passes it on).
        controlnet_input = vae.encode(self.image[..., :3], manager=ctx.models, progress=ctx.progress).movedim(1, -1)
        stage_c = torch.zeros(batch, 16, height // 16, width // 16)
        stage_b = torch.zeros(batch, 4, height // 2, width // 2)
        return controlnet_input, {"samples": stage_c}, {"samples": stage_b}


# --- text encoders with extra options ------------------------------------------------------------------------------

class CLIPTextEncodePixArtAlpha(Node):
    category = "advanced/conditioning"
    description = "Encodes text and sets the resolution conditioning for PixArt Alpha. Does not apply to PixArt Sigma."
    outputs = (Output(CONDITIONING),)
    width: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 1024
    height: Annotated[int, Int(min=0, max=MAX_RESOLUTION)] = 1024
    text: Annotated[str, PROMPT]
    clip: Annotated[Any, Socket(CLIP)]

    def run(self, ctx: RunContext):
        tokens = _tokenize(ctx, self.clip, self.text)
        return (_encode(ctx, self.clip, tokens, {"width": self.width, "height": self.height}),)


class CLIPTextEncodeHunyuanDiT(Node):
    display_name = "CLIPTextEncodeHunyuanDiT"
    category = "advanced/conditioning"
    outputs = (Output(CONDITIONING),)
    clip: Annotated[Any, Socket(CLIP)]
    bert: Annotated[str, PROMPT]
    mt5xl: Annotated[str, PROMPT]

    def run(self, ctx: RunContext):
        # ComfyUI's HunyuanDiT CLIP tokenizes into a "bert" and an "mt5xl" part; no CLIP this engine loads has the
        # second, so the check comes before any tokenizing (which may need files the text cannot use anyway).
        parts = sorted(getattr(self.clip, "encoders", {}) or {})
        if "mt5xl" not in parts:
            raise InputError("clip", "needs HunyuanDiT's text encoder (BERT + mT5-XL), which is not supported yet; "
                                     f"this CLIP has {', '.join(parts) or 'other encoders'}")
        tokens = _tokenize(ctx, self.clip, self.bert)
        tokens["mt5xl"] = _tokenize(ctx, self.clip, self.mt5xl)["mt5xl"]
        return (_encode(ctx, self.clip, tokens),)


class HunyuanRefinerLatent(Node):
    display_name = "HunyuanRefinerLatent"
    category = "sd"
    outputs = (Output(CONDITIONING, name="positive"), Output(CONDITIONING, name="negative"),
               Output(LATENT, name="latent"))
    positive: Annotated[Any, Socket(CONDITIONING)]
    negative: Annotated[Any, Socket(CONDITIONING)]
    latent: Annotated[Any, Socket(LATENT)]
    noise_augmentation: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.10

    def run(self, ctx: RunContext):
        samples = self.latent["samples"]
        values = {"concat_latent_image": samples, "noise_augmentation": self.noise_augmentation}
        # ComfyUI's empty refiner latent: 32 channels over the input's last three dimensions.
        empty = torch.zeros(samples.shape[0], 32, *samples.shape[-3:])
        return set_values(self.positive, values), set_values(self.negative, values), {"samples": empty}


# --- model patches ------------------------------------------------------------------------------------------------

class ModelPatchLoader(Node):
    display_name = "ModelPatchLoader"
    category = "advanced/loaders"
    experimental = True
    outputs = (Output(MODEL_PATCH),)
    name: Annotated[str, Combo(model_choices("model_patches"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "model_patches", constants.get("name"), "model_patch")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "name", "model_patches", self.name)
        patch = load_model(ctx, "name", self.name, model_key("model_patch", file_identity(path)),
                           lambda: load_model_patch_file(path))
        return (patch,)


class DiffSynthControlPatch:
    """ComfyUI's DiffSynthCnetPatch: a transformer_options["patches"]["double_block"] hook of Qwen-Image that adds
    the control net's output to the image tokens after every block. The control image is encoded at the sampled
    latent's pixel size (area-resized, centre-cropped when that differs from the image), once per size."""

    def __init__(self, patch: ModelPatch, vae: VAEModel, image: torch.Tensor, strength: float,
                 mask: torch.Tensor | None, manager: Any):
        self.net = patch.net
        self.vae = vae
        self.image = image
        self.strength = strength
        self.mask = mask  # [B, 1, H, W], already inverted (1 = keep)
        self.manager = manager
        self.encoded: dict[tuple[int, int], torch.Tensor] = {}

    def _latent(self, height: int, width: int) -> torch.Tensor:
        image = self.image
        if image.shape[1:3] != (height, width):
            image = common_upscale(image.movedim(-1, 1), width, height, "area", "center").movedim(1, -1)
        latent = self.vae.encode(image, manager=self.manager)
        extra = self.net.additional_in_dim
        if extra > 0:  # the inpainting variant reads a mask channel (all ones without a mask)
            if self.mask is None:
                mask = torch.ones_like(latent)[:, :extra // 4]
            else:
                mask = common_upscale(self.mask.mean(dim=1, keepdim=True).to(latent), latent.shape[-1],
                                      latent.shape[-2], "bilinear")
            latent = torch.cat([latent, mask], dim=1)
        return latent

    def control_tokens(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if (height, width) not in self.encoded:
            self.encoded[(height, width)] = self._latent(height, width)
        return self.net.image_tokens(self.encoded[(height, width)], device, dtype)

    def __call__(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        x, img, index = kwargs["x"], kwargs["img"], kwargs["block_index"]
        ratio = self.vae.downscale_ratio
        control = self.control_tokens(x.shape[-2] * ratio, x.shape[-1] * ratio, img.device, img.dtype)
        count = control.shape[1]
        added = self.net.control(img[:, :count], control, index) * self.strength
        return {**kwargs, "img": torch.cat([img[:, :count] + added, img[:, count:]], dim=1)}


def _network(model: DiffusionModel) -> Any:
    network = getattr(model.unet, "module", model.unet)
    return getattr(network, "_orig_mod", network)


class QwenImageDiffsynthControlnet(Node):
    display_name = "QwenImageDiffsynthControlnet"
    category = "advanced/loaders/qwen"
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    model_patch: Annotated[Any, Socket(MODEL_PATCH)]
    vae: Annotated[Any, Socket(VAE)]
    image: Annotated[Any, Socket(IMAGE)]
    strength: Annotated[float, Float(min=-10.0, max=10.0, step=0.01)] = 1.0
    mask: Annotated[Any, Socket(MASK, optional=True)] = None

    def run(self, ctx: RunContext):
        model: DiffusionModel = self.model
        patch: ModelPatch = self.model_patch
        if model.family != "qwen_image":
            raise InputError("model", f"is a {model.family} model; DiffSynth ControlNets patch Qwen-Image models")
        if not isinstance(patch, ModelPatch) or patch.kind != "diffsynth_controlnet":
            raise InputError("model_patch", "is not a DiffSynth Qwen-Image ControlNet (load one with ModelPatchLoader)")
        blocks = len(_network(model).transformer_blocks)
        width = _network(model).img_in.out_features
        if len(patch.net.controlnet_blocks) < blocks or patch.net.dim != width:
            raise InputError("model_patch", f"has {len(patch.net.controlnet_blocks)} blocks of width "
                                            f"{patch.net.dim}; this model has {blocks} blocks of width {width}")
        if self.vae.latent_channels != 16:
            raise InputError("vae", f"gives {self.vae.latent_channels}-channel latents; the ControlNet reads the "
                                    "16-channel latents of Qwen-Image's VAE")
        mask = self.mask
        if mask is not None:
            mask = mask.reshape(-1, 1, *mask.shape[-2:]) if mask.ndim != 4 else mask
            mask = 1.0 - mask
        hook = DiffSynthControlPatch(patch, self.vae, self.image[..., :3], self.strength, mask, ctx.models)
        options = patch_api.copy_options(model.options)
        patches = options.setdefault(patch_api.TRANSFORMER_OPTIONS, {}).setdefault("patches", {})
        patches["double_block"] = [*patches.get("double_block", []), hook]
        return (model.clone(options=options),)


class USOStyleReference(Node):
    display_name = "USOStyleReference"
    category = "advanced/model_patches/flux"
    experimental = True
    outputs = (Output(MODEL),)
    model: Annotated[Any, Socket(MODEL)]
    model_patch: Annotated[Any, Socket(MODEL_PATCH)]
    clip_vision_output: Annotated[Any, Socket(CLIP_VISION_OUTPUT)]

    def run(self, ctx: RunContext):
        raise InputError("model_patch", "USO style references are not supported yet (they need Flux's post-input "
                                        "patch and SigLIP's per-layer hidden states, which this engine does not "
                                        "build)")


NODES = [
    StableCascade_StageB_Conditioning,
    StableCascade_StageC_VAEEncode,
    StableCascade_SuperResolutionControlnet,
    CLIPTextEncodePixArtAlpha,
    CLIPTextEncodeHunyuanDiT,
    HunyuanRefinerLatent,
    ModelPatchLoader,
    QwenImageDiffsynthControlnet,
    USOStyleReference,
]
