"""ComfyUI V3 dynamic inputs (io.DynamicCombo, io.Autogrow) and io.BoundingBox, from
tests/custom_node_packs/v3_dynamic: their /object_info form (what the editor builds widgets from), the dotted
prompt keys they arrive as, the dicts `execute` gets, and validation; through the engine and the CLI."""

from __future__ import annotations

import json

import pytest

from latentloom.server.cli import main
from tests.test_custom_nodes import PACKS, engine_for, make_root, preview, texts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("dynamic"))


@pytest.fixture(scope="module")
def engine(root):
    return engine_for(root)


def shown_pixels(result, node: str, root) -> list[tuple[tuple[int, int], tuple[int, int, int]]]:
    """(size, top-left pixel) of each image a PreviewImage node wrote (ComfyUI truncates: 0.5 is 127)."""
    from PIL import Image

    shown = []
    for entry in result.outputs[node]["images"]:
        with Image.open(root / entry["type"] / entry["subfolder"] / entry["filename"]) as image:
            shown.append((image.size, image.convert("RGB").getpixel((0, 0))))
    return shown


def solid() -> dict:
    return {"class_type": "PackSolid", "inputs": {"width": 4, "height": 3, "level": 0.5}}


def errors_of(result, node: str = "1") -> list[tuple[str, str]]:
    assert result.status == "invalid", result.status
    return [(error["type"], error["details"]) for error in result.node_errors[node]["errors"]]


def test_catalogue_lists_dynamic_inputs_as_comfyui_does(engine):
    catalogue = engine.catalogue()
    shaped = catalogue["V3ShapedSolid"]
    assert list(shaped["input"]["required"]) == shaped["input_order"]["required"] == ["shape", "batch"]
    kind, options = shaped["input"]["required"]["shape"]
    assert kind == "COMFY_DYNAMICCOMBO_V3" and options["tooltip"] == "square or rectangle"
    square, rect = options["options"]
    assert square == {"key": "square", "inputs": {"required": {
        "side": ["INT", {"default": 2, "min": 1, "max": 16}],
        "level": ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0}]}}}
    assert rect["key"] == "rect" and list(rect["inputs"]["required"]) == ["width", "height", "level"]
    assert rect["inputs"]["optional"] == {"note": ["STRING", {"multiline": False}]}
    assert "optional" not in shaped["input"]  # the options' inputs are not listed as inputs of their own
    stack = catalogue["V3StackImages"]["input"]
    assert stack == {"required": {"images": ["COMFY_AUTOGROW_V3", {"template": {
        "input": {"required": {"image": ["IMAGE", {}]}}, "prefix": "image", "min": 1, "max": 4}}]}}
    crop = catalogue["V3CropBox"]
    assert crop["input"]["required"]["box"] == ["BOUNDING_BOX", {
        "default": {"x": 1, "y": 0, "width": 2, "height": 2}, "socketless": True}]
    assert crop["output"] == ["IMAGE", "BOUNDING_BOX"]


