"""Issue 18 over HTTP: bodies that cannot be stored or served back are a 400; entries poisoned by an older version
are served (and survive a restart) instead of a 500; over-long file names are a 400; credentials are neither
stored nor echoed; previews follow ComfyUI's --preview-method."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import struct
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from latentloom.server.app import config_from_args
from latentloom.server.cli import build_parser
from tests.server_support import const_graph, live_server, make_app, read_until_done, wait_for

SECRET = "sk-very-secret-0123456789"


@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    """A server whose worker does not run: accepted prompts stay in the queue."""
    root = tmp_path_factory.mktemp("robust-idle")
    with TestClient(make_app(root, start_worker=False)) as client:
        yield client


def assert_listings_answer(client: TestClient, *prompt_ids: str) -> None:
    for path in ("/queue", "/history", "/jobs", "/prompt", *[f"/history/{p}" for p in prompt_ids],
                 *[f"/jobs/{p}" for p in prompt_ids]):
        response = client.get(path)
        assert response.status_code in (200, 404), (path, response.status_code, response.text)
        response.json()


# Bodies that could not be served back ------------------------------------------------------------------------

def raw_body(prompt_text: str, **fields: str) -> str:
    extra = "".join(f', "{name}": {value}' for name, value in fields.items())
    return '{"prompt": ' + prompt_text + extra + "}"


GRAPH = json.dumps(const_graph())
REFUSED_BODIES = [
    ("nested 5000 deep", '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", "nested more than"),
    ("nested 200 deep", raw_body(GRAPH, extra_data='{"x": ' + "[" * 200 + "]" * 200 + "}"), "nested more than"),
    ("Infinity in a checked input", raw_body('{"1": {"class_type": "Const", "inputs": {"value": Infinity}}, '
                                             '"3": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}}'),
     "prompt.1.inputs.value: inf is not a finite number"),
    ("NaN in a checked input", raw_body('{"1": {"class_type": "Const", "inputs": {"value": NaN}}, '
                                        '"3": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}}'),
     "prompt.1.inputs.value: nan is not a finite number"),
    ("1e400 overflows to inf", raw_body('{"1": {"class_type": "Const", "inputs": {"value": 1e400}}}'),
     "not a finite number"),
    ("401-digit number", raw_body(GRAPH, number="9" * 401), "number: an integer of 401 digits is too large"),
    ("NaN in extra_data", raw_body(GRAPH, extra_data='{"note": NaN}'), "extra_data.note: nan"),
    ("lone surrogate in client_id", raw_body(GRAPH, client_id='"\\ud800"'), "client_id: a lone UTF-16 surrogate"),
    ("lone surrogate in a prompt text", raw_body('{"1": {"class_type": "Pick", "inputs": {"choice": "a\\udc00"}}}'),
     "prompt.1.inputs.choice: a lone UTF-16 surrogate"),
    ("lone surrogate in a key", raw_body(GRAPH, extra_data='{"\\ud800": 1}'), "lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("name,body,message", REFUSED_BODIES, ids=[c[0] for c in REFUSED_BODIES])
def test_unservable_bodies_are_a_400_naming_the_place(idle, name, body, message):
    before = idle.get("/queue").json()
    response = idle.post("/prompt", content=body.encode())
    assert response.status_code == 400, response.text
    assert message in response.json()["error"], response.json()
    assert idle.get("/queue").json() == before  # nothing was stored
    assert_listings_answer(idle)


def test_emoji_escapes_and_big_seeds_are_still_accepted(idle):
    graph = const_graph()
    graph["1"]["_meta"] = {"title": "\ud83d\ude00"}
    body = {"prompt": graph, "client_id": "smile \ud83d\ude00", "number": 2 ** 64 - 1,
            "extra_data": {"seed": 0xFFFFFFFFFFFFFFFF}}
    response = idle.post("/prompt", content=json.dumps(body))  # ensure_ascii: the emoji as a surrogate pair escape
    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    job = idle.get(f"/jobs/{prompt_id}").json()
    assert job["workflow"]["prompt"]["1"]["_meta"]["title"] == "😀"
    assert job["workflow"]["extra_data"]["seed"] == 2 ** 64 - 1
    assert job["workflow"]["extra_data"]["client_id"] == "smile 😀"


def test_malformed_ui_workflow_names_the_null_node(idle):
    workflow = {"nodes": [{"id": 1, "type": "Const", "inputs": [], "outputs": []}, None], "links": []}
    response = idle.post("/prompt", json={"prompt": workflow})
    assert response.status_code == 400
    assert "nodes[1] is null" in response.json()["error"]["details"]



async def run_after_first_message(base: str, first: str) -> list:
    """A client whose first websocket message is `first`, then runs a prompt: the messages it receives."""
    from websockets.asyncio.client import connect

    async with connect(f"ws{base[4:]}/ws?clientId=odd") as ws:
        await ws.recv()
        await ws.send(first)
        async with httpx.AsyncClient(base_url=base) as http:
            body = {"prompt": const_graph(), "client_id": "odd"}
            prompt_id = (await http.post("/prompt", json=body)).json()["prompt_id"]
        return await read_until_done(ws, prompt_id)


@pytest.mark.parametrize("first", ["[" * 5000 + "]" * 5000, '{"type": "feature_flags", "data": {"x": NaN}}'])
def test_odd_first_websocket_message_is_ignored(tmp_path, first):
    """The websocket's first message (feature flags) goes through the same reader: refused JSON is ignored like
    any message that is not feature flags, and the socket stays open for the prompt's events."""
    with live_server(make_app(tmp_path)) as base:
        messages = asyncio.run(run_after_first_message(base, first))
    assert not any(m["type"] == "feature_flags" for m in messages)
    assert "execution_success" in [m["type"] for m in messages]

