"""The Ray worker pool on a local 2-CPU Ray cluster, through a real server: prompts spread over 2 workers, the
websocket events equal local mode's, interrupt reaches the right worker, model affinity, and a worker killed
mid-prompt (the prompt finishes on the other worker, nothing lost or duplicated, events in order)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'latentloom[ray]')")

from websockets.asyncio.client import connect  # noqa: E402

from latentloom.server.app import create_app  # noqa: E402
from latentloom.server.state import ServerConfig  # noqa: E402
from tests.ray_support import image_graph, loader_graph, make_engine, make_ray_app, wait_history, workers_that_ran  # noqa: E402
from tests.server_support import TINY_PNG, live_server, read_until_done, wait_for  # noqa: E402

pytestmark = pytest.mark.ray

VOLATILE = {"timestamp", "prompt_id"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory, cluster):
    return tmp_path_factory.mktemp("ray_pool")


@pytest.fixture(scope="module")
def served(root):
    """One server with a pool of 2 workers, shared by the tests of this module (actors take seconds to start)."""
    app = make_ray_app(root, num_workers=2)
    with live_server(app) as base:
        pool = app.state.server.worker
        wait_for(lambda: sum(w["state"] == "idle" for w in pool.workers()) == 2, timeout=60)
        yield base, pool


def all_idle(pool) -> bool:
    workers = pool.workers()
    return len(workers) == 2 and all(w["state"] == "idle" for w in workers)


def ws_url(base: str, client_id: str) -> str:
    return base.replace("http://", "ws://") + f"/ws?clientId={client_id}"


async def run_and_record(base: str, graph: dict, client_id: str) -> tuple[str, list]:
    async with connect(ws_url(base, client_id)) as ws:
        await ws.recv()  # the hello status
        async with httpx.AsyncClient(base_url=base) as http:
            response = await http.post("/prompt", json={"prompt": graph, "client_id": client_id,
                                                         "extra_data": {"preview_method": "auto"}})
            assert response.status_code == 200, response.text
            prompt_id = response.json()["prompt_id"]
        return prompt_id, await read_until_done(ws, prompt_id, timeout=60)


def normalised(messages: list) -> list:
    """Messages without their timestamps and prompt ids (which differ between two runs of one graph)."""
    out = []
    for message in messages:
        if isinstance(message, bytes):
            out.append(message)
            continue
        data = message["data"]
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in VOLATILE}
            if message["type"] == "status":
                # How many prompts a status counts depends on whether the queue had already handed the prompt to a
                # worker when the broadcast went out: a race in either mode, not a difference between them.
                data = {"status": "queue"}
            if message["type"] == "progress_state":
                data["nodes"] = {n: {k: v for k, v in s.items() if k != "prompt_id"} for n, s in data["nodes"].items()}
        out.append((message["type"], json.dumps(data, sort_keys=True)))
    return out


def preview_graph() -> dict:
    """Progress with PNG previews, then a saved image: every kind of message a prompt sends."""
    return {"1": {"class_type": "Const", "inputs": {"value": 0.25}},
            "2": {"class_type": "PreviewSteps", "inputs": {"value": ["1", 0], "steps": 3}},
            "3": {"class_type": "ValueImage", "inputs": {"value": ["2", 0], "size": 8, "batch": 2}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "same"}}}


def test_events_and_outputs_equal_local_mode(served, tmp_path):
    base, pool = served
    _, remote = asyncio.run(run_and_record(base, preview_graph(), "carol"))
    local_app = create_app(make_engine(tmp_path), ServerConfig(user_dir=tmp_path / "user"))
    with live_server(local_app) as local_base:
        _, local = asyncio.run(run_and_record(local_base, preview_graph(), "carol"))
    assert normalised(remote) == normalised(local)
    assert any(isinstance(m, bytes) and m.endswith(TINY_PNG) for m in remote)  # previews came through
    executed = [m for m in remote if isinstance(m, dict) and m["type"] == "executed"]
    names = [image["filename"] for image in executed[0]["data"]["output"]["images"]]
    assert names == ["same_00001_.png", "same_00002_.png"]
    for name in names:  # where /view finds them, as whole PNG files
        body = httpx.get(f"{base}/view", params={"filename": name, "type": "output"}).content
        assert body.startswith(b"\x89PNG") and body == (tmp_path / "output" / name).read_bytes()


def test_prompts_spread_over_two_workers(served, root):
    base, pool = served
    with httpx.Client(base_url=base) as http:
        ids = [http.post("/prompt", json={"prompt": image_graph(i / 10, steps=4, pause=0.05, prefix="spread")})
               .json()["prompt_id"] for i in range(6)]
        entries = [wait_history(http, prompt_id) for prompt_id in ids]
    assert all(entry["status"]["status_str"] == "success" for entry in entries)
    workers = set(workers_that_ran(pool, ids))
    assert len(workers) == 2
    names = sorted(entry["outputs"]["4"]["images"][0]["filename"] for entry in entries)
    assert names == [f"spread_{n:05}_.png" for n in range(1, 7)]  # one counter across workers, no collision
    on_disk = sorted(p.name for p in (root / "output").iterdir() if p.name.startswith("spread"))
    assert on_disk == names
    assert not [p for p in (root / "output").iterdir() if p.name.endswith(".part")]


def test_interrupt_reaches_the_worker_running_that_prompt(served):
    base, pool = served
    wait_for(lambda: all_idle(pool), timeout=30)
    with httpx.Client(base_url=base) as http:
        first = http.post("/prompt", json={"prompt": image_graph(0.1, steps=150, pause=0.02, prefix="int")})
        second = http.post("/prompt", json={"prompt": image_graph(0.2, steps=60, pause=0.02, prefix="int")})
        first, second = first.json()["prompt_id"], second.json()["prompt_id"]
        running = lambda: {w["running"]: w["id"] for w in pool.workers() if w["running"]}  # noqa: E731
        wait_for(lambda: {first, second} <= set(running()), timeout=30)
        where = running()
        assert where[first] != where[second]
        http.post("/interrupt", json={"prompt_id": first})
        interrupted = wait_history(http, first)
        finished = wait_history(http, second)
    assert [m[0] for m in interrupted["status"]["messages"]][-1] == "execution_interrupted"
    assert finished["status"]["status_str"] == "success"
    assert [m[0] for m in finished["status"]["messages"]][-1] == "execution_success"


def test_prompts_go_to_the_worker_that_holds_their_model(served, root):
    base, pool = served
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "alpha.safetensors").write_bytes(b"a" * 1000)
    (checkpoints / "beta.safetensors").write_bytes(b"b" * 2000)
    chosen = []
    with httpx.Client(base_url=base) as http:
        for index, name in enumerate(["alpha", "beta", "alpha", "beta", "alpha"]):
            wait_for(lambda: all_idle(pool), timeout=30)
            prompt_id = http.post("/prompt", json={"prompt": loader_graph(f"{name}.safetensors", index)}) \
                .json()["prompt_id"]
            assert wait_history(http, prompt_id)["status"]["status_str"] == "success"
            chosen.extend(workers_that_ran(pool, [prompt_id]))
    assert chosen[0] != chosen[1]                       # nothing loaded yet: the worker holding fewer models
    assert chosen[2] == chosen[4] == chosen[0]          # alpha stays where alpha is loaded
    assert chosen[3] == chosen[1]


def kill_graph() -> dict:
    """A first image saved while a slow async node runs, then a second image: a kill during the sleep lands after
    the first file was committed (the retry must not save it again under a new number)."""
    return {"1": {"class_type": "Const", "inputs": {"value": 0.5}},
            "2": {"class_type": "Sleep", "inputs": {"value": ["1", 0], "seconds": 1.5}},
            "3": {"class_type": "ValueImage", "inputs": {"value": ["2", 0], "size": 8, "batch": 1}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "kill"}},
            "5": {"class_type": "ValueImage", "inputs": {"value": ["1", 0], "size": 8, "batch": 1}},
            "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "kill"}}}


def test_worker_killed_mid_prompt_prompt_finishes_elsewhere(served, root):
    base, pool = served
    wait_for(lambda: all_idle(pool), timeout=30)

    async def scenario():
        async with connect(ws_url(base, "dave")) as ws:
            await ws.recv()
            async with httpx.AsyncClient(base_url=base) as http:
                response = await http.post("/prompt", json={"prompt": kill_graph(), "client_id": "dave"})
                prompt_id = response.json()["prompt_id"]
            messages, killed = [], None
            async with asyncio.timeout(60):
                while True:
                    message = json.loads(await ws.recv())
                    messages.append(message)
                    if killed is None and message["type"] == "executed" and message["data"]["node"] == "6":
                        killed = next(s for s in pool.slots if s.item and s.item.prompt_id == prompt_id)
                        ray.kill(killed.actor)
                    if message["type"] == "executing" and message["data"]["node"] is None:
                        return prompt_id, messages, killed.worker_id

    prompt_id, messages, killed_id = asyncio.run(scenario())
    types = [m["type"] for m in messages]
    assert types.count("execution_start") == 2      # the first attempt, then the retry
    retry_at = len(types) - 1 - types[::-1].index("execution_start")
    retry = types[retry_at:]
    first_attempt = [m["data"]["node"] for m in messages[:retry_at] if m["type"] == "executed"]
    assert first_attempt == ["6"]  # the dead attempt had committed its first image already
    assert retry[-3:] == ["execution_success", "status", "executing"]
    assert [m["data"]["node"] for m in messages if m["type"] == "executed"][-2:] == ["6", "4"]
    history = httpx.get(f"{base}/history/{prompt_id}").json()[prompt_id]
    assert history["status"]["status_str"] == "success"
    assert [m[0] for m in history["status"]["messages"]].count("execution_start") == 1  # the run that counted
    saved = sorted(p.name for p in (root / "output").iterdir() if p.name.startswith("kill"))
    assert saved == ["kill_00001_.png", "kill_00002_.png"]  # no duplicate from the dead attempt, no partial
    outputs = sorted(image["filename"] for node in ("4", "6") for image in history["outputs"][node]["images"])
    assert outputs == saved
    assert not any(p.name.endswith(".part") for p in (root / "output").iterdir())
    # The pool replaced the dead worker.
    wait_for(lambda: all_idle(pool) and killed_id not in {w["id"] for w in pool.workers()}, timeout=60)
    assert Path(root / "output").is_dir()


def test_a_prompt_that_kills_every_worker_fails_after_three_tries(served):
    base, pool = served
    wait_for(lambda: all_idle(pool), timeout=60)
    graph = {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
             "2": {"class_type": "Crash", "inputs": {"value": ["1", 0]}},
             "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    with httpx.Client(base_url=base) as http:
        prompt_id = http.post("/prompt", json={"prompt": graph}).json()["prompt_id"]
        entry = wait_history(http, prompt_id, timeout=90)
        after = http.post("/prompt", json={"prompt": image_graph(prefix="after")}).json()["prompt_id"]
        assert wait_history(http, after, timeout=60)["status"]["status_str"] == "success"
    assert entry["status"]["status_str"] == "error"
    error = dict(entry["status"]["messages"])["execution_error"]
    assert error["exception_type"] == "WorkerLost" and "3 times" in error["exception_message"]
    wait_for(lambda: all_idle(pool), timeout=60)   # the pool is back to two live workers
