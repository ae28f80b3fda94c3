"""Issue 18, files: writes into the output folder are atomic (a hidden part file, then a rename), so a process
killed mid-write leaves nothing visible and the re-run writes the only copy; part files are cleared later. A server
killed after SaveImage wrote its file but before the prompt finished re-runs the prompt under the same names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from latentloom.engine.files import atomic_writer, is_part_name, remove_stale_parts, write_atomically
from latentloom.nodes.image_files import numbering_outputs, save_images, save_target
from latentloom.server.outputs_commit import next_counter
from latentloom.server.queue_store import PromptOutputNumbering, QueueItem, QueueStore
from tests.server_support import free_port, make_app, wait_for

REPO = Path(__file__).resolve().parents[1]
# SaveImage's own write path (nodes.image_files.save_images) on a large noisy image: slow enough to be killed.
SLOW_SAVE = """
import sys
import torch
from pathlib import Path
from latentloom.nodes.image_files import save_images

size = int(sys.argv[2])
images = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
print(save_images(images, Path(sys.argv[1]), "crash", "output", 9, None), flush=True)
"""

# A server (the test nodes and the image nodes) whose queue lives in a file, for kill -9 and restart.
IMAGE_SERVER = """
import sys
from pathlib import Path
import uvicorn
from latentloom.engine.api import Engine
from latentloom.engine.registry import NodeRegistry
from latentloom.nodes import image
from latentloom.server.app import create_app
from latentloom.server.state import ServerConfig
from tests.server_support import TEST_NODES, make_engine

port, root = int(sys.argv[1]), Path(sys.argv[2])
engine = Engine(NodeRegistry([*TEST_NODES, *image.NODES]), make_engine(root).env)
app = create_app(engine, ServerConfig(user_dir=root / "user", database=root / "queue.db"))
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "a.png"
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("disk on fire")
    assert list((tmp_path / "out").iterdir()) == []
    write_atomically(target, b"whole")
    write_atomically(target, b"again")  # replaces in one step
    assert target.read_bytes() == b"again" and os.listdir(target.parent) == ["a.png"]


def test_part_files_of_the_longest_names_fit(tmp_path):
    name = "é" * 120 + ".png"  # 244 bytes: the part file must still fit in 255
    write_atomically(tmp_path / name, b"x")
    assert visible(tmp_path) == [name]


def test_stale_parts_are_removed_but_recent_ones_kept(tmp_path):
    old = tmp_path / "sub" / ".img_00001_.png.0123abcd.part"
    old.parent.mkdir()
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    recent = tmp_path / ".img_00002_.png.89abcdef.part"
    recent.write_bytes(b"in flight")
    keep = tmp_path / ".hidden_but_mine"
    keep.write_bytes(b"not ours")
    assert remove_stale_parts(tmp_path) == 1
    assert not old.exists() and recent.exists() and keep.exists()
    assert is_part_name(recent.name) and not is_part_name(keep.name)



def test_custom_node_packs_save_models_atomically(tmp_path):
    """comfy.utils.save_torch_file (what packs' model and LoRA save nodes call) writes through our part files, as
    our own writers do: a failed save leaves the previous file whole and nothing else, and a reader of the old
    file keeps it. (Recent safetensors' own save_file renames a temporary file too, but under a name that /view
    and the stale-part clean-up do not know as unfinished.)"""
    from safetensors.torch import load_file

    from latentloom.nodes.comfy_compat.comfy.utils import load_torch_file, save_torch_file

    target = tmp_path / "loras" / "pack_lora.safetensors"
    save_torch_file({"a": torch.arange(6.0).reshape(2, 3)}, str(target), metadata={"by": "pack"})
    first = target.read_bytes()
    with pytest.raises(NotImplementedError):  # the second tensor cannot be copied out: the save fails midway
        save_torch_file({"a": torch.ones(2, 3), "b": torch.empty(4, device="meta")}, str(target))
    assert target.read_bytes() == first and os.listdir(target.parent) == [target.name]
    with open(target, "rb") as old_reader:
        save_torch_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)[::2]}, str(target))
        assert old_reader.read() == first
    assert os.listdir(target.parent) == [target.name]
    loaded = load_file(str(target))
    assert torch.equal(loaded["a"], torch.ones(2, 3)) and torch.equal(loaded["b"], torch.zeros(2, dtype=torch.float16))
    state, metadata = load_torch_file(str(target), return_metadata=True)
    assert set(state) == {"a", "b"} and metadata is None


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_during_save_image_leaves_no_partial_png_and_the_rerun_one_copy(tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(output), "3000"], env=env,
                               stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        part = None
        while part is None and time.monotonic() < deadline:
            assert process.poll() is None, "the write finished before it could be interrupted"
            part = next((p for p in output.iterdir() if is_part_name(p.name) and p.stat().st_size > 0), None)
            time.sleep(0.005)
        assert part is not None, "no write was seen in progress"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert visible(output) == []  # the killed write is not in sight
    assert next_counter(output, "crash") == 1  # and does not take a number
    with TestClient(make_app(tmp_path, start_worker=False)) as client:
        assert client.get("/internal/files/output").json() == []
        assert client.get("/view", params={"filename": part.name}).status_code == 404

    rerun = subprocess.run([sys.executable, "-c", SLOW_SAVE, str(output), "64"], env=env, capture_output=True,
                           timeout=120, check=True)
    assert b"crash_00001_.png" in rerun.stdout
    assert visible(output) == ["crash_00001_.png"]  # the retried save leaves exactly one copy
    with Image.open(output / "crash_00001_.png") as image:
        image.load()
        assert image.size == (64, 64)


