"""The ComfyUI template corpus (comfyui-workflow-templates-json): real UI-format workflows, 214 with subgraphs.

Every template must either convert (and then wire up correctly against the catalogue) or be refused with
an error naming exactly the node types the catalogue lacks. A second pass uses a catalogue inferred from the
corpus itself, so that every template's node types are "known": then every template must convert, which
exercises subgraphs, bypass, reroutes and primitives on real files rather than only on our fixtures.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import pytest

from latentloom.engine.workflow import MissingNodeTypesError, api_to_ui, ui_to_api
from latentloom.engine.workflow.catalogue import VIRTUAL_TYPES
from latentloom.engine.workflow.check import prompt_problems

templates_package = pytest.importorskip("comfyui_workflow_templates_json")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from convert_templates_report import template_files  # noqa: E402

CATALOGUE = json.loads((Path(__file__).parent / "workflow_fixtures" / "catalogue.json").read_text())
TEMPLATES_DIR = Path(templates_package.__file__).resolve().parent / "templates"
COMPANION_WIDGETS = {"control_after_generate", "control_filter_list", "upload", "audioUI"}

# Converts and checks every template the real frontend ships: seconds per test.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def templates() -> dict[str, dict]:
    loaded = {}
    for path in template_files(TEMPLATES_DIR):
        document = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(document, dict) and isinstance(document.get("nodes"), list):
            loaded[path.stem] = document
    return loaded


def node_types(document: dict) -> set[str]:
    graphs = [document, *((document.get("definitions") or {}).get("subgraphs") or [])]
    return {str(node.get("type")) for graph in graphs for node in graph.get("nodes") or []}


def test_every_template_converts_or_names_its_missing_node_types(templates):
    assert len(templates) >= 600
    counts = Counter()
    for name, document in templates.items():
        try:
            prompt = ui_to_api(document, CATALOGUE)
        except MissingNodeTypesError as error:
            counts["refused"] += 1
            assert error.missing, name
            assert set(error.missing) <= node_types(document), name
            assert not set(error.missing) & set(CATALOGUE), name
            assert all(missing in str(error) for missing in error.missing)
            continue
        counts["converted"] += 1
        assert prompt, name
        assert prompt_problems(prompt, CATALOGUE) == [], name
        counts["valid"] += 1
    print(f"\ntemplates: {len(templates)}, converted: {counts['converted']} (valid {counts['valid']}), "
          f"refused with missing node types: {counts['refused']}")
    assert counts["converted"] + counts["refused"] == len(templates)
    # The SD-era templates of today's corpus use only core nodes and must convert.
    for name in ("image_sdxl_simple", "sdxl_simple_example", "sdxl_refiner_prompt_example",
                 "sdxl_revision_text_prompts", "sdxlturbo_example"):
        if name in templates:
            assert prompt_problems(ui_to_api(templates[name], CATALOGUE), CATALOGUE) == []


def test_refiner_template_primitives_reach_both_samplers(templates):
    if "sdxl_refiner_prompt_example" not in templates:
        pytest.skip("template not in this corpus version")
    prompt = ui_to_api(templates["sdxl_refiner_prompt_example"], CATALOGUE)
    samplers = [entry for entry in prompt.values() if entry["class_type"] == "KSamplerAdvanced"]
    primitives = [n for n in templates["sdxl_refiner_prompt_example"]["nodes"] if n["type"] == "PrimitiveNode"]
    values = {n["outputs"][0]["widget"]["name"]: n["widgets_values"][0] for n in primitives}
    assert len(samplers) == 2 and values
    base, refiner = sorted(samplers, key=lambda e: e["inputs"]["start_at_step"])
    assert base["inputs"]["steps"] == refiner["inputs"]["steps"] == values["steps"]
    assert base["inputs"]["end_at_step"] == refiner["inputs"]["start_at_step"] == values["end_at_step"]
    assert not any(entry["class_type"] in VIRTUAL_TYPES for entry in prompt.values())


def _guess_spec(value) -> list:
    if isinstance(value, bool):
        return ["BOOLEAN", {}]
    if isinstance(value, int):
        return ["INT", {"control_after_generate": False}]
    if isinstance(value, float):
        return ["FLOAT", {}]
    return ["STRING", {}]


def infer_catalogue(documents: list[dict]) -> dict[str, dict]:
    """An /object_info-shaped entry per node type, read off the richest saved instance of that type
    (sockets from its inputs, widgets from widgets_values_named, which lists companion widgets too)."""
    subgraph_ids = {str(s.get("id")) for d in documents for s in (d.get("definitions") or {}).get("subgraphs") or []}
    best: dict[str, tuple[tuple, dict]] = {}
    for document in documents:
        graphs = [document, *((document.get("definitions") or {}).get("subgraphs") or [])]
        for node in (n for graph in graphs for n in graph.get("nodes") or []):
            node_type = str(node.get("type"))
            if node_type in VIRTUAL_TYPES or node_type in subgraph_ids:
                continue
            score = (isinstance(node.get("widgets_values_named"), dict), len(node.get("inputs") or []))
            if node_type not in best or score > best[node_type][0]:
                best[node_type] = (score, node)
    catalogue = {}
    for node_type, (_, node) in best.items():
        required: dict[str, list] = {}
        widget_input_types = {}
        for slot in node.get("inputs") or []:
            slot_type = str(slot.get("type") or "*")
            slot_type = "*" if slot_type.startswith("COMFY_") else slot_type
            if slot.get("widget"):
                widget_input_types[slot["name"]] = slot_type
            elif slot_type in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                required[slot["name"]] = [slot_type, {"forceInput": True}]  # a socket-only primitive input
            else:
                required[slot["name"]] = [slot_type]
        named = node.get("widgets_values_named")
        if isinstance(named, dict):
            names = list(named)
            for index, name in enumerate(names):
                if name in COMPANION_WIDGETS:
                    continue
                follower = names[index + 1] if index + 1 < len(names) else None
                value = named[name]
                declared = widget_input_types.get(name)
                if declared in ("INT", "FLOAT", "BOOLEAN", "STRING"):
                    spec = [declared, {"control_after_generate": False} if declared == "INT" else {}]
                elif declared == "COMBO" or follower == "upload":
                    spec = [[value] if isinstance(value, (str, int, float)) else ["?"], {}]
                else:
                    spec = _guess_spec(value)
                if follower == "control_after_generate":
                    spec[1]["control_after_generate"] = True
                if follower == "upload":
                    spec[1]["image_upload"] = True
                required[name] = spec
        elif isinstance(node.get("widgets_values"), list):
            for index, value in enumerate(node["widgets_values"]):
                required[f"widget_{index}"] = _guess_spec(value)
        outputs = [str(o.get("type") or "*") for o in node.get("outputs") or []]
        catalogue[node_type] = {
            "input": {"required": required}, "input_order": {"required": list(required)},
            "output": outputs, "output_name": [str(o.get("name")) for o in node.get("outputs") or []],
            "output_is_list": [False] * len(outputs), "name": node_type, "display_name": node_type,
        }
    return catalogue


def test_every_template_converts_when_its_node_types_are_known(templates):
    catalogue = infer_catalogue(list(templates.values()))
    with_subgraphs = 0
    for name, document in templates.items():
        prompt = ui_to_api(document, catalogue)
        assert prompt, name
        for node_id, entry in prompt.items():
            assert entry["class_type"] in catalogue, (name, node_id)
            for value in entry["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in prompt, (name, node_id, value)
        if (document.get("definitions") or {}).get("subgraphs"):
            with_subgraphs += 1
            assert any(":" in node_id for node_id in prompt) or not any(
                n["type"] in {s["id"] for s in document["definitions"]["subgraphs"]} and n.get("mode", 0) == 0
                for n in document["nodes"]), name
    assert with_subgraphs >= 100


def test_converted_sd_templates_survive_the_round_trip(templates):
    for name in ("image_sdxl_simple", "sdxl_refiner_prompt_example", "sdxlturbo_example"):
        if name not in templates:
            continue
        prompt = ui_to_api(templates[name], CATALOGUE)
        assert ui_to_api(api_to_ui(prompt, CATALOGUE), CATALOGUE) == prompt


def export_digest(prompt: dict) -> str:
    """sha256 of compact key-sorted JSON, numbers written as JavaScript does (1.0 -> 1)."""
    def js_number(value):
        return int(value) if isinstance(value, float) and value.is_integer() else value

    canonical = json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    normalised = json.loads(canonical, parse_float=lambda text: js_number(float(text)))
    return hashlib.sha256(
        json.dumps(normalised, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def test_conversion_equals_the_real_frontend_export(templates):
    """Each template converted with the inferred catalogue must equal what comfyui-frontend-package's own
    Export (API) produced for it (recorded as hashes by running the frontend in headless Chromium)."""
    recorded = json.loads((Path(__file__).parent / "workflow_fixtures" / "frontend_export_hashes.json").read_text())
    if recorded["templates"] != f"comfyui-workflow-templates-json {version('comfyui-workflow-templates-json')}":
        pytest.skip(f"hashes were recorded for {recorded['templates']}")
    catalogue = infer_catalogue(list(templates.values()))
    mismatched = []
    for name, expected in recorded["export_sha256"].items():
        prompt = ui_to_api(templates[name], catalogue)
        if export_digest(prompt) != expected:
            mismatched.append(name)
    print(f"\nidentical to the frontend's export: {len(recorded['export_sha256']) - len(mismatched)} "
          f"of {len(recorded['export_sha256'])} templates ({len(recorded['not_compared'])} not compared)")
    assert len(recorded["export_sha256"]) >= 600
    assert mismatched == []


def test_templates_against_the_real_registry(templates, tmp_path):
    """With the engine's own catalogue: every template converts or names the node types we lack, and what
    converts passes the engine's validation except for model files this machine does not have."""
    from latentloom.nodes import create_engine

    engine = create_engine(models_dir=tmp_path / "models", input_dir=tmp_path / "in", output_dir=tmp_path / "out")
    catalogue = engine.catalogue()
    counts = Counter()
    for name, document in templates.items():
        try:
            prompt = ui_to_api(document, catalogue)
        except MissingNodeTypesError as error:
            counts["refused"] += 1
            assert error.missing and not set(error.missing) & set(catalogue), name
            continue
        counts["converted"] += 1
        result = engine.validate(prompt)
        problems = [(node_id, e["type"], e["details"]) for node_id, entry in result.node_errors.items()
                    for e in entry["errors"]]
        # A template names model and image files this machine does not have; anything else is a real fault.
        structural = [p for p in problems if p[1] not in ("value_not_in_list", "custom_validation_failed")]
        assert structural == [], (name, structural)
        if result.ok or not structural:
            counts["valid_but_for_files"] += 1
    print(f"\nregistry: converted {counts['converted']} (valid but for files {counts['valid_but_for_files']}), "
          f"refused {counts['refused']} of {len(templates)}")
    assert counts["converted"] + counts["refused"] == len(templates) and counts["converted"] >= 5
