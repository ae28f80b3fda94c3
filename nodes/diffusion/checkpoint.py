"""Loading model files into the objects that flow through MODEL / CLIP / VAE links.

Files: single-file `.safetensors`, and `.ckpt/.pt/.pth/.bin` only through `torch.load(weights_only=True)` (a
pickle that needs more than tensors is refused, never executed); diffusers-format folders (model_index.json).
Architectures are detected from tensor shapes (nodes.diffusion.detect); weights are converted with diffusers'
own LDM converters (nodes.diffusion.convert). Networks are built on the meta device and receive the file's
tensors directly, so no time is spent on random initialisation. Nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from . import convert, detect, families, family_clip, model_code, wan_vae, weight_storage
from .clip import ClipModel
from .family_clip import FamilyClip
from .latent_formats import (
    FAMILY_LATENT_FORMATS,
    WAN21_LATENT,
    latent_format_for_family,
    sixteen_channel_format,
)
from .models import SD15_LATENT, SDXL_LATENT, DiffusionModel, LatentFormat, SamplingConfig
from .offline import ensure_offline
from .vae import VAEModel

if TYPE_CHECKING:
    from .gemma_text import Lumina2Clip
    from .hidream_text import HiDreamClip
    from .qwen_text import QwenImageClip

StateDict = dict[str, torch.Tensor]
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Classes that PyTorch Lightning pickles next to the weights of many original .ckpt files. They are admitted as
# inert stand-ins (plain objects with no behaviour), so such files load without running any of their code.
LIGHTNING_CLASSES = (("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
                     ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"))


class ModelFileError(ValueError):
    """A model file that cannot be read or is not a supported architecture; the message names the file."""


def latent_format_for(family: str) -> LatentFormat:
    if family in FAMILY_LATENT_FORMATS:
        return FAMILY_LATENT_FORMATS[family]
    return SDXL_LATENT if family.startswith("sdxl") else SD15_LATENT


# Reading files -----------------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> StateDict:
    """All tensors of a weights file on the CPU. Lightning-style {"state_dict": {...}} and one-key wrappers are
    unwrapped. Raises FileNotFoundError or ModelFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals(
                    [type(name, (), {"__module__": module}) for module, name in LIGHTNING_CLASSES]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelFileError(
            f"{path.name}: refused to load: the pickle needs more than tensors (arbitrary code is never run "
            f"from model files; convert it to .safetensors). Detail: {str(error).splitlines()[0]}") from error
    except Exception as error:  # safetensors / zip / truncated-file errors come in many types
        raise ModelFileError(f"{path.name}: not a readable weights file ({type(error).__name__}: {error})") \
            from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    elif isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise ModelFileError(f"{path.name}: holds a {type(state).__name__}, not a dictionary of tensors")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{path.name}: contains no tensors")
    return tensors


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write tensors as .safetensors (contiguous copies, so views and shared storage are fine), or for
    .ckpt/.pt/.pth as a weights-only pickle {"state_dict": ...} that read_state_dict accepts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors}, path)
    return path


def sidecar_yaml(path: str | os.PathLike) -> str | None:
    """The text of `<name>.yaml` beside a checkpoint (ComfyUI honours its `parameterization`), if present."""
    candidate = Path(path).with_suffix(".yaml")
    return candidate.read_text(errors="replace") if candidate.is_file() else None


# Building networks -------------------------------------------------------------------------------------------

