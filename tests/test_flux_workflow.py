"""ComfyUI-style Flux dev and schnell workflows (API format) through `latentloom run` on tiny single files: the
PNG the CLI saves equals the image of the same nodes run in-process."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from test_flux_sampling import PROMPT, FluxFiles  # noqa: E402

from latentloom.nodes.conditioning import CLIPTextEncode  # noqa: E402
from latentloom.nodes.model_families import EmptySD3LatentImage, FluxGuidance, ModelSamplingFlux  # noqa: E402
from latentloom.nodes.sampling import KSampler  # noqa: E402
from latentloom.nodes.vae_nodes import VAEDecode  # noqa: E402
from latentloom.server.cli import main  # noqa: E402

SIZE = 64  # pixels for EmptySD3LatentImage (latent 8×8; the tiny VAE decodes it to 16×16)
STEPS = 3


def workflow(unet_name: str, guidance: float, seed: int) -> dict:
    """ComfyUI's Flux text-to-image template, shrunk: separate loaders, FluxGuidance, ModelSamplingFlux."""
    return {
        "10": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                          "clip_name2": "clip_l.safetensors", "type": "flux"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["11", 0]}},
        "33": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 0]}},
        "26": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": guidance}},
        "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "30": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["10", 0], "max_shift": 1.15,
                                                             "base_shift": 0.5, "width": SIZE, "height": SIZE}},
        "31": {"class_type": "KSampler", "inputs": {"model": ["30", 0], "seed": seed, "steps": STEPS, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["26", 0], "negative": ["33", 0],
                                                    "latent_image": ["27", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["31", 0], "vae": ["12", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux"}},
    }


def in_process_image(files: FluxFiles, guidance: float, seed: int) -> np.ndarray:
    ctx = files.ctx
    model, clip, vae = files.load()
    (positive,) = CLIPTextEncode.model_construct(text=PROMPT, clip=clip).run(ctx)
    (negative,) = CLIPTextEncode.model_construct(text="", clip=clip).run(ctx)
    (positive,) = FluxGuidance.model_construct(conditioning=positive, guidance=guidance).run(ctx)
    (latent,) = EmptySD3LatentImage.model_construct(width=SIZE, height=SIZE, batch_size=1).run(ctx)
    (model,) = ModelSamplingFlux.model_construct(model=model, max_shift=1.15, base_shift=0.5, width=SIZE,
                                                 height=SIZE).run(ctx)
    (samples,) = KSampler.model_construct(model=model, seed=seed, steps=STEPS, cfg=1.0, sampler_name="euler",
                                          scheduler="simple", positive=positive, negative=negative,
                                          latent_image=latent, denoise=1.0).run(ctx)
    (image,) = VAEDecode.model_construct(samples=samples, vae=vae).run(ctx)
    return np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8)  # SaveImage's conversion


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_workflow_through_the_cli_matches_the_nodes_in_process(tmp_path, capsys, guidance):
    files = FluxFiles(tmp_path, guidance=guidance, seed=40)
    document = tmp_path / "flux.json"
    document.write_text(json.dumps(workflow(files.unet_name, 3.5, seed=5)))
    output = tmp_path / "output"
    code = main(["run", str(document), "--models-dir", str(tmp_path / "models"), "--output-dir", str(output),
                 "--input-dir", str(tmp_path / "input"), "--temp-dir", str(tmp_path / "temp"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    (png,) = summary["outputs"]
    assert Path(png).parent == output
    with Image.open(png) as saved:
        from_cli = np.asarray(saved.convert("RGB"))
    expected = in_process_image(files, 3.5, seed=5)
    assert from_cli.shape == expected.shape == (16, 16, 3) and from_cli.std() > 1.0
    assert np.array_equal(from_cli, expected)
