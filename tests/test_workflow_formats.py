"""Format detection and loading: API JSON, UI JSON, POST /prompt bodies, PNGs with workflow text chunks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentloom.engine.workflow import (
    WorkflowFormatError,
    convert_workflow,
    detect_format,
    load_workflow,
    read_png_text_chunks,
)

FIXTURES = Path(__file__).parent / "workflow_fixtures"
CATALOGUE = json.loads((FIXTURES / "catalogue.json").read_text())
UI = json.loads((FIXTURES / "reroute_chain.ui.json").read_text())
API = json.loads((FIXTURES / "reroute_chain.api.json").read_text())


def png_bytes(texts: dict[str, str], kind: str = "text") -> bytes:
    info = PngInfo()
    for key, value in texts.items():
        if kind == "text":
            info.add_text(key, value)
        elif kind == "ztxt":
            info.add_text(key, value, zip=True)
        else:
            info.add_itxt(key, value, zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_detect_format():
    assert detect_format(UI) == "ui"
    assert detect_format(API) == "api"
    with pytest.raises(WorkflowFormatError, match="empty"):
        detect_format({})
    with pytest.raises(WorkflowFormatError, match="'version'"):
        detect_format({"version": 1, "something": []})
    with pytest.raises(WorkflowFormatError, match="JSON object"):
        detect_format([1, 2])


def test_load_api_and_ui_json(tmp_path):
    api_file = tmp_path / "flow_api.json"
    api_file.write_text(json.dumps(API))
    assert load_workflow(api_file, CATALOGUE) == (API, None, "api_json")
    ui_file = tmp_path / "flow.json"
    ui_file.write_text(json.dumps(UI))
    prompt, workflow, kind = load_workflow(str(ui_file), CATALOGUE)
    assert (prompt, workflow, kind) == (API, UI, "ui_json")
    assert load_workflow(json.dumps(UI).encode(), CATALOGUE)[0] == API
    assert load_workflow(UI, CATALOGUE)[2] == "ui_json"


def test_load_post_prompt_body():
    body = {"client_id": "x", "prompt": API, "extra_data": {"extra_pnginfo": {"workflow": UI}}}
    assert load_workflow(body, CATALOGUE) == (API, UI, "api_json")


@pytest.mark.parametrize("kind", ["text", "ztxt", "itxt"])
def test_png_prefers_prompt_chunk(kind):
    marked = json.loads(json.dumps(API))
    marked["3"]["inputs"]["seed"] = 99  # differs from the workflow, so we can tell which chunk was used
    data = png_bytes({"prompt": json.dumps(marked), "workflow": json.dumps(UI)}, kind)
    assert read_png_text_chunks(data).keys() >= {"prompt", "workflow"}
    prompt, workflow, detected = load_workflow(data, CATALOGUE)
    assert detected == "png_prompt"
    assert prompt["3"]["inputs"]["seed"] == 99
    assert workflow == UI


def test_png_with_only_workflow_is_converted(tmp_path):
    path = tmp_path / "ComfyUI_00001_.png"
    path.write_bytes(png_bytes({"workflow": json.dumps(UI)}))
    assert load_workflow(path, CATALOGUE) == (API, UI, "png_workflow")


def test_png_non_ascii_prompt_text_survives():
    ui = json.loads(json.dumps(UI))
    ui["nodes"][5]["widgets_values"] = ["灯台 — phare"]
    prompt, _, _ = load_workflow(png_bytes({"workflow": json.dumps(ui, ensure_ascii=False)}, "itxt"), CATALOGUE)
    assert prompt["6"]["inputs"]["text"] == "灯台 — phare"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (png_bytes({}), "no 'prompt' or 'workflow'"),
        (png_bytes({"parameters": "a cat, Steps: 20"}), "A1111"),
        (png_bytes({"prompt": "{not json"}), "not valid JSON"),
        (png_bytes({"workflow": json.dumps(API)}), "not a UI workflow"),
        (b"\xff\xd8\xff\xe0 jpeg", "JPEG"),
        (b"hello world", "neither JSON nor a PNG"),
        (b'{"a": ', "not valid JSON"),
        (b'{"1": {"inputs": {}}}', "class_type"),
    ],
)
def test_unknown_or_broken_inputs_get_clear_errors(data, message):
    with pytest.raises(WorkflowFormatError, match=message):
        load_workflow(data, CATALOGUE)


def test_missing_file_and_truncated_png(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_workflow(tmp_path / "nope.json", CATALOGUE)
    data = png_bytes({"workflow": json.dumps(UI)})
    chunk_start = data.index(b"tEXt") - 4
    with pytest.raises(WorkflowFormatError, match="truncated"):
        read_png_text_chunks(data[: chunk_start + 40])


def test_ui_conversion_needs_a_catalogue():
    with pytest.raises(WorkflowFormatError, match="catalogue"):
        load_workflow(UI, None)
    assert load_workflow(API, None)[0] == API


def test_convert_workflow_both_ways():
    assert convert_workflow(UI, "api", CATALOGUE) == (API, "ui_json")
    assert convert_workflow(UI, "ui", CATALOGUE) == (UI, "ui_json")
    laid_out, detected = convert_workflow(API, "ui", CATALOGUE)
    assert detected == "api_json" and laid_out["version"] == 0.4
    assert convert_workflow(laid_out, "api", CATALOGUE)[0] == API
    png = png_bytes({"prompt": json.dumps(API)})
    assert convert_workflow(png, "ui", CATALOGUE)[1] == "png_prompt"
    with pytest.raises(WorkflowFormatError, match="unknown target"):
        convert_workflow(API, "yaml", CATALOGUE)
