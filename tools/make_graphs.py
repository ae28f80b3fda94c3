"""Write the default graphs in graphs/: for each workflow an API-format file NAME.json and a UI-format file
NAME.ui.json (the API prompt laid out for the graph editor by engine.workflow.api_to_ui).

All graphs use the bundled toy model (models/checkpoints/toy-shapes.safetensors: 64x64 images of coloured
shapes, prompts such as "a red circle on a white background"), its LoRA, ControlNet and upscale model, and the
images that tools/make_graph_inputs.py writes into input/. Node ids follow ComfyUI's default graph (3 KSampler,
4 checkpoint, 5 empty latent, 6/7 prompts, 8 decode, 9 save); extra nodes are numbered from 10.

Usage: .venv/bin/python tools/make_graphs.py [--out graphs] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

CHECKPOINT = "toy-shapes.safetensors"
LORA = "toy-outline.safetensors"
CONTROLNET = "toy-shape-control.safetensors"
UPSCALER = "toy-upscale-x2.safetensors"
SIZE = 64
STEPS = 20
CFG = 6.0
SAMPLER = "euler"
SCHEDULER = "normal"


def _node(class_type: str, title: str | None = None, **inputs) -> dict:
    entry: dict = {"class_type": class_type, "inputs": inputs}
    if title:
        entry["_meta"] = {"title": title}
    return entry


def _ksampler(seed: int, positive, negative, latent, model=("4", 0), denoise: float = 1.0, steps: int = STEPS,
              title: str | None = None) -> dict:
    return _node("KSampler", title, seed=seed, steps=steps, cfg=CFG, sampler_name=SAMPLER, scheduler=SCHEDULER,
                 denoise=denoise, model=list(model), positive=list(positive), negative=list(negative),
                 latent_image=list(latent))


def _base(prompt: str, seed: int, prefix: str, width: int = SIZE, height: int = SIZE) -> dict:
    """ComfyUI's default txt2img graph on the toy model."""
    return {
        "4": _node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT),
        "6": _node("CLIPTextEncode", "Positive prompt", text=prompt, clip=["4", 1]),
        "7": _node("CLIPTextEncode", "Negative prompt", text="", clip=["4", 1]),
        "5": _node("EmptyLatentImage", width=width, height=height, batch_size=1),
        "3": _ksampler(seed, ("6", 0), ("7", 0), ("5", 0)),
        "8": _node("VAEDecode", samples=["3", 0], vae=["4", 2]),
        "9": _node("SaveImage", filename_prefix=prefix, images=["8", 0]),
    }


def txt2img() -> dict:
    return _base("a red circle on a white background", 7, "txt2img")


def img2img() -> dict:
    graph = _base("a red circle on a white background", 7, "img2img")
    del graph["5"]
    graph["10"] = _node("LoadImage", "Init image", image="toy-init.png")
    graph["11"] = _node("VAEEncode", pixels=["10", 0], vae=["4", 2])
    graph["3"] = _ksampler(7, ("6", 0), ("7", 0), ("11", 0), denoise=0.75)
    return graph


def inpaint() -> dict:
    """Repaint the masked region (the blue square) from noise while the rest of the latent is kept."""
    graph = _base("a yellow circle on a white background at the left", 7, "inpaint")
    del graph["5"]
    graph["10"] = _node("LoadImage", "Init image", image="toy-init.png")
    graph["11"] = _node("LoadImageMask", "Inpaint mask (white = repaint)", image="toy-inpaint-mask.png",
                        channel="red")
    graph["12"] = _node("VAEEncode", pixels=["10", 0], vae=["4", 2])
    graph["13"] = _node("SetLatentNoiseMask", samples=["12", 0], mask=["11", 0])
    graph["3"] = _ksampler(7, ("6", 0), ("7", 0), ("13", 0), denoise=1.0)
    return graph


def outpaint() -> dict:
    """Extend the init image 32 px to the right (96x64)."""
    graph = _base("a blue square on a white background", 7, "outpaint")
    del graph["5"]
    graph["10"] = _node("LoadImage", "Init image", image="toy-init.png")
    graph["11"] = _node("ImagePadForOutpaint", left=0, top=0, right=32, bottom=0, feathering=8, image=["10", 0])
    graph["12"] = _node("VAEEncodeForInpaint", pixels=["11", 0], vae=["4", 2], mask=["11", 1], grow_mask_by=6)
    graph["3"] = _ksampler(7, ("6", 0), ("7", 0), ("12", 0), denoise=1.0)
    return graph


def hires_fix() -> dict:
    """First pass at the model's 64x64, latent upscale to 128x128, second pass at denoise 0.5."""
    graph = _base("a green triangle on a white background", 7, "hires-fix")
    graph["3"]["_meta"] = {"title": "KSampler (first pass)"}
    graph["10"] = _node("LatentUpscale", upscale_method="bilinear", width=2 * SIZE, height=2 * SIZE,
                        crop="disabled", samples=["3", 0])
    graph["11"] = _ksampler(7, ("6", 0), ("7", 0), ("10", 0), denoise=0.5, title="KSampler (hires pass)")
    graph["8"] = _node("VAEDecode", samples=["11", 0], vae=["4", 2])
    return graph


def controlnet() -> dict:
    """The control image (a shape mask) decides the shape and where it goes; the prompt gives the colours."""
    graph = _base("a green triangle on a black background", 7, "controlnet")
    graph["10"] = _node("ControlNetLoader", control_net_name=CONTROLNET)
    graph["11"] = _node("LoadImage", "Control image (shape mask)", image="toy-control.png")
    graph["12"] = _node("ControlNetApplyAdvanced", strength=1.0, start_percent=0.0, end_percent=1.0,
                        positive=["6", 0], negative=["7", 0], control_net=["10", 0], image=["11", 0])
    graph["3"] = _ksampler(7, ("12", 0), ("12", 1), ("5", 0))
    return graph


