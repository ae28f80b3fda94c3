"""Model loader nodes with ComfyUI's class names, inputs and outputs.

Every load goes through the model memory manager (ctx.models) under an identity key made of the
resolved path, size and modification time (plus options that change what is built), so two loader nodes on the
same file share one set of networks, and a file replaced on disk is loaded afresh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError, MissingInputFile
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, MODEL, VAE, Combo, Output

from .diffusion import checkpoint
from .model_files import (
    file_identity,
    find_model_file,
    folder_identity,
    load_model,
    locate_model,
    model_choices,
    model_fingerprint,
    model_key,
    times_dropped,
)

UNET_WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
# ComfyUI's CLIPLoader / DualCLIPLoader types (kept so workflows validate); the SD, SD3 and Flux ones are supported.
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image"]
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]
SUPPORTED_CLIP_TYPES = {"stable_diffusion", "sdxl", "sd3", "flux", "chroma", "qwen_image", "lumina2", "hidream"}


class CheckpointLoaderSimple(Node):
    display_name = "Load Checkpoint"
    category = "loaders"
    description = "Loads a diffusion model checkpoint; diffusion models are used to denoise latents."
    outputs = (Output(MODEL, tooltip="The model used for denoising latents."),
               Output(CLIP, tooltip="The CLIP model used for encoding text prompts."),
               Output(VAE, tooltip="The VAE model used for encoding and decoding images to and from latent space."))
    ckpt_name: Annotated[str, Combo(model_choices("checkpoints"),
                                    tooltip="The name of the checkpoint (model) to load.")]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "checkpoints", constants.get("ckpt_name"), "checkpoint")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "ckpt_name", "checkpoints", self.ckpt_name)
        manager = ctx.models
        loaded = load_model(ctx, "ckpt_name", self.ckpt_name, model_key("checkpoint", file_identity(path)),
                            lambda: checkpoint.load_checkpoint(path, manager))
        for note in loaded.detected.notes:
            ctx.warn(f"{self.ckpt_name}: {note}")
        if loaded.clip is None:
            ctx.warn(f"{self.ckpt_name} contains no text encoder; its CLIP output is empty")
        if loaded.vae is None:
            ctx.warn(f"{self.ckpt_name} contains no VAE; its VAE output is empty")
        return (loaded.model, loaded.clip, loaded.vae)


def read_ldm_config(path: Path) -> tuple[bool, int | None]:
    """What CheckpointLoader takes from an original LDM .yaml config: whether `model.params.parameterization`
    is "v", and the text encoder's `cond_stage_config.params.layer_idx` (clip skip) if set."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(errors="replace"))
        params = config["model"]["params"]
        layer_idx = ((params.get("cond_stage_config") or {}).get("params") or {}).get("layer_idx")
        return params.get("parameterization") == "v", None if layer_idx is None else int(layer_idx)
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as error:
        raise InputError("config_name", f"{path.name}: not an LDM model config with model.params "
                                        f"({type(error).__name__}: {error})") from None


