"""Custom node packs with `serve --workers ray`: each actor's engine loads the `--custom-nodes` folder, pack nodes
run on the workers, and what a pack sends through `PromptServer.instance` there (send_sync, send_progress_text)
reaches the server's websocket clients; the pack's HTTP routes are served by the server process."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from websockets.asyncio.client import connect

from latentloom.server.app import create_app
from latentloom.server.ray_pool import EngineFactory, EngineWorker
from latentloom.server.state import ServerConfig
from tests.ray_support import workers_that_ran
from tests.server_support import live_server, read_until_done, wait_for
from tests.test_custom_nodes import PACKS, engine_for, make_root


def pack_engine_factory(root: Path) -> EngineFactory:
    """The actors' engine with the test packs (the Ray test checks it is what `serve --custom-nodes` builds)."""
    return EngineFactory("latentloom.nodes:create_engine", {
        "models_dir": str(root / "models"), "input_dir": str(root / "input"), "output_dir": str(root / "output"),
        "temp_dir": str(root / "temp"), "extra_model_paths": None, "custom_nodes_dir": str(PACKS),
        "cache_bytes": None, "cache_prompts": None})


def notify_graph(message: str) -> dict:
    return {"1": {"class_type": "PackNotify", "inputs": {"message": message}}}


def test_a_worker_streams_pack_messages_with_the_prompt(tmp_path):
    """EngineWorker (the body of an actor, no Ray needed): messages a pack sends while its node runs travel in the
    prompt's stream, in order, before the result."""
    worker = EngineWorker(pack_engine_factory(make_root(tmp_path)))
    try:
        messages = [message for batch in worker.run("p1", notify_graph("hey"), [], {"client_id": "ann"})
                    for message in batch]
    finally:
        worker.close()
    kinds = [message[0] for message in messages]
    assert kinds[-1] == "result" and messages[-1][1]["status"] == "success"
    relayed = [message for message in messages if message[0].startswith("pack_")]
    assert relayed == [("pack_json", ("v1_routes.message", {"message": "hey", "node": "1"}, None)),
                       ("pack_text", ("1", "said hey", "ann"))]
    executed = kinds.index("executed")
    assert kinds.index("pack_json") < kinds.index("pack_text") < executed  # as the node sent them


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'latentloom[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_pack_nodes_run_on_ray_workers_and_their_messages_reach_the_hub(cluster, tmp_path):
    from latentloom.server.dispatch import PoolOptions, engine_factory_from_args

    root = make_root(tmp_path)
    flags = SimpleNamespace(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                            temp_dir=root / "temp", extra_model_paths=None, custom_nodes=str(PACKS))
    factory = engine_factory_from_args(flags)  # how `serve --workers ray --custom-nodes DIR` builds the actors'
    assert factory == pack_engine_factory(root)
    options = PoolOptions(factory, num_workers=1)
    app = create_app(engine_for(root), ServerConfig(user_dir=root / "user", database=root / "queue.db",
                                                    workers="ray", worker_options=options))

    async def scenario(base: str, pool) -> None:
        async with httpx.AsyncClient(base_url=base) as http:
            # Routes are the server's: the pack is loaded there as well as in every worker.
            hello = await http.get("/v1_routes/hello/ray")
            assert hello.status_code == 200 and hello.json() == {"hello": "ray", "times": 1}
            async with connect(base.replace("http://", "ws://") + "/ws?clientId=me") as ws:
                await ws.recv()  # status
                reply = await http.post("/prompt", json={"prompt": notify_graph("from a worker"),
                                                         "client_id": "me"})
                assert reply.status_code == 200, reply.text
                prompt_id = reply.json()["prompt_id"]
                messages = await read_until_done(ws, prompt_id, timeout=120)
        assert workers_that_ran(pool, [prompt_id]) == [pool.workers()[0]["id"]]
        custom = [m for m in messages if isinstance(m, dict) and m["type"] == "v1_routes.message"]
        assert custom == [{"type": "v1_routes.message", "data": {"message": "from a worker", "node": "1"}}]
        frames = [m for m in messages if isinstance(m, bytes) and struct.unpack(">I", m[:4])[0] == 3]
        assert [frame[8:] for frame in frames] == [b"1said from a worker"]
        kinds = [m["type"] for m in messages if isinstance(m, dict)]
        assert kinds.index("v1_routes.message") < kinds.index("executed")
        executed = [m for m in messages if isinstance(m, dict) and m["type"] == "executed"]
        assert executed[0]["data"]["output"] == {"text": ["from a worker"]}

    with live_server(app) as base:
        pool = app.state.server.worker
        wait_for(lambda: [w["state"] for w in pool.workers()] == ["idle"], timeout=120)
        asyncio.run(scenario(base, pool))
