"""The websocket protocol against a real uvicorn on 127.0.0.1: ComfyUI's event order for success, all-cached, error
and interrupt; routing to the submitting client only; binary previews; 20 clients x 10 prompts isolation."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from typing import Annotated, Any

import httpx
import pytest
from websockets.asyncio.client import connect

from latentloom.engine.node import Node
from latentloom.engine.types import FLOAT, Int, Output, Socket
from tests.server_support import const_graph, fail_graph, live_server, make_app, read_until_done, steps_graph


class BigPreview(Node):
    """Progress with 256 KiB previews (enough to fill a stalled socket's buffers)."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]
    steps: Annotated[int, Int(min=1, max=1000)] = 10

    def run(self, ctx):
        for step in range(self.steps):
            time.sleep(0.005)  # a (very fast) sampler step
            ctx.progress(step + 1, self.steps, preview=("image/jpeg", bytes(256 * 1024)))
        return (self.value,)


@pytest.fixture()
def server(tmp_path):
    with live_server(make_app(tmp_path)) as base:
        yield base


def ws_url(base: str, client_id: str) -> str:
    return base.replace("http://", "ws://") + f"/ws?clientId={client_id}"


async def submit(http: httpx.AsyncClient, graph: dict, client_id: str | None, **body) -> str:
    payload = {"prompt": graph, **body}
    if client_id is not None:
        payload["client_id"] = client_id
    response = await http.post("/prompt", json=payload)
    assert response.status_code == 200, response.text
    return response.json()["prompt_id"]


def summary(messages: list) -> list:
    """(type, node) for JSON messages except progress_state (which interleaves everywhere)."""
    out = []
    for message in messages:
        if isinstance(message, bytes) or message["type"] == "progress_state":
            continue
        data = message["data"]
        out.append((message["type"], data.get("node") if message["type"] in ("executing", "executed") else None))
    return out


async def connected(base: str, client_id: str):
    ws = await connect(ws_url(base, client_id))
    hello = json.loads(await ws.recv())
    assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}}
    return ws


