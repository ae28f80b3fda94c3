"""Image prompting nodes with ComfyUI's class names, inputs and outputs: CLIP vision (models/clip_vision), unCLIP /
SDXL Revision conditioning and style models (models/style_models).

unCLIPConditioning adds an `unclip_conditioning` entry to the conditioning options; the sampler
(nodes/diffusion/sampling_conds.py) turns it into the pooled vector of SDXL models (Revision:
clip_vision.revision_pooled) and into the class-embedding input of SD2.1-unCLIP models (clip_vision.
unclip_class_labels), as ComfyUI's SDXL and SD21UNCLIP models do. SD1/SD2 models ignore it, as ComfyUI's do.
PhotoMaker (nodes/diffusion/photomaker.py) fuses a face image into one token of an SDXL prompt.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, IMAGE, MODEL, VAE, Combo, Float, Output, Socket, String

from .diffusion import checkpoint
from .diffusion.clip import ClipModel
from .diffusion.clip_vision import (
    ClipVisionOutput,
    checkpoint_vision_prefix,
    load_checkpoint_clip_vision,
    load_clip_vision_file,
)
from .diffusion.embeddings import EmbeddingLibrary
from .diffusion.photomaker import PhotoMakerModel, load_photomaker_file, tokens_without_group, trigger_word_number
from .diffusion.style_model import StyleModel, load_style_model_file
from .diffusion.tokenizer import CHUNK_LENGTH
from .model_files import file_identity, load_model, locate_model, model_choices, model_fingerprint, model_key

CLIP_VISION = "CLIP_VISION"
CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
STYLE_MODEL = "STYLE_MODEL"
PHOTOMAKER = "PHOTOMAKER"


class CLIPVisionLoader(Node):
    display_name = "Load CLIP Vision"
    category = "loaders"
    outputs = (Output(CLIP_VISION),)
    clip_name: Annotated[str, Combo(model_choices("clip_vision"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "clip_vision", constants.get("clip_name"), "clip_vision")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "clip_name", "clip_vision", self.clip_name)
        manager = ctx.models
        vision = load_model(ctx, "clip_name", self.clip_name, model_key("clip_vision", file_identity(path)),
                            lambda: load_clip_vision_file(path, manager))
        return (vision,)


class CLIPVisionEncode(Node):
    display_name = "CLIP Vision Encode"
    category = "conditioning"
    outputs = (Output(CLIP_VISION_OUTPUT),)
    clip_vision: Annotated[Any, Socket(CLIP_VISION)]
    image: Annotated[Any, Socket(IMAGE)]
    crop: Annotated[str, Combo(["center", "none"])]

    def run(self, ctx: RunContext):
        if not hasattr(self.clip_vision, "encode_image"):
            raise InputError("clip_vision", f"expected a CLIP vision model, got {type(self.clip_vision).__name__}")
        return (self.clip_vision.encode_image(self.image, crop=self.crop == "center", manager=ctx.models),)


class unCLIPCheckpointLoader(Node):  # noqa: N801  (ComfyUI's class name)
    display_name = "unCLIPCheckpointLoader"
    category = "loaders"
    outputs = (Output(MODEL), Output(CLIP), Output(VAE), Output(CLIP_VISION))
    ckpt_name: Annotated[str, Combo(model_choices("checkpoints"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        name = constants.get("ckpt_name")
        return [model_fingerprint(env, "checkpoints", name, kind) for kind in ("checkpoint", "checkpoint_clip_vision")]

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "ckpt_name", "checkpoints", self.ckpt_name)
        manager = ctx.models
        identity = file_identity(path)
        # The same key as CheckpointLoaderSimple's: both loaders share one set of networks.
        loaded = load_model(ctx, "ckpt_name", self.ckpt_name, model_key("checkpoint", identity),
                            lambda: checkpoint.load_checkpoint(path, manager))
        for note in loaded.detected.notes:
            ctx.warn(f"{self.ckpt_name}: {note}")
        prefix = checkpoint_vision_prefix(path)
        vision = None
        if prefix is None:
            ctx.warn(f"{self.ckpt_name} contains no CLIP vision model; its CLIP_VISION output is empty")
        else:
            vision = load_model(ctx, "ckpt_name", self.ckpt_name, model_key("checkpoint_clip_vision", identity),
                                lambda: load_checkpoint_clip_vision(path, prefix, manager))
        return (loaded.model, loaded.clip, loaded.vae, vision)


def _image_embeds(output: Any, input_name: str) -> torch.Tensor:
    embeds = output["image_embeds"] if isinstance(output, (dict, ClipVisionOutput)) else \
        getattr(output, "image_embeds", None)
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2:
        raise InputError(input_name, "expected a CLIP vision output with image_embeds [batch, width]")
    return embeds


class unCLIPConditioning(Node):  # noqa: N801  (ComfyUI's class name)
    display_name = "unCLIPConditioning"
    category = "conditioning"
    outputs = (Output(CONDITIONING),)
    conditioning: Annotated[Any, Socket(CONDITIONING)]
    clip_vision_output: Annotated[Any, Socket(CLIP_VISION_OUTPUT)]
    strength: Annotated[float, Float(min=-10.0, max=10.0, step=0.01)] = 1.0
    noise_augmentation: Annotated[float, Float(min=0.0, max=1.0, step=0.01)] = 0.0

    def run(self, ctx: RunContext):
        if self.strength == 0:
            return (self.conditioning,)
        _image_embeds(self.clip_vision_output, "clip_vision_output")
        added = {"clip_vision_output": self.clip_vision_output, "strength": self.strength,
                 "noise_augmentation": self.noise_augmentation}
        # Appended to the entry's existing list (a copy): several images add up.
        return ([[cond, {**options, "unclip_conditioning": [*options.get("unclip_conditioning", []), added]}]
                 for cond, options in self.conditioning],)


class StyleModelLoader(Node):
    display_name = "Load Style Model"
    category = "loaders"
    outputs = (Output(STYLE_MODEL),)
    style_model_name: Annotated[str, Combo(model_choices("style_models"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "style_models", constants.get("style_model_name"), "style_model")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "style_model_name", "style_models", self.style_model_name)
        manager = ctx.models
        style = load_model(ctx, "style_model_name", self.style_model_name,
                           model_key("style_model", file_identity(path)), lambda: load_style_model_file(path, manager))
        return (style,)


def extend_attention_mask(options: dict, text_tokens: int, batch: int, added: int, bias: float) -> torch.Tensor:
    """ComfyUI's attention bias for `added` tokens inserted after the text tokens: the old mask (text, then
    reference-image tokens) is kept in its four quadrants, the new tokens get log(bias) from every query row."""
    reference = options.get("attention_mask_img_shape", (1, 1))
    n_ref = reference[0] * reference[1]
    mask = options.get("attention_mask")
    if mask is None:
        mask = torch.zeros((batch, text_tokens + n_ref, text_tokens + n_ref), dtype=torch.float16)
    if mask.dtype == torch.bool:
        mask = torch.log(mask.to(dtype=torch.float16))
    total = text_tokens + added + n_ref
    new_mask = torch.zeros((batch, total, total), dtype=torch.float16)
    t, a = text_tokens, text_tokens + added
    new_mask[:, :t, :t] = mask[:, :t, :t]
    new_mask[:, :t, a:] = mask[:, :t, t:]
    new_mask[:, a:, :t] = mask[:, t:, :t]
    new_mask[:, a:, a:] = mask[:, t:, t:]
    log_bias = torch.log(torch.tensor([bias]))
    new_mask[:, :t, t:a] = log_bias
    new_mask[:, a:, t:a] = log_bias
    return new_mask


class StyleModelApply(Node):
    display_name = "Apply Style Model"
    category = "conditioning/style_model"
    outputs = (Output(CONDITIONING),)
    conditioning: Annotated[Any, Socket(CONDITIONING)]
    style_model: Annotated[Any, Socket(STYLE_MODEL)]
    clip_vision_output: Annotated[Any, Socket(CLIP_VISION_OUTPUT)]
    strength: Annotated[float, Float(min=0.0, max=10.0, step=0.001)] = 1.0
    strength_type: Annotated[str, Combo(["multiply", "attn_bias"])]

    def run(self, ctx: RunContext):
        style = self.style_model
        if not isinstance(style, StyleModel):
            raise InputError("style_model", f"expected a style model, got {type(style).__name__}")
        hidden = self.clip_vision_output["last_hidden_state"]
        if hidden.shape[-1] != style.input_width:
            raise InputError("clip_vision_output", f"has hidden width {hidden.shape[-1]}; this style model reads "
                                                   f"vision tokens of width {style.input_width}")
        # Every image's tokens in one sequence, as ComfyUI flattens them.
        tokens = style.get_cond(self.clip_vision_output, manager=ctx.models).flatten(0, 1).unsqueeze(0)
        if self.strength_type == "multiply":
            tokens = tokens * self.strength
        out = []
        for cond, options in self.conditioning:
            if cond.shape[-1] != tokens.shape[-1]:
                raise InputError("style_model", f"gives tokens of width {tokens.shape[-1]}; the conditioning has "
                                                f"width {cond.shape[-1]}")
            new_options = dict(options)
            if "attention_mask" in options or (self.strength_type == "attn_bias" and self.strength != 1.0):
                bias = self.strength if self.strength_type == "attn_bias" else 1.0
                new_options["attention_mask"] = extend_attention_mask(options, cond.shape[1], cond.shape[0],
                                                                      tokens.shape[1], bias).to(cond.device)
                new_options["attention_mask_img_shape"] = options.get("attention_mask_img_shape", (1, 1))
            batch_tokens = tokens.to(cond.device, cond.dtype).expand(cond.shape[0], -1, -1)
            out.append([torch.cat((cond, batch_tokens), dim=1), new_options])
        return (out,)


class PhotoMakerLoader(Node):
    category = "_for_testing/photomaker"
    experimental = True
    outputs = (Output(PHOTOMAKER),)
    photomaker_model_name: Annotated[str, Combo(model_choices("photomaker"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "photomaker", constants.get("photomaker_model_name"), "photomaker")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "photomaker_model_name", "photomaker", self.photomaker_model_name)
        manager = ctx.models
        model = load_model(ctx, "photomaker_model_name", self.photomaker_model_name,
                           model_key("photomaker", file_identity(path)), lambda: load_photomaker_file(path, manager))
        return (model,)


class PhotoMakerEncode(Node):
    category = "_for_testing/photomaker"
    experimental = True
    outputs = (Output(CONDITIONING),)
    photomaker: Annotated[Any, Socket(PHOTOMAKER)]
    image: Annotated[Any, Socket(IMAGE)]
    clip: Annotated[Any, Socket(CLIP)]
    text: Annotated[str, String(multiline=True, dynamicPrompts=True)] = "photograph of photomaker"

    def run(self, ctx: RunContext):
        photomaker, clip = self.photomaker, self.clip
        if not isinstance(photomaker, PhotoMakerModel):
            raise InputError("photomaker", f"expected a PhotoMaker model, got {type(photomaker).__name__}")
        if not isinstance(clip, ClipModel):
            raise InputError("clip", f"expected a CLIP model, got {type(clip).__name__}")
        number = trigger_word_number(self.text)
        tokens = tokens_without_group(clip, self.text, number, ctx.find_service(EmbeddingLibrary), ctx.warn)
        cond, pooled = clip.encode_tokens(tokens, manager=ctx.models)
        if number > 0:
            if cond.shape[-1] != photomaker.fuse_width:
                raise InputError("clip", f"gives conditioning of width {cond.shape[-1]}; this PhotoMaker model "
                                         f"fuses width {photomaker.fuse_width} (an SDXL CLIP)")
            position = number - 1
            positions = [position] if position < CHUNK_LENGTH else []
            cond = photomaker.fuse(self.image, cond, positions, manager=ctx.models)
        return ([[cond, {"pooled_output": pooled}]],)


NODES = [CLIPVisionLoader, CLIPVisionEncode, unCLIPCheckpointLoader, unCLIPConditioning, StyleModelLoader,
         StyleModelApply, PhotoMakerLoader, PhotoMakerEncode]