def test_dynamic_inputs_arrive_as_comfyui_passes_them(engine, root):
    graph = {"1": {"class_type": "V3ShapedSolid", "inputs": {
                 "shape": "rect", "shape.width": 5, "shape.height": 3, "shape.level": 0.5, "batch": 2}},
             "2": {"class_type": "V3ShapedSolid", "inputs": {
                 "shape": "square", "shape.side": 3, "shape.level": 1.0, "batch": 1,
                 "shape.width": 9}},  # an input of the option not selected: dropped, as ComfyUI does
             "3": {"class_type": "V3StackImages", "inputs": {
                 "images.image0": ["1", 0], "images.image2": ["4", 0]}},
             "4": {"class_type": "V3ShapedSolid", "inputs": {
                 "shape": "rect", "shape.width": 5, "shape.height": 3, "shape.level": 0.25, "batch": 1}},
             "5": {"class_type": "V3CropBox", "inputs": {"image": ["4", 0],
                                                          "box": {"x": 2, "y": 1, "width": 3, "height": 2}}},
             "6": preview("1", 1), "7": preview("2", 1), "8": preview("3", 1),
             "9": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
             "10": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
             "11": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    result = engine.run(graph)
    assert result.status == "success", (result.error, result.node_errors)
    # DynamicCombo: one dict, the selected key under the combo's id, every input of that option (None if unset).
    assert texts(result)["6"] == ["height=3, level=0.5, note=None, shape=rect, width=5"]
    assert texts(result)["7"] == ["level=1.0, shape=square, side=3"]
    # Autogrow: the slots given, by slot name.
    assert texts(result)["8"] == ["image0,image2"]
    assert shown_pixels(result, "9", root) == [((5, 3), (127, 127, 127))] * 2 + [((5, 3), (63, 63, 63))]
    assert shown_pixels(result, "10", root) == [((3, 2), (63, 63, 63))]  # the BoundingBox's crop
    assert shown_pixels(result, "11", root) == [((3, 3), (255, 255, 255))]


def test_dynamic_inputs_are_validated(engine):
    base = {"shape": "rect", "shape.width": 2, "shape.height": 2, "shape.level": 0.5, "batch": 1}

    def run_shaped(**changes):
        inputs = {key: value for key, value in {**base, **changes}.items() if value is not None}
        return engine.run({"1": {"class_type": "V3ShapedSolid", "inputs": inputs}, "2": preview("1", 1)})

    unknown = errors_of(run_shaped(shape="circle"))
    assert unknown == [("value_not_in_list", "shape: 'circle' not in ['square', 'rect']")]
    assert errors_of(run_shaped(**{"shape.height": None})) == [
        ("custom_validation_failed", "shape.height - Required input is missing")]
    assert errors_of(run_shaped(**{"shape.width": 17}))[0][0] == "value_bigger_than_max"
    # `level` is declared by both options, with different ranges: the selected option's range counts.
    assert errors_of(run_shaped(**{"shape.level": 0.75})) == [
        ("custom_validation_failed", "shape.level - Value 0.75 bigger than max of 0.5")]
    square = run_shaped(shape="square", **{"shape.side": 1, "shape.level": 0.75, "shape.width": None,
                                           "shape.height": None})
    assert square.status == "success", square.node_errors
    assert errors_of(run_shaped(shape=None)) == [("required_input_missing", "shape")]

    no_images = engine.run({"1": {"class_type": "V3StackImages", "inputs": {"images.image1": ["2", 0]}},
                            "2": solid(), "3": preview("1", 1)})
    assert errors_of(no_images) == [("required_input_missing", "images.image0")]
    past_max = engine.run({"1": {"class_type": "V3StackImages", "inputs": {"images.image0": ["2", 0],
                                                                            "images.image4": ["2", 0]}},
                           "2": solid(), "3": preview("1", 1)})
    assert texts(past_max)["3"] == ["image0"]  # ComfyUI's max: image4 is not one of the slots

    for box, reason in (({"x": 0, "y": 0, "width": 2}, "must be an object with x, y, width and height"),
                        ({"x": 0, "y": 0, "width": "2", "height": 2}, "must be numbers"),
                        ({"x": -1, "y": 0, "width": 2, "height": 2}, "x and y must be 0 or more")):
        bad = engine.run({"1": {"class_type": "V3CropBox", "inputs": {"image": ["2", 0], "box": box}},
                          "2": solid(), "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
        ((kind, details),) = errors_of(bad)
        assert kind == "custom_validation_failed" and details.startswith("box - ") and reason in details


def test_validate_inputs_gets_a_dynamic_input_as_its_dict(engine):
    def pick(inputs):
        return engine.run({"1": {"class_type": "V3PickMode", "inputs": inputs}, "2": preview("1")})

    assert texts(pick({"mode": "fixed", "mode.value": 7}))["2"] == ["7"]
    assert errors_of(pick({"mode": "fixed", "mode.value": 13})) == [("custom_validation_failed", "13 is unlucky")]
    # validate_inputs names `mode`, not its parts: the engine still checks their ranges.
    assert errors_of(pick({"mode": "fixed", "mode.value": 101}))[0][0] == "value_bigger_than_max"
    assert texts(pick({"mode": "off"}))["2"] == ["0"]


def test_a_subclass_of_a_comfyui_node_registers_and_fails_clearly_when_run(engine):
    assert engine.catalogue()["V3GuideSubclass"]["input"] == {"required": {"image": ["IMAGE"]}}
    result = engine.run({"1": solid(), "2": {"class_type": "V3GuideSubclass", "inputs": {"image": ["1", 0]}},
                         "3": preview("2")})
    assert result.status == "error" and result.error["node_type"] == "V3GuideSubclass"
    assert result.error["exception_type"].endswith(".MissingInternals")
    assert result.error["exception_message"].startswith("comfy_extras.nodes_lt.LTXVAddGuide.encode is part of "
                                                        "ComfyUI's model internals")


def test_cli_runs_a_workflow_with_dynamic_inputs(tmp_path, capsys):
    work = make_root(tmp_path)
    graph = {"1": {"class_type": "V3ShapedSolid", "inputs": {"shape": "square", "shape.side": 2,
                                                              "shape.level": 0.5, "batch": 1}},
             "2": {"class_type": "V3StackImages", "inputs": {"images.image0": ["1", 0], "images.image1": ["1", 0]}},
             "3": {"class_type": "V3CropBox", "inputs": {"image": ["2", 0],
                                                          "box": {"x": 0, "y": 0, "width": 1, "height": 2}}},
             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "dyn"}}}
    (work / "g.json").write_text(json.dumps(graph))
    code = main(["run", str(work / "g.json"), "--json", "--custom-nodes", str(PACKS), "--models-dir",
                 str(work / "models"), "--input-dir", str(work / "input"), "--output-dir", str(work / "output"),
                 "--temp-dir", str(work / "temp")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    from PIL import Image

    saved = sorted((work / "output").glob("dyn_*.png"))
    assert len(saved) == 2  # the two stacked images, each cropped to 1x2
    for path in saved:
        with Image.open(path) as image:
            assert image.size == (1, 2) and image.getpixel((0, 1))[:3] == (127, 127, 127)
