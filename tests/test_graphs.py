"""The default graphs in graphs/: every workflow has an API file and a UI file that say the same thing, both
validate, and both run with `latentloom run` on the shipped toy model (models/) and its input images (input/),
writing a PNG of the expected size. Steps are cut to 2 per sampler (`--set`) to keep this file fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentloom.engine.workflow import ui_to_api
from latentloom.nodes import create_engine
from latentloom.server.cli import main

pytestmark = [pytest.mark.toy, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
GRAPHS = REPO / "graphs"
# TOY_MODELS_DIR (as tools/pack_toy.py) checks a retrained model elsewhere before it replaces the shipped one.
MODELS = Path(os.environ.get("TOY_MODELS_DIR", REPO / "models"))
INPUT = REPO / "input"
sys.path.insert(0, str(REPO / "tools"))

# Workflow name -> size (width, height) of the image it writes.
EXPECTED = {
    "txt2img": (64, 64), "img2img": (64, 64), "inpaint": (64, 64), "outpaint": (96, 64),
    "hires-fix": (128, 128), "controlnet": (64, 64), "lora": (64, 64), "area-composition": (128, 64),
    "freeu-sag": (96, 96),
    "esrgan-upscale": (128, 128),
}
SHIPPED = {
    "checkpoints": "toy-shapes.safetensors", "loras": "toy-outline.safetensors",
    "controlnet": "toy-shape-control.safetensors", "upscale_models": "toy-upscale-x2.safetensors",
}
FILES = [f"{name}{suffix}" for name in EXPECTED for suffix in (".json", ".ui.json")]
# Graphs that train a LoRA: their files, layout and validation are checked here; their run (and the style it learns)
# is tests/test_training.py's.
TRAINING_GRAPHS = ("lora-training",)
TRAINING_FILES = [f"{name}{suffix}" for name in TRAINING_GRAPHS for suffix in (".json", ".ui.json")]

missing_models = [f"{folder}/{name}" for folder, name in SHIPPED.items() if not (MODELS / folder / name).is_file()]
needs_models = pytest.mark.skipif(bool(missing_models), reason=f"toy model files not shipped: {missing_models}")


def api_prompt(name: str) -> dict:
    return json.loads((GRAPHS / f"{name}.json").read_text())


def bare(prompt: dict) -> dict:
    """class_type and inputs only (titles live in _meta in API files and in the node in UI files)."""
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


@pytest.fixture(scope="module")
def catalogue() -> dict:
    return create_engine(models_dir=MODELS, entry_points=False).catalogue()


def test_graphs_folder_holds_each_workflow_in_both_formats():
    assert sorted(p.name for p in GRAPHS.glob("*.json")) == sorted(FILES + TRAINING_FILES)


def test_editor_default_graph_is_txt2img():
    from latentloom.server.frontend import default_graph_file

    assert default_graph_file(GRAPHS) == GRAPHS / "txt2img.json"


@pytest.mark.parametrize("name", [*EXPECTED, *TRAINING_GRAPHS])
def test_ui_file_is_the_api_file_laid_out(name, catalogue):
    ui = json.loads((GRAPHS / f"{name}.ui.json").read_text())
    assert isinstance(ui.get("nodes"), list) and ui.get("links"), "not a UI-format workflow"
    assert not ui.get("extra", {}).get("conversion_warnings")
    assert bare(ui_to_api(ui, catalogue)) == bare(api_prompt(name))
    # A readable layout: no two nodes overlap, and data flows left to right along every link.
    boxes = {node["id"]: (*node["pos"], *node["size"]) for node in ui["nodes"]}
    ids = sorted(boxes)
    for index, first in enumerate(ids):
        x0, y0, w0, h0 = boxes[first]
        for second in ids[index + 1:]:
            x1, y1, w1, h1 = boxes[second]
            assert x0 + w0 <= x1 or x1 + w1 <= x0 or y0 + h0 <= y1 or y1 + h1 <= y0, (name, first, second)
    for _, source, _, target, _, _ in ui["links"]:
        assert boxes[source][0] < boxes[target][0], (name, source, target)


def test_input_images_are_the_generated_ones():
    from make_graph_inputs import control_image, init_image, inpaint_mask

    expected = {"toy-init.png": init_image(), "toy-inpaint-mask.png": inpaint_mask(),
                "toy-control.png": control_image()}
    for file_name, pixels in expected.items():
        assert np.array_equal(np.asarray(Image.open(INPUT / file_name)), pixels), file_name
    referenced = {node["inputs"]["image"] for name in EXPECTED for node in api_prompt(name).values()
                  if node["class_type"] in ("LoadImage", "LoadImageMask")}
    assert referenced == set(expected)


def run_cli(args: list[str], capsys) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


@pytest.mark.parametrize("file_name", FILES + TRAINING_FILES)
def test_graph_validates(file_name, capsys):
    code, report = run_cli(["validate", str(GRAPHS / file_name), "--json", "--models-dir", str(MODELS)], capsys)
    if missing_models:  # without the model files the combos cannot match; the rest must still be fine
        errors = [e for entry in report.get("node_errors", {}).values() for e in entry["errors"]]
        assert all(e["type"] == "value_not_in_list" for e in errors), errors
        return
    assert code == 0, report


@needs_models
@pytest.mark.parametrize("file_name", FILES)
def test_graph_runs_and_writes_a_png(file_name, tmp_path, capsys):
    name = file_name.removesuffix(".ui.json").removesuffix(".json")
    samplers = [node_id for node_id, node in api_prompt(name).items() if node["class_type"] == "KSampler"]
    overrides = [arg for node_id in samplers for arg in ("--set", f"{node_id}.steps=2")]
    code, report = run_cli(
        ["run", str(GRAPHS / file_name), "--json", "--models-dir", str(MODELS), "--input-dir", str(INPUT),
         "--output-dir", str(tmp_path / "out"), "--temp-dir", str(tmp_path / "temp"),
         "--custom-nodes", str(tmp_path / "no_custom_nodes"), *overrides], capsys)
    assert code == 0 and report["status"] == "success", report
    (output,) = report["outputs"]
    image = Image.open(output)
    assert image.format == "PNG" and image.size == EXPECTED[name]
    pixels = np.asarray(image.convert("RGB")).astype(float)
    assert pixels.std() > 1.0, "a flat image"
    # The PNG carries the prompt it was made from, and the editor workflow when run from the UI file.
    assert json.loads(image.text["prompt"])[samplers[0]]["inputs"]["steps"] == 2
    assert ("workflow" in image.text) == file_name.endswith(".ui.json")
