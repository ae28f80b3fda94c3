"""Model upscaling with ComfyUI's class names (comfy_extras/nodes_upscale_model.py): UpscaleModelLoader reads an
ESRGAN / Real-ESRGAN / SwinIR-class file from models/upscale_models through spandrel (the library ComfyUI uses, so
the same files load and an UPSCALE_MODEL link carries the same object, a spandrel ImageModelDescriptor), and
ImageUpscaleWithModel runs it over an image in overlapping tiles.

spandrel is imported when a model is loaded, not with the catalogue: its import pulls in torchvision and every
architecture it knows, seconds that `latentloom nodes` or a graph without upscaling should not pay.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import IMAGE, UPSCALE_MODEL, Combo, Output, Socket

from .diffusion.checkpoint import SAFETENSORS_SUFFIXES, ModelFileError, read_state_dict
from .diffusion.tiling import upscale_tiled
from .model_files import file_identity, load_model, locate_model, model_choices, model_fingerprint, model_key

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

# A SwinIR trained with DataParallel keeps its "module." prefix; ComfyUI strips it when this key is present.
_DATA_PARALLEL_SWINIR_KEY = "module.layers.0.residual_group.blocks.0.norm1.weight"


def _read_weights(path: Path) -> dict[str, Any]:
    """The file's dictionary as saved. Pickles keep their nesting ({"params_ema": {...}, "params": {...}} from
    BasicSR): spandrel picks the weights out of the known wrappers itself."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return read_state_dict(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is a paragraph; the sentence that says what was found starts with "Unsupported".
        found = re.search(r"Unsupported [^\n]*?(?:\.(?=\s)|$)", str(error), re.MULTILINE)
        detail = found.group(0) if found else str(error).strip().split("\n")[0]
        if "Unsupported global" not in detail:
            raise ModelFileError(f"{path.name}: not a readable weights file ({detail})") from error
        raise ModelFileError(
            f"{path.name}: refused to load: the pickle needs more than tensors (arbitrary code is never run from "
            f"model files; convert it to .safetensors). Detail: {detail}") from error
    except Exception as error:  # zip / truncated-file errors come in many types
        raise ModelFileError(f"{path.name}: not a readable weights file ({type(error).__name__}: {error})") \
            from error
    if not isinstance(state, dict):
        raise ModelFileError(f"{path.name}: holds a {type(state).__name__}, not a dictionary of tensors")
    return state


def load_upscale_model(path: Path) -> ImageModelDescriptor:
    """Detect the architecture from the tensors' names and shapes (spandrel) and build it, in eval mode on the
    CPU. Anything but a single-image model (an inpainting model, which also takes a mask) is refused."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    state = _read_weights(path)
    if _DATA_PARALLEL_SWINIR_KEY in state:
        state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        descriptor = ModelLoader().load_from_state_dict(state)
    except UnsupportedModelError as error:
        raise ModelFileError(f"{path.name}: not an upscale model architecture spandrel knows (ESRGAN, Real-ESRGAN, "
                             f"SwinIR, HAT, DAT, ...)") from error
    except (AssertionError, IndexError, TypeError) as error:  # detected, but the tensors do not fit it
        raise ModelFileError(f"{path.name}: the tensors do not fit the detected architecture "
                             f"({type(error).__name__}: {error})") from error
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ModelFileError(f"{path.name}: a {descriptor.architecture.name} model that takes more than an image "
                             f"({type(descriptor).__name__}); an upscale model must be a single-image model")
    return descriptor.eval()


class UpscaleModelLoader(Node):
    display_name = "Load Upscale Model"
    category = "loaders"
    outputs = (Output(UPSCALE_MODEL),)
    model_name: Annotated[str, Combo(model_choices("upscale_models"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "upscale_models", constants.get("model_name"), "upscale_model")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "model_name", "upscale_models", self.model_name)
        model = load_model(ctx, "model_name", self.model_name, model_key("upscale_model", file_identity(path)),
                           lambda: load_upscale_model(path))
        return (model,)


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ImageUpscaleWithModel(Node):
    display_name = "Upscale Image (using Model)"
    category = "image/upscaling"
    outputs = (Output(IMAGE),)
    upscale_model: Annotated[Any, Socket(UPSCALE_MODEL)]
    image: Annotated[Any, Socket(IMAGE)]

    def run(self, ctx: RunContext):
        model: ImageModelDescriptor = self.upscale_model
        image: torch.Tensor = self.image
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise InputError("image", f"is empty ({image.shape[2]}x{image.shape[1]} pixels)")
        if image.shape[-1] != model.input_channels:
            raise InputError("image", f"has {image.shape[-1]} channels; the {model.architecture.name} upscale model "
                                      f"takes {model.input_channels}")

        def report(done: int, total: int) -> None:
            ctx.check_interrupt()
            ctx.progress(done, total)

        with ctx.models.use(model.model) as module, torch.no_grad():
            weight = next(module.parameters(), None)
            device = weight.device if weight is not None else torch.device("cpu")
            dtype = weight.dtype if weight is not None else torch.float32

            def retry_smaller(tile: int) -> None:
                _release_cached_memory(device)
                ctx.warn(f"out of memory while upscaling; retrying with {tile}-pixel tiles")

            upscaled = upscale_tiled(image.movedim(-1, 1), lambda piece: model(piece.to(device=device, dtype=dtype)),
                                     model.scale, model.output_channels, progress=report,
                                     on_out_of_memory=retry_smaller)
        return (torch.clamp(upscaled.movedim(1, -1), 0.0, 1.0),)


NODES = [UpscaleModelLoader, ImageUpscaleWithModel]