# Entries stored by an older version: served, also after a restart --------------------------------------------

def poison(database: Path, prompt_id: str) -> None:
    """What an older version stored for a prompt with NaN in extra_data and lone surrogates in its texts."""
    with sqlite3.connect(database) as db:
        (entry,) = db.execute("SELECT entry FROM history WHERE prompt_id=?", (prompt_id,)).fetchone()
        document = json.loads(entry)
        document["prompt"][3] = {"client_id": "\ud800", "note": float("nan"), "extra_pnginfo": {"n": float("inf")}}
        document["prompt"][2]["1"]["_meta"] = {"title": "bad \udc00 text"}
        db.execute("UPDATE history SET entry=? WHERE prompt_id=?", (json.dumps(document), prompt_id))
        db.execute("INSERT INTO queue (prompt_id, number, prompt, extra_data, outputs, created) "
                   "VALUES ('queued-poison', 5, ?, ?, '[\"3\"]', 1.0)",
                   (json.dumps(const_graph()), '{"client_id": "\\ud800", "x": NaN}'))
        db.execute("INSERT INTO history (prompt_id, entry, status, created, started, finished) "
                   "VALUES ('damaged', '{\"prompt\": [1, ', 'completed', 1.0, 1.0, 2.0)")


def test_poisoned_history_is_served_after_a_restart_until_deleted(tmp_path):
    database = tmp_path / "queue.db"
    with TestClient(make_app(tmp_path, database=database)) as client:
        prompt_id = client.post("/prompt", json={"prompt": const_graph()}).json()["prompt_id"]
        wait_for(lambda: client.get(f"/history/{prompt_id}").json())
    poison(database, prompt_id)
    # The restart: a new app over the same database; its worker stays off so the queued row stays visible.
    with TestClient(make_app(tmp_path, database=database, start_worker=False)) as client:
        assert_listings_answer(client, prompt_id, "queued-poison", "damaged")
        entry = client.get(f"/history/{prompt_id}").json()[prompt_id]
        assert entry["prompt"][3]["client_id"] == "\ufffd" and entry["prompt"][3]["note"] is None
        assert entry["prompt"][2]["1"]["_meta"]["title"] == "bad \ufffd text"
        queued = client.get("/queue").json()["queue_pending"]
        assert queued[0][1] == "queued-poison" and queued[0][3]["x"] is None
        damaged = client.get("/history/damaged").json()["damaged"]
        assert damaged["status"]["status_str"] == "error"
        assert damaged["status"]["messages"][0][1]["exception_type"] == "StoredEntryUnreadable"
        assert client.get("/jobs/damaged").json()["status"] == "completed"
        assert client.post("/history", json={"delete": ["damaged", prompt_id]}).status_code == 200
        assert client.get("/history").json() == {}
    with TestClient(make_app(tmp_path, database=database)) as client:  # the poisoned queued prompt runs, fails
        wait_for(lambda: client.get("/history/queued-poison").json())
        assert_listings_answer(client, "queued-poison")


