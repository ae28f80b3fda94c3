"""Hardening beyond ComfyUI (docs/comfyui-reference.md#request-hardening): Host allow-list, Origin checks, bearer
token, path confinement with symlinks, unsafe types never inline, upload size limit, secrets kept out of listings,
malformed JSON -> 400."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from latentloom.engine.node import Node, NodeOutput
from latentloom.engine.types import Socket
from tests.server_support import const_graph, make_app, wait_for

LOCAL = "http://127.0.0.1:8188"


@pytest.fixture()
def client(tmp_path):
    with TestClient(make_app(tmp_path), base_url=LOCAL) as test_client:
        test_client.root = tmp_path
        yield test_client


# Host and Origin ----------------------------------------------------------------------------------------------

def test_host_allow_list_blocks_dns_rebinding(client):
    assert client.get("/system_stats", headers={"Host": "attacker.example:8188"}).status_code == 403
    assert client.get("/system_stats", headers={"Host": "localhost:8188"}).status_code == 200
    assert client.get("/system_stats", headers={"Host": "192.168.1.20:8188"}).status_code == 200
    assert client.get("/system_stats", headers={"Host": "[::1]:8188"}).status_code == 200


def test_configured_host_names_are_allowed(tmp_path):
    with TestClient(make_app(tmp_path, allowed_hosts=("studio.lan",)), base_url="http://studio.lan:8188") as c:
        assert c.get("/system_stats").status_code == 200
        assert c.get("/system_stats", headers={"Host": "other.lan"}).status_code == 403


@pytest.mark.parametrize("host", ["127.0.0.1:8188", "192.168.1.20:8188", "localhost:8188"])
def test_cross_origin_post_refused_whatever_the_address(client, host):
    body = {"prompt": const_graph()}
    refused = client.post("/prompt", json=body, headers={"Host": host, "Origin": "http://evil.example"})
    assert refused.status_code == 403
    assert client.post("/prompt", json=body, headers={"Host": host, "Origin": "null"}).status_code == 403
    # Another port on the same host is another origin.
    name = host.rsplit(":", 1)[0]
    assert client.post("/prompt", json=body, headers={"Host": host,
                                                      "Origin": f"http://{name}:9999"}).status_code == 403
    allowed = client.post("/prompt", json=body, headers={"Host": host, "Origin": f"http://{host}"})
    assert allowed.status_code == 200
    prompt_id = allowed.json()["prompt_id"]
    history = wait_for(lambda: client.get(f"/history/{prompt_id}").json(), timeout=20)
    assert history[prompt_id]["status"]["completed"]
    # Only the same-origin prompt was queued: the refused ones left no trace.
    assert list(client.get("/history").json()) == [prompt_id]
    assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_cross_site_fetch_metadata_without_origin_refused(client):
    for path in ("/prompt", "/queue", "/interrupt", "/upload/image", "/userdata/x.json", "/settings/a"):
        response = client.post(path, content=b"{}", headers={"Sec-Fetch-Site": "cross-site"})
        assert response.status_code == 403, path
    # Scripts send no Origin and no fetch metadata: allowed.
    assert client.post("/interrupt").status_code == 200


def test_state_changing_methods_all_checked(client):
    headers = {"Origin": "http://evil.example"}
    assert client.delete("/userdata/a.json", headers=headers).status_code == 403
    assert client.patch("/internal/logs/subscribe", json={"clientId": "x"}, headers=headers).status_code == 403
    assert client.post("/history", json={"clear": True}, headers=headers).status_code == 403


def test_websocket_origin_checked(client):
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/ws?clientId=a", headers={"Origin": "http://evil.example"}) as ws:
            ws.receive_json()
    # (The test client's websocket handshake always says Host: testserver.)
    with client.websocket_connect("/ws?clientId=a", headers={"Origin": "http://testserver"}) as ws:
        assert ws.receive_json()["data"]["sid"] == "a"


# Bearer token -------------------------------------------------------------------------------------------------

def test_auth_token_required_when_set(tmp_path):
    with TestClient(make_app(tmp_path, auth_token="s3cret"), base_url=LOCAL) as client:
        assert client.get("/queue").status_code == 401
        assert client.get("/queue", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/queue", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/prompt", json={"prompt": const_graph()}).status_code == 401
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/ws") as ws:
                ws.receive_json()
        # The editor's way in: /?token= sets an HttpOnly, SameSite=Strict cookie and redirects to /.
        login = client.get("/?token=s3cret", follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.get("/queue").status_code == 200  # the client kept the cookie
        # (The test client does not send its cookie jar on websockets, so the header is given here.)
        with client.websocket_connect("/ws?clientId=t", headers={"Cookie": cookie.split(";")[0]}) as ws:
            assert ws.receive_json()["type"] == "status"
        assert client.get("/?token=nope", follow_redirects=False).status_code == 401


# Paths --------------------------------------------------------------------------------------------------------

@pytest.fixture()
def outside(tmp_path):
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "secret.txt").write_text("TOP SECRET")
    (secret / "secret.png").write_bytes(b"\x89PNG secret")
    return secret


@pytest.mark.parametrize("params, status", [
    # A file name with a folder escape or an absolute path is malformed (400, as ComfyUI's /view) ...
    ({"filename": "../outside/secret.txt"}, 400),
    ({"filename": "../../outside/secret.txt", "type": "input"}, 400),
    ({"filename": "/etc/passwd"}, 400),
    ({"filename": "x\x00.png"}, 400),
    # ... a subfolder that leaves the folder is forbidden (403) ...
    ({"filename": "secret.txt", "subfolder": "../outside"}, 403),
    ({"filename": "secret.txt", "subfolder": "/tmp"}, 403),
    ({"filename": "secret.txt", "subfolder": "..\\outside"}, 403),
    ({"filename": "passwd", "subfolder": "../../../../../../etc"}, 403),
    # ... and query values are decoded once: "%2F" stays part of a (missing) file name.
    ({"filename": "..%2Foutside%2Fsecret.txt"}, 404),
])
def test_view_path_escapes_refused(client, outside, params, status):
    response = client.get("/view", params=params)
    assert response.status_code == status, response.text
    assert b"SECRET" not in response.content


def test_percent_encoded_escape_in_raw_url(client, outside):
    response = client.get("/view?filename=%2e%2e%2foutside%2fsecret.txt")
    assert response.status_code == 400 and b"SECRET" not in response.content
    response = client.get("/view?filename=secret.txt&subfolder=%2e%2e%2foutside")
    assert response.status_code == 403


def test_symlinks_out_of_folders_are_not_followed(client, outside):
    input_dir = client.root / "input"
    os.symlink(outside / "secret.png", input_dir / "link.png")
    os.symlink(outside, input_dir / "linkdir")
    assert client.get("/view?filename=link.png&type=input").status_code == 403
    assert client.get("/view?filename=secret.png&type=input&subfolder=linkdir").status_code == 403
    # Uploading through a symlinked folder or over a symlinked name never writes outside.
    upload = client.post("/upload/image", files={"image": ("new.png", b"data")}, data={"subfolder": "linkdir"})
    assert upload.status_code == 400 and not (outside / "new.png").exists()
    over = client.post("/upload/image", files={"image": ("link.png", b"data")}, data={"overwrite": "true"})
    assert over.status_code == 400 and (outside / "secret.png").read_bytes() == b"\x89PNG secret"
    # A symlink inside the folder that stays inside is fine.
    (input_dir / "real.png").write_bytes(b"ok")
    os.symlink(input_dir / "real.png", input_dir / "alias.png")
    assert client.get("/view?filename=alias.png&type=input").content == b"ok"


@pytest.mark.parametrize("name", ["../escape.png", "..\\escape.png", "/abs/escape.png"])
def test_upload_names_stay_inside(client, name):
    """Folders in an uploaded file name are dropped (only its last part is kept), whatever the separator."""
    response = client.post("/upload/image", files={"image": (name, b"img")})
    assert response.status_code == 200, response.text
    assert response.json() == {"name": "escape.png", "subfolder": "", "type": "input"}
    assert (client.root / "input" / "escape.png").read_bytes() == b"img"
    assert not (client.root / "escape.png").exists()


@pytest.mark.parametrize("subfolder", ["../up", "/abs", "a/../../up", "..\\up"])
def test_upload_subfolder_escapes_refused(client, subfolder):
    response = client.post("/upload/image", files={"image": ("a.png", b"img")}, data={"subfolder": subfolder})
    assert response.status_code == 400
    assert not (client.root / "up").exists()


def test_userdata_escapes_refused(client, outside):
    user_root = client.root / "user" / "default"
    user_root.mkdir(parents=True)
    assert client.get("/userdata/..%2F..%2Foutside%2Fsecret.txt").status_code == 403
    assert client.get("/userdata/%2Fetc%2Fpasswd").status_code == 403
    assert client.post("/userdata/..%2Fevil.json", content=b"{}").status_code == 403
    assert client.get("/userdata?dir=..%2F..").status_code == 403
    assert client.get("/userdata", params={"dir": "../../outside"}).status_code == 403
    os.symlink(outside, user_root / "workflows")
    assert client.get("/userdata/workflows%2Fsecret.txt").status_code == 403
    assert client.get("/userdata", params={"dir": "workflows"}).status_code == 403
    client.post("/userdata/mine.json", content=b"{}")
    assert client.post("/userdata/mine.json/move/..%2F..%2Foutside%2Fstolen.json").status_code == 403
    assert not (outside / "stolen.json").exists() and (user_root / "mine.json").exists()


# Content types and headers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,body", [
    ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>"),
    ("x.html", b"<script>alert(1)</script>"),
    ("x.js", b"alert(1)"),
    ("x.xhtml", b"<html/>"),
    ("x.xml", b"<a/>"),
])
def test_active_content_never_inline(client, name, body):
    assert client.post("/upload/image", files={"image": (name, body)}).status_code == 200
    response = client.get("/view", params={"filename": name, "type": "input"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in response.headers["content-security-policy"]


def test_nosniff_on_every_response(client):
    for response in (client.get("/object_info"), client.get("/view"), client.get("/no/such/route"),
                     client.post("/prompt", content=b"{bad"), client.get("/")):
        assert response.headers["x-content-type-options"] == "nosniff"


def test_content_disposition_is_escaped(client):
    name = 'a"b;c\u00e9.png'
    stored = client.post("/upload/image", files={"image": (name, b"\x89PNG")}).json()["name"]
    header = client.get("/view", params={"filename": stored, "type": "input"}).headers["content-disposition"]
    assert '"b;' not in header and "filename*=UTF-8''" in header


def test_upload_size_limit(tmp_path):
    with TestClient(make_app(tmp_path, max_upload_bytes=1000), base_url=LOCAL) as client:
        small = client.post("/upload/image", files={"image": ("s.png", b"x" * 100)})
        assert small.status_code == 200
        big = client.post("/upload/image", files={"image": ("b.png", b"x" * 5000)})
        assert big.status_code == 413
        assert not (tmp_path / "input" / "b.png").exists()

        def chunks():
            for _ in range(10):
                yield b"x" * 500

        streamed = client.post("/upload/image", content=chunks(),
                               headers={"Content-Type": "multipart/form-data; boundary=zz"})
        assert streamed.status_code == 413
        assert client.get("/features").json()["max_upload_size"] == 1000.0


# Secrets -------------------------------------------------------------------------------------------------------

class SecretProbe(Node):
    """Reports whether the run saw the API key (never the key itself)."""

    category = "test"
    output_node = True
    value: Annotated[Any, Socket("FLOAT")]

    def run(self, ctx):
        return NodeOutput(ui={"has_key": [ctx.extra_data.get("api_key_comfy_org") == "KEY-123"]})


def test_secrets_never_listed_but_reach_the_run(tmp_path):
    app = make_app(tmp_path)
    app.state.server.engine.registry.register(SecretProbe)
    graph = {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
             "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": 30, "pause": 0.02}},
             "3": {"class_type": "SecretProbe", "inputs": {"value": ["2", 0]}}}
    secrets = {"api_key_comfy_org": "KEY-123", "auth_token_comfy_org": "TOKEN-456"}
    with TestClient(app, base_url=LOCAL) as client:
        first = client.post("/prompt", json={"prompt": graph, "extra_data": dict(secrets)}).json()["prompt_id"]
        second = client.post("/prompt", json={"prompt": graph, "extra_data": {**secrets, "x": 1}}).json()
        listings = [client.get("/queue").text, client.get("/jobs").text, client.get(f"/jobs/{first}").text,
                    client.get(f"/jobs/{second['prompt_id']}").text]
        wait_for(lambda: client.get(f"/history/{second['prompt_id']}").json(), timeout=20)
        listings += [client.get("/history").text, client.get("/jobs").text]
        for text in listings:
            assert "KEY-123" not in text and "TOKEN-456" not in text
        entry = client.get(f"/history/{first}").json()[first]
        assert entry["outputs"]["3"] == {"has_key": [True]}
        assert entry["prompt"][3] == {}
    assert b"KEY-123" not in (tmp_path / "user" / "queue.db").read_bytes()


# Malformed JSON ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/prompt", "/queue", "/history", "/free", "/interrupt", "/settings",
                                  "/settings/x", "/jobs/cancel", "/api/prompt"])
def test_malformed_json_is_400(client, path):
    response = client.post(path, content=b'{"prompt": ')
    assert response.status_code == 400
    assert "error" in response.json()


def test_wrong_json_types_are_400(client):
    assert client.post("/prompt", json=[1, 2]).status_code == 400
    assert client.post("/queue", json={"delete": "abc"}).status_code == 400
    assert client.post("/history", json="clear").status_code == 400
    assert client.post("/settings", json=[1]).status_code == 400
    assert client.post("/jobs/cancel", json={"job_ids": 3}).status_code == 400
    assert json.loads(client.post("/free", json=5).text)["error"]
