"""Run the shipped toy model through the engine itself (`latentloom run`, ComfyUI core nodes) and compare with
tools/eval_toy.py's own sampling loop on the same prompt and seed; prints JSON.

Checks that the shipped single-file checkpoint, loaded by CheckpointLoaderSimple and sampled by KSampler
(euler / normal), gives the image the eval loop gives from the training folders (same weights rounded to fp16).
Optionally writes the engine's image (nearest-upscaled) as the README example.
Usage: .venv/bin/python tools/engine_check_toy.py [--example docs/toy-example.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_metrics  # noqa: E402
from toy_common import REPO_ROOT  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))

PROMPT = "a red circle on a white background"


def txt2img_graph(prompt: str, seed: int, steps: int, cfg: float) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "toy-shapes.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "toy", "images": ["8", 0]}},
    }


def run_engine(prompt: str, seed: int, steps: int, cfg: float, models_dir: Path) -> np.ndarray:
    from latentloom.server.cli import main

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        graph_path = root / "graph.json"
        graph_path.write_text(json.dumps(txt2img_graph(prompt, seed, steps, cfg)))
        code = main(["run", str(graph_path), "--no-progress", "--models-dir", str(models_dir),
                     "--output-dir", str(root / "out"), "--input-dir", str(root / "in"),
                     "--temp-dir", str(root / "tmp"), "--custom-nodes", str(root / "custom_nodes")])
        if code != 0:
            raise RuntimeError(f"latentloom run exited with {code}")
        (image_path,) = sorted((root / "out").rglob("*.png"))
        return np.asarray(Image.open(image_path).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=6.0)
    parser.add_argument("--models-dir", default=str(REPO_ROOT / "models"))
    parser.add_argument("--example", default="", help="save the engine's image here, upscaled 4x (nearest)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine_image = run_engine(args.prompt, args.seed, args.steps, args.cfg, Path(args.models_dir))

    from eval_toy import ToySampler, load_work_models
    from toy_common import load_tokenizer

    unet, vae, text_encoder, _ = load_work_models(with_controlnet=False)
    own = ToySampler(unet, vae, text_encoder, load_tokenizer()).sample(args.prompt, args.seed, args.steps, args.cfg)
    difference = np.abs(engine_image.astype(int) - own.astype(int))
    print(json.dumps({
        "prompt": args.prompt, "seed": args.seed,
        "engine": toy_metrics.analyse(engine_image).as_dict(), "eval_loop": toy_metrics.analyse(own).as_dict(),
        "max_abs_pixel_difference": int(difference.max()), "mean_abs_pixel_difference": float(difference.mean()),
    }, indent=2))
    if args.example:
        Path(args.example).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(engine_image).resize((256, 256), Image.NEAREST).save(args.example, optimize=True)


if __name__ == "__main__":
    main()