# File names ----------------------------------------------------------------------------------------------------

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a5d2b1e60000000049454e44ae426082")


@pytest.mark.parametrize("filename,subfolder,message", [
    ("x" * 300 + ".png", "", "too long"),
    ("a.png", "s" * 5000, "too long"),
    ("a.png", "/".join(["d" * 200] * 8), "path too long"),
])
def test_over_long_upload_names_are_a_400(idle, filename, subfolder, message):
    response = idle.post("/upload/image", files={"image": (filename, PNG, "image/png")},
                         data={"subfolder": subfolder})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_over_long_view_and_userdata_names_are_a_400(idle):
    assert idle.get("/view", params={"filename": "x" * 300 + ".png"}).status_code == 400
    assert idle.get("/view", params={"filename": "a.png", "subfolder": "s" * 5000}).status_code == 400
    long_path = "workflows%2F" + "w" * 300 + ".json"
    assert idle.post(f"/userdata/{long_path}", content=b"{}").status_code == 400
    assert idle.get("/view", params={"filename": "x" * 255 + ".png"}).status_code == 400  # 259 bytes
    assert idle.get("/view", params={"filename": "x" * 250 + ".png"}).status_code == 404  # fits: just absent
    # A 255-byte name is fine end to end.
    name = "n" * 251 + ".png"
    assert idle.post("/upload/image", files={"image": (name, PNG, "image/png")}).json()["name"] == name
    assert idle.get("/view", params={"filename": name, "type": "input"}).content == PNG


