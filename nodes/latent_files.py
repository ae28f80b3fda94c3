"""Latents on disk: SaveLatent and LoadLatent in ComfyUI's `.latent` format.

A `.latent` file is a safetensors file holding `latent_tensor` (the unscaled samples, [B,C,H,W]) and an empty
`latent_format_version_0` tensor that marks the current format; files without the marker were written scaled by
SD1's factor 0.18215 and are divided by it on load. The header metadata carries the prompt (and the extra_pnginfo
entries, e.g. the workflow) as JSON strings, like a saved PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from latentloom.engine.environment import Environment
from latentloom.engine.files import write_atomically
from latentloom.engine.inputs import InputError, MissingInputFile
from latentloom.engine.node import Node, NodeOutput, RunContext
from latentloom.engine.types import LATENT, Combo, Output, Socket, String

from .image_files import file_fingerprint, resolve_annotated_path, save_target

LATENT_EXTENSION = ".latent"
FORMAT_MARKER = "latent_format_version_0"
TENSOR_KEY = "latent_tensor"
OLD_FORMAT_SCALE = 0.18215  # what files without the marker were multiplied by


def latent_file_bytes(samples: torch.Tensor, metadata: dict[str, str] | None) -> bytes:
    tensors = {TENSOR_KEY: samples.detach().cpu().contiguous(), FORMAT_MARKER: torch.tensor([])}
    return safetensors.torch.save(tensors, metadata=metadata)


def read_latent_file(path: Path) -> torch.Tensor:
    """The samples of a `.latent` file as float32, old-format files rescaled. Raises ValueError for a file that
    is not one."""
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"'{path.name}' is not a readable latent file: {error}") from None
    if TENSOR_KEY not in tensors:
        raise ValueError(f"'{path.name}' holds no '{TENSOR_KEY}'")
    multiplier = 1.0 if FORMAT_MARKER in tensors else 1.0 / OLD_FORMAT_SCALE
    return tensors[TENSOR_KEY].float() * multiplier


def list_input_latents(env: Any) -> list[str]:
    """`.latent` files directly in the input folder, sorted (the LoadLatent combo)."""
    if env is None:
        return []
    folder = Path(env.input_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(LATENT_EXTENSION))


def _metadata(ctx: RunContext) -> dict[str, str] | None:
    if getattr(ctx.env, "disable_metadata", False):
        return None
    metadata = {"prompt": json.dumps(ctx.prompt) if ctx.prompt is not None else ""}
    extra = (ctx.extra_data or {}).get("extra_pnginfo")
    for key, value in (extra if isinstance(extra, dict) else {}).items():
        metadata[str(key)] = json.dumps(value)
    return metadata


class SaveLatent(Node):
    category = "_for_testing"
    output_node = True

    samples: Annotated[Any, Socket(LATENT)]
    filename_prefix: Annotated[str, String()] = "latents/ComfyUI"

    def run(self, ctx: RunContext):
        try:
            target = save_target(Path(ctx.env.output_dir), self.filename_prefix)
        except ValueError as error:
            raise InputError("filename_prefix", str(error)) from None
        name = f"{target.basename}_{target.counter:05}_{LATENT_EXTENSION}"
        write_atomically(target.folder / name, latent_file_bytes(self.samples["samples"], _metadata(ctx)))
        return NodeOutput(ui={"latents": [{"filename": name, "subfolder": target.subfolder, "type": "output"}]})


class LoadLatent(Node):
    category = "_for_testing"
    outputs = (Output(LATENT),)

    # Annotated names ('x.latent [output]') are valid too, so the node checks names itself (as ComfyUI does).
    latent: Annotated[str, Combo(list_input_latents, check_value=False)]

    @classmethod
    def validate_inputs(cls, env: Environment, constants: dict[str, Any], input_types: dict[str, str]) -> bool | str:
        name = constants.get("latent")
        if name is None:  # linked: checked when it runs
            return True
        try:
            path = resolve_annotated_path(env, str(name))
        except ValueError:
            return f"Invalid latent file: {name}"
        return True if path.is_file() else f"Invalid latent file: {name}"

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        name = constants.get("latent")
        if name is None or env is None:
            return None
        try:
            return file_fingerprint(resolve_annotated_path(env, str(name)))  # any change of content reloads
        except (OSError, ValueError):
            return f"unreadable:{name}"

    def run(self, ctx: RunContext):
        try:
            path = resolve_annotated_path(ctx.env, self.latent)
        except ValueError:
            raise InputError("latent", f"'{self.latent}' points outside its folder") from None
        if not path.is_file():
            raise MissingInputFile("latent", f"latent file '{self.latent}' not found ({path})")
        try:
            return ({"samples": read_latent_file(path)},)
        except ValueError as error:
            raise InputError("latent", str(error)) from None


NODES = [SaveLatent, LoadLatent]