class CheckpointLoader(Node):
    """Deprecated in ComfyUI: the checkpoint loaded as by CheckpointLoaderSimple, then the config's v
    parameterization and clip layer applied on top."""

    display_name = "Load Checkpoint With Config (DEPRECATED)"
    category = "advanced/loaders"
    deprecated = True
    outputs = (Output(MODEL), Output(CLIP), Output(VAE))
    config_name: Annotated[str, Combo(model_choices("configs"))]
    ckpt_name: Annotated[str, Combo(model_choices("checkpoints"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return [model_fingerprint(env, "configs", constants.get("config_name"), "config"),
                CheckpointLoaderSimple.fingerprint(env, constants)]

    def run(self, ctx: RunContext):
        v_prediction, layer_idx = read_ldm_config(locate_model(ctx, "config_name", "configs", self.config_name))
        model, clip, vae = CheckpointLoaderSimple.model_construct(ckpt_name=self.ckpt_name).run(ctx)
        if v_prediction:
            model = model.with_sampling(dataclasses.replace(model.sampling, prediction="v", schedule="discrete"))
        if layer_idx is not None and clip is not None:
            if layer_idx >= 0:
                raise InputError("config_name", f"{self.config_name}: layer_idx {layer_idx} must be negative "
                                                f"(-1 = last layer)")
            clip = clip.clone_with_layer(layer_idx)
        return (model, clip, vae)


def _vae_family(name: str) -> str:
    """Latents between nodes are unscaled, so a VAE needs no model family to work; its latent format matters
    only for previews. SD1/SD2 and SDXL VAEs have the same shapes, so the file name is the only hint."""
    return "sdxl" if "xl" in Path(name).name.lower() else "sd1"


class VAELoader(Node):
    display_name = "Load VAE"
    category = "loaders"
    outputs = (Output(VAE),)
    vae_name: Annotated[str, Combo(model_choices("vae"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        name = constants.get("vae_name")
        return model_fingerprint(env, "vae", name, "vae", _vae_family(name if isinstance(name, str) else ""))

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "vae_name", "vae", self.vae_name)
        manager = ctx.models
        family = _vae_family(self.vae_name)
        vae = load_model(ctx, "vae_name", self.vae_name, model_key("vae", file_identity(path), family),
                         lambda: checkpoint.load_vae_file(path, manager, family))
        return (vae,)


class UNETLoader(Node):
    display_name = "Load Diffusion Model"
    category = "advanced/loaders"
    outputs = (Output(MODEL),)
    unet_name: Annotated[str, Combo(model_choices("unet"))]
    weight_dtype: Annotated[str, Combo(UNET_WEIGHT_DTYPES)] = "default"

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "unet", constants.get("unet_name"), "unet", constants.get("weight_dtype"))

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "unet_name", "unet", self.unet_name)
        manager = ctx.models
        # fp8_*: the layers' weights are kept in fp8 and cast to the compute dtype per call (weight_storage).
        model = load_model(ctx, "unet_name", self.unet_name, model_key("unet", file_identity(path), self.weight_dtype),
                           lambda: checkpoint.load_unet_file(path, manager, weight_dtype=self.weight_dtype))
        return (model,)


def _clip_type_supported(clip_type: str) -> None:
    if clip_type not in SUPPORTED_CLIP_TYPES:
        raise InputError("type", f"{clip_type!r} text encoders are not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED_CLIP_TYPES))})")


class CLIPLoader(Node):
    display_name = "Load CLIP"
    category = "advanced/loaders"
    description = ("stable_diffusion: a CLIP-L file (SD1.x), a CLIP-H file (SD2.x) or a CLIP-G file "
                   "(SDXL refiner). sd3 / flux: a CLIP-L, CLIP-G (sd3) or T5-XXL file.")
    outputs = (Output(CLIP),)
    clip_name: Annotated[str, Combo(model_choices("clip"))]
    type: Annotated[str, Combo(CLIP_TYPES)] = "stable_diffusion"
    device: Annotated[str, Combo(["default", "cpu"], optional=True, advanced=True)] = "default"

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "clip", constants.get("clip_name"), "clip", constants.get("type"))

    def run(self, ctx: RunContext):
        _clip_type_supported(self.type)
        path = locate_model(ctx, "clip_name", "clip", self.clip_name)
        manager = ctx.models
        clip = load_model(ctx, "clip_name", self.clip_name, model_key("clip", file_identity(path), self.type),
                          lambda: checkpoint.load_clip_files([path], self.type, manager))
        return (clip,)


class DualCLIPLoader(Node):
    display_name = "DualCLIPLoader"
    category = "advanced/loaders"
    description = ("sdxl: a CLIP-L file and a CLIP-G file, in either order. sd3: two of CLIP-L, CLIP-G, T5-XXL; "
                   "flux: CLIP-L and T5-XXL.")
    outputs = (Output(CLIP),)
    clip_name1: Annotated[str, Combo(model_choices("clip"))]
    clip_name2: Annotated[str, Combo(model_choices("clip"))]
    type: Annotated[str, Combo(DUAL_CLIP_TYPES)] = "sdxl"
    device: Annotated[str, Combo(["default", "cpu"], optional=True, advanced=True)] = "default"

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        first = find_model_file(env, "clip", constants.get("clip_name1"))
        second = find_model_file(env, "clip", constants.get("clip_name2"))
        if first is None or second is None:
            return None
        identity = file_identity(first) + file_identity(second)
        return [identity, times_dropped(env, model_key("dual_clip", identity, constants.get("type")))]

    def run(self, ctx: RunContext):
        _clip_type_supported(self.type)
        first = locate_model(ctx, "clip_name1", "clip", self.clip_name1)
        second = locate_model(ctx, "clip_name2", "clip", self.clip_name2)
        manager = ctx.models
        names = f"{self.clip_name1}, {self.clip_name2}"
        key = model_key("dual_clip", file_identity(first) + file_identity(second), self.type)
        clip = load_model(ctx, "clip_name1/clip_name2", names, key,
                          lambda: checkpoint.load_clip_files([first, second], self.type, manager))
        return (clip,)


class TripleCLIPLoader(Node):
    """SD3 / SD3.5: a CLIP-L, a CLIP-G and a T5-XXL file, in any order."""

    display_name = "TripleCLIPLoader"
    category = "advanced/loaders"
    description = "sd3: a CLIP-L, a CLIP-G and a T5-XXL file, in any order."
    outputs = (Output(CLIP),)
    clip_name1: Annotated[str, Combo(model_choices("clip"))]
    clip_name2: Annotated[str, Combo(model_choices("clip"))]
    clip_name3: Annotated[str, Combo(model_choices("clip"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        found = [find_model_file(env, "clip", constants.get(f"clip_name{n}")) for n in (1, 2, 3)]
        if any(path is None for path in found):
            return None
        identity = tuple(part for path in found if path is not None for part in file_identity(path))
        return [identity, times_dropped(env, model_key("triple_clip", identity))]

    def run(self, ctx: RunContext):
        names = (self.clip_name1, self.clip_name2, self.clip_name3)
        paths = [locate_model(ctx, f"clip_name{n}", "clip", name) for n, name in zip((1, 2, 3), names, strict=True)]
        manager = ctx.models
        key = model_key("triple_clip", tuple(part for path in paths for part in file_identity(path)))
        clip = load_model(ctx, "clip_name1/clip_name2/clip_name3", ", ".join(names), key,
                          lambda: checkpoint.load_clip_files(list(paths), "sd3", manager))
        return (clip,)


class DiffusersLoader(Node):
    display_name = "DiffusersLoader"
    category = "advanced/loaders/deprecated"
    outputs = (Output(MODEL), Output(CLIP), Output(VAE))
    model_path: Annotated[str, Combo(model_choices("diffusers"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "diffusers", constants.get("model_path"), "diffusers")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "model_path", "diffusers", self.model_path)
        manager = ctx.models
        index = path / "model_index.json"
        if not index.is_file():
            raise MissingInputFile("model_path", f"{self.model_path}: no model_index.json in {path}")
        key = model_key("diffusers", folder_identity(path, index))
        loaded = load_model(ctx, "model_path", self.model_path, key,
                            lambda: checkpoint.load_diffusers_folder(path, manager))
        return (loaded.model, loaded.clip, loaded.vae)


NODES = [CheckpointLoaderSimple, CheckpointLoader, VAELoader, UNETLoader, CLIPLoader, DualCLIPLoader, TripleCLIPLoader,
         DiffusersLoader]
