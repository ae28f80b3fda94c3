"""Contract tests: every route's status codes and response shapes (ComfyUI's, docs/comfyui-reference.md#http-api)."""

from __future__ import annotations

import io
import json
import struct
import time

import pytest
from starlette.testclient import TestClient

from tests.server_support import const_graph, fail_graph, make_app, steps_graph, wait_for


@pytest.fixture()
def client(tmp_path):
    with TestClient(make_app(tmp_path)) as test_client:
        test_client.root = tmp_path
        yield test_client


def run_to_end(client, graph, **body) -> str:
    response = client.post("/prompt", json={"prompt": graph, **body})
    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    wait_for(lambda: client.get(f"/history/{prompt_id}").json())
    return prompt_id


def png_bytes(size=(4, 3), mode="RGBA", color=(255, 0, 0, 128)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


# Prompt, queue, history -----------------------------------------------------------------------------------------

def test_post_prompt_returns_id_number_and_node_errors(client):
    response = client.post("/prompt", json={"prompt": const_graph(), "client_id": "c1"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"prompt_id", "number", "node_errors"}
    assert body["node_errors"] == {} and isinstance(body["number"], int)
    second = client.post("/api/prompt", json={"prompt": const_graph()}).json()
    assert second["number"] == body["number"] + 1


def test_post_prompt_accepts_urlencoded_content_type(client):
    # urllib clients send JSON with application/x-www-form-urlencoded; ComfyUI parses it anyway.
    response = client.post("/prompt", content=json.dumps({"prompt": const_graph()}),
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


def test_prompt_id_number_and_extra_data_are_kept(client):
    prompt_id = run_to_end(client, const_graph(2.0), prompt_id="mine-1", number=7.5, client_id="cid",
                           extra_data={"extra_pnginfo": {"workflow": {"id": "wf"}}})
    assert prompt_id == "mine-1"
    entry = client.get("/history/mine-1").json()["mine-1"]
    number, pid, prompt, extra, outputs = entry["prompt"]
    assert (number, pid, outputs) == (7.5, "mine-1", ["3"])
    assert extra == {"extra_pnginfo": {"workflow": {"id": "wf"}}, "client_id": "cid"}
    assert entry["outputs"] == {"3": {"values": [2.0]}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                          "execution_success"]
    assert entry["meta"]["3"]["node_id"] == "3"


def test_partial_execution_targets_run_only_listed_outputs(client):
    graph = const_graph()
    graph["4"] = {"class_type": "Collect", "inputs": {"value": ["1", 0]}}
    prompt_id = run_to_end(client, graph, partial_execution_targets=["4"])
    entry = client.get(f"/history/{prompt_id}").json()[prompt_id]
    assert entry["prompt"][4] == ["4"] and list(entry["outputs"]) == ["4"]
    response = client.post("/prompt", json={"prompt": graph, "partial_execution_targets": []})
    assert response.status_code == 400 and response.json()["error"]["type"] == "prompt_no_outputs"


def test_partial_success_reports_failing_outputs(client):
    graph = const_graph()
    graph["5"] = {"class_type": "Const", "inputs": {"value": 5000.0}}
    graph["6"] = {"class_type": "Collect", "inputs": {"value": ["5", 0]}}
    body = client.post("/prompt", json={"prompt": graph}).json()
    assert body["node_errors"]["5"]["errors"][0]["type"] == "value_bigger_than_max"
    assert body["node_errors"]["5"]["dependent_outputs"] == ["6"]


def test_invalid_prompt_gives_comfy_400_shape(client):
    graph = const_graph()
    graph["1"]["inputs"]["value"] = "not a number"
    response = client.post("/prompt", json={"prompt": graph})
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    error = body["node_errors"]["1"]["errors"][0]
    assert error["type"] == "invalid_input_type" and error["extra_info"]["input_name"] == "value"
    assert body["node_errors"]["1"]["class_type"] == "Const"
    assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_ui_format_prompt_is_converted_server_side(client):
    from latentloom.engine.workflow import api_to_ui

    workflow = api_to_ui(const_graph(3.5, 1.0), client.get("/object_info").json())
    assert isinstance(workflow["nodes"], list)
    response = client.post("/prompt", json={"prompt": workflow})
    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    entry = wait_for(lambda: client.get(f"/history/{prompt_id}").json())[prompt_id]
    assert list(entry["outputs"].values()) == [{"values": [4.5]}]
    assert {n["class_type"] for n in entry["prompt"][2].values()} == {"Const", "Add", "Collect"}
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"] == workflow  # images will embed it

    workflow["nodes"][0]["type"] = "NotInstalled"
    missing = client.post("/prompt", json={"prompt": workflow})
    assert missing.status_code == 400
    assert missing.json()["error"]["type"] == "missing_node_type"
    assert "NotInstalled" in missing.json()["error"]["message"]
    broken = client.post("/prompt", json={"prompt": {"nodes": [{"id": "x"}], "links": "nope"}})
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_prompt"


def test_no_prompt(client):
    response = client.post("/prompt", json={"client_id": "x"})
    assert response.status_code == 400
    assert response.json() == {"error": {"type": "no_prompt", "message": "No prompt provided",
                                         "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}


def test_get_prompt_reports_queue_remaining(client):
    assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}
    assert client.get("/api/prompt").status_code == 200


def test_queue_shows_running_and_pending_items(client):
    slow = client.post("/prompt", json={"prompt": steps_graph(steps=40, pause=0.02)}).json()["prompt_id"]
    pending = client.post("/prompt", json={"prompt": const_graph(3.0)}).json()["prompt_id"]
    queue = wait_for(lambda: (q := client.get("/queue").json())["queue_running"] and q)
    assert queue["queue_running"][0][1] == slow
    assert [item[1] for item in queue["queue_pending"]] == [pending]
    assert len(queue["queue_pending"][0]) == 5
    client.post("/queue", json={"delete": [pending]})
    assert client.get("/queue").json()["queue_pending"] == []
    client.post("/interrupt", json={"prompt_id": slow})
    wait_for(lambda: client.get(f"/history/{slow}").json())
    assert client.get(f"/history/{pending}").json() == {}


def test_queue_clear_and_post_responses_are_empty_200(client):
    for path, body in (("/queue", {"clear": True}), ("/history", {"clear": True}), ("/interrupt", None),
                       ("/free", {"unload_models": True})):
        response = client.post(path, json=body) if body is not None else client.post(path)
        assert response.status_code == 200 and response.content == b"", path


def test_history_max_items_and_offset(client):
    ids = [run_to_end(client, const_graph(float(i))) for i in range(4)]
    assert list(client.get("/history").json()) == ids
    assert list(client.get("/history?max_items=2").json()) == ids[2:]
    assert list(client.get("/history?offset=1").json()) == ids[1:]
    assert list(client.get("/history?max_items=2&offset=1").json()) == ids[1:3]
    assert client.get("/history?offset=10").json() == {}
    assert client.get("/history?max_items=abc").status_code == 400
    client.post("/history", json={"delete": [ids[0]]})
    assert list(client.get("/history").json()) == ids[1:]
    client.post("/history", json={"clear": True})
    assert client.get("/history").json() == {}


def test_history_of_unknown_prompt_is_empty(client):
    assert client.get("/history/nope").json() == {}


def test_error_run_is_recorded(client):
    prompt_id = run_to_end(client, fail_graph("bad things"))
    entry = client.get(f"/history/{prompt_id}").json()[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    kind, data = entry["status"]["messages"][-1]
    assert kind == "execution_error" and data["node_id"] == "2" and data["exception_message"] == "bad things"


def test_free_clears_the_output_cache(client):
    run_to_end(client, const_graph(4.0))
    second = run_to_end(client, const_graph(4.0))
    cached = client.get(f"/history/{second}").json()[second]["status"]["messages"][1][1]["nodes"]
    assert set(cached) == {"1", "2", "3"}
    client.post("/free", json={"free_memory": True})
    time.sleep(0.2)
    third = run_to_end(client, const_graph(4.0))
    assert client.get(f"/history/{third}").json()[third]["status"]["messages"][1][1]["nodes"] == []


# Jobs API -----------------------------------------------------------------------------------------------------

def test_jobs_list_detail_and_cancel(client):
    done = run_to_end(client, const_graph(1.0), extra_data={"extra_pnginfo": {"workflow": {"id": "w1"}}})
    failed = run_to_end(client, fail_graph())
    jobs = client.get("/api/jobs?status=completed,failed,cancelled&limit=64&offset=0").json()
    assert [j["id"] for j in jobs["jobs"]] == [failed, done]
    assert jobs["pagination"] == {"offset": 0, "limit": 64, "total": 2, "has_more": False}
    assert jobs["jobs"][0]["status"] == "failed" and jobs["jobs"][0]["execution_error"]["node_id"] == "2"
    assert jobs["jobs"][1]["workflow_id"] == "w1" and jobs["jobs"][1]["outputs_count"] == 1
    page = client.get("/jobs?limit=1&offset=1").json()
    assert [j["id"] for j in page["jobs"]] == [done] and page["pagination"]["has_more"] is False
    detail = client.get(f"/jobs/{done}").json()
    assert detail["outputs"] == {"3": {"values": [1.0]}}
    assert detail["workflow"]["prompt"]["1"]["class_type"] == "Const"
    assert client.get("/jobs/unknown").status_code == 404
    assert client.get("/jobs?status=bogus").status_code == 400

    slow = client.post("/prompt", json={"prompt": steps_graph(steps=100, pause=0.02)}).json()["prompt_id"]
    waiting = client.post("/prompt", json={"prompt": const_graph(9.0)}).json()["prompt_id"]
    wait_for(lambda: client.get("/queue").json()["queue_running"])
    queue = client.get("/jobs?status=in_progress,pending").json()["jobs"]
    assert [(j["id"], j["status"]) for j in queue] == [(slow, "in_progress"), (waiting, "pending")]
    assert client.post(f"/jobs/{waiting}/cancel").status_code == 200
    assert client.post("/jobs/cancel", json={"job_ids": [slow]}).json() == {"cancelled": [slow]}
    wait_for(lambda: client.get(f"/history/{slow}").json())
    statuses = {j["id"]: j["status"] for j in client.get("/jobs").json()["jobs"]}
    assert statuses[slow] == "cancelled" and waiting not in statuses
    finished = client.post(f"/jobs/{done}/cancel")
    assert finished.status_code == 200 and finished.json() == {"cancelled": []}
    assert client.post("/jobs/never-existed/cancel").status_code == 404


# Files ----------------------------------------------------------------------------------------------------------

def test_upload_then_view(client):
    data = png_bytes()
    response = client.post("/upload/image", files={"image": ("a.png", data, "image/png")},
                           data={"subfolder": "pasted"})
    assert response.json() == {"name": "a.png", "subfolder": "pasted", "type": "input"}
    assert (client.root / "input" / "pasted" / "a.png").read_bytes() == data
    # Same content: the name is reused; different content: a numbered name.
    assert client.post("/upload/image", files={"image": ("a.png", data)},
                       data={"subfolder": "pasted"}).json()["name"] == "a.png"
    other = png_bytes(color=(0, 255, 0, 255))
    assert client.post("/upload/image", files={"image": ("a.png", other)},
                       data={"subfolder": "pasted"}).json()["name"] == "a (1).png"
    assert client.post("/upload/image", files={"image": ("a.png", other)},
                       data={"subfolder": "pasted", "overwrite": "true"}).json()["name"] == "a.png"
    view = client.get("/view?filename=a.png&subfolder=pasted&type=input")
    assert view.status_code == 200 and view.content == other
    assert view.headers["content-type"] == "image/png"
    assert view.headers["x-content-type-options"] == "nosniff"
    annotated = client.get("/api/view", params={"filename": "pasted/a.png [input]"})
    assert annotated.content == other


def test_view_preview_and_channels(client):
    from PIL import Image

    client.post("/upload/image", files={"image": ("p.png", png_bytes(color=(10, 20, 30, 40)))})
    webp = client.get("/view?filename=p.png&type=input&preview=webp;90")
    assert webp.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(webp.content)).format == "WEBP"
    jpeg = client.get("/view?filename=p.png&type=input&preview=jpeg;50")
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    rgb = Image.open(io.BytesIO(client.get("/view?filename=p.png&type=input&channel=rgb").content))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (10, 20, 30)
    alpha = Image.open(io.BytesIO(client.get("/view?filename=p.png&type=input&channel=a").content))
    assert alpha.getpixel((0, 0)) == (0, 0, 0, 40)


def test_view_errors(client):
    assert client.get("/view").status_code == 404
    assert client.get("/view?filename=missing.png").status_code == 404
    assert client.get("/view?filename=x.png&type=secret").status_code == 400
    assert client.get("/view?filename=../x.png").status_code == 400


def test_output_file_reported_in_history_is_viewable(client):
    graph = {"1": {"class_type": "Const", "inputs": {"value": 6.5}},
             "2": {"class_type": "SaveText", "inputs": {"value": ["1", 0], "filename_prefix": "v"}}}
    prompt_id = run_to_end(client, graph)
    image = client.get(f"/history/{prompt_id}").json()[prompt_id]["outputs"]["2"]["images"][0]
    response = client.get("/view", params=image)
    assert response.status_code == 200 and response.text == "6.5"


def test_upload_mask_applies_alpha(client):
    from PIL import Image

    client.post("/upload/image", files={"image": ("base.png", png_bytes(color=(200, 100, 50, 255)))})
    mask = png_bytes(color=(0, 0, 0, 7))
    response = client.post("/upload/mask", files={"image": ("masked.png", mask)},
                           data={"original_ref": json.dumps({"filename": "base.png", "type": "input"})})
    assert response.json()["name"] == "masked.png"
    result = Image.open(client.root / "input" / "masked.png")
    assert result.getpixel((0, 0)) == (200, 100, 50, 7)
    bad = client.post("/upload/mask", files={"image": ("m.png", mask)}, data={"original_ref": "{"})
    assert bad.status_code == 400


def test_upload_errors(client):
    assert client.post("/upload/image", data={"x": "1"}).status_code == 400
    assert client.post("/upload/image", files={"image": ("a.png", b"x")}, data={"type": "nope"}).status_code == 400
    assert client.post("/upload/image", content=b"not multipart").status_code == 400


def test_internal_files(client):
    client.post("/upload/image", files={"image": ("one.png", png_bytes())})
    assert client.get("/internal/files/input").json() == ["one.png"]
    assert client.get("/internal/files/nope").status_code == 400
    assert client.get("/api/internal/files/input").status_code == 404  # /internal has no /api alias


def test_view_metadata(client):
    folder = client.root / "models" / "loras"
    folder.mkdir(parents=True)
    header = json.dumps({"__metadata__": {"ss_network_dim": "4"}}).encode()
    (folder / "a.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert client.get("/view_metadata/loras?filename=a.safetensors").json() == {"ss_network_dim": "4"}
    assert client.get("/view_metadata/loras?filename=b.safetensors").status_code == 404
    assert client.get("/view_metadata/nofolder?filename=a.safetensors").status_code == 404


# Catalogue, models, system ------------------------------------------------------------------------------------------

def test_object_info(client):
    catalogue = client.get("/object_info").json()
    assert "Const" in catalogue and "SaveText" in catalogue
    info = catalogue["Pick"]
    for key in ("input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
                "description", "python_module", "category", "output_node"):
        assert key in info
    assert info["input"]["required"]["choice"][0] == ["red", "green", "blue"]
    assert client.get("/api/object_info/Pick").json() == {"Pick": info}
    assert client.get("/object_info/Nope").json() == {}


def test_models_and_embeddings(client):
    (client.root / "models" / "embeddings").mkdir(parents=True)
    (client.root / "models" / "embeddings" / "style.pt").write_bytes(b"x")
    (client.root / "models" / "checkpoints").mkdir(parents=True)
    (client.root / "models" / "checkpoints" / "m.safetensors").write_bytes(b"x")
    assert client.get("/embeddings").json() == ["style"]
    assert "checkpoints" in client.get("/models").json()
    assert client.get("/models/checkpoints").json() == ["m.safetensors"]
    assert client.get("/models/nope").status_code == 404
    folders = client.get("/experiment/models").json()
    assert {"name", "folders"} <= set(folders[0])
    files = client.get("/api/experiment/models/checkpoints").json()
    assert files[0]["name"] == "m.safetensors" and files[0]["pathIndex"] == 0 and files[0]["size"] == 1
    assert client.get("/experiment/models/nope").status_code == 404
    from PIL import Image

    Image.new("RGB", (4, 4), (1, 2, 3)).save(client.root / "models" / "checkpoints" / "m.png")
    preview = client.get("/api/experiment/models/preview/checkpoints/0/m.safetensors")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/webp"
    assert client.get("/experiment/models/preview/checkpoints/0/other.safetensors").status_code == 404
    assert client.get("/experiment/models/preview/checkpoints/9/m.safetensors").status_code == 404
    assert client.get("/experiment/models/preview/checkpoints/0/..%2F..%2Fx.safetensors").status_code == 404


def test_system_stats_and_features(client):
    stats = client.get("/system_stats").json()
    for key in ("os", "ram_total", "ram_free", "comfyui_version", "required_frontend_version", "python_version",
                "pytorch_version", "embedded_python", "argv"):
        assert key in stats["system"]
    assert stats["devices"] and {"name", "type", "vram_total", "vram_free"} <= set(stats["devices"][0])
    assert client.get("/api/features").json() == {"supports_preview_metadata": True,
                                                  "max_upload_size": float(100 * 1024 * 1024)}


def test_frontend_boot_routes(client):
    assert client.get("/api/extensions").json() == ["/extensions/latentloom/latentloom.js"]
    script = client.get("/extensions/latentloom/latentloom.js")
    assert script.headers["content-type"].startswith("text/javascript") and "defaultGraph" in script.text
    assert client.get("/api/latentloom/default_graph").status_code == 404  # no graphs here
    assert client.get("/api/i18n").json() == {}
    assert client.get("/templates/index.json").json() == []
    assert client.get("/api/global_subgraphs").json() == {}
    index = client.get("/")
    assert index.status_code == 200 and "<html" in index.text.lower()
    assert index.headers["cache-control"] == "no-cache"


def test_workflow_templates_offer_graphs(tmp_path):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    (graphs / "demo.json").write_text(json.dumps({"1": {"class_type": "Const", "inputs": {"value": 2.0}}}))
    with TestClient(make_app(tmp_path, graphs_dir=graphs)) as client:
        assert client.get("/api/workflow_templates").json() == {"latentloom": ["demo"]}
        assert client.get("/api/workflow_templates/latentloom/demo.json").json()["1"]["class_type"] == "Const"
        assert client.get("/api/workflow_templates/latentloom/../x.json").status_code == 404
        assert client.get("/api/workflow_templates/other/demo.json").status_code == 404
        # The editor's default graph: the only graph, API format converted to UI format.
        default = client.get("/api/latentloom/default_graph").json()
        assert [node["type"] for node in default["nodes"]] == ["Const"]


def test_internal_logs_and_folder_paths(client):
    import logging

    logging.getLogger("latentloom.test").warning("hello from the test")
    assert "hello from the test" in client.get("/internal/logs").json()
    raw = client.get("/internal/logs/raw").json()
    assert raw["entries"][-1]["m"].startswith("hello from the test") and "size" in raw
    assert client.patch("/internal/logs/subscribe", json={"clientId": "x", "enabled": True}).status_code == 200
    paths = client.get("/internal/folder_paths").json()
    assert paths["input"] == [str(client.root / "input")]


# Users, settings, userdata ------------------------------------------------------------------------------------------

def test_users_and_settings(client):
    assert client.get("/api/users").json() == {"storage": "server", "migrated": False}
    assert client.get("/api/settings").json() == {}
    assert client.post("/api/settings/Comfy.A", json=3).status_code == 200
    assert client.post("/settings", json={"Comfy.B": "x"}).content == b""
    assert client.get("/settings").json() == {"Comfy.A": 3, "Comfy.B": "x"}
    assert client.get("/settings/Comfy.A").json() == 3
    assert client.get("/settings/Comfy.Missing").json() is None
    assert client.get("/api/users").json()["migrated"] is True


def test_userdata_crud_and_move(client):
    assert client.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true").status_code == 404
    assert client.post("/api/userdata/workflows%2Fa.json", content=b'{"x": 1}').json() == "workflows/a.json"
    assert client.post("/userdata/workflows%2Fa.json?overwrite=false", content=b"{}").status_code == 409
    info = client.post("/userdata/workflows%2Fsub%2Fb.json?full_info=true", content=b"{}").json()
    assert info["path"] == "workflows/sub/b.json" and info["size"] == 2
    assert client.get("/userdata?dir=workflows&recurse=true").json() == ["a.json", "sub/b.json"]
    assert client.get("/userdata?dir=workflows").json() == ["a.json"]
    full = client.get("/userdata?dir=workflows&recurse=true&full_info=true").json()
    assert {"path", "size", "modified", "created"} <= set(full[0])
    assert client.get("/userdata?dir=workflows&recurse=true&split=true").json()[1] == ["sub/b.json", "sub",
                                                                                      "b.json"]
    assert client.get("/userdata/workflows%2Fa.json").content == b'{"x": 1}'
    moved = client.post("/userdata/workflows%2Fa.json/move/workflows%2Fc.json")
    assert moved.json() == "workflows/c.json"
    assert client.get("/userdata/workflows%2Fa.json").status_code == 404
    assert client.post("/userdata/workflows%2Fmissing.json/move/workflows%2Fd.json").status_code == 404
    assert client.delete("/userdata/workflows%2Fc.json").status_code == 204
    assert client.delete("/userdata/workflows%2Fc.json").status_code == 404
    v2 = client.get("/api/v2/userdata").json()
    assert v2[0] == {"name": "workflows", "path": "workflows", "type": "directory"}
    assert any(e["path"] == "workflows/sub/b.json" and e["type"] == "file" for e in v2)
    assert client.get("/userdata").status_code == 400



def test_websocket_also_at_api_ws(client):
    with client.websocket_connect("/api/ws?clientId=aliased") as ws:
        assert ws.receive_json()["data"]["sid"] == "aliased"


def test_every_api_route_also_answers_under_api_prefix(client):
    from starlette.routing import Route

    plain = {r.path for r in client.app.routes if isinstance(r, Route) and not r.path.startswith("/api/")}
    prefixed = {r.path[4:] for r in client.app.routes if isinstance(r, Route) and r.path.startswith("/api/")}
    static_only = {"/", "/templates/{name:path}", "/user.css", "/extensions/latentloom/latentloom.js"}
    assert plain - static_only <= prefixed, plain - static_only - prefixed
    for path in ("/prompt", "/queue", "/history", "/object_info", "/embeddings", "/extensions", "/system_stats",
                 "/features", "/users", "/settings", "/models", "/experiment/models", "/jobs", "/i18n",
                 "/workflow_templates", "/v2/userdata"):
        direct, aliased = client.get(path), client.get("/api" + path)
        assert direct.status_code == aliased.status_code == 200, path
        assert direct.headers["content-type"].startswith("application/json"), path
