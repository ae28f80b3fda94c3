"""Write the LoRA training example: the dataset input/toy-stripes/ and the graph graphs/lora-training.json
(+ .ui.json, laid out for the editor by engine.workflow.api_to_ui).

The dataset is a style the toy model has never seen: its shapes crossed by horizontal bands of the background
colour, 16 px apart (8 px shape, 8 px background), drawn with tools/toy_dataset.py so everything else looks like
the toy model's training data. Each image has the toy model's ordinary caption in a .txt beside it.

The graph trains a LoRA on the toy UNet from those images (LoadImageTextSetFromFolderNode -> VAEEncode ->
TrainLoraNode), saves it to output/loras, plots the loss, and samples one image with the trained model. It is sized
for CPU (fp32, a few dozen steps). `stripe_energy` is the style measure the tests use.

Usage: .venv/bin/python tools/make_training_graph.py [--root .]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_dataset import BACKGROUND_COLOURS, ShapeSpec, caption_for, render  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET = "toy-stripes"
GRAPH = "lora-training"
STRIPE_PERIOD = 16  # pixels; the toy VAE (8x downsampling) reproduces bands of 8 px

DATASET_SPECS = (
    ShapeSpec(colour="red", shape="square", background="black", size_word="large", extent=40.0, centre=(32.0, 32.0)),
    ShapeSpec(colour="blue", shape="circle", background="yellow", size_word="large", extent=42.0,
              centre=(30.0, 34.0)),
    ShapeSpec(colour="green", shape="triangle", background="gray", size_word="large", extent=40.0,
              centre=(33.0, 30.0)),
    ShapeSpec(colour="yellow", shape="square", background="white", size_word="large", extent=40.0,
              centre=(32.0, 32.0)),
)
# Training settings of the example graph (TrainLoraNode inputs).
TRAINING = {
    "batch_size": 4, "grad_accumulation_steps": 1, "steps": 100, "learning_rate": 0.01, "rank": 8,
    "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32",
    "algorithm": "LoRA", "gradient_checkpointing": False, "existing_lora": "[None]",
}
PROMPT = "a large green circle on a white background"  # not in the dataset


def striped(spec: ShapeSpec, period: int = STRIPE_PERIOD) -> np.ndarray:
    """uint8 [64, 64, 3]: the shape with every other band of period/2 rows painted in the background colour."""
    image, _ = render(spec)
    rows = np.arange(image.shape[0])[:, None, None]
    band = (rows // (period // 2)) % 2 == 1
    background = np.array(BACKGROUND_COLOURS[spec.background], dtype=np.uint8)
    return np.where(band, background, image).astype(np.uint8)


def stripe_energy(images: np.ndarray, period: int = STRIPE_PERIOD) -> np.ndarray:
    """Per image [N, H, W, 3]: the share of the vertical variation (per column, grey levels, mean removed) that
    lies at the stripe frequency (H / period cycles per image height). ~0.04 for the toy model's plain shapes,
    ~0.3 for the striped dataset after a VAE round trip."""
    grey = images.astype(np.float64).mean(axis=-1)
    profile = grey - grey.mean(axis=1, keepdims=True)
    power = np.abs(np.fft.rfft(profile, axis=1)) ** 2
    return power[:, images.shape[1] // period, :].sum(axis=-1) / (power[:, 1:, :].sum(axis=(1, 2)) + 1e-9)


def dataset() -> dict[str, tuple[np.ndarray, str]]:
    """file stem -> (image, caption)."""
    return {f"stripes-{index}": (striped(spec), caption_for(spec, with_size=True, with_position=False))
            for index, spec in enumerate(DATASET_SPECS)}


def _node(class_type: str, title: str | None = None, **inputs) -> dict:
    entry: dict = {"class_type": class_type, "inputs": inputs}
    if title:
        entry["_meta"] = {"title": title}
    return entry


def training_graph() -> dict:
    """API prompt; ids follow the other graphs (3 sampler, 4 checkpoint, 5 latent, 6/7 prompts, 8 decode, 9 save)."""
    return {
        "3": _node("KSampler", seed=7, steps=20, cfg=6.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                   model=["12", 0], positive=["6", 0], negative=["7", 0], latent_image=["5", 0]),
        "4": _node("CheckpointLoaderSimple", ckpt_name="toy-shapes.safetensors"),
        "5": _node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "6": _node("CLIPTextEncode", "Positive prompt", text=PROMPT, clip=["4", 1]),
        "7": _node("CLIPTextEncode", "Negative prompt", text="", clip=["4", 1]),
        "8": _node("VAEDecode", samples=["3", 0], vae=["4", 2]),
        "9": _node("SaveImage", filename_prefix="lora-training", images=["8", 0]),
        "10": _node("LoadImageTextSetFromFolderNode", "Striped shapes + captions", folder=DATASET, clip=["4", 1],
                    resize_method="None", width=-1, height=-1),
        "11": _node("VAEEncode", pixels=["10", 0], vae=["4", 2]),
        "12": _node("TrainLoraNode", model=["4", 0], latents=["11", 0], positive=["10", 1], **TRAINING),
        "13": _node("SaveLoRANode", lora=["12", 1], prefix="loras/toy-stripes", steps=["12", 3]),
        "14": _node("LossGraphNode", loss=["12", 2], filename_prefix="loss_graph"),
    }


def write(root: Path) -> list[Path]:
    from latentloom.engine.workflow import api_to_ui
    from latentloom.nodes import create_engine

    folder = root / "input" / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (image, caption) in dataset().items():
        Image.fromarray(image, "RGB").save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        written += [folder / f"{stem}.png", folder / f"{stem}.txt"]
    catalogue = create_engine(models_dir=REPO_ROOT / "models", input_dir=root / "input",
                              entry_points=False).catalogue()
    prompt = training_graph()
    ordered = {key: prompt[key] for key in sorted(prompt, key=int)}
    graphs = root / "graphs"
    (graphs / f"{GRAPH}.json").write_text(json.dumps(ordered, indent=2) + "\n")
    workflow = api_to_ui(copy.deepcopy(ordered), catalogue)
    (graphs / f"{GRAPH}.ui.json").write_text(json.dumps(workflow, indent=2) + "\n")
    return [*written, graphs / f"{GRAPH}.json", graphs / f"{GRAPH}.ui.json"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root to write into")
    args = parser.parse_args()
    for path in write(args.root):
        print(path)


if __name__ == "__main__":
    main()
