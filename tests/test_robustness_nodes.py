"""Issue 18 on the node side, through the real engine: every loader given an unreadable file, and every LoRA loader
failure (with the bundled toy model), names the node, the input and the file; credentials in extra_data never reach
a saved PNG's metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from starlette.testclient import TestClient

from latentloom.nodes import create_engine
from latentloom.server.app import create_app
from latentloom.server.state import ServerConfig
from tests.server_support import wait_for

REPO = Path(__file__).resolve().parents[1]
TOY_LORA = REPO / "models" / "loras" / "toy-outline.safetensors"
SECRET = "sk-never-in-a-png-42"


def lora_graph(lora_name: str) -> dict:
    graph = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    graph["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": lora_name,
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    graph["3"]["inputs"].update(model=["10", 0], steps=1)
    graph["6"]["inputs"]["clip"] = graph["7"]["inputs"]["clip"] = ["10", 1]
    return graph


def broken_loras(folder: Path) -> dict[str, str]:
    """file name -> what is wrong with it."""
    tensors = load_file(str(TOY_LORA))
    alpha_key = next(k for k in tensors if k.endswith(".alpha"))
    up_key = next(k for k in tensors if k.endswith("lora_up.weight"))
    (folder / "corrupt-header.safetensors").write_bytes(b"\xff" * 8 + b"{not a header" + bytes(64))
    save_file({**tensors, alpha_key: torch.ones(35)}, str(folder / "alpha-35.safetensors"))
    save_file({**tensors, up_key: torch.ones(3, 5)}, str(folder / "wrong-shape.safetensors"))
    save_file({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 8)},
              str(folder / "other-family.safetensors"))
    return {"corrupt-header.safetensors": "not a readable weights file",
            "alpha-35.safetensors": "holds 35 values",
            "wrong-shape.safetensors": "does not fit",
            "other-family.safetensors": "none of its"}


@pytest.fixture(scope="module")
def toy_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust-nodes")
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "loras").mkdir()
    shutil.copy(REPO / "models" / "checkpoints" / "toy-shapes.safetensors", models / "checkpoints")
    problems = broken_loras(models / "loras")
    engine = create_engine(models_dir=models, input_dir=root / "input", output_dir=root / "output",
                           temp_dir=root / "temp")
    return engine, problems, root


@pytest.mark.toy
@pytest.mark.parametrize("lora_name", ["corrupt-header.safetensors", "alpha-35.safetensors",
                                       "wrong-shape.safetensors", "other-family.safetensors"])
def test_lora_failures_name_node_input_and_file(toy_engine, lora_name):
    engine, problems, _ = toy_engine
    result = engine.run(lora_graph(lora_name))
    assert result.status == "error", result
    error = result.error
    message = error["exception_message"]
    assert error["node_id"] == "10" and error["node_type"] == "LoraLoader", error
    assert "lora_name" in message and lora_name in message and problems[lora_name] in message, message
    assert "Traceback" not in message and "SafetensorError" not in error["exception_type"]


@pytest.mark.toy
def test_credentials_never_reach_the_saved_png(toy_engine):
    engine, _, root = toy_engine
    graph = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    graph["3"]["inputs"]["steps"] = 1
    graph["9"]["inputs"]["filename_prefix"] = "secretless"
    extra_data = {"api_key_comfy_org": SECRET,
                  "extra_pnginfo": {"workflow": {"nodes": [], "links": [], "api_key_comfy_org": SECRET},
                                    "notes": {"bearer": SECRET, "author": "me"}}}
    app = create_app(engine, ServerConfig(user_dir=root / "user", allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        prompt_id = client.post("/prompt", json={"prompt": graph, "extra_data": extra_data}).json()["prompt_id"]
        entry = wait_for(lambda: client.get(f"/history/{prompt_id}").json(), timeout=120)[prompt_id]
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert SECRET not in json.dumps(entry)
    (image,) = entry["outputs"]["9"]["images"]
    with Image.open(root / "output" / image["filename"]) as png:
        chunks = dict(png.text)
    assert json.loads(chunks["notes"]) == {"author": "me"} and "workflow" in chunks and "prompt" in chunks
    assert all(SECRET not in text for text in chunks.values())


# Every loader of a single model file, given one whose safetensors header is garbage: (node, input, folder, inputs).
CORRUPT = b"\xff" * 8 + b"{not a header" + bytes(64)
SINGLE_FILE_LOADERS = [
    ("CheckpointLoaderSimple", "ckpt_name", "checkpoints", {}),
    ("unCLIPCheckpointLoader", "ckpt_name", "checkpoints", {}),
    ("VAELoader", "vae_name", "vae", {}),
    ("UNETLoader", "unet_name", "unet", {"weight_dtype": "default"}),
    ("CLIPLoader", "clip_name", "clip", {"type": "stable_diffusion"}),
    ("ControlNetLoader", "control_net_name", "controlnet", {}),
    ("CLIPVisionLoader", "clip_name", "clip_vision", {}),
    ("StyleModelLoader", "style_model_name", "style_models", {}),
    ("GLIGENLoader", "gligen_name", "gligen", {}),
    ("UpscaleModelLoader", "model_name", "upscale_models", {}),
    ("PhotoMakerLoader", "photomaker_model_name", "photomaker", {}),
]


@pytest.fixture(scope="module")
def corrupt_files_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt-files")
    for _, _, folder, _ in SINGLE_FILE_LOADERS:
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
        (root / "models" / folder / "garbage.safetensors").write_bytes(CORRUPT)
    return create_engine(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                         temp_dir=root / "temp")


@pytest.mark.parametrize("class_type,input_name,folder,inputs", SINGLE_FILE_LOADERS,
                         ids=[case[0] for case in SINGLE_FILE_LOADERS])
def test_unreadable_model_files_name_node_input_and_file(corrupt_files_engine, class_type, input_name, folder,
                                                         inputs):
    graph = {"1": {"class_type": class_type, "inputs": {input_name: "garbage.safetensors", **inputs}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    result = corrupt_files_engine.run(graph)
    assert result.status == "error", (result.status, result.node_errors)
    error = result.error
    assert error["node_id"] == "1" and error["node_type"] == class_type, error
    assert error["exception_message"].startswith(f"{class_type} (#1): input '{input_name}': garbage.safetensors: "
                                                 "not a readable weights file"), error["exception_message"]