def test_unfinished_writes_are_never_served(tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    (output / ".img_00001_.png.0123abcd.part").write_bytes(PNG[:20])
    (output / "whole.png").write_bytes(PNG)
    with TestClient(make_app(tmp_path, start_worker=False)) as client:
        assert client.get("/internal/files/output").json() == ["whole.png"]
        assert client.get("/view", params={"filename": ".img_00001_.png.0123abcd.part"}).status_code == 404


# Credentials -------------------------------------------------------------------------------------------------

def secret_extra_data() -> dict:
    return {"api_key_comfy_org": SECRET, "credentials": {"user": "me", "password": SECRET}, "bearer": SECRET,
            "Authorization": f"Bearer {SECRET}", "author": "kept", "max_tokens": 77,
            "extra_pnginfo": {"workflow": {"nodes": [], "extra": {"api_key_comfy_org": SECRET,
                                                                  "deep": [{"auth_token": SECRET}]}}}}


def test_credentials_are_neither_stored_nor_echoed(tmp_path):
    database = tmp_path / "queue.db"
    with TestClient(make_app(tmp_path, database=database, start_worker=False)) as client:
        prompt_id = client.post("/prompt", json={"prompt": const_graph(),
                                                 "extra_data": secret_extra_data()}).json()["prompt_id"]
        for path in ("/queue", f"/jobs/{prompt_id}", "/jobs"):
            assert SECRET not in client.get(path).text, path
        stored = client.get(f"/jobs/{prompt_id}").json()["workflow"]["extra_data"]
        assert stored["author"] == "kept" and stored["max_tokens"] == 77
        assert stored["extra_pnginfo"]["workflow"]["extra"] == {"deep": [{}]}
        store = client.app.state.server.store
        assert store._secrets[prompt_id] == {key: secret_extra_data()[key] for key in
                                             ("api_key_comfy_org", "credentials", "bearer", "Authorization")}
    assert SECRET.encode() not in database.read_bytes()
    wal = database.with_name(database.name + "-wal")
    assert not wal.exists() or SECRET.encode() not in wal.read_bytes()


def test_credentials_reach_the_nodes_but_not_the_history(tmp_path):
    seen = []
    with TestClient(make_app(tmp_path)) as client:
        engine = client.app.state.server.engine
        original = engine.executor.run_async

        async def spy(graph, prompt_id=None, extra_data=None, interrupt=None):
            seen.append(extra_data)
            return await original(graph, prompt_id, extra_data, interrupt)

        engine.executor.run_async = spy
        prompt_id = client.post("/prompt", json={"prompt": const_graph(),
                                                 "extra_data": secret_extra_data()}).json()["prompt_id"]
        wait_for(lambda: client.get(f"/history/{prompt_id}").json())
        assert SECRET not in client.get("/history").text and SECRET not in client.get(f"/jobs/{prompt_id}").text
    assert seen[0]["api_key_comfy_org"] == SECRET  # top-level credentials: in memory, for API nodes
    assert SECRET not in json.dumps(seen[0]["extra_pnginfo"])  # nested ones never reach image metadata


# Previews ------------------------------------------------------------------------------------------------------

PREVIEW_GRAPH = {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
                 "2": {"class_type": "PreviewSteps", "inputs": {"value": ["1", 0], "steps": 3}},
                 "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}


async def frames_for(base: str, client_id: str, extra_data: dict | None) -> tuple[int, int]:
    """(binary frames, progress messages) a client receives for one run of PREVIEW_GRAPH."""
    from websockets.asyncio.client import connect

    async with connect(f"ws{base[4:]}/ws?clientId={client_id}") as ws:
        await ws.recv()
        async with httpx.AsyncClient(base_url=base) as http:
            body = {"prompt": PREVIEW_GRAPH, "client_id": client_id, **({"extra_data": extra_data}
                                                                        if extra_data is not None else {})}
            prompt_id = (await http.post("/prompt", json=body)).json()["prompt_id"]
        messages = await read_until_done(ws, prompt_id)
    frames = [m for m in messages if isinstance(m, bytes)]
    assert all(struct.unpack(">I", frame[:4])[0] == 1 for frame in frames)
    return len(frames), sum(1 for m in messages if isinstance(m, dict) and m["type"] == "progress")


@pytest.mark.parametrize("server_method,extra_data,expected_frames", [
    ("none", None, 0),                                   # ComfyUI's default: no previews
    ("none", {"preview_method": "default"}, 0),
    ("none", {"preview_method": "auto"}, 3),             # the editor's "Live preview method" setting
    ("none", {"preview_method": "taesd"}, 3),            # no TAESD decoder: latent2rgb, as without weights
    ("latent2rgb", None, 3),
    ("auto", {"preview_method": "none"}, 0),
])
def test_previews_follow_the_preview_method(tmp_path, server_method, extra_data, expected_frames):
    with live_server(make_app(tmp_path, preview_method=server_method)) as base:
        frames, progress = asyncio.run(frames_for(base, "viewer", extra_data))
    assert (frames, progress) == (expected_frames, 3)


def test_preview_method_is_checked(idle):
    response = idle.post("/prompt", json={"prompt": const_graph(), "extra_data": {"preview_method": "fancy"}})
    assert response.status_code == 400 and "preview_method" in response.json()["error"]["message"]
    args = build_parser().parse_args(["serve", "--preview-method", "latent2rgb"])
    assert config_from_args(args).preview_method == "latent2rgb"
    assert config_from_args(build_parser().parse_args(["serve"])).preview_method == "none"