def test_success_then_all_cached_order(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            ws = await connected(server, "alice")
            first = await submit(http, const_graph(2.0), "alice")
            messages = await read_until_done(ws, first)
            assert summary(messages) == [
                ("status", None), ("status", None), ("execution_start", None), ("execution_cached", None),
                ("executing", "1"), ("executing", "2"), ("executing", "3"), ("executed", "3"),
                ("execution_success", None), ("status", None), ("executing", None)]
            by_type = {m["type"]: m["data"] for m in messages}
            assert set(by_type["execution_start"]) == {"prompt_id", "timestamp"}
            assert by_type["execution_cached"]["nodes"] == []
            assert by_type["executed"] == {"node": "3", "display_node": "3", "output": {"values": [2.0]},
                                           "prompt_id": first}
            states = [m["data"]["nodes"] for m in messages if m["type"] == "progress_state"]
            assert states[-1]["3"]["state"] == "finished"
            assert messages[-2]["data"]["status"]["exec_info"]["queue_remaining"] == 0
            # History is written before the done signal.
            assert (await http.get(f"/history/{first}")).json()[first]["status"]["completed"] is True

            second = await submit(http, const_graph(2.0), "alice")
            cached = await read_until_done(ws, second)
            assert summary(cached) == [
                ("status", None), ("status", None), ("execution_start", None), ("execution_cached", None),
                ("executed", "3"), ("execution_success", None), ("status", None), ("executing", None)]
            cached_nodes = next(m["data"]["nodes"] for m in cached if m["type"] == "execution_cached")
            assert sorted(cached_nodes) == ["1", "2", "3"]
            await ws.close()

    asyncio.run(scenario())


def test_error_order_and_fields(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            ws = await connected(server, "bob")
            prompt_id = await submit(http, fail_graph("exploded"), "bob")
            messages = await read_until_done(ws, prompt_id)
            assert summary(messages)[-5:] == [("executing", "1"), ("executing", "2"), ("execution_error", None),
                                              ("status", None), ("executing", None)]
            error = next(m["data"] for m in messages if m["type"] == "execution_error")
            assert error["node_id"] == "2" and error["node_type"] == "Fail"
            assert error["exception_message"] == "exploded" and error["exception_type"] == "RuntimeError"
            assert error["executed"] == ["1"] and isinstance(error["traceback"], list)
            assert error["current_inputs"]["message"] == ["exploded"]
            await ws.close()

    asyncio.run(scenario())


def test_interrupt_order_and_only_running_prompt(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            ws = await connected(server, "carol")
            slow = await submit(http, steps_graph(steps=200, pause=0.02), "carol")
            after = await submit(http, const_graph(5.0), "carol")
            # An interrupt naming another prompt does nothing.
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "progress":
                    break
            await http.post("/interrupt", json={"prompt_id": after})
            await asyncio.sleep(0.1)
            assert (await http.get(f"/history/{slow}")).json() == {}
            await http.post("/interrupt", json={"prompt_id": slow})
            messages = await read_until_done(ws, slow)
            tail = summary(messages)[-3:]
            assert tail == [("execution_interrupted", None), ("status", None), ("executing", None)]
            interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
            assert interrupted["node_id"] == "2" and interrupted["node_type"] == "Steps"
            assert set(interrupted) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
            # The pending prompt still runs, to success.
            rest = await read_until_done(ws, after)
            assert ("execution_success", None) in summary(rest)
            entry = (await http.get(f"/history/{slow}")).json()[slow]
            assert entry["status"] == {"status_str": "error", "completed": False,
                                       "messages": entry["status"]["messages"]}
            await ws.close()

    asyncio.run(scenario())


def test_events_go_only_to_the_submitting_client(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            owner = await connected(server, "owner")
            other = await connected(server, "other")
            prompt_id = await submit(http, steps_graph(steps=3), "owner")
            await read_until_done(owner, prompt_id)
            await asyncio.sleep(0.2)
            seen = []
            while True:
                try:
                    seen.append(json.loads(await asyncio.wait_for(other.recv(), 0.3)))
                except TimeoutError:
                    break
            assert seen and {m["type"] for m in seen} == {"status"}
            await owner.close()
            await other.close()

    asyncio.run(scenario())


def test_prompt_without_client_broadcasts_only_progress(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            watcher = await connected(server, "watcher")
            prompt_id = await submit(http, steps_graph(steps=2), None)
            types = []
            while not any(t == "status" and q == 0 for t, q in types):
                message = json.loads(await asyncio.wait_for(watcher.recv(), 10))
                queue = message["data"].get("status", {}).get("exec_info", {}).get("queue_remaining")
                types.append((message["type"], queue))
            kinds = {t for t, _ in types}
            assert "progress" in kinds and "progress_state" in kinds
            assert not kinds & {"executing", "executed", "execution_start", "execution_success"}
            assert (await http.get(f"/history/{prompt_id}")).json()[prompt_id]["status"]["completed"]
            await watcher.close()

    asyncio.run(scenario())


def test_feature_flags_and_binary_previews(server):
    graph = {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
             "2": {"class_type": "PreviewSteps", "inputs": {"value": ["1", 0], "steps": 2}},
             "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}

    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            rich = await connected(server, "rich")
            await rich.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            reply = json.loads(await rich.recv())
            assert reply == {"type": "feature_flags", "data": {"supports_preview_metadata": True,
                                                               "max_upload_size": 104857600.0}}
            plain = await connected(server, "plain")
            # Previews are off by default (ComfyUI's --preview-method none); the editor asks per prompt.
            asked = {"extra_data": {"preview_method": "latent2rgb"}}
            rich_id = await submit(http, graph, "rich", **asked)
            rich_messages = await read_until_done(rich, rich_id)
            plain_id = await submit(http, {**graph, "1": {"class_type": "Const", "inputs": {"value": 2.0}}},
                                    "plain", **asked)
            plain_messages = await read_until_done(plain, plain_id)

            frames = [m for m in rich_messages if isinstance(m, bytes)]
            assert len(frames) == 2
            kind, length = struct.unpack(">II", frames[0][:8])
            metadata = json.loads(frames[0][8:8 + length])
            assert kind == 4 and metadata["prompt_id"] == rich_id and metadata["node_id"] == "2"
            assert metadata["image_type"] == "image/png" and frames[0][8 + length:].startswith(b"\x89PNG")
            # Order per step: preview (type 4) before the progress message.
            index = rich_messages.index(frames[0])
            assert rich_messages[index + 1]["type"] == "progress"

            plain_frames = [m for m in plain_messages if isinstance(m, bytes)]
            assert len(plain_frames) == 2
            assert struct.unpack(">II", plain_frames[0][:8]) == (1, 2)
            index = plain_messages.index(plain_frames[0])
            assert plain_messages[index - 1]["type"] == "progress"
            await rich.close()
            await plain.close()

    asyncio.run(scenario())


def test_reconnect_with_same_id_keeps_receiving(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            old = await connected(server, "same")
            new = await connected(server, "same")
            await old.close()
            await asyncio.sleep(0.1)
            prompt_id = await submit(http, const_graph(8.0), "same")
            messages = await read_until_done(new, prompt_id)
            assert ("execution_success", None) in summary(messages)
            await new.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_twenty_clients_ten_prompts_each_are_isolated(server):
    clients, per_client = 20, 10

    async def one_client(http: httpx.AsyncClient, index: int) -> None:
        client_id = f"client-{index}"
        ws = await connected(server, client_id)
        mine = [await submit(http, const_graph(float(index), float(n)), client_id) for n in range(per_client)]
        finished: set[str] = set()
        async with asyncio.timeout(90):
            while finished != set(mine):
                raw = await ws.recv()
                message = json.loads(raw)
                data = message["data"]
                if "prompt_id" in data:
                    assert data["prompt_id"] in mine, f"{client_id} received an event of another client"
                if message["type"] == "executing" and data["node"] is None:
                    finished.add(data["prompt_id"])
                if message["type"] == "executed":
                    assert data["output"] == {"values": [float(index) + mine.index(data["prompt_id"])]}
        await ws.close()

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            await asyncio.gather(*(one_client(http, i) for i in range(clients)))
            history = (await http.get("/history")).json()
            assert len(history) == clients * per_client
            assert all(entry["status"]["completed"] for entry in history.values())

    asyncio.run(scenario())


def stalled_socket(base: str, client_id: str) -> socket.socket:
    """A websocket handshake on a raw socket with a tiny receive buffer, which then never reads."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


@pytest.mark.slow
def test_a_stalled_client_does_not_block_the_others(tmp_path, monkeypatch):
    """A client that stops reading fills its own outbox and is cut off; everyone else keeps receiving."""
    from latentloom.server import ws as ws_module

    monkeypatch.setattr(ws_module, "OUTBOX_BYTES", 2 * 1024 * 1024)
    big_preview_graph = {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
                         "2": {"class_type": "BigPreview", "inputs": {"value": ["1", 0], "steps": 200}},
                         "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    app = make_app(tmp_path)
    app.state.server.engine.registry.register(BigPreview)
    with live_server(app) as base:
        async def scenario():
            async with httpx.AsyncClient(base_url=base) as http:
                stalled = stalled_socket(base, "stalled")
                healthy = await connected(base, "healthy")
                # The stalled client's own prompt floods it with previews.
                noisy = await submit(http, big_preview_graph, "stalled",
                                     extra_data={"preview_method": "auto"})
                mine = await submit(http, const_graph(7.0), "healthy")
                async with asyncio.timeout(30):
                    messages = await read_until_done(healthy, mine)
                assert ("execution_success", None) in summary(messages)
                assert (await http.get(f"/history/{noisy}")).json()[noisy]["status"]["completed"]
                assert "stalled" not in app.state.server.hub.clients
                stalled.close()
                await healthy.close()

        asyncio.run(scenario())


def test_reconnect_during_run_is_told_the_running_node(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            first = await connected(server, "again")
            prompt_id = await submit(http, steps_graph(steps=100, pause=0.02), "again")
            while True:
                message = json.loads(await first.recv())
                if message["type"] == "progress":
                    break
            await first.close()
            second = await connect(ws_url(server, "again"))
            hello = [json.loads(await second.recv()) for _ in range(2)]
            assert hello[0]["type"] == "status" and hello[0]["data"]["sid"] == "again"
            assert hello[1] == {"type": "executing", "data": {"node": "2", "display_node": "2",
                                                              "prompt_id": prompt_id}}
            await http.post("/interrupt")
            await read_until_done(second, prompt_id)
            await second.close()

    asyncio.run(scenario())


def test_log_subscription_streams_log_lines(server):
    import logging

    async def scenario():
        async with httpx.AsyncClient(base_url=server) as http:
            ws = await connected(server, "logger")
            response = await http.patch("/internal/logs/subscribe", json={"clientId": "logger", "enabled": True})
            assert response.status_code == 200
            logging.getLogger("latentloom.test").warning("streamed line")
            message = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert message["type"] == "logs"
            assert message["data"]["entries"][0]["m"].startswith("streamed line")
            await ws.close()

    asyncio.run(scenario())
