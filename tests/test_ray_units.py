"""The Ray mode's parts that need no cluster: the worker actor's body run in-process, the server-side output commit
(renumbering, atomic writes, retry deduplication, cached events), model tokens and routing; and local mode left
untouched (no Ray import, checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentloom.server.outputs_commit import OutputCommitter, next_counter
from latentloom.server.ray_pool import EngineFactory, EngineWorker, model_tokens_from_keys
from tests.ray_support import image_graph, loader_graph

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG fake"


# The actor body, in-process -----------------------------------------------------------------------------------

@pytest.fixture()
def worker(tmp_path):
    body = EngineWorker(EngineFactory("tests.ray_support:make_engine", {"root": str(tmp_path)}), torch_threads=1)
    yield body
    body.close()


def run_all(worker: EngineWorker, prompt_id: str, graph: dict) -> list:
    messages = []
    for batch in worker.run(prompt_id, graph, [], {}):
        assert batch, "no empty batches"
        messages.extend(batch)
    return messages


def test_worker_streams_events_then_result_and_ships_its_files(worker, tmp_path):
    messages = run_all(worker, "p1", image_graph(0.5, steps=3, pause=0.0, prefix="w"))
    kinds = [m[0] for m in messages]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    events = [m[1].type for m in messages if m[0] != "result"]
    assert events[0] == "execution_start" and events[-1] == "execution_success"
    assert events.count("progress") == 3
    executed = next(m for m in messages if m[0] == "executed")
    assert executed[1].output == {"images": [{"filename": "w_00001_.png", "subfolder": "", "type": "output"}]}
    (key, data), = executed[2].items()
    assert key == ("output", "", "w_00001_.png") and data.startswith(b"\x89PNG")
    result = messages[-1][1]
    assert result["status"] == "success" and result["outputs"] == {"4": executed[1].output}
    # The engine wrote into the actor's staging folder only; the shipped file stays as an empty placeholder.
    assert list((tmp_path / "output").iterdir()) == []
    assert (worker.staging / "output" / "w_00001_.png").stat().st_size == 0
    # Run again: served from the cache, same staged name, nothing shipped twice.
    again = run_all(worker, "p2", image_graph(0.5, steps=3, pause=0.0, prefix="w"))
    cached = next(m for m in again if m[0] == "executed")
    assert cached[1].output == executed[1].output and cached[2] == {}
    # A new image continues the actor's own counter, so staged names never repeat.
    third = run_all(worker, "p3", image_graph(0.7, steps=1, pause=0.0, prefix="w"))
    assert next(m for m in third if m[0] == "executed")[1].output["images"][0]["filename"] == "w_00002_.png"


def test_worker_interrupt_before_start_and_invalid_prompt(worker):
    worker.interrupt("early")
    result = run_all(worker, "early", image_graph(steps=50, pause=0.01))[-1][1]
    assert result["status"] == "interrupted"
    result = run_all(worker, "bad", {"1": {"class_type": "Const", "inputs": {"value": "x"}},
                                     "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}})[-1][1]
    assert result["status"] == "invalid" and "Const" in result["error"]["exception_message"]
    assert run_all(worker, "after", image_graph(steps=1, pause=0.0))[-1][1]["status"] == "success"


def test_worker_reports_the_model_files_it_holds(worker, tmp_path):
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "m.safetensors").write_bytes(b"x" * 123)
    result = run_all(worker, "load", loader_graph("m.safetensors"))[-1][1]
    stat = (folder / "m.safetensors").stat()
    assert result["status"] == "success"
    assert result["models"] == [("m.safetensors", 123, stat.st_mtime_ns)]
    worker.free(unload_models=True, free_memory=False)
    assert worker.loaded_models() == []


def test_model_tokens_from_manager_keys():
    keys = [("checkpoint", "/m/a.safetensors", 10, 99), ("dual_clip", "/m/c1.st", 1, 2, "/m/c2.st", 3, 4, "sdxl"),
            ("other", "not-a-path", 1, 2), "plain"]
    assert model_tokens_from_keys(keys) == {("a.safetensors", 10, 99), ("c1.st", 1, 2), ("c2.st", 3, 4)}


# Output commit --------------------------------------------------------------------------------------------------

def ui(*names: str, kind: str = "output", subfolder: str = "") -> dict:
    return {"images": [{"filename": n, "subfolder": subfolder, "type": kind} for n in names]}


def test_commit_numbers_after_existing_files_and_keeps_batches_consecutive(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    (out / "img_00007_.png").write_bytes(b"old")
    committer = OutputCommitter({"output": out, "temp": tmp_path / "temp"})
    files = {("output", "", "img_00001_.png"): PNG + b"1", ("output", "", "img_00002_.png"): PNG + b"2"}
    renamed = committer.commit("w1", "p", "9", ui("img_00001_.png", "img_00002_.png"), files)
    assert renamed == ui("img_00008_.png", "img_00009_.png")
    assert (out / "img_00008_.png").read_bytes() == PNG + b"1" and (out / "img_00009_.png").read_bytes() == PNG + b"2"
    assert (out / "img_00007_.png").read_bytes() == b"old"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no part files left
    assert next_counter(out, "img") == 10


def test_commit_retry_reuses_names_and_cached_events_map_back(tmp_path):
    out, temp = tmp_path / "output", tmp_path / "temp"
    committer = OutputCommitter({"output": out, "temp": temp})
    first = committer.commit("w1", "p", "4", ui("x_00001_.png"), {("output", "", "x_00001_.png"): b"attempt 1"})
    # The worker died; the retry on another worker (its own staged counter) lands on the same name.
    retry = committer.commit("w2", "p", "4", ui("x_00005_.png"), {("output", "", "x_00005_.png"): b"attempt 2"})
    assert first == retry == ui("x_00001_.png")
    assert sorted(p.name for p in out.iterdir()) == ["x_00001_.png"]
    assert (out / "x_00001_.png").read_bytes() == b"attempt 2"
    # History rewrite and a later cached `executed` of w2 (no bytes) give the committed name.
    assert committer.rewrite("w2", "p", "4", ui("x_00005_.png")) == ui("x_00001_.png")
    committer.forget_prompt("p")
    assert committer.commit("w2", "q", "4", ui("x_00005_.png"), {}) == ui("x_00001_.png")
    # A different prompt with new bytes takes the next counter; an unknown cached name is left as it is.
    assert committer.commit("w1", "r", "4", ui("x_00002_.png"), {("output", "", "x_00002_.png"): b"r"}) \
        == ui("x_00002_.png")
    assert committer.commit("w3", "s", "4", ui("x_00009_.png"), {}) == ui("x_00009_.png")


def test_commit_temp_files_subfolders_and_plain_names(tmp_path):
    committer = OutputCommitter({"output": tmp_path / "output", "temp": tmp_path / "temp"})
    preview = committer.commit("w", "p", "2", ui("ComfyUI_temp_abcde_00001_.png", kind="temp"),
                               {("temp", "", "ComfyUI_temp_abcde_00001_.png"): b"t"})
    assert preview == ui("ComfyUI_temp_abcde_00001_.png", kind="temp")
    assert (tmp_path / "temp" / "ComfyUI_temp_abcde_00001_.png").read_bytes() == b"t"
    nested = committer.commit("w", "p", "3", ui("a_00001_.png", subfolder="run/1"),
                              {("output", "run/1", "a_00001_.png"): b"n"})
    assert nested == ui("a_00001_.png", subfolder="run/1")
    plain = committer.commit("w", "p", "5", {"text": ["hi"], **ui("notes.txt")}, {("output", "", "notes.txt"): b"z"})
    assert plain == {"text": ["hi"], **ui("notes.txt")}
    with pytest.raises(ValueError, match="outside"):
        committer.commit("w", "p", "6", ui("e_00001_.png", subfolder="../.."),
                         {("output", "../..", "e_00001_.png"): b"e"})


# Local mode -----------------------------------------------------------------------------------------------------

LOCAL_MODE_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
from starlette.testclient import TestClient
from latentloom.server.app import config_from_args
from latentloom.server.cli import build_parser
from tests.server_support import const_graph, make_app, wait_for
root = Path(tempfile.mkdtemp())
config = config_from_args(build_parser().parse_args(["serve"]))
app = make_app(root)
with TestClient(app) as client:
    prompt_id = client.post("/prompt", json={"prompt": const_graph(2.0)}).json()["prompt_id"]
    entry = wait_for(lambda: client.get(f"/history/{prompt_id}").json().get(prompt_id))
print(json.dumps({"workers": config.workers, "status": entry["status"]["status_str"],
                  "worker": type(app.state.server.worker).__name__, "ray": "ray" in sys.modules}))
"""


