"""A real open-source pack, installed from PyPI (comfyui-ib-customnodes, in the test extra), loaded unchanged: its
LoadImageFromPath (folder_paths' annotated paths, IS_CHANGED, VALIDATE_INPUTS) gives the same pixels and mask as
our LoadImage, and a missing file is refused at validation, naming the node."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentloom.nodes import create_engine

SPEC = importlib.util.find_spec("ComfyUI_Ib_CustomNodes")
CAPTURE = Path(__file__).resolve().parent / "custom_node_packs_compat" / "helpers.py"
pytestmark = pytest.mark.skipif(SPEC is None or SPEC.origin is None,
                                reason="comfyui-ib-customnodes is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pypi_pack")
    packs = root / "custom_nodes"
    packs.mkdir()
    # A custom_nodes folder holding the installed pack, as a user who links it in would have it.
    assert SPEC is not None and SPEC.origin is not None
    (packs / "ComfyUI_Ib_CustomNodes").symlink_to(Path(SPEC.origin).parent, target_is_directory=True)
    (packs / "capture.py").symlink_to(CAPTURE)  # SaveCapture: torch.save of what flowed through the graph
    (root / "input").mkdir()
    picture = Image.new("RGBA", (24, 16), (200, 40, 10, 255))
    picture.putpixel((3, 5), (0, 0, 255, 60))
    picture.save(root / "input" / "dot.png")
    return create_engine(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                         temp_dir=root / "temp", custom_nodes_dir=packs, entry_points=False)


def test_every_node_of_the_pack_is_registered_with_its_display_name(engine):
    catalogue = engine.catalogue()
    names = {"LoadImageFromPath": "Load Image From Path", "PILToImage": "PIL To Image",
             "PILToMask": "PIL To Mask", "ImageToPIL": "Image To PIL"}
    assert {name: catalogue[name]["display_name"] for name in names} == names
    assert catalogue["LoadImageFromPath"]["python_module"] == "custom_nodes.ComfyUI_Ib_CustomNodes"
    assert not engine.registry.load_errors


def test_load_image_from_path_gives_our_load_image_pixels_and_mask(engine, tmp_path):
    graph = {"pack": {"class_type": "LoadImageFromPath", "inputs": {"image": "dot.png [input]"}},
             "ours": {"class_type": "LoadImage", "inputs": {"image": "dot.png"}}}
    for node in ("pack", "ours"):
        for slot in (0, 1):
            graph[f"{node}_{slot}"] = {"class_type": "SaveCapture",
                                       "inputs": {"value": [node, slot], "path": str(tmp_path / f"{node}_{slot}")}}
    result = engine.run(graph)
    assert result.status == "success", (result.error, result.node_errors)
    captured = {name: torch.load(tmp_path / name) for name in ("pack_0", "pack_1", "ours_0", "ours_1")}
    assert captured["pack_0"].shape == (1, 16, 24, 3) and torch.equal(captured["pack_0"], captured["ours_0"])
    # The mask is 1 - alpha in both; the pack returns [H, W], LoadImage [1, H, W].
    assert torch.equal(captured["pack_1"], captured["ours_1"].reshape(16, 24))
    assert abs(captured["pack_1"][5, 3].item() - (1 - 60 / 255)) < 1e-6 and captured["pack_1"][0, 0] == 0


def test_a_missing_file_is_refused_at_validation(engine):
    result = engine.run({"pack": {"class_type": "LoadImageFromPath", "inputs": {"image": "absent.png [input]"}},
                         "show": {"class_type": "PreviewAny", "inputs": {"source": ["pack", 0]}}})
    assert result.status == "invalid"
    assert "pack" in result.node_errors
    assert "absent.png" in str(result.node_errors["pack"])
