"""LoRA training nodes with ComfyUI 0.3.64's signatures (comfy_extras/nodes_train.py): TrainLoraNode,
LoraModelLoader, SaveLoRANode, LossGraphNode, LoadImageSetFromFolderNode, LoadImageTextSetFromFolderNode.

A LORA_MODEL is a plain dict of tensors named as in a ComfyUI-trained LoRA file (`diffusion_model.<LDM module>.
lora_up.weight` …, nodes.diffusion.training); SaveLoRANode writes it unchanged and LoraLoader reads the file
back. TrainLoraNode returns the input model with the trained LoRA as a weight patch (the model-patch API): the
input MODEL, cached upstream, never changes. A LOSS_MAP is ComfyUI's {"loss": [one float per step]}.

Differences from ComfyUI, on purpose: training is seeded throughout (ComfyUI draws the sample order, the σ and the
initial factors from the global RNG), so a graph trains the same LoRA every time and its outputs can be cached;
each latent is paired with its own conditioning entry (ComfyUI applies every chosen caption to the whole batch);
an image with an empty caption gets one entry (ComfyUI adds two); biases are not trained (ComfyUI's `diff_b`
tensors, which our LoraLoader does not apply); OFT is offered (it is in the signature) but reports that it is
not built. The dataset folders are read in sorted order.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from latentloom.engine.environment import Environment
from latentloom.engine.files import atomic_writer
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, NodeOutput, RunContext
from latentloom.engine.types import (
    CLIP,
    CONDITIONING,
    IMAGE,
    INT,
    LATENT,
    MODEL,
    Boolean,
    Combo,
    Float,
    Int,
    Output,
    Socket,
    String,
)

from .diffusion import lora as lora_math
from .diffusion import training
from .diffusion.checkpoint import ModelFileError, read_state_dict
from .diffusion.embeddings import EmbeddingLibrary
from .image_files import png_metadata, save_target
from .model_files import locate_model, model_fingerprint

LORA_MODEL = "LORA_MODEL"
LOSS_MAP = "LOSS_MAP"
NO_LORA = "[None]"
RESIZE_METHODS = ("None", "Stretch", "Crop", "Pad")
DATASET_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _existing_lora_choices(env: Environment | None) -> list[str]:
    return [*(env.list_models("loras") if env is not None else []), NO_LORA]


def _steps_in_name(name: str) -> int:
    """Steps a trained LoRA's file name records ("…_10_steps_00001_.safetensors"); 0 when it records none."""
    head, found, _ = name.rpartition("_steps_")
    number = head.rsplit("_", 1)[-1] if found else ""
    return int(number) if number.isdigit() else 0


