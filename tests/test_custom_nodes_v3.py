"""ComfyUI V3 custom nodes (comfy_api.latest: comfy_entrypoint, ComfyExtension, io.ComfyNode, io.Schema,
NodeOutput with ui) from tests/custom_node_packs/v3_nodes, through the engine and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from latentloom.server.cli import main
from tests.test_custom_nodes import PACKS, engine_for, make_root, preview, texts


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("v3packs"))


@pytest.fixture(scope="module")
def engine(root):
    return engine_for(root)


def test_v3_nodes_load_and_a_broken_schema_is_reported(engine):
    for name in ("V3Blend", "V3Describe", "V3Words", "V3ReadText", "V3LazyPick"):
        assert name in engine.registry
    error = engine.registry.load_errors[f"{PACKS / 'v3_nodes'}: V3Broken"]
    assert "ids must be unique across inputs and outputs, but same repeat" in error


def test_catalogue_entries_follow_the_schema(engine):
    catalogue = engine.catalogue()
    describe = catalogue["V3Describe"]
    assert (describe["display_name"], describe["category"], describe["output_node"]) == \
        ("Describe (V3)", "pack/v3", True)
    assert describe["description"] == "Repeats a text, shouting it if asked."
    assert describe["python_module"] == "custom_nodes.v3_nodes"
    required = describe["input"]["required"]
    assert required["text"] == ["STRING", {"default": "hi", "multiline": True}]
    assert required["count"] == ["INT", {"default": 2, "min": 1, "max": 10, "tooltip": "how many times"}]
    assert required["shout"] == ["BOOLEAN", {"default": False, "label_on": "loud", "label_off": "quiet"}]
    assert describe["input"]["optional"]["joiner"][0] == ["space", "dash"]
    assert describe["output_name"] == ["described"] and "unique_id" not in str(describe["input"])
    words = catalogue["V3Words"]
    assert words["output"] == ["STRING", "PACK_WORDS"] and words["output_is_list"] == [True, False]
    assert words["input"]["required"]["text"] == ["STRING", {"forceInput": True}]
    blend = catalogue["V3Blend"]
    assert blend["input"]["required"]["factor"][1]["display"] == "slider"
    assert blend["input"]["optional"]["mask"] == ["MASK"] and blend["output_name"] == ["blended", "MASK"]
    assert catalogue["V3LazyPick"]["input"]["required"]["first"] == ["FLOAT,INT", {"lazy": True, "forceInput": True}]


def test_v3_nodes_run_with_hidden_values_and_ui(engine, root):
    graph = {"1": {"class_type": "PackSolid", "inputs": {"width": 2, "height": 2, "level": 0.2}},
             "2": {"class_type": "PackSolid", "inputs": {"width": 2, "height": 2, "level": 0.6}},
             "3": {"class_type": "V3Blend", "inputs": {"image_a": ["1", 0], "image_b": ["2", 0], "factor": 0.25}},
             "4": {"class_type": "V3Describe", "inputs": {"text": "ho", "count": 3, "shout": True,
                                                          "joiner": "dash"}},
             "5": {"class_type": "V3Words", "inputs": {"text": ["4", 0]}},
             "6": preview("5", 1),
             "7": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
             "8": preview("5")}
    events = []
    result = engine.run(graph, listener=events.append)
    assert result.status == "success", result.error
    # ui.PreviewImage wrote the blend to the temp folder; the editor gets it in the node's "executed" message.
    shown = {event.node: event.output for event in events if event.type == "executed"}
    (saved,) = shown["3"]["images"]
    assert saved["type"] == "temp" and saved != result.outputs["7"]["images"][0]
    assert shown["3"]["animated"] == [False]
    from PIL import Image

    with Image.open(root / "temp" / saved["subfolder"] / saved["filename"]) as image:
        red, _, _ = image.getpixel((0, 0))
        assert image.size == (4, 4) and abs(red - 255 * (0.2 * 0.75 + 0.6 * 0.25)) <= 1
    assert texts(result)["4"] == ["HO-HO-HO #4"]             # hidden UNIQUE_ID through cls.hidden
    assert result.values["4"] == [["HO-HO-HO #4"]]
    assert texts(result)["8"] == ["HO-HO-HO", "#4"]         # an is_output_list output, one call per item
    assert texts(result)["6"] == [json.dumps({"words": ["HO-HO-HO", "#4"]})]


def test_validate_inputs_and_combo_choices(engine):
    unlucky = engine.run({"1": {"class_type": "V3Describe", "inputs": {"text": "a", "count": 7, "shout": False}}})
    assert unlucky.status == "invalid"
    error = unlucky.node_errors["1"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and "7 is unlucky" in error["details"]
    bad_choice = engine.run({"1": {"class_type": "V3Describe", "inputs": {"text": "a", "count": 1, "shout": False,
                                                                         "joiner": "comma"}}})
    assert bad_choice.node_errors["1"]["errors"][0]["type"] == "value_not_in_list"
    too_small = engine.run({"1": {"class_type": "V3Blend", "inputs": {"image_a": ["2", 0], "image_b": ["2", 0],
                                                                      "factor": 1.5}},
                            "2": {"class_type": "PackSolid", "inputs": {"width": 1, "height": 1, "level": 0.0}},
                            "3": preview("1")})
    assert too_small.node_errors["1"]["errors"][0]["type"] == "value_bigger_than_max"


def test_lazy_inputs_and_async_execute(engine):
    graph = {"1": {"class_type": "PackScale", "inputs": {"value": 1.5, "factor": 2}},
             "2": {"class_type": "PackFail", "inputs": {"value": ["1", 0]}},
             "3": {"class_type": "V3LazyPick", "inputs": {"use_first": False, "first": ["2", 0],
                                                          "second": ["1", 0]}},
             "4": preview("3")}
    result = engine.run(graph)
    assert result.status == "success", result.error
    assert texts(result)["4"] == ["3.0"] and "2" not in result.executed
    graph["3"]["inputs"]["use_first"] = True
    failed = engine.run(graph)
    assert failed.status == "error" and failed.error["node_type"] == "PackFail"


def test_fingerprint_inputs_feeds_the_cache_key(engine, root):
    note = root / "input" / "v3.txt"
    note.write_text("one")
    graph = {"1": {"class_type": "V3ReadText", "inputs": {"name": "v3.txt"}}, "2": preview("1")}
    assert texts(engine.run(graph))["2"] == ["one"]
    again = engine.run(graph)
    assert "1" not in again.executed
    note.write_text("two")
    stat = note.stat()
    os.utime(note, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    changed = engine.run(graph)
    assert "1" in changed.executed and texts(changed)["2"] == ["two"]


def test_cli_runs_a_v3_workflow(tmp_path, capsys):
    work = make_root(tmp_path)
    graph = {"1": {"class_type": "V3Describe", "inputs": {"text": "cli", "count": 2, "shout": False}}}
    (work / "g.json").write_text(json.dumps(graph))
    code = main(["run", str(work / "g.json"), "--json", "--custom-nodes", str(PACKS), "--models-dir",
                 str(work / "models"), "--input-dir", str(work / "input"), "--output-dir", str(work / "output"),
                 "--temp-dir", str(work / "temp")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "success", summary
    assert summary["text"] == ["cli cli #1"]
    assert f"{PACKS / 'v3_nodes'}: V3Broken" in summary["custom_node_errors"]