@pytest.mark.slow
def test_local_mode_does_not_import_ray():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LOCAL_MODE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"workers": "local", "status": "success", "worker": "Worker", "ray": False}


def test_serve_flags_select_the_ray_pool(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'latentloom[ray]')")
    from latentloom.server.app import config_from_args
    from latentloom.server.cli import build_parser

    args = build_parser().parse_args(["serve", "--workers", "ray", "--ray-address", "auto", "--num-workers", "3",
                                      "--models-dir", "models", "--output-dir", "out"])
    config = config_from_args(args)
    assert config.workers == "ray"
    options = config.worker_options
    assert (options.address, options.num_workers) == ("auto", 3)
    # The workers import the factory by name: it must be the installed package's (a bare "nodes" would find
    # nothing in a worker, or a pack's / the source folder's module of that name).
    import importlib

    from latentloom.nodes import create_engine

    module, _, attribute = options.engine.target.partition(":")
    assert getattr(importlib.import_module(module), attribute) is create_engine
    # What a worker does with it: build the engine the flags describe.
    flags = ["serve", "--workers", "ray", "--models-dir", str(tmp_path / "models"),
             "--output-dir", str(tmp_path / "out"), "--input-dir", str(tmp_path / "in")]
    worker_engine = config_from_args(build_parser().parse_args(flags)).worker_options.engine()
    assert "KSampler" in worker_engine.catalogue()
    assert options.engine.kwargs["output_dir"] == str(Path("out").resolve())
    assert options.engine.kwargs["models_dir"] == str(Path("models").resolve())