def _materialize(model: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str,
                 storage: torch.dtype | None = None) -> torch.nn.Module:
    """Give a meta-device network the tensors of `state` (strict) in `dtype` (floating tensors only), then rebuild
    non-persistent index buffers. With a `storage` dtype the Linear / Conv weights are kept in it and cast to the
    compute dtype per call (nodes.diffusion.weight_storage)."""
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ModelFileError(f"{what}: weights do not fit the detected architecture "
                             f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                             f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})")
    # Copies, not views into the file's buffer: safetensors packs tensors at 8-byte offsets, and CPU kernels
    # take different (last-bit different) paths on such unaligned weights than on the freshly allocated ones
    # a diffusers model has; own allocations keep results bit-identical to the original modules.
    stored = weight_storage.stored_weight_names(model) if storage is not None else set()
    state = weight_storage.cast_state(state, stored, storage, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if storage is not None:
        weight_storage.enable_per_call_cast(model, dtype)
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                if name != "position_ids":
                    raise ModelFileError(f"{what}: buffer {name} has no value in the file")
                module._buffers[name] = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
    return model.eval().requires_grad_(False)


def build_unet(ldm_unet: Mapping[str, torch.Tensor], shape: detect.UNetShape, family: str, dtype: torch.dtype,
               prefix: str = convert.UNET_PREFIX, what: str = "UNet", storage: torch.dtype | None = None) \
        -> torch.nn.Module:
    unet_class = model_code.unet_class()  # before convert's diffusers import, so unused families stay unloaded
    config = detect.unet_config(shape, family)
    weights = convert.unet_from_ldm(ldm_unet, config, prefix=prefix)
    with torch.device("meta"):
        unet = unet_class(**config)
    return _materialize(unet, weights, dtype, what, storage)


def build_vae(state: Mapping[str, torch.Tensor], family: str, dtype: torch.dtype, what: str = "VAE") \
        -> torch.nn.Module:
    autoencoder_class = model_code.autoencoder_class()
    ldm = detect.vae_ldm_weights(state)
    config = detect.vae_config(ldm, latent_format_for(family).scale_factor)
    weights = convert.vae_from_ldm(ldm, config)
    with torch.device("meta"):
        vae = autoencoder_class(**config)
    return _materialize(vae, weights, dtype, what)


def build_transformer(state: Mapping[str, torch.Tensor], found: families.DetectedTransformer, dtype: torch.dtype,
                      what: str = "diffusion transformer", storage: torch.dtype | None = None) -> torch.nn.Module:
    """SD3Transformer2DModel / FluxTransformer2DModel from the original single-file names."""
    transformer_class = families.transformer_class(found.family)
    weights = families.diffusers_weights(state, found)
    with torch.device("meta"):
        transformer = transformer_class(**found.config)
    families.rebuild_rotary_tables(transformer, found)
    return _materialize(transformer, weights, dtype, what, storage)


def transformer_model(state: Mapping[str, torch.Tensor], found: families.DetectedTransformer, dtype: torch.dtype,
                      path: Path, storage: torch.dtype | None = None) -> DiffusionModel:
    """The MODEL of a diffusion-transformer family: the diffusers transformer in `unet`, the family's latent
    format and ComfyUI's default flow sampling; options["variant"] names the variant (sd3.5, flux_dev, ...)."""
    transformer = build_transformer(state, found, dtype, what=f"{path.name} ({found.family} transformer)",
                                    storage=storage)
    return DiffusionModel(unet=transformer, family=found.family,
                          sampling=SamplingConfig(**families.default_sampling(found)),
                          latent_format=latent_format_for_family(found.family), source=str(path),
                          options={"variant": found.variant})


def build_text_encoder(state: Mapping[str, torch.Tensor], shape: detect.TextEncoderShape, slot: str,
                       dtype: torch.dtype, what: str = "text encoder") -> torch.nn.Module:
    """A transformers CLIP text model for a CLIP slot: "l" plain, "h"/"g" with their text projection."""
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection = model_code.clip_text_classes()  # noqa: N806
    with_projection = slot in ("h", "g")
    config = CLIPTextConfig(**detect.text_encoder_config(shape, slot))
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    if shape.layout == "open_clip":
        weights = convert.clip_from_open_clip(state, shape.prefix, model)
    else:
        weights = convert.clip_from_hf_layout(state, shape.prefix)
    if with_projection and "text_projection.weight" not in weights:
        raise ModelFileError(f"{what}: a CLIP-{slot.upper()} encoder needs its text_projection, which is missing")
    own_flat = not any(key.startswith("text_model.") for key in model.state_dict())
    weights = {(key[len("text_model."):] if own_flat and key.startswith("text_model.") else key): value
               for key, value in weights.items() if with_projection or key != "text_projection.weight"}
    return _materialize(model, weights, dtype, what)


# Whole checkpoints -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedCheckpoint:
    model: DiffusionModel
    clip: ClipModel | FamilyClip | Lumina2Clip | QwenImageClip | None
    vae: VAEModel | None
    detected: detect.Detected | families.DetectedTransformer


def _release(state: StateDict, prefix: str) -> None:
    """Forget the file's tensors under `prefix` once their component is built (keeps peak memory near one copy)."""
    if not prefix:
        return  # a bare UNet: its keys have no prefix of their own
    for key in [key for key in state if key.startswith(prefix)]:
        del state[key]


def _fp8_storage(state: StateDict) -> torch.dtype | None:
    """An all-in-one file stored in fp8 keeps its diffusion weights in fp8 (never upcast at load)."""
    found = weight_storage.file_weight_dtype(state)
    return found if found in weight_storage.FP8_DTYPES else None


def _dtypes(manager: Any) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    if manager is None:
        return torch.float32, torch.float32, torch.float32
    return manager.dtype_for("diffusion"), manager.dtype_for("text_encoder"), manager.dtype_for("vae")


def load_checkpoint(path: str | os.PathLike, manager: Any = None, unet_dtype: torch.dtype | None = None) \
        -> LoadedCheckpoint:
    """A single-file SD1/SD2/SDXL checkpoint as (DiffusionModel, ClipModel, VAEModel). CLIP / VAE are None
    when the file does not carry them."""
    path = Path(path)
    state = read_state_dict(path)
    if families.find_transformer_prefix(state) is not None:
        return load_transformer_checkpoint(state, path, manager, unet_dtype)
    try:
        found = detect.detect_checkpoint(state, sidecar_yaml(path))
    except detect.UnknownArchitecture as error:
        raise ModelFileError(f"{path.name}: unknown or unsupported model architecture: {error}; "
                             f"found {families.describe_keys(state)}") from error
    diffusion_dtype, text_dtype, vae_dtype = _dtypes(manager)
    family = found.family
    unet = build_unet(state, found.unet, family, unet_dtype or diffusion_dtype, prefix=found.unet_prefix,
                      what=f"{path.name} (UNet)", storage=_fp8_storage(state))
    _release(state, found.unet_prefix)
    model = DiffusionModel(unet=unet, family=family, sampling=SamplingConfig(prediction=found.prediction),
                           latent_format=latent_format_for(family), source=str(path),
                           options={"variant": found.variant} if found.variant else {})
    clip = None
    if found.text_encoders:
        expected = {"sd1": {"l"}, "sd2": {"h"}, "sdxl": {"l", "g"}, "sdxl_refiner": {"g"}}[family]
        if set(found.text_encoders) == expected:
            encoders = torch.nn.ModuleDict()
            for slot, shape in found.text_encoders.items():
                encoders[slot] = build_text_encoder(state, shape, slot, text_dtype, what=f"{path.name} (CLIP-{slot})")
                _release(state, shape.prefix)
            clip = ClipModel(encoders=encoders, family=family, source=str(path))
    vae = None
    if found.has_vae:
        vae = VAEModel(autoencoder=build_vae(state, family, vae_dtype, what=f"{path.name} (VAE)"),
                       latent_format=latent_format_for(family), source=str(path))
    return LoadedCheckpoint(model, clip, vae, found)


def load_transformer_checkpoint(state: StateDict, path: Path, manager: Any = None,
                                unet_dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """An all-in-one SD3 / SD3.5 / Flux file: the transformer under model.diffusion_model., its VAE under
    first_stage_model. (or vae.), its text encoders under text_encoders.* when present."""
    try:
        found = families.detect_transformer(state)
    except families.UnknownTransformer as error:
        raise ModelFileError(f"{path.name}: unsupported diffusion transformer: {error}") from error
    diffusion_dtype, text_dtype, vae_dtype = _dtypes(manager)
    model = transformer_model(state, found, unet_dtype or diffusion_dtype, path, _fp8_storage(state))
    _release(state, found.prefix)
    clip: FamilyClip | Lumina2Clip | QwenImageClip | None = family_clip.checkpoint_family_clip(
        state, found.family, text_dtype, path)
    if clip is None and found.family == "qwen_image":
        from .qwen_text import checkpoint_qwen_clip

        clip = checkpoint_qwen_clip(state, text_dtype, path)
    vae = None
    vae_prefix = next((p for p in (convert.VAE_PREFIX, "vae.") if has_vae_under(state, p)), None)
    if wan_vae.find_wan_vae_prefix(state) is not None:  # Qwen-Image's Wan 2.1 VAE under vae.
        vae = VAEModel(autoencoder=wan_vae.build_wan21_vae(state, vae_dtype, f"{path.name} (VAE)"),
                       latent_format=WAN21_LATENT, source=str(path))
    elif vae_prefix is not None and found.family == "qwen_image":
        found = dataclasses.replace(found, notes=found.notes + (
            "its Wan 2.1 VAE (a video autoencoder) is not supported yet; the VAE output is empty",))
    elif vae_prefix is not None:
        vae_state = convert.strip_prefix(state, vae_prefix)
        vae = VAEModel(autoencoder=build_vae(vae_state, found.family, vae_dtype, what=f"{path.name} (VAE)"),
                       latent_format=latent_format_for_family(found.family), source=str(path))
    return LoadedCheckpoint(model, clip, vae, found)


def has_vae_under(state: Mapping[str, Any], prefix: str) -> bool:
    return f"{prefix}decoder.conv_in.weight" in state


# Stand-alone component files ---------------------------------------------------------------------------------

def _diffusers_unet_to_ldm(state: StateDict) -> StateDict:
    layers = len({key.split(".")[3] for key in state if key.startswith("down_blocks.0.resnets.")})
    return convert.unet_to_ldm(state, layers)


def load_unet_file(path: str | os.PathLike, manager: Any = None, dtype: torch.dtype | None = None,
                   weight_dtype: str = "default") -> DiffusionModel:
    """A UNet-only file (models/unet, models/diffusion_models): LDM names with or without the
    model.diffusion_model. prefix, or diffusers names; a .gguf file through nodes.diffusion.gguf_files.
    weight_dtype (UNETLoader's) picks the storage dtype of the layers' weights (weight_storage.storage_dtype)."""
    path = Path(path)
    compute = dtype or _dtypes(manager)[0]
    if path.suffix.lower() == ".gguf":
        from .gguf_files import load_gguf_unet

        return load_gguf_unet(path, compute)
    state = read_state_dict(path)
    storage = weight_storage.storage_dtype(weight_dtype, weight_storage.file_weight_dtype(state), compute)
    if families.find_transformer_prefix(state) is not None:
        try:
            found = families.detect_transformer(state)
        except families.UnknownTransformer as error:
            raise ModelFileError(f"{path.name}: unsupported diffusion transformer: {error}") from error
        return transformer_model(state, found, compute, path, storage)
    if "conv_in.weight" in state and any(key.startswith("down_blocks.") for key in state):
        state = _diffusers_unet_to_ldm(state)
    prefix = detect.find_unet_prefix(state)
    try:
        if prefix is None:
            raise detect.UnknownArchitecture(
                f"neither an SD-style UNet (input_blocks.*) nor an SD3 (joint_blocks.*) or Flux (double_blocks.*) "
                f"transformer; found {families.describe_keys(state)}")
        shape = detect.read_unet_shape(state, prefix)
        family = detect.unet_family(shape)
        prediction, _ = detect.prediction_type(family, shape, convert.strip_prefix(state, prefix), state,
                                               sidecar_yaml(path))
    except detect.UnknownArchitecture as error:
        raise ModelFileError(f"{path.name}: unknown or unsupported UNet architecture: {error}") from error
    ldm = convert.with_prefix(convert.strip_prefix(state, prefix), convert.UNET_PREFIX)
    unet = build_unet(ldm, shape, family, compute, what=f"{path.name} (UNet)", storage=storage)
    variant = {9: "inpaint", 8: "instruct_pix2pix"}.get(shape.in_channels, "")
    return DiffusionModel(unet=unet, family=family, sampling=SamplingConfig(prediction=prediction),
                          latent_format=latent_format_for(family), source=str(path),
                          options={"variant": variant} if variant else {})


def load_vae_file(path: str | os.PathLike, manager: Any = None, family: str = "sd1") -> VAEModel:
    """A stand-alone VAE (LDM names, with or without first_stage_model., or diffusers names)."""
    path = Path(path)
    state = read_state_dict(path)
    if wan_vae.find_wan_vae_prefix(state) is not None:  # Qwen-Image's Wan 2.1 VAE (ComfyUI's Wan names)
        try:
            return VAEModel(autoencoder=wan_vae.build_wan21_vae(state, _dtypes(manager)[2], path.name),
                            latent_format=WAN21_LATENT, source=str(path))
        except wan_vae.NotAWanVAE as error:
            raise ModelFileError(f"{path.name}: not a VAE this engine can load: {error}") from error
    try:
        autoencoder = build_vae(state, family, _dtypes(manager)[2], what=path.name)
    except detect.UnknownArchitecture as error:
        raise ModelFileError(f"{path.name}: not a VAE this engine can load: {error}") from error
    latent_format = latent_format_for(family)
    channels = int(cast(Any, autoencoder).config.latent_channels)
    if channels == 16:  # SD3 / Flux
        latent_format = sixteen_channel_format(path.name)
    elif channels != latent_format.channels:
        raise ModelFileError(f"{path.name}: a VAE with {channels} latent channels is not supported "
                             f"(4: SD1/SD2/SDXL, 16: SD3/Flux)")
    return VAEModel(autoencoder=autoencoder, latent_format=latent_format, source=str(path))


def _text_encoder_in_file(state: StateDict, name: str) -> detect.TextEncoderShape:
    """The one text encoder a clip file holds, wherever it sits (bare, or under a known checkpoint prefix)."""
    for prefix in ("", convert.SD1_CLIP_PREFIX, convert.SDXL_CLIP_L_PREFIX, convert.SD2_CLIP_PREFIX,
                   convert.SDXL_CLIP_G_PREFIX, convert.REFINER_CLIP_G_PREFIX):
        try:
            return detect.read_text_encoder_shape(state, prefix)
        except (detect.UnknownArchitecture, KeyError):
            continue
    raise ModelFileError(f"{name}: no CLIP text encoder found in the file")


def text_encoder_slot(shape: detect.TextEncoderShape) -> str:
    """Which CLIP a stand-alone encoder is: G (1280 wide), H (1024 wide or any OpenCLIP-layout file), else L.
    Tiny test encoders are told apart by their projection: only H and G carry one."""
    if shape.hidden_size == 1280:
        return "g"
    if shape.hidden_size == 1024 or shape.layout == "open_clip":
        return "h"
    if shape.hidden_size == 768:
        return "l"
    return "g" if shape.projection_dim is not None else "l"


def load_clip_files(paths: list[str | os.PathLike], clip_type: str, manager: Any = None) \
        -> ClipModel | FamilyClip | Lumina2Clip | HiDreamClip | QwenImageClip:
    """CLIPLoader / DualCLIPLoader / TripleCLIPLoader: text encoders from their own files. clip_type
    "stable_diffusion" takes one file (CLIP-L → SD1, CLIP-H → SD2, CLIP-G → SDXL refiner); "sdxl" takes CLIP-L and
    CLIP-G in any order; "sd3" / "flux" take CLIP-L, CLIP-G (sd3) and T5-XXL files (nodes.diffusion.family_clip)."""
    text_dtype = _dtypes(manager)[1]
    if clip_type == "lumina2":
        from .gemma_text import load_lumina2_clip

        return load_lumina2_clip([Path(p) for p in paths], text_dtype)
    if clip_type == "hidream":
        from .hidream_text import load_hidream_clip

        return load_hidream_clip([Path(p) for p in paths], text_dtype)
    if clip_type == "qwen_image":
        from .qwen_text import load_qwen_clip

        return load_qwen_clip([Path(p) for p in paths], text_dtype)
    from . import t5_families

    if clip_type == "chroma" or (len(paths) == 1 and t5_families.file_holds_pile_t5(Path(paths[0]))):
        return t5_families.load_t5_family_clip([Path(p) for p in paths], clip_type, text_dtype)
    if clip_type in family_clip.ALLOWED:
        return family_clip.load_family_clip([Path(p) for p in paths], clip_type, text_dtype)
    encoders: dict[str, torch.nn.Module] = {}
    for raw in paths:
        path = Path(raw)
        state = read_state_dict(path)
        shape = _text_encoder_in_file(state, path.name)
        slot = text_encoder_slot(shape)
        if clip_type == "sdxl" and slot == "h":
            slot = "g"  # an OpenCLIP encoder next to CLIP-L in an SDXL pair is G whatever its width
        if slot in encoders:
            raise ModelFileError(f"{path.name}: a second CLIP-{slot.upper()} encoder; {clip_type} needs different ones")
        encoders[slot] = build_text_encoder(state, shape, slot, text_dtype, what=path.name)
    family = {("stable_diffusion", ("l",)): "sd1", ("stable_diffusion", ("h",)): "sd2",
              ("stable_diffusion", ("g",)): "sdxl_refiner", ("sdxl", ("g", "l")): "sdxl"}.get(
        (clip_type, tuple(sorted(encoders))))
    if family is None:
        names = ", ".join(Path(p).name for p in paths)
        raise ModelFileError(f"{names}: CLIP type {clip_type!r} with encoders {sorted(encoders)} is not supported "
                             f"(stable_diffusion: one CLIP-L, -H or -G file; sdxl: a CLIP-L and a CLIP-G file)")
    return ClipModel(encoders=torch.nn.ModuleDict(encoders), family=family,
                     source=";".join(str(p) for p in paths))


# diffusers folders -------------------------------------------------------------------------------------------

def _identity_layer_like(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of a CLIP encoder layer that passes its input through unchanged (zero output projections: both
    residual branches add 0)."""
    import copy

    clone = copy.deepcopy(layer)
    with torch.no_grad():
        for linear in ("self_attn.out_proj", "mlp.fc2"):
            clone.get_parameter(f"{linear}.weight").zero_()
            clone.get_parameter(f"{linear}.bias").zero_()
    return clone


def load_diffusers_folder(directory: str | os.PathLike, manager: Any = None) -> LoadedCheckpoint:
    """A diffusers-format pipeline folder (model_index.json, unet/, vae/, text_encoder[_2]/)."""
    ensure_offline()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(f"{directory}: not a diffusers folder (no model_index.json)")
    diffusion_dtype, text_dtype, vae_dtype = _dtypes(manager)
    try:
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", local_files_only=True,
                                                    torch_dtype=diffusion_dtype)
        shape = detect.read_unet_shape(_diffusers_unet_to_ldm(unet.state_dict()), "")
        has_l = (directory / "text_encoder").is_dir()
        family = detect.unet_family(shape)
        if family.startswith("sdxl"):
            family = "sdxl" if has_l else "sdxl_refiner"
        scheduler_file = directory / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
        prediction = "v" if scheduler.get("prediction_type") == "v_prediction" else "eps"
        vae = AutoencoderKL.from_pretrained(directory / "vae", local_files_only=True, torch_dtype=vae_dtype)
        folders = {"sd1": {"l": "text_encoder"}, "sd2": {"h": "text_encoder"},
                   "sdxl": {"l": "text_encoder", "g": "text_encoder_2"},
                   "sdxl_refiner": {"g": "text_encoder_2"}}[family]
        encoders = {}
        for slot, folder in folders.items():
            cls = CLIPTextModel if slot == "l" else CLIPTextModelWithProjection
            encoders[slot] = cls.from_pretrained(directory / folder, local_files_only=True,
                                                 dtype=text_dtype).eval()
    except (OSError, ValueError, KeyError, detect.UnknownArchitecture) as error:
        raise ModelFileError(f"{directory.name}: cannot load the diffusers folder: {error}") from error
    if family == "sd2":
        # diffusers stores SD2's text encoder without its last layer (its pipeline reads the last remaining one);
        # ComfyUI's SD2 CLIP reads the penultimate of the full stack. An identity layer on top makes them agree.
        layers = encoders["h"].text_model.encoder.layers
        layers.append(_identity_layer_like(layers[-1]))
        encoders["h"].config.num_hidden_layers = len(layers)
    model = DiffusionModel(unet=unet.eval().requires_grad_(False), family=family,
                           sampling=SamplingConfig(prediction=prediction), latent_format=latent_format_for(family),
                           source=str(directory))
    clip = ClipModel(encoders=torch.nn.ModuleDict({k: v.requires_grad_(False) for k, v in encoders.items()}),
                     family=family, source=str(directory))
    vae_model = VAEModel(autoencoder=vae.eval().requires_grad_(False),
                         latent_format=latent_format_for(family), source=str(directory))
    found = detect.Detected(family=family, prediction=prediction, unet=shape, unet_prefix="", has_vae=True)
    return LoadedCheckpoint(model, clip, vae_model, found)