def _save(output: Path, prefix: str, count: int) -> list[str]:
    images = torch.rand(count, 8, 8, 3, generator=torch.Generator().manual_seed(count))
    return [entry["filename"] for entry in save_images(images, output, prefix, "output", 1, None)]


def test_a_prompt_run_again_after_a_crash_saves_under_its_first_names(tmp_path):
    output, database = tmp_path / "output", tmp_path / "queue.db"
    store = QueueStore(database)
    store.put(QueueItem(store.next_number(False), "p1", {}, {}, []))
    first = store.take_next()
    with numbering_outputs(PromptOutputNumbering(store, first.prompt_id)):
        assert _save(output, "img", 2) == ["img_00001_.png", "img_00002_.png"]
        assert _save(output, "img", 1) == ["img_00003_.png"]
        assert save_target(output, "held", files=2).counter == 1  # claimed, the crash comes before the write
    store.close()  # killed here: p1 never finished

    store = QueueStore(database)
    store.put(QueueItem(store.next_number(True), "front", {}, {}, []))  # queued ahead of the re-run
    front = store.take_next()
    with numbering_outputs(PromptOutputNumbering(store, front.prompt_id)):
        assert _save(output, "img", 1) == ["img_00004_.png"]
        assert save_target(output, "held").counter == 3  # 1 and 2 stay p1's
    store.finish(front, {}, "completed")
    rerun = store.take_next()
    assert rerun.prompt_id == "p1"
    with numbering_outputs(PromptOutputNumbering(store, rerun.prompt_id)):
        assert _save(output, "img", 2) == ["img_00001_.png", "img_00002_.png"]  # replaced, not counted up
        assert _save(output, "img", 1) == ["img_00003_.png"]
        assert save_target(output, "held", files=2).counter == 1
    assert visible(output) == [f"img_{n:05}_.png" for n in range(1, 5)]
    store.finish(rerun, {}, "completed")  # a finished prompt holds no numbers: a new run counts on
    store.put(QueueItem(store.next_number(False), "p1", {}, {}, []))  # even under a reused prompt id
    again = store.take_next()
    with numbering_outputs(PromptOutputNumbering(store, again.prompt_id)):
        assert _save(output, "img", 1) == ["img_00005_.png"]
        assert save_target(output, "held").counter == 1
    store.close()
    assert _save(output, "img", 1) == ["img_00006_.png"]  # outside a queued run (headless `run`): plain rule


def _start_image_server(port: int, root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", IMAGE_SERVER, str(port), str(root)], cwd=REPO, env=env)

    def up():
        assert process.poll() is None, "server process exited"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/prompt", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=90, interval=0.1)
    return process


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_after_save_image_and_before_the_prompt_ends_leaves_one_copy(tmp_path):
    port, output = free_port(), tmp_path / "output"
    base = f"http://127.0.0.1:{port}"
    # SaveImage runs first (the executor's order for these ids); Steps is still stepping when the server is killed.
    graph = {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
             "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": 150, "pause": 0.02}},
             "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}},
             "4": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 2,
                                                          "color": 0x3366CC}},
             "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "kept"}}}
    names = ["kept_00001_.png", "kept_00002_.png"]
    process = _start_image_server(port, tmp_path)
    try:
        prompt_id = httpx.post(f"{base}/prompt", json={"prompt": graph}).json()["prompt_id"]
        wait_for(lambda: visible(output) == names, timeout=60, interval=0.005)
        assert httpx.get(f"{base}/queue").json()["queue_running"][0][1] == prompt_id  # not finished yet
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert visible(output) == names
    first_bytes = (output / names[0]).read_bytes()

    process = _start_image_server(port, tmp_path)
    try:
        entry = wait_for(lambda: httpx.get(f"{base}/history/{prompt_id}").json(), timeout=60)[prompt_id]
        assert entry["status"]["status_str"] == "success"
        assert visible(output) == names  # the re-run replaced its files instead of writing kept_00003_/4
        assert entry["outputs"]["5"]["images"] == [{"filename": n, "subfolder": "", "type": "output"} for n in names]
        served = httpx.get(f"{base}/view", params={"filename": names[0], "type": "output"})
        assert served.status_code == 200 and served.content == (output / names[0]).read_bytes() == first_bytes
        listed = httpx.get(f"{base}/history").json()[prompt_id]["outputs"]["5"]["images"]
        assert [image["filename"] for image in listed] == names
        # The finished prompt holds no numbers: the next one counts on after the files.
        other = {"4": {**graph["4"], "inputs": {**graph["4"]["inputs"], "color": 0}}, "5": graph["5"]}
        second = httpx.post(f"{base}/prompt", json={"prompt": other}).json()
        entry = wait_for(lambda: httpx.get(f"{base}/history/{second['prompt_id']}").json(), timeout=30)
        assert [i["filename"] for i in entry[second["prompt_id"]]["outputs"]["5"]["images"]] == \
            ["kept_00003_.png", "kept_00004_.png"]
    finally:
        process.terminate()
        process.wait(10)