def test_routing_prefers_loaded_models_then_the_least_loaded(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'latentloom[ray]')")
    from latentloom.server.dispatch import WorkerSlot, choose_worker, prompt_model_tokens
    from tests.ray_support import make_engine

    env = make_engine(tmp_path).env
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"a" * 10)
    (folder / "b.ckpt").write_bytes(b"b" * 20)
    prompt = {**loader_graph("a.safetensors"), "9": {"class_type": "TinyLoader", "inputs": {"ckpt_name": "b.ckpt"}},
              "8": {"class_type": "Pick", "inputs": {"choice": "red", "flag": False}}}
    tokens = prompt_model_tokens(env, prompt)
    a, b = (("a.safetensors", 10, (folder / "a.safetensors").stat().st_mtime_ns),
            ("b.ckpt", 20, (folder / "b.ckpt").stat().st_mtime_ns))
    assert tokens == {a, b}
    holds_a = WorkerSlot(1, None, None, models={a}, prompts_run=5)
    holds_both = WorkerSlot(2, None, None, models={a, b}, prompts_run=9)
    empty = WorkerSlot(3, None, None, prompts_run=7)
    fresh = WorkerSlot(4, None, None, prompts_run=1)
    assert choose_worker([holds_a, holds_both, empty], tokens) is holds_both
    assert choose_worker([holds_a, empty], {b}) is empty        # no affinity: the one holding fewer models
    assert choose_worker([empty, fresh, holds_a], set()) is fresh  # then the one that ran fewer prompts
    # A file replaced in place (new size) is another model: no affinity to the old one.
    (folder / "a.safetensors").write_bytes(b"a" * 11)
    assert a not in prompt_model_tokens(env, prompt)
