"""Writing models back to files as ComfyUI's save nodes do (comfy/sd.py save_checkpoint, CLIPSave, VAESave).

A saved file holds the weights a model *runs with*: its weight patches (LoRA, merges) applied. The layouts are
the ordinary ones our loaders read and ComfyUI writes: a single-file LDM checkpoint (model.diffusion_model.,
first_stage_model., the family's text-encoder prefixes; convert.build_single_file), a bare VAE in LDM names, and
one transformers-layout file per text encoder. Files are safetensors, written tensor by tensor into a hidden part
file that is renamed over the target once complete (engine.files.atomic_writer), so no reader sees half a model
and no second in-memory copy of the serialized file is made.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

from latentloom.engine.files import atomic_writer

from . import convert
from .clip import ClipModel
from .models import DiffusionModel
from .vae import VAEModel

StateDict = dict[str, torch.Tensor]

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# ComfyUI's names for the CLIP slots (file suffixes of CLIPSave, keys of LoRA text-encoder entries).
CLIP_SLOT_NAMES = {"l": "clip_l", "h": "clip_h", "g": "clip_g"}


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """A .safetensors file written atomically, one tensor at a time (the format: 8-byte little-endian header
    size, the JSON header padded with spaces to 8 bytes, then the raw little-endian tensor bytes in order)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_writer(path) as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                handle.write(flat.view(torch.uint8).numpy().tobytes())


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def unet_state(model: DiffusionModel, manager: Any = None) -> StateDict:
    """The UNet's weights with the model's patches applied (diffusers names), on the CPU."""
    with model.prepared(manager) as unet:
        return _cpu_copy(unet.state_dict())


def clip_states(clip: ClipModel, manager: Any = None) -> dict[str, StateDict]:
    """Each text encoder's weights with the clip's patches applied (transformers names), by slot."""
    with clip.prepared(manager) as encoders:
        return {slot: _cpu_copy(encoder.state_dict()) for slot, encoder in encoders.items()}


def vae_state(vae: VAEModel) -> StateDict:
    return _cpu_copy(vae.autoencoder.state_dict())


def checkpoint_state(model: DiffusionModel, unet: StateDict, clips: Mapping[str, StateDict] | None,
                     vae: StateDict | None) -> StateDict:
    """One single-file LDM checkpoint (the layout CheckpointLoaderSimple / UNETLoader read)."""
    layout = convert.CHECKPOINT_TEXT_ENCODERS[model.family]
    text_encoders = [(prefix, kind, clips[slot]) for slot, prefix, kind in layout if clips and slot in clips]
    return convert.build_single_file(unet, convert.diffusers_config(model.unet).layers_per_block, vae,
                                     text_encoders)


def clip_file_state(state: StateDict) -> StateDict:
    """One text encoder as CLIPSave writes it: transformers names (text_model.*, text_projection.weight)."""
    return {key: value for key, value in convert.clip_to_hf_legacy(state).items()
            if not key.endswith(".position_ids")}


def vae_file_state(state: StateDict) -> StateDict:
    """A VAE as VAESave writes it: LDM names without the first_stage_model. prefix."""
    return convert.vae_to_ldm(state)


def model_metadata(model: DiffusionModel, title: str) -> tuple[dict[str, str], StateDict]:
    """ComfyUI's checkpoint metadata and marker tensors: the modelspec keys it knows for SDXL base / edit /
    refiner, the prediction key, and `v_pred` / `ztsnr` / `edm_vpred.*` markers that tell loaders how the model
    samples. Written from the model's current sampling settings, so a file reloads sampling as it was saved."""
    metadata: dict[str, str] = {}
    architecture = None
    if model.family == "sdxl":
        edit = model.options.get("variant") == "instruct_pix2pix"
        architecture = "stable-diffusion-xl-v1-edit" if edit else "stable-diffusion-xl-v1-base"
    elif model.family == "sdxl_refiner":
        architecture = "stable-diffusion-xl-v1-refiner"
    if architecture is not None:
        metadata.update({"modelspec.architecture": architecture, "modelspec.sai_model_spec": "1.0.0",
                         "modelspec.implementation": "sgm", "modelspec.title": title})
    markers: StateDict = {}
    sampling = model.sampling
    if sampling.schedule == "continuous_edm" and sampling.prediction == "v":
        markers["edm_vpred.sigma_max"] = torch.tensor(sampling.sigma_max).float()
        markers["edm_vpred.sigma_min"] = torch.tensor(sampling.sigma_min).float()
    if sampling.prediction == "eps":
        metadata["modelspec.predict_key"] = "epsilon"
    elif sampling.prediction == "v":
        metadata["modelspec.predict_key"] = "v"
        markers["v_pred"] = torch.tensor([])
        if sampling.zsnr:
            markers["ztsnr"] = torch.tensor([])
    return metadata, markers