class TrainLoraNode(Node):
    display_name = "Train LoRA"
    category = "training"
    experimental = True
    outputs = (Output(MODEL, name="model_with_lora"), Output(LORA_MODEL, name="lora"), Output(LOSS_MAP, name="loss"),
               Output(INT, name="steps"))

    model: Annotated[Any, Socket(MODEL, tooltip="The model to train the LoRA on.")]
    latents: Annotated[Any, Socket(LATENT, tooltip="The latents to train on (the dataset).")]
    positive: Annotated[Any, Socket(CONDITIONING, tooltip="One conditioning entry, or one per latent.")]
    batch_size: Annotated[int, Int(min=1, max=10000, step=1)] = 1
    grad_accumulation_steps: Annotated[int, Int(min=1, max=1024, step=1)] = 1
    steps: Annotated[int, Int(min=1, max=100000)] = 16
    learning_rate: Annotated[float, Float(min=0.0000001, max=1.0, step=0.000001)] = 0.0005
    rank: Annotated[int, Int(min=1, max=128)] = 8
    optimizer: Annotated[str, Combo(tuple(training.OPTIMIZERS))] = "AdamW"
    loss_function: Annotated[str, Combo(tuple(training.LOSSES))] = "MSE"
    seed: Annotated[int, Int(min=0, max=0xFFFFFFFFFFFFFFFF)] = 0
    training_dtype: Annotated[str, Combo(("bf16", "fp32"))] = "bf16"
    lora_dtype: Annotated[str, Combo(("bf16", "fp32"))] = "bf16"
    algorithm: Annotated[str, Combo(training.ALGORITHMS)] = "LoRA"
    gradient_checkpointing: Annotated[bool, Boolean()] = True
    existing_lora: Annotated[str, Combo(_existing_lora_choices, tooltip="A LoRA to continue training.")] = NO_LORA

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        name = constants.get("existing_lora")
        return None if name in (None, NO_LORA) else model_fingerprint(env, "loras", name, "lora")

    def run(self, ctx: RunContext):
        latents = self.latents["samples"]
        count = latents.shape[0]
        positive = list(self.positive)
        if len(positive) == 1 and count > 1:
            positive = positive * count
        existing = None
        existing_steps = 0
        if self.existing_lora != NO_LORA:
            path = locate_model(ctx, "existing_lora", "loras", self.existing_lora)
            try:
                existing = read_state_dict(path)
            except ModelFileError as error:
                raise InputError("existing_lora", str(error)) from error
            existing_steps = _steps_in_name(self.existing_lora)
        channels = getattr(self.model.unet.config, "in_channels", latents.shape[1])
        if latents.shape[1] != channels:
            raise InputError("latents", f"have {latents.shape[1]} channels; this model trains on {channels}-channel "
                             "latents")
        settings = training.TrainSettings(
            batch_size=self.batch_size, steps=self.steps, grad_accumulation_steps=self.grad_accumulation_steps,
            learning_rate=self.learning_rate, rank=self.rank, optimizer=self.optimizer,
            loss_function=self.loss_function, seed=self.seed, training_dtype=training.DTYPES[self.training_dtype],
            lora_dtype=training.DTYPES[self.lora_dtype], algorithm=self.algorithm,
            gradient_checkpointing=self.gradient_checkpointing)

        def report(step: int, total: int, loss: float) -> None:
            ctx.progress(step, total)

        try:
            result = training.train_lora(self.model, latents, positive, settings, existing, ctx.models, report)
        except training.TrainingInputError as error:
            raise InputError(error.input_name, error.detail) from error
        model_with_lora = training.apply_lora_state(self.model, result.state, 1.0)
        return (model_with_lora, result.state, {"loss": result.losses}, self.steps + existing_steps)


class LoraModelLoader(Node):
    display_name = "Load LoRA Model"
    category = "loaders"
    description = "Load Trained LoRA weights from Train LoRA node."
    experimental = True
    outputs = (Output(MODEL, tooltip="The modified diffusion model."),)

    model: Annotated[Any, Socket(MODEL, tooltip="The diffusion model the LoRA will be applied to.")]
    lora: Annotated[Any, Socket(LORA_MODEL, tooltip="The LoRA model to apply to the diffusion model.")]
    strength_model: Annotated[float, Float(min=-100.0, max=100.0, step=0.01)] = 1.0

    def run(self, ctx: RunContext):
        if self.strength_model == 0:
            return (self.model,)
        if not isinstance(self.lora, dict) or not all(isinstance(v, torch.Tensor) for v in self.lora.values()):
            raise InputError("lora", "is not a LoRA state dict (name -> tensor)")
        try:
            return (training.apply_lora_state(self.model, self.lora, self.strength_model),)
        except lora_math.LoraFormatError as error:
            raise InputError("lora", f"does not fit this {self.model.family} model: {error}") from error


class SaveLoRANode(Node):
    display_name = "Save LoRA Weights"
    category = "loaders"
    experimental = True
    output_node = True

    lora: Annotated[Any, Socket(LORA_MODEL, tooltip="The LoRA to save (not the model with the LoRA).")]
    prefix: Annotated[str, String()] = "loras/ComfyUI_trained_lora"
    steps: Annotated[int | None, Int(force_input=True, optional=True)] = None

    def run(self, ctx: RunContext):
        if not isinstance(self.lora, dict) or not self.lora:
            raise InputError("lora", "is empty or not a LoRA state dict")
        try:
            target = save_target(Path(ctx.env.output_dir), self.prefix)
        except ValueError as error:
            raise InputError("prefix", str(error)) from None
        middle = "" if self.steps is None else f"{self.steps}_steps_"
        path = target.folder / f"{target.basename}_{middle}{target.counter:05}_.safetensors"
        from safetensors.torch import save

        data = save({name: value.detach().cpu().contiguous() for name, value in self.lora.items()})
        with atomic_writer(path) as handle:
            handle.write(data)
        return ()


