"""Queue semantics (priority by number/front, delete/clear, interrupt scope) and persistence: SQLite queue and
history survive a restart, even kill -9 mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from latentloom.server import queue_store
from latentloom.server.queue_store import QueueItem, QueueStore
from tests.server_support import const_graph, free_port, live_server, make_app, steps_graph, wait_for

REPO = Path(__file__).resolve().parent.parent


def test_priority_order_front_and_number(tmp_path):
    app = make_app(tmp_path, start_worker=False)
    with TestClient(app) as client:
        def submit(value, **extra):
            response = client.post("/prompt", json={"prompt": const_graph(value), **extra})
            assert response.status_code == 200
            return response.json()

        a = submit(1.0)
        b = submit(2.0)
        c = submit(3.0, front=True)
        d = submit(4.0, front=True)
        e = submit(5.0, number=0.5)
        assert [x["number"] for x in (a, b, c, d, e)] == [0, 1, -2, -3, 0.5]
        expected = [d["prompt_id"], c["prompt_id"], a["prompt_id"], e["prompt_id"], b["prompt_id"]]
        pending = client.get("/queue").json()["queue_pending"]
        assert [item[1] for item in pending] == expected
        assert client.get("/prompt").json()["exec_info"]["queue_remaining"] == 5
        app.state.server.worker.start()
        wait_for(lambda: len(client.get("/history").json()) == 5)
        assert list(client.get("/history").json()) == expected


def test_delete_and_clear_touch_only_pending(tmp_path):
    with TestClient(make_app(tmp_path)) as client:
        running = client.post("/prompt", json={"prompt": steps_graph(steps=100, pause=0.02)}).json()["prompt_id"]
        waiting = [client.post("/prompt", json={"prompt": const_graph(float(i))}).json()["prompt_id"]
                   for i in range(3)]
        wait_for(lambda: client.get("/queue").json()["queue_running"])
        client.post("/queue", json={"delete": [running, waiting[0]]})
        queue = client.get("/queue").json()
        assert queue["queue_running"][0][1] == running
        assert [i[1] for i in queue["queue_pending"]] == waiting[1:]
        client.post("/queue", json={"clear": True})
        assert client.get("/queue").json()["queue_pending"] == []
        client.post("/interrupt")
        wait_for(lambda: client.get(f"/history/{running}").json())
        assert all(client.get(f"/history/{w}").json() == {} for w in waiting)


def test_idle_interrupt_does_not_affect_the_next_prompt(tmp_path):
    with TestClient(make_app(tmp_path)) as client:
        client.post("/interrupt")
        prompt_id = client.post("/prompt", json={"prompt": steps_graph(steps=3)}).json()["prompt_id"]
        entry = wait_for(lambda: client.get(f"/history/{prompt_id}").json())[prompt_id]
        assert entry["status"]["status_str"] == "success"


def test_store_reopen_requeues_running_and_keeps_history(tmp_path):
    path = tmp_path / "q.db"
    store = QueueStore(path)
    for index in range(3):
        store.put(QueueItem(store.next_number(False), f"p{index}", {"n": index}, {"client_id": "c"}, ["1"]))
    done = store.take_next()
    store.finish(done, {"prompt": done.as_tuple(), "outputs": {}}, "completed")
    running = store.take_next()
    assert running.prompt_id == "p1" and store.counts() == (1, 1)
    store.close()  # as if the process died here

    reopened = QueueStore(path)
    assert reopened.counts() == (2, 0)
    assert [i.prompt_id for i in reopened.items("pending")] == ["p1", "p2"]
    assert list(reopened.history()) == ["p0"]
    assert reopened.next_number(False) == 3  # the counter survives too
    reopened.close()


def test_history_retention_drops_the_oldest(tmp_path, monkeypatch):
    monkeypatch.setattr(queue_store, "HISTORY_LIMIT", 3)
    store = QueueStore(tmp_path / "q.db")
    for index in range(5):
        store.put(QueueItem(index, f"p{index}", {}, {}, []))
        store.finish(store.take_next(), {"n": index}, "completed")
    assert list(store.history()) == ["p2", "p3", "p4"]
    store.close()


def _start_server(port: int, database: Path, root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "tests.server_support", str(port), str(database), str(root)],
                               cwd=REPO, env=env)

    def up():
        if process.poll() is not None:
            raise AssertionError("server process exited")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/prompt", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=60, interval=0.1)
    return process


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_then_restart_runs_pending_and_keeps_history(tmp_path):
    port, database = free_port(), tmp_path / "queue.db"
    base = f"http://127.0.0.1:{port}"
    process = _start_server(port, database, tmp_path)
    try:
        first = httpx.post(f"{base}/prompt", json={"prompt": const_graph(1.0)}).json()["prompt_id"]
        wait_for(lambda: httpx.get(f"{base}/history/{first}").json())
        slow = httpx.post(f"{base}/prompt", json={"prompt": steps_graph(steps=300, pause=0.02)}).json()
        pending = [httpx.post(f"{base}/prompt", json={"prompt": const_graph(float(10 + i))}).json()["prompt_id"]
                   for i in range(3)]
        wait_for(lambda: httpx.get(f"{base}/queue").json()["queue_running"])
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    process = _start_server(port, database, tmp_path)
    try:
        history = httpx.get(f"{base}/history").json()
        assert first in history and history[first]["outputs"] == {"3": {"values": [1.0]}}
        # The killed prompt runs again (it was not finished); interrupt it to keep the test short.
        wait_for(lambda: httpx.get(f"{base}/queue").json()["queue_running"])
        assert httpx.get(f"{base}/queue").json()["queue_running"][0][1] == slow["prompt_id"]
        httpx.post(f"{base}/interrupt", json={"prompt_id": slow["prompt_id"]})
        wait_for(lambda: all(httpx.get(f"{base}/history/{p}").json() for p in pending), timeout=30)
        history = httpx.get(f"{base}/history").json()
        assert list(history)[-3:] == pending
        assert [history[p]["outputs"]["3"]["values"][0] for p in pending] == [10.0, 11.0, 12.0]
        later = httpx.post(f"{base}/prompt", json={"prompt": const_graph(2.0)}).json()
        assert later["number"] > slow["number"]
    finally:
        process.terminate()
        process.wait(10)


def test_deferred_app_listens_first_and_holds_requests_until_the_engine_is_ready(tmp_path):
    import threading
    import time

    from latentloom.server.app import DeferredApp

    release = threading.Event()

    def build():
        release.wait(10)  # stands in for importing the node modules
        return make_app(tmp_path)

    with live_server(DeferredApp(build)) as base:
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(httpx.get(f"{base}/prompt", timeout=20)))
        waiting.start()
        time.sleep(0.3)
        assert not answers  # held, not refused
        release.set()
        waiting.join(20)
        assert answers[0].json() == {"exec_info": {"queue_remaining": 0}}

    def broken():
        raise RuntimeError("no such models dir")

    with live_server(DeferredApp(broken)) as base:
        response = httpx.get(f"{base}/prompt", timeout=20)
        assert response.status_code == 503 and "no such models dir" in response.json()["error"]


def test_config_from_cli_arguments(tmp_path):
    from latentloom.server.app import config_from_args
    from latentloom.server.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "9000", "--user-dir", str(tmp_path / "u"),
                                      "--auth-token", "tok"])
    config = config_from_args(args)
    assert (config.port, config.auth_token, config.database_path) == (9000, "tok", tmp_path / "u" / "queue.db")
    args.allowed_hosts, args.max_upload_size = "a.lan, b.lan", 2
    config = config_from_args(args)
    assert config.allowed_hosts == ("a.lan", "b.lan") and config.max_upload_bytes == 2 * 1024 * 1024
