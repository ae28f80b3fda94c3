"""Images through the server with the real image nodes: upload -> LoadImage (subfolder and annotated names) ->
ImageInvert -> SaveImage -> /history -> /view; PreviewImage lands in temp; the workflow is embedded in the PNG."""

from __future__ import annotations

import io
import json

import pytest
from starlette.testclient import TestClient

from latentloom.engine.api import Engine
from latentloom.engine.environment import Environment
from latentloom.engine.registry import NodeRegistry
from latentloom.nodes import image as image_nodes
from latentloom.server.app import create_app
from latentloom.server.state import ServerConfig
from tests.server_support import wait_for


@pytest.fixture()
def client(tmp_path):
    env = Environment.create(input_dir=tmp_path / "input", output_dir=tmp_path / "output",
                             temp_dir=tmp_path / "temp")
    engine = Engine(NodeRegistry(image_nodes.NODES), env)
    app = create_app(engine, ServerConfig(user_dir=tmp_path / "user", allowed_hosts=("testserver",)))
    with TestClient(app) as test_client:
        yield test_client


def png(color, size=(8, 6)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def run(client, prompt, **body) -> dict:
    response = client.post("/prompt", json={"prompt": prompt, **body})
    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    entry = wait_for(lambda: client.get(f"/history/{prompt_id}").json(), timeout=30)[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


@pytest.mark.parametrize("name_form", ["subfolder", "annotated"])
def test_upload_load_invert_save_view(client, name_form):
    from PIL import Image

    uploaded = client.post("/upload/image", files={"image": ("src.png", png((10, 200, 30)))},
                           data={"subfolder": "pasted"}).json()
    name = f"{uploaded['subfolder']}/{uploaded['name']}"
    if name_form == "annotated":
        name += " [input]"
    workflow = {"nodes": [], "links": [], "extra": {"marker": 42}}
    entry = run(client, {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "srv/inverted"}},
    }, extra_data={"extra_pnginfo": {"workflow": workflow}})
    image = entry["outputs"]["3"]["images"][0]
    assert image["type"] == "output" and image["subfolder"] == "srv"
    assert image["filename"].startswith("inverted_") and image["filename"].endswith(".png")
    response = client.get("/view", params=image)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    saved = Image.open(io.BytesIO(response.content))
    assert saved.size == (8, 6)
    # Inverted (float maths, then ComfyUI's truncating conversion to 8 bits: within one level).
    pixel = saved.convert("RGB").getpixel((3, 3))
    assert all(abs(got - want) <= 1 for got, want in zip(pixel, (245, 55, 225), strict=False)), pixel
    # The editor's workflow travels inside the PNG, as ComfyUI writes it.
    assert json.loads(saved.info["workflow"])["extra"]["marker"] == 42
    preview = client.get("/view", params={**image, "preview": "webp;90"})
    assert preview.headers["content-type"] == "image/webp"


def test_preview_image_goes_to_temp(client):
    entry = run(client, {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 2, "color": 0xFF0000}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    })
    images = entry["outputs"]["2"]["images"]
    assert len(images) == 2 and all(i["type"] == "temp" for i in images)
    assert client.get("/view", params=images[1]).status_code == 200


def test_missing_input_image_is_refused_up_front_naming_the_node(client):
    """As ComfyUI's LoadImage.VALIDATE_INPUTS: a missing file fails validation (400), nothing is queued."""
    response = client.post("/prompt", json={"prompt": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}})
    assert response.status_code == 400, response.text
    node_errors = response.json()["node_errors"]
    assert set(node_errors) == {"1"} and node_errors["1"]["class_type"] == "LoadImage"
    (error,) = node_errors["1"]["errors"]
    assert error["type"] == "custom_validation_failed" and "nope.png" in error["details"]
    assert client.get("/history").json() == {}