def _draw_loss_graph(losses: list[float]) -> Image.Image:
    """ComfyUI's plot: an 800x480 area plus a 40 px margin, the loss scaled min..max, axes, labels, min / max."""
    width, height, margin = 800, 480, 40
    image = Image.new("RGB", (width + margin, height + margin), "white")
    draw = ImageDraw.Draw(image)
    low, high = min(losses), max(losses)
    spread = high - low
    scaled = [(value - low) / spread if spread > 0 else 0.5 for value in losses]
    previous = (margin, height - int(scaled[0] * height))
    for index, value in enumerate(scaled[1:], start=1):
        point = (margin + int(index / len(losses) * width), height - int(value * height))
        draw.line([previous, point], fill="blue", width=2)
        previous = point
    draw.line([(margin, 0), (margin, height)], fill="black", width=2)
    draw.line([(margin, height), (width + margin, height)], fill="black", width=2)
    font = ImageFont.load_default()
    draw.text((5, height // 2), "Loss", font=font, fill="black")
    draw.text((width // 2, height + 10), "Steps", font=font, fill="black")
    draw.text((margin - 30, 0), f"{high:.2f}", font=font, fill="black")
    draw.text((margin - 30, height - 10), f"{low:.2f}", font=font, fill="black")
    return image


class LossGraphNode(Node):
    display_name = "Plot Loss Graph"
    category = "training"
    description = "Plots the loss graph and saves it to the temp directory (shown like a preview)."
    experimental = True
    output_node = True

    loss: Annotated[Any, Socket(LOSS_MAP, default={})]
    filename_prefix: Annotated[str, String()] = "loss_graph"

    def run(self, ctx: RunContext):
        values = self.loss.get("loss") if isinstance(self.loss, dict) else None
        if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
            raise InputError("loss", "holds no loss values (expected {'loss': [numbers]})")
        image = _draw_loss_graph([float(v) for v in values])
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        try:
            target = save_target(Path(ctx.env.temp_dir), f"{self.filename_prefix}_{stamp}")
        except ValueError as error:
            raise InputError("filename_prefix", str(error)) from None
        name = f"{target.basename}.png"
        metadata = None
        if not getattr(ctx.env, "disable_metadata", False):
            extra = (ctx.extra_data or {}).get("extra_pnginfo")
            metadata = png_metadata(ctx.prompt, extra if isinstance(extra, dict) else None)
        with atomic_writer(target.folder / name) as handle:
            image.save(handle, format="PNG", pnginfo=metadata)
        return NodeOutput(ui={"images": [{"filename": name, "subfolder": target.subfolder, "type": "temp"}]})


# ---------------------------------------------------------------------------------------------------------------
# Datasets from input/ subfolders


def input_subfolders(env: Environment | None) -> list[str]:
    """Every folder below the input folder, recursively, '/'-separated and sorted (ComfyUI's combo)."""
    if env is None or not Path(env.input_dir).is_dir():
        return []
    root = Path(env.input_dir)
    found = [Path(current).relative_to(root).as_posix() for current, _, _ in os.walk(root)]
    return sorted(name for name in found if name != ".")


def _dataset_folder(ctx: RunContext, folder: str) -> Path:
    root = Path(os.path.abspath(ctx.env.input_dir))
    path = Path(os.path.abspath(root / folder))
    if not folder or os.path.commonpath((root, path)) != str(root) or path == root:
        raise InputError("folder", f"'{folder}' is not a folder inside the input folder")
    if not path.is_dir():
        raise InputError("folder", f"'{folder}' does not exist in the input folder")
    return path


def _is_dataset_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in DATASET_EXTENSIONS


def _load_images(paths: list[Path], resize_method: str, width: int | None = None,
                 height: int | None = None) -> torch.Tensor:
    """IMAGE [N, H, W, 3] from files; every image takes the size given, or the first image's (ComfyUI's rule:
    Stretch and Pad resize with Lanczos, Crop keeps the top-left part, None refuses other sizes)."""
    if not paths:
        raise InputError("folder", f"holds no images ({', '.join(DATASET_EXTENSIONS)})")
    pictures = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                picture = opened.point(lambda value: value * (1 / 255)) if opened.mode == "I" else opened
                picture = picture.convert("RGB")
        except (OSError, SyntaxError) as error:
            raise InputError("folder", f"cannot read image file '{path.name}': {error}") from None
        if width is None:
            width = picture.size[0]
        if height is None:
            height = picture.size[1]
        if picture.size != (width, height):
            if resize_method in ("Stretch", "Pad"):
                picture = picture.resize((width, height), Image.Resampling.LANCZOS)
            elif resize_method == "Crop":
                picture = picture.crop((0, 0, width, height))
            else:
                raise InputError("resize_method", f"'{path.name}' is {picture.size[0]}x{picture.size[1]}, not "
                                 f"{width}x{height}; choose a resize method or use images of one size")
        pictures.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0))
    return torch.stack(pictures)


class LoadImageSetFromFolderNode(Node):
    display_name = "Load Image Dataset from Folder"
    category = "loaders"
    description = "Loads a batch of images from a directory for training."
    experimental = True
    outputs = (Output(IMAGE),)

    folder: Annotated[str, Combo(input_subfolders, tooltip="The folder to load images from.")]
    resize_method: Annotated[str, Combo(RESIZE_METHODS, optional=True)] = "None"

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return _folder_fingerprint(env, constants.get("folder"))

    def run(self, ctx: RunContext):
        folder = _dataset_folder(ctx, self.folder)
        paths = sorted(p for p in folder.iterdir() if _is_dataset_image(p))
        return (_load_images(paths, self.resize_method),)


def _folder_fingerprint(env: Environment, folder: Any) -> Any:
    """Names, sizes and mtimes of everything below the folder, so edits to the dataset re-run the loader."""
    if not isinstance(folder, str):
        return None
    root = Path(env.input_dir) / folder
    if not root.is_dir():
        return None
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


def _kohya_repeats(name: str) -> int:
    """kohya-ss folder names "<repeats>_<name>" repeat their images; other folders count once."""
    head = name.split("_")[0]
    return int(head) if head.isdigit() else 1


class LoadImageTextSetFromFolderNode(Node):
    display_name = "Load Image and Text Dataset from Folder"
    category = "loaders"
    description = "Loads a batch of images and caption from a directory for training."
    experimental = True
    outputs = (Output(IMAGE), Output(CONDITIONING))

    folder: Annotated[str, Combo(input_subfolders, tooltip="The folder to load images from.")]
    clip: Annotated[Any, Socket(CLIP, tooltip="The CLIP model used for encoding the text.")]
    resize_method: Annotated[str, Combo(RESIZE_METHODS, optional=True)] = "None"
    width: Annotated[int, Int(min=-1, max=10000, step=1, optional=True)] = -1
    height: Annotated[int, Int(min=-1, max=10000, step=1, optional=True)] = -1

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return _folder_fingerprint(env, constants.get("folder"))

    def run(self, ctx: RunContext):
        folder = _dataset_folder(ctx, self.folder)
        paths: list[Path] = []
        for item in sorted(folder.iterdir()):
            if _is_dataset_image(item):
                paths.append(item)
            elif item.is_dir():
                paths.extend(sorted(p for p in item.iterdir() if _is_dataset_image(p)) * _kohya_repeats(item.name))
        images = _load_images(paths, self.resize_method, None if self.width == -1 else self.width,
                              None if self.height == -1 else self.height)
        resolver = ctx.find_service(EmbeddingLibrary)
        encoded: dict[str, list] = {}
        conditioning = []
        for path in paths:
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            if caption not in encoded:  # repeated captions (and kohya repeats) are encoded once
                cond, pooled = self.clip.encode(caption, resolve_embedding=resolver, manager=ctx.models,
                                                warn=ctx.warn)
                encoded[caption] = [cond, {"pooled_output": pooled}]
            conditioning.append(encoded[caption])
        return (images, conditioning)


NODES = [TrainLoraNode, LossGraphNode, LoadImageSetFromFolderNode, LoadImageTextSetFromFolderNode, SaveLoRANode,
         LoraModelLoader]