def lora() -> dict:
    """The toy-outline style LoRA: outlined instead of filled shapes."""
    graph = _base("a yellow circle on a blue background", 7, "lora")
    graph["10"] = _node("LoraLoader", lora_name=LORA, strength_model=1.0, strength_clip=1.0, model=["4", 0],
                        clip=["4", 1])
    graph["6"]["inputs"]["clip"] = ["10", 1]
    graph["7"]["inputs"]["clip"] = ["10", 1]
    graph["3"] = _ksampler(7, ("6", 0), ("7", 0), ("5", 0), model=("10", 0))
    return graph


def area_composition() -> dict:
    """Two prompts, each on its own 64x64 half of a 128x64 image: a red circle left, a blue square right."""
    graph = _base("a red circle on a white background", 7, "area-composition", width=2 * SIZE, height=SIZE)
    graph["6"]["_meta"] = {"title": "Prompt (left half)"}
    graph["10"] = _node("ConditioningSetArea", "Area: left half", width=SIZE, height=SIZE, x=0, y=0, strength=1.0,
                        conditioning=["6", 0])
    graph["11"] = _node("CLIPTextEncode", "Prompt (right half)", text="a blue square on a white background",
                        clip=["4", 1])
    graph["12"] = _node("ConditioningSetArea", "Area: right half", width=SIZE, height=SIZE, x=SIZE, y=0,
                        strength=1.0, conditioning=["11", 0])
    graph["13"] = _node("ConditioningCombine", conditioning_1=["10", 0], conditioning_2=["12", 0])
    # The negative gets the same two areas: the toy model only ever saw 64x64 images, and its unconditional
    # prediction on the whole 128x64 canvas (which ComfyUI's maths mixes into each half) washes the colours out.
    graph["14"] = _node("ConditioningSetArea", "Negative: left half", width=SIZE, height=SIZE, x=0, y=0,
                        strength=1.0, conditioning=["7", 0])
    graph["15"] = _node("ConditioningSetArea", "Negative: right half", width=SIZE, height=SIZE, x=SIZE, y=0,
                        strength=1.0, conditioning=["7", 0])
    graph["16"] = _node("ConditioningCombine", conditioning_1=["14", 0], conditioning_2=["15", 0])
    graph["3"] = _ksampler(7, ("13", 0), ("16", 0), ("5", 0))
    return graph


def freeu_sag() -> dict:
    """Two model patches chained: FreeU re-weights the UNet's decoder features, then Self-Attention Guidance
    blurs what the middle block attends to most and steers away from the blurred prediction. 96x96: at 64x64
    the toy UNet's middle block sees a single token, where SAG has nothing to blur."""
    graph = _base("a blue square on a white background", 7, "freeu-sag", width=SIZE * 3 // 2, height=SIZE * 3 // 2)
    graph["10"] = _node("FreeU", b1=1.1, b2=1.2, s1=0.9, s2=0.2, model=["4", 0])
    graph["11"] = _node("SelfAttentionGuidance", scale=0.5, blur_sigma=2.0, model=["10", 0])
    graph["3"] = _ksampler(7, ("6", 0), ("7", 0), ("5", 0), model=("11", 0))
    return graph


def esrgan_upscale() -> dict:
    """The decoded 64x64 image upscaled to 128x128 by the toy upscale model (a 2x Real-ESRGAN compact network,
    models/upscale_models), tile by tile as ComfyUI does."""
    graph = _base("a yellow triangle on a black background", 7, "esrgan-upscale")
    graph["10"] = _node("UpscaleModelLoader", model_name=UPSCALER)
    graph["11"] = _node("ImageUpscaleWithModel", upscale_model=["10", 0], image=["8", 0])
    graph["9"]["inputs"]["images"] = ["11", 0]
    return graph

GRAPHS = {
    "txt2img": txt2img,
    "img2img": img2img,
    "inpaint": inpaint,
    "outpaint": outpaint,
    "hires-fix": hires_fix,
    "controlnet": controlnet,
    "lora": lora,
    "area-composition": area_composition,
    "esrgan-upscale": esrgan_upscale,
    "freeu-sag": freeu_sag,
}


def _ordered(graph: dict) -> dict:
    """Node ids in numeric order, so the files read top to bottom like ComfyUI's exports."""
    return {node_id: graph[node_id] for node_id in sorted(graph, key=int)}


def write_graphs(folder: Path, names: list[str] | None = None) -> list[Path]:
    sys.path.insert(0, str(REPO_ROOT))
    from latentloom.engine.workflow import api_to_ui
    from latentloom.nodes import create_engine

    catalogue = create_engine(models_dir=REPO_ROOT / "models", entry_points=False).catalogue()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in GRAPHS.items():
        if names and name not in names:
            continue
        prompt = _ordered(build())
        workflow = api_to_ui(copy.deepcopy(prompt), catalogue)
        if workflow.get("extra", {}).get("conversion_warnings"):
            raise RuntimeError(f"{name}: {workflow['extra']['conversion_warnings']}")
        for path, document in ((folder / f"{name}.json", prompt), (folder / f"{name}.ui.json", workflow)):
            path.write_text(json.dumps(document, indent=2) + "\n")
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "graphs"))
    parser.add_argument("--only", nargs="+", choices=sorted(GRAPHS), help="write only these graphs")
    args = parser.parse_args()
    for path in write_graphs(Path(args.out), args.only):
        print(path)


if __name__ == "__main__":
    main()
