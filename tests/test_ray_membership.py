"""Ray pool membership and restarts on a local Ray cluster of 2 CPUs that declares 2 GPUs: one worker per GPU by
default; workers join and leave while prompts run (every prompt still runs exactly once), a worker that cannot be
placed yet waits without blocking the others; a server restart loses no queued prompt (the one running at shutdown
runs again)."""

from __future__ import annotations

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'latentloom[ray]')")

from tests.ray_support import image_graph, make_ray_app, wait_history, workers_that_ran  # noqa: E402
from tests.server_support import live_server, wait_for  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # Two GPUs declared (none exist): the pool's GPU path (one actor per GPU, num_gpus=1) runs on CPUs.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024**2)
    try:
        yield
    finally:
        ray.shutdown()


def states(pool) -> list[str]:
    return sorted(w["state"] for w in pool.workers())


def test_one_worker_per_gpu_by_default(tmp_path):
    app = make_ray_app(tmp_path, num_workers=None)
    with live_server(app) as base, httpx.Client(base_url=base) as http:
        pool = app.state.server.worker
        wait_for(lambda: states(pool) == ["idle", "idle"], timeout=60)
        assert pool.target == 2
        assert sorted(gpu for w in pool.workers() for gpu in w["gpus"]) == ["0", "1"]  # one GPU each
        prompt_id = http.post("/prompt", json={"prompt": image_graph(prefix="gpu")}).json()["prompt_id"]
        assert wait_history(http, prompt_id)["status"]["status_str"] == "success"


def test_workers_join_and_leave_while_prompts_run(tmp_path):
    app = make_ray_app(tmp_path, num_workers=1)
    with live_server(app) as base, httpx.Client(base_url=base) as http:
        pool = app.state.server.worker
        # Prompts long enough (0.8 s each) that a second worker, whose start imports torch, still finds work.
        ids = [http.post("/prompt", json={"prompt": image_graph(i / 20, steps=8, pause=0.1, prefix="member")})
               .json()["prompt_id"] for i in range(10)]
        wait_for(lambda: states(pool) == ["busy"], timeout=60)
        pool.resize(3)   # one more fits the 2 CPUs; the third waits for resources (a node that never joins)
        # Two placed (a worker is idle for a moment between prompts), the third still waiting for its CPU.
        wait_for(lambda: states(pool) in (["busy", "busy", "starting"], ["busy", "idle", "starting"]), timeout=60)
        wait_for(lambda: len({timing["worker"] for timing in list(pool.timings)}) == 2, timeout=60)
        pool.resize(1)   # the waiting one goes at once, a busy one after its prompt
        wait_for(lambda: len(pool.workers()) == 1, timeout=60)
        entries = [wait_history(http, prompt_id, timeout=60) for prompt_id in ids]
    assert all(entry["status"]["status_str"] == "success" for entry in entries)
    ran_on = workers_that_ran(pool, ids)
    assert len(pool.timings) == 10 and len(set(ran_on)) == 2    # one run per prompt; two workers took part
    names = sorted(entry["outputs"]["4"]["images"][0]["filename"] for entry in entries)
    assert names == [f"member_{n:05}_.png" for n in range(1, 11)]
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == names


def test_server_restart_loses_no_queued_prompt(tmp_path):
    database = tmp_path / "queue.db"
    first_app = make_ray_app(tmp_path, num_workers=1, database=database)
    with live_server(first_app) as base, httpx.Client(base_url=base) as http:
        pool = first_app.state.server.worker
        ids = [http.post("/prompt", json={"prompt": image_graph(i / 10, steps=40, pause=0.03, prefix="restart")})
               .json()["prompt_id"] for i in range(3)]
        wait_for(lambda: pool.running_prompt_id == ids[0], timeout=60)
    # The first server stopped mid-prompt: nothing of it is in the history, everything is still queued.
    second_app = make_ray_app(tmp_path, num_workers=2, database=database)
    assert second_app.state.server.store.history() == {}
    assert sorted(item.prompt_id for item in second_app.state.server.store.items("pending")) == sorted(ids)
    with live_server(second_app) as base, httpx.Client(base_url=base) as http:
        entries = [wait_history(http, prompt_id, timeout=60) for prompt_id in ids]
    assert all(entry["status"]["status_str"] == "success" for entry in entries)
    saved = sorted(p.name for p in (tmp_path / "output").iterdir())
    assert saved == [f"restart_{n:05}_.png" for n in range(1, 4)]
